"""How a run stops (issue 11): one deadline, bounded whatever is buffered, no orphans, ever.

Real processes through the real CLI; timings are bounds with a margin (a busy 2-core machine),
never exact times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flext_meltano_context import preflight, stopping
from flext_meltano_context.lineage.log import LineageLogError
from flext_meltano_context.pipeline import PipelineSpec, Settings, execute
from flext_meltano_context.runenv import identity_from_env
from flext_meltano_context.state import Persister, StateLock
from tests.conftest import fake

pytestmark = pytest.mark.usefixtures("clean_env")

GRACE = 2.0
MARGIN = 3.0  # scheduling slack on a loaded machine


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone, only not yet reaped


def pids_in(pid_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in pid_dir.glob("*.pid")]


def gone_within(pid_dir: Path, seconds: float) -> list[int]:
    """The pids still alive after `seconds` (empty when all are gone)."""
    pids = pids_in(pid_dir)
    assert pids, "the fakes wrote no pid files"
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def wait_until(check: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def start_cli(
    tmp_path: Path, tap: list[str], target: list[str], *extra: str, grace: float = GRACE
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "lineage.jsonl"),
        "FLEXT_CONTEXT_GRACE_SECONDS": str(grace),
        "FLEXT_CONTEXT_LANDING": "off",
    }
    argv = [sys.executable, "-m", "flext_meltano_context", "run"]
    argv += ["--tap-cmd", " ".join(tap), "--target-cmd", " ".join(target)]
    argv += ["--state-out", str(tmp_path / "state.json"), *extra]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def last_event(tmp_path: Path) -> dict[str, Any]:
    lines = (tmp_path / "lineage.jsonl").read_text().splitlines()
    event: dict[str, Any] = json.loads(lines[-1])
    return event


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"]
)
def test_a_signal_with_a_backlog_beyond_every_pipe_ends_within_grace_plus_5_s(
    tmp_path: Path, signum: int, code: int
) -> None:
    out, pids = tmp_path / "out.jsonl", tmp_path / "pids"
    pids.mkdir()
    proc = start_cli(
        tmp_path,
        # About 5 MB at once: more than the tap's pipe, the target's pipe and the relay's chunk.
        fake("tap_counter.py", "--records", "100000", "--hang", "--pid-dir", str(pids)),
        fake("target_collect.py", str(out), "--slow", "0.002", "--confirm-at-end"),
    )
    wait_until(lambda: lines_in(out) >= 50, "the target loading")
    time.sleep(1.0)  # the tap fills every buffer meanwhile
    assert lines_in(out) < 5000  # a real backlog: the slow target is far behind
    sent = time.monotonic()
    proc.send_signal(signum)
    _stdout, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == code, stderr
    assert took < GRACE + 5 + MARGIN, took
    # The target confirmed the last state it had taken on SIGTERM; that state is kept.
    kept = json.loads((tmp_path / "state.json").read_text())["bookmarks"]["users"]["id"]
    assert 0 < kept <= lines_in(out)
    done = last_event(tmp_path)
    assert (done["event"], done["data"]["status"]) == ("run_completed", "aborted")
    assert gone_within(pids, 2) == []


def test_a_target_that_dies_stops_a_tap_ignoring_sigterm_within_5_s(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    tap = fake(
        "tap_counter.py", "--records", "12", "--hang", "--ignore-sigterm", "--pid-dir", str(pids)
    )
    target = fake("target_collect.py", str(tmp_path / "o"), "--exit-after", "6")
    # The default grace (20 s) must not matter: nothing can read the tap any more.
    settings = Settings(lineage_path=tmp_path / "lineage.jsonl", landing=False)
    spec = PipelineSpec(tap="tap", target="target", tap_cmd=tuple(tap), target_cmd=tuple(target))
    result = execute(spec, environ=dict(os.environ), settings=settings)
    extract, load = result.phases
    assert (load.exit_code, extract.exit_code) == (5, -signal.SIGKILL)
    assert load.ended_at is not None
    assert extract.ended_at is not None
    assert extract.ended_at - load.ended_at < 5 + 1.5
    assert result.ended_at - load.ended_at < 10
    assert gone_within(pids, 2) == []


def test_a_transform_block_ignoring_sigterm_is_killed_at_the_deadline(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    block = " ".join(fake("block_stubborn.py", str(pids)))
    proc = start_cli(
        tmp_path,
        fake("tap_counter.py", "--records", "3"),
        fake("target_collect.py", str(tmp_path / "o")),
        "--transform-cmd",
        block,
    )
    wait_until(lambda: any(pids.glob("block-*.pid")), "the block started")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 143, stderr
    assert GRACE <= took < GRACE + 5 + MARGIN, took  # it had its grace, then it was killed
    assert gone_within(pids, 1) == []
    phases = [
        json.loads(line)["data"]
        for line in (tmp_path / "lineage.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "phase_completed"
    ]
    assert phases[-1]["status"] == "aborted"
    assert phases[-1]["exit_code"] == -signal.SIGKILL


@pytest.mark.parametrize("during", ["load", "block"])
def test_sigkill_to_flext_context_leaves_no_child_alive_2_s_later(
    tmp_path: Path, during: str
) -> None:
    out, pids = tmp_path / "out.jsonl", tmp_path / "pids"
    pids.mkdir()
    hang = ["--hang"] if during == "load" else []
    extra = ["--transform-cmd", " ".join(fake("block_stubborn.py", str(pids)))]
    proc = start_cli(
        tmp_path,
        # --grandchild: a process of the tap's own, as the plugin behind `meltano invoke` is.
        fake("tap_counter.py", "--records", "8", *hang, "--pid-dir", str(pids), "--grandchild"),
        fake("target_collect.py", str(out), "--pid-dir", str(pids)),
        *(extra if during == "block" else []),
    )
    if during == "load":
        wait_until(lambda: lines_in(out) >= 8, "the records loaded")
    else:
        wait_until(lambda: any(pids.glob("block-*.pid")), "the block started")
    proc.kill()
    proc.communicate(timeout=30)
    assert gone_within(pids, 2) == []


def test_timeout_stops_the_run_gracefully_and_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = start_cli(
        tmp_path,
        fake("tap_counter.py", "--records", "8", "--hang"),
        fake("target_collect.py", str(out)),
        "--timeout",
        "1.5",
    )
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "timed out after 1.5 s" in stderr
    done = last_event(tmp_path)["data"]
    assert done["status"] == "failed"
    assert done["error"].startswith("timed out after 1.5 s")
    # The tap wrote its final STATE on SIGTERM and the target confirmed it: state kept.
    assert json.loads((tmp_path / "state.json").read_text())["bookmarks"] == {"users": {"id": 8}}


def test_a_timeout_that_is_not_reached_changes_nothing(tmp_path: Path) -> None:
    env_timeout = {"FLEXT_CONTEXT_TIMEOUT": "60"}
    settings = Settings.from_env({**env_timeout, "FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "l")})
    assert settings.timeout_seconds == 60
    tap, target = fake("tap_counter.py", "--records", "3"), fake("target_head.py")
    spec = PipelineSpec(tap="tap", target="target", tap_cmd=tuple(tap), target_cmd=tuple(target))
    result = execute(spec, environ=dict(os.environ), settings=settings)
    assert (result.status, result.timed_out_after) == ("success", None)


# -- a lineage write that fails --------------------------------------------------------------


@pytest.fixture
def locked_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Standalone runs that hold a real state lock and a work directory, as Meltano runs do."""
    real = preflight.prepare_standalone
    locks = tmp_path / "locks"

    def prepare(spec: PipelineSpec) -> preflight.Prepared:
        prepared = real(spec)
        prepared.lock = StateLock(locks, "dev:tap-to-target")
        prepared.lock.acquire(run_id="this-run", correlation_id="c")
        prepared.workdir = tmp_path / "work"
        prepared.workdir.mkdir()
        return prepared

    monkeypatch.setattr(preflight, "prepare_standalone", prepare)
    return locks


def assert_released(tmp_path: Path, locks: Path) -> None:
    assert not (tmp_path / "work").exists()
    after = StateLock(locks, "dev:tap-to-target")
    after.acquire(run_id="next-run", correlation_id="c")  # raises LockedError if leaked
    after.release()


def test_a_lineage_log_that_cannot_be_opened_fails_before_any_child_and_releases_all(
    tmp_path: Path, locked_runs: Path
) -> None:
    lineage = tmp_path / "lineage.jsonl"
    lineage.mkdir()  # a directory where the log should be: no write can succeed
    pids = tmp_path / "pids"
    pids.mkdir()
    tap = fake("tap_counter.py", "--records", "3", "--pid-dir", str(pids))
    target = fake("target_head.py", "--pid-dir", str(pids))
    spec = PipelineSpec(tap="tap", target="target", tap_cmd=tuple(tap), target_cmd=tuple(target))
    with pytest.raises(LineageLogError, match="cannot open the lineage log"):
        execute(spec, environ=dict(os.environ), settings=Settings(lineage_path=lineage))
    assert pids_in(pids) == []  # nothing started
    assert_released(tmp_path, locked_runs)


def test_a_lineage_write_failing_mid_run_is_reported_and_the_run_ends_normally(
    tmp_path: Path, locked_runs: Path
) -> None:
    lineage, out, state_out = tmp_path / "lineage.jsonl", tmp_path / "out", tmp_path / "s.json"
    tap = fake("tap_counter.py", "--records", "20")
    # The target loads slowly; meanwhile the lineage log's path becomes unwritable.
    target = fake("target_collect.py", str(out), "--slow", "0.05")
    spec = PipelineSpec(
        tap="tap",
        target="target",
        tap_cmd=tuple(tap),
        target_cmd=tuple(target),
        state_out=state_out,
    )

    def break_the_log() -> None:
        wait_until(lambda: lines_in(out) >= 2, "the load under way")
        lineage.rename(tmp_path / "lineage.old")
        lineage.mkdir()

    breaker = threading.Thread(target=break_the_log)
    breaker.start()
    result = execute(spec, environ=dict(os.environ), settings=Settings(lineage_path=lineage))
    breaker.join()
    assert result.status == "failed"
    assert "the lineage log could not be written" in str(result.error)
    assert result.lineage_error is not None
    assert "lineage" in result.lineage_error
    # Tap and target were not killed for it: every record landed, the last state is kept.
    assert [p.status for p in result.phases] == ["success", "success"]
    assert lines_in(out) == 20
    assert json.loads(state_out.read_text())["bookmarks"] == {"users": {"id": 20}}
    assert_released(tmp_path, locked_runs)


def test_a_childs_exit_time_is_when_it_exited_not_when_it_was_reaped() -> None:
    from flext_meltano_context.children import Child

    argv = [sys.executable, "-c", "pass"]
    child = Child("quick", argv, dict(os.environ), stdin=None, stdout=None)
    wait_until(child.exited.is_set, "the child exited", seconds=10)
    time.sleep(1.5)  # the run loop busy elsewhere
    exit_ = child.wait()
    assert exit_.returncode == 0
    assert exit_.ended_at - exit_.started_at < 1.0
    assert time.time() - exit_.ended_at >= 1.5


# -- the rules step by step, on a clock the test turns (real processes, no waiting) -----------

DEAF = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def deaf_pair(stopper: stopping.Stopper) -> tuple[Any, Any]:
    """A tap and a target that both ignore SIGTERM and never read or write."""
    env = dict(os.environ)
    target = stopper.start_target("target", [sys.executable, "-c", DEAF], env, lambda _v: None)
    tap = stopper.start_tap("tap", [sys.executable, "-c", DEAF], env)
    # Both deaf before the test signals them: the tap's line on our pipe, the target's seen.
    said = b""
    while not said.endswith(b"\n"):
        said += os.read(tap.stdout, 6)
    assert said == b"ready\n"
    wait_until(lambda: target.other_lines == 1, "the target ready", seconds=10)
    return tap, target


def at(clock: Clock, stopper: stopping.Stopper, seconds: float) -> None:
    clock.now = 1000.0 + seconds
    stopper.tick()


@pytest.mark.parametrize(("grace", "tap_killed_at"), [(20.0, 10.0), (4.0, 4.0)])
def test_one_deadline_from_the_first_signal(grace: float, tap_killed_at: float) -> None:
    clock = Clock()
    stopper = stopping.Stopper(grace, clock=clock)
    tap, target = deaf_pair(stopper)
    try:
        stopper._handle(signal.SIGTERM, None)  # as the signal would call it
        assert (tap.child.signalled, target.child.signalled) == (signal.SIGTERM, None)
        at(clock, stopper, tap_killed_at - 0.1)
        assert not tap.child.exited.wait(0.3)  # it ignores SIGTERM and is not killed yet
        assert (target.child.signalled,) == (None,)  # the target may still confirm a state
        if grace > tap_killed_at:
            at(clock, stopper, tap_killed_at)
            assert tap.child.wait(5).returncode == -signal.SIGKILL
            at(clock, stopper, grace - 0.1)
            assert (target.child.signalled,) == (None,)
        at(clock, stopper, grace)
        assert tap.child.wait(5).returncode == -signal.SIGKILL
        assert target.child.signalled == signal.SIGTERM
        assert target.stdin is not None  # replaced by a dead pipe: the next relay write fails
        with pytest.raises(BrokenPipeError):
            os.write(target.stdin, b"x\n")
        at(clock, stopper, grace + 4.9)
        assert not target.child.exited.wait(0.3)
        at(clock, stopper, grace + 5)
        assert target.child.wait(5).returncode == -signal.SIGKILL
    finally:
        stopper.cleanup()


def test_a_second_signal_kills_everything_at_once() -> None:
    clock = Clock()
    stopper = stopping.Stopper(20.0, clock=clock)
    tap, target = deaf_pair(stopper)
    try:
        stopper._handle(signal.SIGINT, None)
        stopper._handle(signal.SIGINT, None)
        assert tap.child.wait(5).returncode == -signal.SIGKILL
        assert target.child.wait(5).returncode == -signal.SIGKILL
        assert stopper.hard
    finally:
        stopper.cleanup()


def test_the_timeout_starts_the_same_stop() -> None:
    clock = Clock()
    stopper = stopping.Stopper(20.0, timeout=30.0, clock=clock)
    tap, _target = deaf_pair(stopper)
    try:
        at(clock, stopper, 29.9)
        assert (stopper.stopping, tap.child.signalled) == (False, None)
        at(clock, stopper, 30.0)
        assert (stopper.timed_out_after, tap.child.signalled) == (30.0, signal.SIGTERM)
        assert stopper.signum is None
    finally:
        stopper.cleanup()


def test_a_tap_without_a_reader_gets_at_most_5_s() -> None:
    clock = Clock()
    stopper = stopping.Stopper(20.0, clock=clock)
    tap, _target = deaf_pair(stopper)
    try:
        stopper.target_gone()
        assert tap.child.signalled == signal.SIGTERM
        at(clock, stopper, 4.9)
        assert not tap.child.exited.wait(0.3)
        at(clock, stopper, 5.0)
        assert tap.child.wait(5).returncode == -signal.SIGKILL
        assert not stopper.stopping  # a failure, not a stop: the run is not "aborted"
    finally:
        stopper.cleanup()


def _slow_store(seconds: float) -> tuple[list[dict[str, Any]], threading.Event, Any]:
    """A state store that answers after `seconds`, or at once when the event is set."""
    written: list[dict[str, Any]] = []
    answer = threading.Event()

    def write(value: dict[str, Any]) -> None:
        answer.wait(seconds)
        written.append(value)

    return written, answer, write


@pytest.mark.parametrize(
    ("stopped_ago", "store_takes", "stored"),
    [(5.5, 30.0, False), (0.0, 0.3, True), (None, 0.3, True)],
    ids=["hung-store-at-the-deadline", "store-in-time", "no-stop-no-bound"],
)
def test_after_a_stop_the_wait_for_the_store_counts_against_the_deadline(
    stopped_ago: float | None, store_takes: float, stored: bool
) -> None:
    written, answer, write = _slow_store(store_takes)
    persister = Persister(write, identity_from_env({}, job_name="tap-to-target"))
    persister.offer({"bookmarks": {"users": {"id": 8}}})
    stopper = stopping.Stopper(grace=1.0)  # the last kill 6 s after the stop request
    if stopped_ago is not None:
        stopper.began = stopper.clock() - stopped_ago
    started = time.monotonic()
    assert persister.finish(stopper.wait_store) is stored
    took = time.monotonic() - started
    if stored:
        assert persister.persisted == 1
        assert persister.unstored is None
        assert written[0]["bookmarks"] == {"users": {"id": 8}}
        return
    # 6 - 5.5 - 1 (STORE_MARGIN) < 0: given up at once, and said so.
    assert took < 1.0, took
    assert persister.unstored is not None
    assert persister.unstored.startswith(
        "the last confirmed state could not be stored before the deadline: "
    )
    assert "the stored state is untouched (1 confirmed by the target)" in persister.unstored
    assert persister.errors == [persister.unstored]
    answer.set()  # the store answers late: nothing is counted or stored after giving up
    time.sleep(0.2)
    assert persister.persisted == 0
