"""How a run stops: SIGINT/SIGTERM, a target that exits early, and the grace a child gets.

A first signal stops the tap and lets the target confirm its state (or stops the running
transformer block); a second one kills at once. A stopped child gets `grace` seconds to finish
cleanly before it is killed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context.errors import AbortedError

if TYPE_CHECKING:
    from flext_meltano_context.children import Exit
    from taps_wrapper.tap import Tap
    from targets_wrapper.target import Target

log = structlog.get_logger("flext_meltano_context.stopping")


class Stopper:
    """SIGINT/SIGTERM: first a graceful stop (tap first), a second signal kills everything."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.signum: int | None = None
        self.hard = False
        self.tap: Tap | None = None
        self.target: Target | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; embedders handle signals themselves
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            self.hard = True
            for child in (self.tap, self.target):
                if child is not None:
                    child.child.signal(signal.SIGKILL)
            return
        self.signum = signum
        if self.tap is None:
            raise AbortedError(
                signum, f"stopped by {signal.Signals(signum).name} before the run began"
            )
        print(  # noqa: T201 - a direct line to the user at the terminal, not a log event
            f"flext-context: {signal.Signals(signum).name}: stopping the tap, letting the target "
            "confirm its state; send again to stop at once",
            file=sys.stderr,
        )
        self.tap.child.signal(signal.SIGTERM)
        tap = self.tap
        threading.Thread(target=_kill_after, args=(tap, self.grace), daemon=True).start()


def _kill_after(tap: Tap, grace: float) -> None:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if tap.child.poll() is not None:
            return
        time.sleep(0.05)
    tap.child.signal(signal.SIGKILL)


def watch_target(target: Target, tap: Tap, relay_done: threading.Event, grace: float) -> None:
    """When the target exits while the tap still streams, stop the tap (it cannot be heard)."""

    def watch() -> None:
        target.child.proc.wait()
        if not relay_done.is_set():
            log.warning("target_exited_early", target=target.name, stopping=tap.name)
            tap.child.stop(grace)

    threading.Thread(target=watch, name="target-watch", daemon=True).start()


def wait_target(target: Target, stopper: Stopper, grace: float) -> Exit:
    """Wait for the target; after a signal it gets `grace` seconds to confirm, then is stopped."""
    while True:
        try:
            timeout = grace if stopper.signum is not None else 0.2
            return target.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if stopper.signum is not None:
                target.child.stop(grace)


def stop_block(child: Any, stopper: Stopper, signum: int) -> None:
    """A signal while a transformer block runs: the first stops the block, a second kills it."""
    if stopper.signum is None:
        stopper.signum = signum
        child.signal(signal.SIGTERM)
    else:
        child.signal(signal.SIGKILL)
