"""A dbt-like transformer block that ignores SIGTERM: only SIGKILL ends it (fault injection)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid_dir = Path(sys.argv[1])
    (pid_dir / f"block-{os.getpid()}.pid").write_text(str(os.getpid()))
    print("block_stubborn: running", flush=True)
    deadline = time.monotonic() + 120  # never outlives a broken test by long
    while time.monotonic() < deadline:
        time.sleep(0.1)
