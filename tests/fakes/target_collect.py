"""A fake Singer target: appends records to OUT, prints each STATE it takes as confirmed."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

KEEP = ("FLEXT_", "MELTANO_RUN_ID", "TRACEPARENT", "OPENLINEAGE", "DBT_ENV_CUSTOM_ENV_")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--exit-after", type=int, default=None, help="exit 5 after N records")
    parser.add_argument("--exit-zero-after", type=int, default=None)
    parser.add_argument("--fail-at-end", action="store_true")
    parser.add_argument("--confirm-at-end", action="store_true", help="print only the last STATE")
    parser.add_argument("--slow", type=float, default=0.0, help="seconds per record")
    parser.add_argument("--pid-dir", type=Path, default=None)
    parser.add_argument("--env-out", type=Path, default=None)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    if args.pid_dir is not None:
        (args.pid_dir / f"target-{os.getpid()}.pid").write_text(str(os.getpid()))
    if args.env_out is not None:
        seen = {k: v for k, v in os.environ.items() if k.startswith(KEEP)}
        args.env_out.write_text(json.dumps({"argv": sys.argv[1:], "env": seen}))
    pending: object = None

    def confirm(value: object) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    def on_term(_signum: int, _frame: object) -> None:
        if pending is not None:
            confirm(pending)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    records = lines = 0
    with args.out.open("a") as out:
        for line in sys.stdin:
            message = json.loads(line)
            lines += 1
            if message["type"] == "RECORD":
                if args.exit_after is not None and records >= args.exit_after:
                    print("target_collect: cannot write: disk full", file=sys.stderr)
                    return 5
                if args.exit_zero_after is not None and records >= args.exit_zero_after:
                    return 0
                out.write(json.dumps(message["record"]) + "\n")
                out.flush()
                records += 1
                time.sleep(args.slow)
            elif message["type"] == "STATE":
                pending = message["value"]
                if not args.confirm_at_end:
                    confirm(pending)
                    pending = None
    if args.fail_at_end:
        print("target_collect: commit failed", file=sys.stderr)
        return 1
    if pending is not None:
        confirm(pending)
    # As the SDK counts: every message read, not only the records (singer_sdk plugin_base.py).
    print(
        f"INFO Reader 'stdin' completed processing {lines} lines of input ({records} records)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
