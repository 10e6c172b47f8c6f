"""The target's config file: where its command line names it, and what it holds.

The landing check and the dbt lineage both read it (never logging it: it holds secrets).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def config_path_in(argv: Sequence[str]) -> Path | None:
    """The `--config FILE` (or `-c FILE`) a target command carries, the last one winning."""
    found = None
    for i, arg in enumerate(argv):
        if arg in {"--config", "-c"} and i + 1 < len(argv):
            found = Path(argv[i + 1])
        elif arg.startswith("--config="):
            found = Path(arg.split("=", 1)[1])
    return found


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; OSError or ValueError when it cannot be read as one."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data
