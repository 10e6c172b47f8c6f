"""A fake target that reads exactly N lines (one byte at a time, no read-ahead), then exits CODE.

With `--lines -1` it reads everything in blocks and confirms the last STATE: the passing control.
Reading byte by byte leaves every later byte in the pipe, so what it never read is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def read_lines(limit: int, confirm: bool) -> None:
    """Read `limit` whole lines from fd 0 without taking a byte more; confirm STATEs if asked."""
    line = bytearray()
    seen = 0
    while seen < limit:
        byte = os.read(0, 1)
        if not byte:
            return
        line += byte
        if byte == b"\n":
            seen += 1
            message = json.loads(line)
            if confirm and message["type"] == "STATE":
                sys.stdout.write(json.dumps(message["value"]) + "\n")
                sys.stdout.flush()
            line.clear()


def read_all() -> bytes | None:
    """Read to the end of input; the last STATE line, if any."""
    tail, last = b"", None
    while block := os.read(0, 1 << 16):
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if line.startswith((b'{"type": "STATE"', b'{"type":"STATE"')):
                last = line
    return last


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=-1)
    parser.add_argument("--code", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before reading")
    parser.add_argument("--pid-dir", type=Path, default=None)
    parser.add_argument("--confirm-states", action="store_true", help="print each STATE read")
    args = parser.parse_args()
    if args.pid_dir is not None:
        (args.pid_dir / f"target-{os.getpid()}.pid").write_text(str(os.getpid()))
    time.sleep(args.delay)
    if args.lines >= 0:
        read_lines(args.lines, args.confirm_states)
    else:
        last = read_all()
        if last is not None:
            sys.stdout.write(json.dumps(json.loads(last)["value"]) + "\n")
    return int(args.code)


if __name__ == "__main__":
    sys.exit(main())
