"""A fault-injecting Meltano helper: the real one, loaded by path, with faults around requests.

FAKE_HELPER_HANG=op[,op]: print a database error on stderr, then block (as a locked system
database blocks Meltano); `start` blocks before the ready reply. FAKE_HELPER_CRASH=op: exit 3
with a traceback line on stderr instead of answering. FAKE_HELPER_PID_DIR=dir: on a hang, write
`helper.pid` and start a child of the helper's own (as a tap's discovery under Meltano), whose
pid goes to `helper-child.pid`: a test sees the hang began and which processes must end.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REAL = Path(__file__).resolve().parents[2] / "flext_meltano_context" / "meltano_server.py"
HANG = set(os.environ.get("FAKE_HELPER_HANG", "").split(","))
CRASH = set(os.environ.get("FAKE_HELPER_CRASH", "").split(","))
PID_DIR = os.environ.get("FAKE_HELPER_PID_DIR")
LOCKED = "sqlite3.OperationalError: database is locked (postgresql://meltano:s3cret@db:5432/m)"

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def hang() -> None:
    """Block as a locked system database blocks Meltano, the pid files written first."""
    print(LOCKED, file=sys.stderr, flush=True)
    if PID_DIR:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], stdin=subprocess.DEVNULL
        )
        (Path(PID_DIR) / "helper-child.pid").write_text(str(child.pid))
        (Path(PID_DIR) / "helper.pid").write_text(str(os.getpid()))
    time.sleep(3600)


def wrap(handle: Handler) -> Handler:
    async def faulty(request: dict[str, Any]) -> Any:
        if request["op"] in CRASH:
            print(f"Traceback: {LOCKED}", file=sys.stderr, flush=True)
            os._exit(3)
        if request["op"] in HANG:
            hang()  # blocks the helper's loop, as a hung database call does
        return await handle(request)

    return faulty


if "start" in HANG:
    hang()
sys.exit(runpy.run_path(str(REAL))["main"](sys.argv, wrap=wrap))
