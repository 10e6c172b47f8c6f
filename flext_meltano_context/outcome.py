"""What a run's processes did (Outcome) and what it means (judge): the run's failure rules.

The run loop only records facts: exit codes and exit times, what the relay counted, how many
bytes the target never read, which signals came. `judge` is a pure function from those facts to
the run's status and error, so every failure rule (issues 4, 10 and 11) is one row of a table in
tests/test_outcome.py, with a passing row beside each failing one.
"""

from __future__ import annotations

import collections
import signal
from dataclasses import dataclass
from typing import Any

import msgspec

from flext_meltano_context.children import Exit
from flext_meltano_context.errors import AbortedError, FlextContextError, StepError
from flext_meltano_context.relay import RelayStats


class TimedOutError(FlextContextError):
    """`--timeout` (or FLEXT_CONTEXT_TIMEOUT / MELTANO_RUN_TIMEOUT) stopped the run; exit 1."""

    def __init__(self, seconds: float, message: str) -> None:
        self.seconds = seconds
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What reached the target: bytes written into its stdin, bytes it left there unread."""

    bytes_written: int  # M: bytes the target's input pipe accepted from the relay
    bytes_unread: int | None  # still in the pipe when the target exited (FIONREAD); None: unknown
    records_unread: int | None = None  # RECORD lines among the unread bytes
    records_exact: bool = True  # False: records_unread is an estimate
    input_closed_first: bool = True  # end of input was delivered before the target exited

    @property
    def complete(self) -> bool:
        """The target read the whole stream: end of input reached it and no byte is left."""
        return self.input_closed_first and self.bytes_unread == 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """The facts of one run, gathered by the run loop; judged by `judge`."""

    tap_name: str
    target_name: str
    tap: Exit
    target: Exit
    stats: RelayStats | None  # None when the relay did not return (a strict stop keeps them)
    delivery: Delivery
    signum: int | None = None  # the first SIGINT/SIGTERM received
    timed_out_after: float | None = None  # --timeout fired
    relay_error: FlextContextError | None = None  # StrictModeError: a line was not forwarded
    state_tracked: bool = False  # a state id / --state-out: confirmed states are stored
    states_confirmed: int = 0
    states_persisted: int = 0
    state_errors: tuple[str, ...] = ()  # storing a confirmed state failed
    state_unstored: str | None = None  # why the last confirmed state is not stored (deadline)
    block_error: FlextContextError | None = None  # the first transformer block that failed
    lineage_error: str | None = None  # a lineage write failed; the run went on


@dataclass(frozen=True, slots=True)
class Verdict:
    """The run's status and error, and the status of its extract and load phases."""

    status: str  # success, failed, aborted
    error: FlextContextError | None
    extract: str
    load: str

    @property
    def loaded(self) -> bool:
        """Tap and target both succeeded: the load may be checked and blocks may run."""
        return self.extract == "success" and self.load == "success"


def judge(outcome: Outcome) -> Verdict:
    """The status and error of a run, from its facts alone (rules in order of precedence)."""
    stopped = outcome.signum is not None or outcome.timed_out_after is not None
    tap_failed = outcome.tap.returncode != 0 and outcome.tap.signalled_by_us is None
    strict = outcome.relay_error is not None
    target_failed = outcome.target.returncode != 0 or not outcome.delivery.complete
    if stopped:
        extract = load = "aborted"
    else:
        extract = "failed" if tap_failed or strict else "success"
        load = "failed" if target_failed else "success"
    if outcome.signum is not None:
        name = signal.Signals(outcome.signum).name
        error: FlextContextError = AbortedError(
            outcome.signum, f"stopped by {name}; {_state_kept(outcome)}"
        )
        return Verdict("aborted", error, extract, load)
    if outcome.timed_out_after is not None:
        seconds = outcome.timed_out_after
        message = f"timed out after {seconds:g} s; {_state_kept(outcome)}"
        return Verdict("failed", TimedOutError(seconds, message), extract, load)
    found = _el_error(outcome, tap_failed, target_failed)
    if found is None and outcome.block_error is not None:
        found = outcome.block_error
    if found is None and outcome.lineage_error is not None:
        found = FlextContextError(
            f"the lineage log could not be written ({outcome.lineage_error}); the run went on "
            "to its normal end, but its record is incomplete"
        )
    return Verdict("success" if found is None else "failed", found, extract, load)


def _el_error(outcome: Outcome, tap_failed: bool, target_failed: bool) -> FlextContextError | None:
    """The first failure of extract and load: strict stop, target, tap, then storing state."""
    if outcome.relay_error is not None:
        return outcome.relay_error
    target = outcome.target
    if target.returncode != 0:
        return StepError(outcome.target_name, target.returncode, target.stderr_tail)
    if target_failed:
        return FlextContextError(incomplete_read(outcome.target_name, target, outcome.delivery))
    if tap_failed:
        return StepError(outcome.tap_name, outcome.tap.returncode, outcome.tap.stderr_tail)
    if outcome.state_errors:
        return FlextContextError(
            f"the state confirmed by {outcome.target_name!r} could not be stored: "
            f"{outcome.state_errors[-1]}"
        )
    return None


def incomplete_read(name: str, target: Exit, delivery: Delivery) -> str:
    """ "target-x exited 0 after reading N of M bytes; K records never reached it"."""
    written = delivery.bytes_written
    unread = delivery.bytes_unread or 0
    read = max(written - unread, 0)
    head = f"target {name!r} exited {target.returncode} after reading {read:,} of {written:,} bytes"
    if delivery.bytes_unread is None:
        return f"{head} (unread bytes unknown) before the end of its input; the tap was stopped"
    if unread == 0:
        return (
            f"{head}, before the end of its input was delivered; the tap was stopped, so the "
            "rest of the stream never reached it"
        )
    records = delivery.records_unread
    count = "some" if records is None else f"{records:,}"
    about = "" if delivery.records_exact or records is None else "about "
    return f"{head}; {about}{count} records never reached it"


def _state_kept(outcome: Outcome) -> str:
    if not outcome.state_tracked:
        return "no state is kept for this run"
    if outcome.state_unstored is not None:
        return outcome.state_unstored
    if outcome.states_persisted:
        return f"the last of {outcome.states_confirmed} confirmed state(s) is stored"
    return "the target confirmed no state; the stored state is untouched"


class _Kind(msgspec.Struct):
    type: Any = None


_KIND = msgspec.json.Decoder(_Kind)


class RecentBytes:
    """The last bytes the relay forwarded, to count the records among bytes a target never read.

    Fed with every piece the target's pipe accepted (the relay's `on_sent` hook: raw chunks, so
    the compiled scanner keeps its fast path); it keeps whole pieces while the newest ones hold
    fewer than `keep` bytes: more than a pipe holds.
    """

    def __init__(self, keep: int = 4 << 20) -> None:
        self.keep = keep
        self._pieces: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._line_start = True  # the kept bytes begin a line (nothing dropped, or a newline was)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        piece = data if isinstance(data, bytes) else bytes(data)
        self._pieces.append(piece)
        self._size += len(piece)
        while self._pieces and self._size - len(self._pieces[0]) >= self.keep:
            dropped = self._pieces.popleft()
            self._size -= len(dropped)
            self._line_start = dropped.endswith(b"\n")

    def records_in_last(self, nbytes: int) -> int | None:
        """RECORD lines among the last `nbytes` forwarded (a line cut in two counts); None if
        fewer bytes were kept."""
        if nbytes <= 0:
            return 0
        if nbytes > self._size:
            return None
        kept = b"".join(self._pieces)
        start = len(kept) - nbytes
        newline = kept.rfind(b"\n", 0, start)
        if newline < 0 and not self._line_start:
            return None  # the first unread line began before the bytes kept
        lines = kept[newline + 1 :].split(b"\n")
        if not lines[-1]:
            lines.pop()  # the stream's last newline ends the last line
        return sum(map(_is_record, lines))


def _is_record(line: bytes | bytearray) -> bool:
    try:
        return bool(_KIND.decode(line).type == "RECORD")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False  # a bad line is forwarded and reported as an anomaly, never a record
