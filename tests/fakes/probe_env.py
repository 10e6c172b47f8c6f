"""A fake transformer block: records the context variables it was given in OUT, exits CODE."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KEEP = ("FLEXT_", "MELTANO_RUN_ID", "TRACEPARENT", "OPENLINEAGE", "DBT_ENV_CUSTOM_ENV_")

if __name__ == "__main__":
    seen = {k: v for k, v in os.environ.items() if k.startswith(KEEP)}
    Path(sys.argv[1]).write_text(json.dumps({"env": seen}))
    print("probe_env: transformed", flush=True)
    sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
