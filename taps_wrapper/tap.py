"""Start a tap: its command, its context environment, a pipe for its stdout, its stderr drained."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from flext_meltano_context.children import Child, Watchdog
from flext_meltano_context.pipes import enlarge_pipe as enlarge_pipe  # targets_wrapper uses it


def standalone_command(argv: Sequence[str], state_file: Path | None) -> list[str]:
    """The user's tap command, with `--state FILE` appended when there is a state to resume."""
    command = list(argv)
    if state_file is not None:
        command += ["--state", str(state_file)]
    return command


class Tap:
    """A running tap whose stdout is the read end `self.stdout` (ours to read and close)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        watchdog: Watchdog | None = None,
    ) -> None:
        read_end, write_end = os.pipe()
        enlarge_pipe(read_end)
        try:
            self.child = Child(name, argv, env, stdin=None, stdout=write_end, watchdog=watchdog)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the tap holds the only write end: EOF when it exits
        self.stdout = read_end
        self.name = name
