"""A fake file target that loses records: writes each stream to OUT/<stream>.jsonl but the ids
given with `--drop STREAM:ID`, confirms the last STATE and exits 0, as a lossy target would.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--drop", action="append", default=[])
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    drop = {tuple(item.rsplit(":", 1)) for item in args.drop}
    args.out.mkdir(parents=True, exist_ok=True)
    state = None
    lines = 0
    for line in sys.stdin:
        lines += 1
        message = json.loads(line)
        if message["type"] == "RECORD":
            record = message["record"]
            if (message["stream"], str(record.get("id"))) in drop:
                continue
            with (args.out / f"{message['stream']}.jsonl").open("a") as out:
                out.write(json.dumps(record) + "\n")
        elif message["type"] == "STATE":
            state = message["value"]
    if state is not None:
        print(json.dumps(state), flush=True)
    print(f"INFO Reader 'stdin' completed processing {lines} lines of input", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
