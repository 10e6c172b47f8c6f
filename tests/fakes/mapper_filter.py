"""A fake Singer mapper: passes every line through, keeping only every Nth RECORD (a filter)."""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep-every", type=int, default=1)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    seen = 0
    for line in sys.stdin.buffer:
        if b'"RECORD"' in line and json.loads(line).get("type") == "RECORD":
            seen += 1
            if seen % args.keep_every:
                continue
        sys.stdout.buffer.write(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
