#!/usr/bin/env python3
"""A null Singer target for benchmarks: reads stdin to the end, confirms the last STATE.

Reads 1 MiB blocks without parsing records, so what is measured is the pipe between tap and
target; prints the last STATE's value on stdout as real targets do.
"""

from __future__ import annotations

import json
import sys


def is_state(line: bytes) -> bool:
    """Whether `line` is a STATE message (compact or spaced JSON)."""
    return line.startswith((b'{"type":"STATE"', b'{"type": "STATE"'))


def main() -> None:
    """Drain stdin, then print the value of the last STATE line seen."""
    source = sys.stdin.buffer
    tail = b""
    last_state = None
    while block := source.read(1 << 20):
        lines = (tail + block).split(b"\n")
        tail = lines.pop()  # the unfinished last line, completed by the next block
        last_state = next((line for line in reversed(lines) if is_state(line)), last_state)
    if is_state(tail):
        last_state = tail
    if last_state is not None:
        sys.stdout.write(json.dumps(json.loads(last_state)["value"]) + "\n")


if __name__ == "__main__":
    main()
