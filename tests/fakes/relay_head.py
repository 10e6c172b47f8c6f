"""Fake target that reads N lines (default 10) from stdin, prints them, then exits 0 early."""

import sys

limit = int(sys.argv[1]) if len(sys.argv) > 1 else 10
for _ in range(limit):
    line = sys.stdin.buffer.readline()
    if not line:
        break
    sys.stdout.buffer.write(line)
sys.stdout.flush()
