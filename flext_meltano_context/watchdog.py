"""Run by `children.Watchdog` as a script: kill a run's process groups if the run dies.

Reads `+PGID` / `-PGID` lines on stdin; on `done` it exits quietly. When stdin ends without
`done` (flext-context was killed, SIGKILL included), every group still listed gets SIGKILL, so
no tap, target or dbt outlives the run. Standard library only: it starts with `python -I -S`.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    """Follow the run's groups until `done`, or kill them all at end of input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the run, not us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if line == b"done":
            return
        if line[:1] in (b"+", b"-") and line[1:].isdigit():
            pgid = int(line[1:])
            if line[:1] == b"+":
                groups.add(pgid)
            else:
                groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


if __name__ == "__main__":
    main()
