"""A fake Singer target that reads all input, then prints the given lines as its states."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path, help="records are appended here")
    parser.add_argument("--say", action="append", default=[], help="a state line to print")
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    with args.out.open("a") as out:
        for line in sys.stdin:
            message = json.loads(line)
            if message["type"] == "RECORD":
                out.write(json.dumps(message["record"]) + "\n")
    for said in args.say:
        sys.stdout.write(said + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
