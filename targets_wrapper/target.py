"""Start a target: a pipe for its stdin, its stdout read for confirmed state, stderr drained.

Whether the target read the whole stream is measured, not guessed (issue 10): we keep a read end
of its input pipe of our own, so after it exits `FIONREAD` tells how many bytes it left unread,
also when end of input was delivered long before (the write end is closed by then).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from flext_meltano_context.children import Child
from taps_wrapper.tap import enlarge_pipe

if TYPE_CHECKING:
    from flext_meltano_context.children import Watchdog


def unread_bytes(fd: int) -> int | None:
    """Bytes still in the pipe `fd` belongs to (either end); None where FIONREAD fails."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return None
    return int(buf[0])


class Target:
    """A running target; the relay writes to `self.stdin` (ours to close: end of input).

    Every line the target prints on stdout that is a JSON object is a state it confirmed, as under
    `meltano run`; each is handed to `on_state` as it arrives, on the reader thread.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_state: Callable[[dict[str, Any]], None],
        watchdog: Watchdog | None = None,
    ) -> None:
        read_end, write_end = os.pipe()
        enlarge_pipe(write_end)
        out_read, out_write = os.pipe()
        try:
            self.child = Child(name, argv, env, stdin=read_end, stdout=out_write, watchdog=watchdog)
        except BaseException:
            os.close(write_end)
            os.close(out_read)
            os.close(read_end)
            raise
        finally:
            os.close(out_write)
        self.stdin: int | None = write_end
        # Our own read end: FIONREAD after the target exited. While we hold it the relay's
        # writes would never fail, so it is closed the moment the target exits mid-stream.
        self._probe: int | None = read_end
        # Reentrant: a second signal's handler cuts the input on the thread that may hold it.
        self._lock = threading.RLock()
        self.name = name
        self.states = 0
        self.other_lines = 0
        self.last_state: dict[str, Any] | None = None
        self.end_of_input_at: float | None = None
        self.input_closed_first = True  # end of input was delivered before the target exited
        self.unread: int | None = None  # bytes it never read, measured once it has exited
        self._gone = False  # the target has exited (set on the waiter thread)
        self._on_state = on_state
        self.state_errors: list[str] = []
        self._reader = threading.Thread(
            target=self._read_stdout,
            args=(os.fdopen(out_read, "rb"),),
            name=f"{name}-stdout",
            daemon=True,
        )
        self._reader.start()
        self.child.on_exit(self._exited)

    def _read_stdout(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                text = raw.strip()
                if not text.startswith(b"{"):
                    self.other_lines += 1
                    continue
                try:
                    value = json.loads(text)
                except ValueError:
                    self.other_lines += 1
                    continue
                if not isinstance(value, dict):
                    self.other_lines += 1
                    continue
                self.states += 1
                self.last_state = value
                try:
                    self._on_state(value)
                except Exception as exc:  # noqa: BLE001 - kept for the run's error, never lost
                    self.state_errors.append(f"{type(exc).__name__}: {exc}")

    def _exited(self, _child: Child) -> None:
        """On the waiter thread: measure what is left, or let the relay's writes fail now."""
        with self._lock:
            self._gone = True
            if self.stdin is None and self._probe is not None:
                self.unread = unread_bytes(self._probe)
            self._close_probe()

    def _close_probe(self) -> None:
        if self._probe is not None:
            os.close(self._probe)
            self._probe = None

    def close_input(self) -> None:
        """End of input: the target finishes its batch and confirms its state.

        If the target has exited already, what it left unread is measured on the write end
        first (FIONREAD works there after the reader is gone), then the end is closed.
        """
        with self._lock:
            if self.stdin is None:
                return
            if self._gone:
                self.input_closed_first = False
                self.unread = unread_bytes(self.stdin)
            os.close(self.stdin)
            self.stdin = None
            self.end_of_input_at = time.time()

    def cut_input(self) -> None:
        """Stop forwarding now (a deadline): later relay writes fail, the pipe ends with them.

        The relay may be blocked in a write on this descriptor on another thread, so it is not
        closed (its number could be reused under the relay) but replaced by a pipe without a
        reader: the next write fails with EPIPE and the relay returns.
        """
        with self._lock:
            if self.stdin is None:
                return
            dead_read, dead_write = os.pipe()
            os.close(dead_read)
            with contextlib.suppress(OSError):
                os.dup2(dead_write, self.stdin, inheritable=False)
            os.close(dead_write)
            self._close_probe()

    def forget_input(self) -> None:
        """Drop the input without closing it: a relay thread that never ended may still use it."""
        with self._lock:
            self.stdin = None
            self._close_probe()

    def join_output(self, timeout: float = 10) -> None:
        """Wait until every state line the target printed was handed on."""
        self._reader.join(timeout=timeout)
