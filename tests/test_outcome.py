"""The run's failure rules as a table: one row per rule, a passing row beside each failing one."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flext_meltano_context.children import Exit
from flext_meltano_context.errors import AbortedError, StepError, StrictModeError
from flext_meltano_context.outcome import (
    Delivery,
    Outcome,
    RecentBytes,
    TimedOutError,
    judge,
)
from flext_meltano_context.relay import RelayStats, relay
from flext_meltano_context.spec import CrossCheck

ALL_READ = Delivery(bytes_written=1000, bytes_unread=0)


def ended(code: int = 0, signalled: int | None = None) -> Exit:
    return Exit(code, 10.0, 11.0, ("last words",), signalled)


def _no_stats() -> RelayStats:
    """What the relay reports for an empty stream: the stats a strict stop carries."""
    read, write = os.pipe()
    os.close(write)
    with Path(os.devnull).open("wb") as sink:
        stats = relay(read, sink.fileno(), close_sink=False)
    os.close(read)
    return stats


NO_STATS = _no_stats()


def outcome(**changes: Any) -> Outcome:
    base = Outcome(
        tap_name="tap-x",
        target_name="target-x",
        tap=ended(),
        target=ended(),
        stats=None,
        delivery=ALL_READ,
        state_tracked=True,
        states_confirmed=2,
        states_persisted=2,
    )
    return replace(base, **changes)


UNREAD = Delivery(1000, 400, records_unread=7)
EARLY_EMPTY = Delivery(600, 0, input_closed_first=False)  # read all it got, then left early

ROWS = [
    # (row id, outcome, status, extract, load, error type, error text)
    ("all_good", outcome(), "success", "success", "success", None, None),
    # issue 10 section 1: a target that stops reading fails the load, exit 0 or not
    (
        "target_exit_0_bytes_unread",
        outcome(delivery=UNREAD),
        "failed",
        "success",
        "failed",
        None,
        "target 'target-x' exited 0 after reading 600 of 1,000 bytes; 7 records never reached it",
    ),
    (
        "target_exit_0_estimated_records",
        outcome(delivery=replace(UNREAD, records_exact=False)),
        "failed",
        "success",
        "failed",
        None,
        "; about 7 records never reached it",
    ),
    (
        "target_exit_0_before_end_of_input",
        outcome(delivery=EARLY_EMPTY),
        "failed",
        "success",
        "failed",
        None,
        "before the end of its input was delivered",
    ),
    (
        "target_exit_0_unmeasured",
        outcome(delivery=Delivery(1000, None)),
        "failed",
        "success",
        "failed",
        None,
        "unread bytes unknown",
    ),
    (
        "target_exit_3_all_read",
        outcome(target=ended(3)),
        "failed",
        "success",
        "failed",
        StepError,
        "step 'target-x' exited with 3",
    ),
    (
        "target_exit_3_bytes_unread",
        outcome(target=ended(3), delivery=UNREAD),
        "failed",
        "success",
        "failed",
        StepError,
        "step 'target-x' exited with 3",
    ),
    # the tap: its own failure, or stopped by us because the target was gone
    (
        "tap_failed_target_drained",
        outcome(tap=ended(37)),
        "failed",
        "failed",
        "success",
        StepError,
        "step 'tap-x' exited with 37",
    ),
    (
        "tap_stopped_by_us_is_not_a_tap_failure",
        outcome(tap=ended(-15, signal.SIGTERM), target=ended(5), delivery=UNREAD),
        "failed",
        "success",
        "failed",
        StepError,
        "step 'target-x' exited with 5",
    ),
    (
        "strict_stop",
        outcome(relay_error=StrictModeError("strict mode stopped the stream at line 3", NO_STATS)),
        "failed",
        "failed",
        "success",
        StrictModeError,
        "strict mode stopped",
    ),
    (
        "state_not_stored",
        outcome(state_errors=("meltano state set failed",)),
        "failed",
        "success",
        "success",
        None,
        "could not be stored: meltano state set failed",
    ),
    # issue 11: signals, timeout, lineage writes, blocks
    (
        "sigint_keeps_confirmed_state",
        outcome(signum=signal.SIGINT, tap=ended(-15, signal.SIGTERM)),
        "aborted",
        "aborted",
        "aborted",
        AbortedError,
        "stopped by SIGINT; the last of 2 confirmed state(s) is stored",
    ),
    (
        "sigterm_nothing_confirmed",
        outcome(signum=signal.SIGTERM, states_confirmed=0, states_persisted=0),
        "aborted",
        "aborted",
        "aborted",
        AbortedError,
        "the target confirmed no state; the stored state is untouched",
    ),
    (
        "signal_wins_over_a_target_failure",
        outcome(signum=signal.SIGTERM, target=ended(1), state_tracked=False),
        "aborted",
        "aborted",
        "aborted",
        AbortedError,
        "no state is kept for this run",
    ),
    (
        "timed_out",
        outcome(timed_out_after=2.5),
        "failed",
        "aborted",
        "aborted",
        TimedOutError,
        "timed out after 2.5 s; the last of 2 confirmed state(s) is stored",
    ),
    (
        "lineage_write_failed",
        outcome(lineage_error="cannot append to the lineage log x: No space left on device"),
        "failed",
        "success",
        "success",
        None,
        "the lineage log could not be written (cannot append",
    ),
    (
        "block_failed",
        outcome(block_error=StepError("dbt:run", 1, ())),
        "failed",
        "success",
        "success",
        StepError,
        "step 'dbt:run' exited with 1",
    ),
]


@pytest.mark.parametrize(
    ("case", "status", "extract", "load", "error_type", "text"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_judge(
    case: Outcome,
    status: str,
    extract: str,
    load: str,
    error_type: type[Exception] | None,
    text: str | None,
) -> None:
    verdict = judge(case)
    assert (verdict.status, verdict.extract, verdict.load) == (status, extract, load)
    if text is None:
        assert verdict.error is None
        assert verdict.loaded
    else:
        assert verdict.error is not None
        assert text in str(verdict.error)
        if error_type is not None:
            assert isinstance(verdict.error, error_type)


def test_signal_and_timeout_set_the_shells_exit_codes() -> None:
    assert judge(outcome(signum=signal.SIGTERM)).error.exit_code == 143  # type: ignore[union-attr]
    assert judge(outcome(signum=signal.SIGINT)).error.exit_code == 130  # type: ignore[union-attr]
    assert judge(outcome(timed_out_after=1.0)).error.exit_code == 1  # type: ignore[union-attr]


def test_a_delivery_is_complete_only_with_end_of_input_first_and_nothing_unread() -> None:
    assert ALL_READ.complete
    assert not UNREAD.complete
    assert not EARLY_EMPTY.complete
    assert not Delivery(10, None).complete


def test_recent_bytes_count_the_records_in_the_unread_tail() -> None:
    recent = RecentBytes()
    schema = b'{"type":"SCHEMA","stream":"s","schema":{}}'
    records = [b'{"type":"RECORD","stream":"s","record":{"id":%d}}' % i for i in range(10)]
    state = b'{"type":"STATE","value":{}}'
    recent.feed(b"\n".join([schema, *records[:5]]) + b"\n")
    recent.feed(b"\n".join([*records[5:], state, b"not json"]) + b"\n")
    tail = len(state) + 1 + len(b"not json") + 1
    assert recent.records_in_last(0) == 0
    assert recent.records_in_last(tail) == 0
    assert recent.records_in_last(tail + 1) == 1  # a record cut in two never reached it whole
    assert recent.records_in_last(tail + sum(len(r) + 1 for r in records[6:])) == 4
    assert recent.records_in_last(10**6) is None  # fewer bytes kept than asked about


def test_recent_bytes_keep_a_bounded_tail() -> None:
    recent = RecentBytes(keep=100)
    line = b'{"type":"RECORD","stream":"s","record":{}}\n'
    for _ in range(1000):
        recent.feed(line)
    assert recent.records_in_last(100) is not None
    assert recent.records_in_last(1000) is None


@pytest.mark.parametrize(
    ("expected", "reported", "status"),
    [(10, 10, "ok"), (10, 9, "count_mismatch")],
    ids=["equal", "one_short"],
)
def test_cross_check_status(expected: int, reported: int, status: str) -> None:
    check = CrossCheck("tap_record_count", "users", expected, reported)
    assert check.status == status
    assert check.to_dict() == {
        "kind": "tap_record_count",
        "stream": "users",
        "expected": expected,
        "reported": reported,
        "status": status,
    }
