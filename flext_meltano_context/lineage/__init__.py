"""The lineage of runs: the hash-chained log, reports on it, CI gates and OpenLineage events.

`Recorder` is what the pipeline writes with; `LineageLog`/`verify` are the file, `pg` the
PostgreSQL store, `store` the interface both share and `push` the spool into a store;
`report` builds one run's report; `render` turns it into Markdown or HTML, `runs_html` renders
the overview of many runs; `openlineage` maps a run to RunEvents.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flext_meltano_context.lineage.log import LineageLog, VerifyResult, verify
from flext_meltano_context.lineage.recorder import Recorder

__all__ = ["LineageLog", "Recorder", "VerifyResult", "default_log_path", "verify"]


def default_log_path(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """Where the local lineage log lives.

    `$FLEXT_CONTEXT_LINEAGE_PATH`, else `$MELTANO_PROJECT_ROOT/.meltano/flext-context/lineage.jsonl`
    under Meltano (in `$MELTANO_SYS_DIR_ROOT` when Meltano names it), else
    `./.flext-context/lineage.jsonl`. When the setting names a store (`postgresql://...` or
    `systemdb`), the local log is the store's spool at the default place; a `systemdb` that is
    not PostgreSQL is a UsageError here, before anything starts.
    """
    from flext_meltano_context.lineage.store import is_store_location, store_url

    env = os.environ if environ is None else environ
    setting = env.get("FLEXT_CONTEXT_LINEAGE_PATH", "")
    if is_store_location(setting):
        store_url(setting, env)  # fail early on a systemdb that is not PostgreSQL
    elif setting:
        return Path(setting).expanduser()
    base = cwd or Path.cwd()
    if env.get("MELTANO_PROJECT_ROOT"):
        root = Path(env["MELTANO_PROJECT_ROOT"])
        sys_dir = Path(env.get("MELTANO_SYS_DIR_ROOT") or root / ".meltano")
        return (root / sys_dir) / "flext-context" / "lineage.jsonl"
    return base / ".flext-context" / "lineage.jsonl"
