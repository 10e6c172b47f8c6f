"""How a run stops: signals, --timeout, a target that exits mid-stream, and one deadline.

The rules (issue 11), all measured from the first stop request (a SIGINT/SIGTERM or the timeout):
- the tap gets SIGTERM at once and SIGKILL if it has not exited within min(10 s, grace);
- the relay keeps forwarding what arrives, so the target can confirm a last state;
- at the deadline (grace seconds) forwarding stops, the target's input is closed, and the target
  and any transformer block get SIGTERM; 5 s later whatever is left gets SIGKILL;
- a second signal SIGKILLs everything at once.
So flext-context exits within grace + 5 s of the first signal, whatever is buffered. A target that
exits while the tap still streams: the tap gets SIGTERM and, at most 5 s later, SIGKILL.

`supervised()` is the one place children are started and ended: the stopper's signal handlers,
the watchdog that takes the children down if we are killed, and the cleanup that leaves no child
behind whatever happens, in one context manager.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import structlog

from flext_meltano_context.children import Child, Watchdog
from flext_meltano_context.errors import AbortedError
from taps_wrapper.tap import Tap
from targets_wrapper.target import Target

log = structlog.get_logger("flext_meltano_context.stopping")

KILL_AFTER = 5.0  # after the deadline: SIGKILL what is left
TAP_KILL_AFTER = 10.0  # a signalled tap gets at most this long (or the grace, if shorter)
ORPHANED_TAP_KILL_AFTER = 5.0  # the target is gone: the tap has at most this long
# After a stop request the wait for the state store ends this long before the last kill: time
# to record the run's end and release the Meltano helper inside grace + 5 s.
STORE_MARGIN = 1.0
_TICK = 0.1  # how often the run loop looks at the clock while it waits


class Stopper:
    """The run's children and the clock that stops them; signals land here."""

    def __init__(
        self,
        grace: float,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace = max(grace, 0.0)
        self.timeout = timeout
        self.clock = clock
        self.started = clock()
        self.signum: int | None = None  # the first signal
        self.timed_out_after: float | None = None
        self.began: float | None = None  # when the first stop request came (monotonic)
        self.hard = False
        self.tap: Tap | None = None
        self.target: Target | None = None
        self.block: Child | None = None  # the transformer block running now
        self.watchdog: Watchdog | None = None
        self.children: list[Child] = []
        self._tap_kill_at: float | None = None
        self._deadline_passed = False
        self._tap_stopped = False  # stopped because its output has nowhere to go
        self._killed = False
        self._previous: dict[int, Any] = {}

    # -- starting children (always from the run loop's thread: see children._die_with_parent)

    def start_tap(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Tap:
        tap = Tap(name, argv, env, watchdog=self.watchdog)
        self.tap = tap
        self.children.append(tap.child)
        return tap

    def start_target(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_state: Callable[[dict[str, Any]], None],
    ) -> Target:
        target = Target(name, argv, env, on_state, watchdog=self.watchdog)
        self.target = target
        self.children.append(target.child)
        return target

    def start_block(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], **kw: Any
    ) -> Child:
        child = Child(name, argv, env, watchdog=self.watchdog, **kw)
        self.block = child
        self.children.append(child)
        return child

    # -- stop requests

    @property
    def stopping(self) -> bool:
        return self.began is not None

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
        if self.began is not None:
            if self.signum is None:
                self.signum = signum  # a signal during a timeout stop: aborted, and at once
            self.kill_all()
            return
        self.signum = signum
        if not self.children:
            raise AbortedError(
                signum, f"stopped by {signal.Signals(signum).name} before the run began"
            )
        _tell(
            f"{signal.Signals(signum).name}: stopping; the target may confirm its state for up "
            f"to {self.grace:g} s; send again to stop at once"
        )
        self._begin()

    def _begin(self) -> None:
        """The first stop request: signal the producer (tap or block), start the deadline."""
        self.began = self.clock()
        if self.tap is not None:
            self.tap.child.signal(signal.SIGTERM)
            self._kill_tap_by(self.began + min(TAP_KILL_AFTER, self.grace))
        if self.block is not None:
            self.block.signal(signal.SIGTERM)

    def target_gone(self) -> None:
        """The target exited while the tap still streams: nothing can read the tap any more."""
        if self.tap is None or self.tap.child.exited.is_set() or self._tap_stopped:
            return
        self._tap_stopped = True
        log.warning("tap_stopped", tap=self.tap.name, reason="its output has no reader")
        self.tap.child.signal(signal.SIGTERM)
        self._kill_tap_by(self.clock() + min(ORPHANED_TAP_KILL_AFTER, self.grace))

    def stop_tap(self) -> None:
        """The relay stopped (strict mode): the tap's output has nowhere to go."""
        self.target_gone()

    def _kill_tap_by(self, when: float) -> None:
        if self._tap_kill_at is None or when < self._tap_kill_at:
            self._tap_kill_at = when

    def kill_all(self) -> None:
        """A second signal (or the last step of the deadline): SIGKILL every child now."""
        self.hard = True
        if self.target is not None:
            self.target.cut_input()
        for child in self.children:
            child.signal(signal.SIGKILL)

    # -- the clock

    def tick(self) -> float:
        """Do what is due now; the seconds until something may be due next."""
        now = self.clock()
        if self.timeout is not None and self.began is None and now >= self.started + self.timeout:
            self.timed_out_after = self.timeout
            _tell(f"timed out after {self.timeout:g} s: stopping as on SIGTERM")
            log.warning("run_timed_out", timeout_s=self.timeout)
            self._begin()
        if self._tap_kill_at is not None and now >= self._tap_kill_at:
            self._tap_kill_at = None
            if self.tap is not None:
                self.tap.child.signal(signal.SIGKILL)
        if self.began is not None and not self._deadline_passed and now >= self.began + self.grace:
            self._deadline_passed = True
            self._at_deadline()
        if self.began is not None and not self._killed and now >= self.final_kill_at:
            self._killed = True
            self.kill_all()
        return _TICK

    @property
    def final_kill_at(self) -> float:
        return (self.began if self.began is not None else self.clock()) + self.grace + KILL_AFTER

    def _at_deadline(self) -> None:
        """Stop forwarding, end the target's input, SIGTERM the target and any block."""
        log.warning("stop_deadline_reached", grace_s=self.grace)
        if self.target is not None:
            self.target.cut_input()
            self.target.child.signal(signal.SIGTERM)
        if self.block is not None and self.block.signalled is None:
            self.block.signal(signal.SIGTERM)

    def wait(self, done: threading.Event, *, give_up: bool = False) -> bool:
        """Wait for `done` while keeping the clock; False if given up (only when `give_up`).

        With `give_up`, waiting ends 2 s after the last kill: something outside the children's
        groups may hold a pipe, and the run must still end in bounded time.
        """
        while not done.is_set():
            delay = self.tick()
            if give_up and self.began is not None and self.clock() > self.final_kill_at + 2:
                return False
            done.wait(delay)
        self.tick()
        return True

    def wait_store(self, done: threading.Event) -> bool:
        """Wait for the state store (`done`); after a stop request, only until the deadline.

        Without one, each store call is bounded by its own timeout (`meltano_timeout`); with
        one, the run's exit promise (grace + 5 s) bounds the wait too: False when it gave up.
        """
        while not done.is_set():
            delay = self.tick()
            if self.began is not None:
                left = self.final_kill_at - STORE_MARGIN - self.clock()
                if left <= 0:
                    return done.is_set()
                delay = min(delay, left)
            done.wait(delay)
        return True

    def reap(self, child: Child) -> None:
        """Wait for `child` to exit, the deadline and timeout running."""
        self.wait(child.exited)

    def cleanup(self) -> None:
        """No child outlives the run: SIGKILL and reap what is still running."""
        for child in self.children:
            if not child.exited.is_set():
                child.signal(signal.SIGKILL)
        for child in self.children:
            child.exited.wait(10)
        if self.target is not None:
            self.target.close_input()


@contextmanager
def supervised(grace: float, timeout: float | None = None) -> Iterator[Stopper]:
    """The run's stopper: handlers installed, a watchdog up, every child reaped at the end."""
    stopper = Stopper(grace, timeout)
    stopper.watchdog = Watchdog()
    stopper.install()
    try:
        yield stopper
    finally:
        stopper.restore()
        stopper.cleanup()
        stopper.watchdog.close()


def _tell(message: str) -> None:
    """A line to the user at the terminal, safe inside a signal handler (no buffered writer)."""
    data = f"flext-context: {message}\n".encode()
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), data)
