"""Start a target: a pipe for its stdin, its stdout read for confirmed state, stderr drained."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from flext_meltano_context.children import Child
from taps_wrapper.tap import enlarge_pipe


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
    ) -> None:
        read_end, write_end = os.pipe()
        enlarge_pipe(write_end)
        out_read, out_write = os.pipe()
        try:
            self.child = Child(name, argv, env, stdin=read_end, stdout=out_write)
        except BaseException:
            os.close(write_end)
            os.close(out_read)
            raise
        finally:
            os.close(read_end)
            os.close(out_write)
        self.stdin: int | None = write_end
        self.name = name
        self.states = 0
        self.other_lines = 0
        self.last_state: dict[str, Any] | None = None
        self.end_of_input_at: float | None = None
        self._on_state = on_state
        self.state_errors: list[str] = []
        self._reader = threading.Thread(
            target=self._read_stdout,
            args=(os.fdopen(out_read, "rb"),),
            name=f"{name}-stdout",
            daemon=True,
        )
        self._reader.start()

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

    def close_input(self) -> None:
        """End of input: the target finishes its batch and confirms its state."""
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None
            self.end_of_input_at = time.time()

    def join_output(self, timeout: float = 10) -> None:
        """Wait until every state line the target printed was handed on."""
        self._reader.join(timeout=timeout)
