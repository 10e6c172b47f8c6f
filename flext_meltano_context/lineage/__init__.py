"""The lineage of runs: the hash-chained log, reports on it, CI gates and OpenLineage events.

`Recorder` is what the pipeline writes with; `LineageLog`/`verify` are the file; `report` builds
one run's report; `render` turns it into Markdown or HTML; `openlineage` maps it to RunEvents.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flext_meltano_context.lineage.log import LineageLog, VerifyResult, verify
from flext_meltano_context.lineage.recorder import Recorder

__all__ = ["LineageLog", "Recorder", "VerifyResult", "default_log_path", "verify"]


def default_log_path(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """Where the lineage log lives.

    `$FLEXT_CONTEXT_LINEAGE_PATH`, else `$MELTANO_PROJECT_ROOT/.meltano/flext-context/lineage.jsonl`
    under Meltano (in `$MELTANO_SYS_DIR_ROOT` when Meltano names it), else
    `./.flext-context/lineage.jsonl`.
    """
    env = os.environ if environ is None else environ
    if env.get("FLEXT_CONTEXT_LINEAGE_PATH"):
        return Path(env["FLEXT_CONTEXT_LINEAGE_PATH"]).expanduser()
    base = cwd or Path.cwd()
    if env.get("MELTANO_PROJECT_ROOT"):
        root = Path(env["MELTANO_PROJECT_ROOT"])
        sys_dir = Path(env.get("MELTANO_SYS_DIR_ROOT") or root / ".meltano")
        return (root / sys_dir) / "flext-context" / "lineage.jsonl"
    return base / ".flext-context" / "lineage.jsonl"
