"""Child processes of a run: own process group, stderr drained on a thread, METRIC lines summed.

Every child starts in a session of its own, so a signal we send reaches its whole group (the tap
behind `meltano invoke` included) and a Ctrl-C on the terminal reaches only us: stopping the
children is our job, in our order. Their stderr is read on a thread as it comes, or a chatty child
would block on a full pipe and deadlock the pipeline.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

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
    import logging

    import structlog

    log = structlog.get_logger("flext_meltano_context.children")
    if not log.is_enabled_for(logging.DEBUG):
        return None

    def echo(line: str) -> None:
        log.debug("plugin_stderr", plugin=name, line=line[:2000])

    return echo


@dataclass(frozen=True, slots=True)
class Exit:
    """How a child ended."""

    returncode: int
    started_at: float
    ended_at: float
    stderr_tail: tuple[str, ...]
    signalled_by_us: int | None  # the signal we sent it first, if any


class Child:
    """One running child process in its own process group."""

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
    ) -> None:
        self.name = name
        self.metrics = Metrics()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._on_line = on_stderr_line or _debug_echo(name)
        self.signalled: int | None = None
        self.started_at = time.time()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            from flext_meltano_context.errors import UsageError

            raise UsageError(
                f"cannot start {name} ({argv[0]!r}): {exc.strerror}; check the command "
                "and that the plugin is installed"
            ) from exc
        self.pid = self.proc.pid
        assert self.proc.stderr is not None  # noqa: S101 - stderr=PIPE above
        self._drain = threading.Thread(
            target=self._read_stderr, args=(self.proc.stderr,), name=f"{name}-stderr", daemon=True
        )
        self._drain.start()

    def _read_stderr(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.tail.append(line[:2000])
                self.metrics.feed(line)
                if self._on_line is not None:
                    self._on_line(line)

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        """Send `signum` to the child's whole process group (no-op once it is gone)."""
        if self.signalled is None:
            self.signalled = signum
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds if it is still running."""
        if self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> Exit:
        """Wait for the child, then make sure nothing of its group outlives it."""
        returncode = self.proc.wait(timeout=timeout)
        ended = time.time()
        # Anything left in its group (a grandchild holding our pipes) goes with it: no orphans.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._drain.join(timeout=5)
        return Exit(returncode, self.started_at, ended, tuple(self.tail), self.signalled)
