"""Child processes of a run: own process group, stderr drained on a thread, METRIC lines summed.

Every child starts in a session of its own, so a signal we send reaches its whole group (the tap
behind `meltano invoke` included) and a Ctrl-C on the terminal reaches only us: stopping the
children is our job, in our order. Their stderr is read on a thread as it comes, or a chatty child
would block on a full pipe and deadlock the pipeline.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from flext_meltano_context.errors import UsageError

TAIL_LINES = 50
_READER_DONE = re.compile(r"Reader '([^']*)' completed processing (\d+) lines of input")


class Metrics:
    """Singer SDK `METRIC:` lines summed per metric and stream (counters log increments)."""

    def __init__(self) -> None:
        self._totals: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self.lines_processed: int | None = None  # a target's "Reader ... completed processing N"

    def feed(self, line: str) -> None:
        """Take one stderr line; lines that carry no metric are ignored."""
        point: Any = None
        at = line.find("METRIC: ")
        if at >= 0:
            with contextlib.suppress(ValueError):
                point = json.loads(line[at + 8 :])
        elif '"metric_info"' in line:
            with contextlib.suppress(ValueError):
                decoded = json.loads(line[line.find("{") :])
                point = decoded.get("metric_info") if isinstance(decoded, dict) else None
        elif "completed processing" in line and (done := _READER_DONE.search(line)):
            self.lines_processed = int(done.group(2))
            return
        if not isinstance(point, dict):
            return
        name, value = point.get("metric"), point.get("value")
        if not isinstance(name, str) or isinstance(value, bool):
            return
        if not isinstance(value, (int, float)):
            return
        tags = point.get("tags")
        stream = tags.get("stream") if isinstance(tags, dict) else None
        key = stream if isinstance(stream, str) else ""
        with self._lock:
            per_stream = self._totals.setdefault(name, {})
            per_stream[key] = per_stream.get(key, 0) + value

    def to_dict(self) -> dict[str, dict[str, float]]:
        """{metric: {stream: total}}; metrics without a stream tag sit under ""."""
        with self._lock:
            return {name: dict(streams) for name, streams in self._totals.items()}

    def for_stream(self, stream: str) -> dict[str, float]:
        """{metric: total} for one stream."""
        with self._lock:
            return {
                name: streams[stream] for name, streams in self._totals.items() if stream in streams
            }


def _debug_echo(name: str) -> Callable[[str], None] | None:
    """Each stderr line as a debug event when debug logging is on (`--log-level DEBUG`)."""
    log = structlog.get_logger("flext_meltano_context.children")
    if not log.is_enabled_for(logging.DEBUG):
        return None

    def echo(line: str) -> None:
        log.debug("plugin_stderr", plugin=name, line=line[:2000])

    return echo


@dataclass(frozen=True, slots=True)
class Exit:
    """How a child ended; `ended_at` is when it exited, not when we got round to reaping it."""

    returncode: int
    started_at: float
    ended_at: float
    stderr_tail: tuple[str, ...]
    signalled_by_us: int | None  # the signal we sent it first, if any


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG).

    The kernel sends it when the creating *thread* exits, so children are started from the
    thread that runs the run loop, which outlives them all (it reaps them before returning).
    Grandchildren (the plugin behind `meltano invoke`) are covered by the run's Watchdog.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child die with the thread starting it; None off Linux.

    For any process of the run that is not a `Child` (the Meltano helper, `meltano` commands):
    the same protection, from the same rule (start it from a thread that outlives it).
    """
    return _die_with_parent if _PRCTL is not None else None


def _load_prctl() -> Any:
    """libc's prctl, loaded once in the parent (never in the forked child), None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1
_PRCTL = _load_prctl()


class Watchdog:
    """A tiny process that SIGKILLs the run's process groups if flext-context dies (SIGKILL too).

    Children run in sessions of their own (a Ctrl-C must reach only us), so nothing would take
    them down with us: the watchdog, in a session of its own, reads the groups on a pipe and
    kills them when the pipe ends without `done` (issue 11: no orphans, ever).
    """

    def __init__(self) -> None:
        script = Path(__file__).with_name("watchdog.py")
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            _log().warning("watchdog_not_started", reason=exc.strerror)

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                return
            try:
                self._proc.stdin.write(line.encode() + b"\n")
                self._proc.stdin.flush()
            except OSError as exc:  # it died: children still go with their threads' exit
                _log().warning("watchdog_gone", reason=exc.strerror)
                self._proc.stdin = None

    def guard(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def release(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def close(self) -> None:
        """The run ended normally: the watchdog exits without killing anything."""
        self._send("done")
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log() -> Any:
    return structlog.get_logger("flext_meltano_context.children")


class Child:
    """One running child process in its own process group.

    A waiter thread reaps it as soon as it exits, notes the moment, kills what is left of its
    group (a grandchild holding our pipes) and calls the `on_exit` callbacks.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        stdin: int | None,
        stdout: int | None,
        cwd: str | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.name = name
        self.metrics = Metrics()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._on_line = on_stderr_line or _debug_echo(name)
        self.signalled: int | None = None
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.exited = threading.Event()  # set once the on_exit callbacks have run
        self._exiting = False
        self._on_exit: list[Callable[[Child], None]] = []
        self._exit_lock = threading.Lock()
        self._watchdog = watchdog
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except OSError as exc:
            raise UsageError(
                f"cannot start {name} ({argv[0]!r}): {exc.strerror}; check the command "
                "and that the plugin is installed"
            ) from exc
        self.pid = self.proc.pid
        if watchdog is not None:
            watchdog.guard(self.pid)
        assert self.proc.stderr is not None  # noqa: S101 - stderr=PIPE above
        self._drain = threading.Thread(
            target=self._read_stderr, args=(self.proc.stderr,), name=f"{name}-stderr", daemon=True
        )
        self._drain.start()
        threading.Thread(target=self._wait_exit, name=f"{name}-waiter", daemon=True).start()

    def _read_stderr(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.tail.append(line[:2000])
                self.metrics.feed(line)
                if self._on_line is not None:
                    self._on_line(line)

    def _wait_exit(self) -> None:
        self.proc.wait()
        self.ended_at = time.time()
        # Anything left in its group (a grandchild holding our pipes) goes with it: no orphans.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._watchdog is not None:
            self._watchdog.release(self.pid)
        with self._exit_lock:
            self._exiting = True
            callbacks = list(self._on_exit)
        try:
            for callback in callbacks:
                callback(self)
        finally:
            self.exited.set()

    def on_exit(self, callback: Callable[[Child], None]) -> None:
        """Call `callback(child)` on the waiter thread when it exits (at once if it has)."""
        with self._exit_lock:
            if not self._exiting:
                self._on_exit.append(callback)
                return
        callback(self)

    def poll(self) -> int | None:
        return self.proc.returncode if self.exited.is_set() else None

    def signal(self, signum: int) -> None:
        """Send `signum` to the child's whole process group (no-op once it is gone)."""
        if self.exited.is_set():
            return
        if self.signalled is None:
            self.signalled = signum
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds if it is still running."""
        if self.exited.is_set():
            return
        self.signal(signal.SIGTERM)
        if not self.exited.wait(grace):
            self.signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> Exit:
        """Wait for the child's exit (its group is gone with it) and its stderr's end."""
        if not self.exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.proc.args, timeout or 0)
        self._drain.join(timeout=5)
        ended = self.ended_at if self.ended_at is not None else time.time()
        returncode = self.proc.returncode
        return Exit(returncode, self.started_at, ended, tuple(self.tail), self.signalled)
