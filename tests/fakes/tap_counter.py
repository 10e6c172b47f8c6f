"""A fake Singer tap for fault injection: counts users up from the bookmark in --state."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KEEP = {"FLEXT_", "MELTANO_RUN_ID", "TRACEPARENT", "OPENLINEAGE", "DBT_ENV_CUSTOM_ENV_"}


def emit(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--fail-after", type=int, default=None)
    parser.add_argument("--hang", action="store_true", help="after the records, wait for SIGTERM")
    parser.add_argument("--garbage-after", type=int, default=None, help="a non-JSON line")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--pid-dir", type=Path, default=None)
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--env-out", type=Path, default=None)
    parser.add_argument("--state", type=Path, default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--discover", action="store_true")
    args = parser.parse_args()
    if args.discover:
        schema = {"properties": {"id": {"type": "integer"}}}
        stream: dict[str, object] = {"tap_stream_id": "users", "stream": "users", "schema": schema}
        stream["metadata"] = [{"breadcrumb": [], "metadata": {"selected": True}}]
        print(json.dumps({"streams": [stream]}))
        return 0
    if args.env_out is not None:
        seen = {k: v for k, v in os.environ.items() if k.startswith(tuple(KEEP))}
        args.env_out.write_text(json.dumps({"argv": sys.argv[1:], "env": seen}))
    if args.pid_dir is not None:
        (args.pid_dir / f"tap-{os.getpid()}.pid").write_text(str(os.getpid()))
        if args.grandchild:
            child = subprocess.Popen(["/bin/sleep", "1000"])
            (args.pid_dir / f"grandchild-{child.pid}.pid").write_text(str(child.pid))
    start = 0
    if args.state is not None:
        state = json.loads(args.state.read_text())
        start = state.get("bookmarks", {}).get("users", {}).get("id", 0)
    last = start
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:

        def final_state(_signum: int, _frame: object) -> None:
            emit({"type": "STATE", "value": {"bookmarks": {"users": {"id": last}}}})
            sys.exit(0)

        signal.signal(signal.SIGTERM, final_state)
    emit(
        {
            "type": "SCHEMA",
            "stream": "users",
            "schema": {"properties": {"id": {"type": "integer"}}},
            "key_properties": ["id"],
        }
    )
    for n in range(start + 1, start + args.records + 1):
        if args.fail_after is not None and n - start > args.fail_after:
            print("tap_counter: boom: the source went away", file=sys.stderr)
            return 3
        emit({"type": "RECORD", "stream": "users", "record": {"id": n}})
        if args.garbage_after is not None and n - start == args.garbage_after:
            sys.stdout.write("this is not JSON\n")
        last = n
        if n % 5 == 0:
            emit({"type": "STATE", "value": {"bookmarks": {"users": {"id": n}}}})
    metric = {
        "type": "counter",
        "metric": "record_count",
        "value": last - start,
        "tags": {"stream": "users", "pid": os.getpid()},
    }
    print(
        f"2026-01-01 00:00:00,000 | INFO | singer_sdk.metrics | METRIC: {json.dumps(metric)}",
        file=sys.stderr,
    )
    emit({"type": "STATE", "value": {"bookmarks": {"users": {"id": last}}}})
    if args.hang:
        while True:
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
