#!/usr/bin/env python3
"""A Singer tap, target or dbt stand-in that records the environment it was started with.

Its role is the name it is called by (symlink it as `tap-probe`, `target-probe`, `dbt-probe`).
Each start appends `{"role", "argv", "pid", "env"}` (only FLEXT_*, MELTANO_RUN_ID, TRACEPARENT,
OPENLINEAGE_*, DBT_ENV_* variables) as one line to `$PROBE_DIR/<role>.jsonl`.
- tap: emits stream `probe` with `$PROBE_RECORDS` (default 3) records, then one STATE.
- target: reads stdin to the end, counts RECORDs, prints the last STATE value it saw (confirmed).
- dbt: does nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PREFIXES = ("FLEXT_", "OPENLINEAGE", "DBT_ENV_", "MELTANO_RUN_ID", "TRACEPARENT")
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}}}


def record_environment(role: str) -> None:
    """Append what this process saw to `$PROBE_DIR/<role>.jsonl`."""
    seen = {k: v for k, v in os.environ.items() if k.startswith(PREFIXES)}
    line = json.dumps({"role": role, "argv": sys.argv[1:], "pid": os.getpid(), "env": seen})
    with (Path(os.environ["PROBE_DIR"]) / f"{role}.jsonl").open("a", encoding="utf-8") as out:
        out.write(line + "\n")


def tap() -> None:
    """Discovery prints a catalog; a sync prints SCHEMA, records and one STATE."""
    if "--discover" in sys.argv:
        stream = {"tap_stream_id": "probe", "stream": "probe", "schema": SCHEMA, "metadata": []}
        sys.stdout.write(json.dumps({"streams": [stream]}) + "\n")
        return
    count = int(os.environ.get("PROBE_RECORDS", "3"))
    lines = [{"type": "SCHEMA", "stream": "probe", "schema": SCHEMA, "key_properties": ["id"]}]
    lines += [{"type": "RECORD", "stream": "probe", "record": {"id": i}} for i in range(count)]
    lines.append({"type": "STATE", "value": {"bookmarks": {"probe": {"id": count}}}})
    sys.stdout.write("".join(json.dumps(line) + "\n" for line in lines))


def target() -> None:
    """Read every message; confirm the last STATE by printing its value."""
    state = None
    for line in sys.stdin:
        message = json.loads(line)
        if message["type"] == "STATE":
            state = message["value"]
    if state is not None:
        sys.stdout.write(json.dumps(state) + "\n")


def main() -> None:
    """Dispatch on the name this script was called by."""
    role = Path(sys.argv[0]).name.removesuffix(".py").split("-")[0]
    if "--about" not in sys.argv:
        record_environment(role)
    {"tap": tap, "target": target}.get(role, lambda: None)()


if __name__ == "__main__":
    main()
