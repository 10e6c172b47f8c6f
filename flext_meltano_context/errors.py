"""Errors flext-context raises on purpose; `cli.py` maps them to exit codes.

FlextContextError            anything we raise knowingly (exit 1)
+-- UsageError               bad input, found before any child starts (exit 2)
+-- StepError                a child process (tap, target, dbt) failed (exit 1)
+-- RelayError               the relay could not deliver (sink closed early)
|   +-- StrictModeError      --strict met an anomaly; the line was not forwarded
+-- LockedError              another run holds the pipeline's state lock (exit 2)
+-- AbortedError             stopped by SIGINT/SIGTERM (exit 130/143)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flext_meltano_context.relay import RelayStats


class FlextContextError(Exception):
    """Base of every error flext-context raises on purpose."""

    exit_code = 1


class UsageError(FlextContextError):
    """Bad input: what, where, and what to do, found before any child started."""

    exit_code = 2


class StepError(FlextContextError):
    """A child process of the pipeline failed."""

    def __init__(self, step: str, returncode: int, stderr_tail: Sequence[str]) -> None:
        self.step = step
        self.returncode = returncode
        self.stderr_tail = tuple(stderr_tail)
        tail = "\n  ".join(self.stderr_tail[-10:]) or "(nothing on stderr)"
        super().__init__(f"step {step!r} exited with {returncode}; last stderr lines:\n  {tail}")


class RelayError(FlextContextError):
    """The relay could not deliver the stream."""


class StrictModeError(RelayError):
    """`--strict` met an anomaly; the offending line was not forwarded."""

    def __init__(self, message: str, stats: RelayStats) -> None:
        super().__init__(message)
        self.stats = stats  # what the relay counted and forwarded before it stopped


class LockedError(FlextContextError):
    """Another run holds the pipeline's state lock."""

    exit_code = 2


class AbortedError(FlextContextError):
    """The run was stopped by a signal."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)
