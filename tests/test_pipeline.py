"""The run command in standalone mode: real fake plugins, fault injection, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flext_meltano_context.cli import cli
from flext_meltano_context.errors import AbortedError, StepError, UsageError
from flext_meltano_context.pipeline import PipelineSpec, RunResult, Settings, execute
from tests.conftest import fake

pytestmark = pytest.mark.usefixtures("clean_env")


def spec(tap: list[str], target: list[str], **kwargs: Any) -> PipelineSpec:
    return PipelineSpec(
        tap="tap", target="target", tap_cmd=tuple(tap), target_cmd=tuple(target), **kwargs
    )


def run(tmp_path: Path, tap: list[str], target: list[str], **kwargs: Any) -> RunResult:
    settings = Settings(lineage_path=tmp_path / "lineage.jsonl", grace_seconds=3)
    return execute(spec(tap, target, **kwargs), environ=dict(os.environ), settings=settings)


def events(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "lineage.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone, only not yet reaped


def assert_no_orphans(pid_dir: Path) -> None:
    pids = [int(p.read_text()) for p in pid_dir.glob("*.pid")]
    assert pids, "the fakes wrote no pid files"
    deadline = time.monotonic() + 3
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if alive(pid)] == []


def test_records_reach_the_target_and_the_last_confirmed_state_is_written(tmp_path: Path) -> None:
    out, state_out = tmp_path / "out.jsonl", tmp_path / "state.json"
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "12"),
        fake("target_collect.py", str(out)),
        state_out=state_out,
    )
    assert (result.status, result.exit_code, result.records) == ("success", 0, 12)
    assert len(out.read_text().splitlines()) == 12
    written = json.loads(state_out.read_text())
    assert written["bookmarks"] == {"users": {"id": 12}}
    assert written["flext_context"]["run_id"] == result.run_id
    assert written["flext_context"]["correlation_id"] == result.correlation_id
    assert all(isinstance(v, str) for v in written["flext_context"].values())
    assert result.confirmed_states == 3
    assert result.state_persisted


def test_second_run_resumes_from_the_first_runs_state_and_records_who_wrote_it(
    tmp_path: Path,
) -> None:
    out, state_file = tmp_path / "out.jsonl", tmp_path / "state.json"
    tap, target = fake("tap_counter.py", "--records", "5"), fake("target_collect.py", str(out))
    first = run(tmp_path, tap, target, state_out=state_file)
    second = run(tmp_path, tap, target, state_in=state_file, state_out=state_file)
    assert second.state_loaded_from == first.run_id
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == list(range(1, 11))
    loaded = [e for e in events(tmp_path) if e["event"] == "state_loaded"]
    assert loaded[0]["run_id"] == second.run_id
    assert loaded[0]["data"]["written_by_run_id"] == first.run_id
    assert loaded[0]["data"]["streams"] == ["users"]


def test_lineage_log_has_the_runs_events_in_order(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "3"),
        fake("target_collect.py", str(tmp_path / "o")),
    )
    names = [e["event"] for e in events(tmp_path)]
    assert names[0] == "run_started"
    assert names[-1] == "run_completed"
    assert names.count("phase_started") == 2
    assert names.count("phase_completed") == 2
    stats = next(e for e in events(tmp_path) if e["event"] == "stream_stats")["data"]
    assert stats["counts"]["RECORD"] == 3
    assert stats["schema"] == {"properties": {"id": "integer"}, "key_properties": ["id"]}
    assert stats["tap_metrics"] == {"record_count": 3}
    done = events(tmp_path)[-1]["data"]
    assert done["status"] == "success"
    assert done["records"] == 3
    assert done["digest"] == result.digest


def test_a_run_under_github_actions_names_its_ci_run_in_the_report(tmp_path: Path) -> None:
    from flext_meltano_context.lineage.render import to_markdown
    from flext_meltano_context.lineage.report import build_report

    ci = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": "acme/etl",
        "GITHUB_RUN_ID": "42",
    }
    settings = Settings(lineage_path=tmp_path / "lineage.jsonl", grace_seconds=3)
    execute(
        spec(
            fake("tap_counter.py", "--records", "1"), fake("target_collect.py", str(tmp_path / "o"))
        ),
        environ={**os.environ, **ci},
        settings=settings,
    )
    started = events(tmp_path)[0]["data"]
    assert started["ci"]["provider"] == "github"
    report = build_report(events(tmp_path))
    assert "| CI | github https://github.com/acme/etl/actions/runs/42 |" in to_markdown(report)


def test_tap_failing_mid_stream_keeps_the_targets_confirmed_state_and_names_the_tap(
    tmp_path: Path,
) -> None:
    out, state_out, pids = tmp_path / "out.jsonl", tmp_path / "state.json", tmp_path / "pids"
    pids.mkdir()
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "20", "--fail-after", "7", "--pid-dir", str(pids)),
        fake("target_collect.py", str(out), "--pid-dir", str(pids)),
        state_out=state_out,
    )
    assert isinstance(result.error, StepError)
    assert (result.error.step, result.error.returncode) == ("tap_counter.py", 3)
    assert "boom" in result.error.stderr_tail[-1]
    assert result.exit_code == 1
    assert len(out.read_text().splitlines()) == 7  # delivered records stay delivered
    assert json.loads(state_out.read_text())["bookmarks"] == {"users": {"id": 5}}
    assert [p.status for p in result.phases] == ["failed", "success"]
    assert_no_orphans(pids)


def test_target_exiting_non_zero_stops_the_tap_and_names_the_target(tmp_path: Path) -> None:
    out, state_out, pids = tmp_path / "out.jsonl", tmp_path / "state.json", tmp_path / "pids"
    pids.mkdir()
    result = run(
        tmp_path,
        fake(
            "tap_counter.py",
            "--records",
            "12",
            "--hang",
            "--ignore-sigterm",
            "--pid-dir",
            str(pids),
            "--grandchild",
        ),
        fake("target_collect.py", str(out), "--exit-after", "6", "--pid-dir", str(pids)),
        state_out=state_out,
    )
    assert isinstance(result.error, StepError)
    assert (result.error.step, result.error.returncode) == ("target_collect.py", 5)
    assert "disk full" in str(result.error)
    assert json.loads(state_out.read_text())["bookmarks"] == {"users": {"id": 5}}
    assert result.phases[1].status == "failed"
    assert_no_orphans(pids)


def test_target_exiting_early_with_zero_still_fails_the_run(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "100000", "--pid-dir", str(pids)),
        fake("target_collect.py", str(tmp_path / "o"), "--exit-zero-after", "3"),
    )
    assert result.status == "failed"
    assert "target 'target_collect.py' exited 0 after reading" in str(result.error)
    # "K records never reached it" when bytes were left in its pipe; when it exited before the
    # relay wrote more (a race with the tap's start), "the rest of the stream never reached it".
    assert "never reached it" in str(result.error)
    assert_no_orphans(pids)


def test_target_failing_at_end_leaves_the_state_file_untouched(tmp_path: Path) -> None:
    state_out = tmp_path / "state.json"
    state_out.write_text('{"bookmarks": {"users": {"id": 1}}}')
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "7"),
        fake("target_collect.py", str(tmp_path / "o"), "--confirm-at-end", "--fail-at-end"),
        state_out=state_out,
    )
    assert isinstance(result.error, StepError)
    assert result.error.returncode == 1
    assert json.loads(state_out.read_text()) == {"bookmarks": {"users": {"id": 1}}}
    assert not result.state_persisted


def test_transform_runs_after_the_load_with_the_same_correlation_id(tmp_path: Path) -> None:
    seen = tmp_path / "probe.json"
    tap_env = tmp_path / "tap.json"
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "2", "--env-out", str(tap_env)),
        fake("target_collect.py", str(tmp_path / "o")),
        transform_cmds=(tuple(fake("probe_env.py", str(seen))),),
    )
    assert result.status == "success"
    block_env, extract_env = json.loads(seen.read_text())["env"], json.loads(tap_env.read_text())
    assert block_env["FLEXT_CORRELATION_ID"] == extract_env["env"]["FLEXT_CORRELATION_ID"]
    assert (block_env["FLEXT_PHASE"], extract_env["env"]["FLEXT_PHASE"]) == ("transform", "extract")
    assert result.phases[2].status == "success"


def test_transform_is_skipped_and_recorded_when_the_load_failed(tmp_path: Path) -> None:
    seen = tmp_path / "probe.json"
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "4", "--fail-after", "1"),
        fake("target_collect.py", str(tmp_path / "o")),
        transform_cmds=(tuple(fake("probe_env.py", str(seen))),),
    )
    assert result.status == "failed"
    assert not seen.exists()
    assert result.phases[2].status == "skipped"
    completed = [e["data"] for e in events(tmp_path) if e["event"] == "phase_completed"]
    assert completed[-1]["status"] == "skipped"


def test_failing_transform_fails_the_run_naming_the_block(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "1"),
        fake("target_collect.py", str(tmp_path / "o")),
        transform_cmds=(tuple(fake("probe_env.py", str(tmp_path / "p.json"), "4")),),
    )
    assert isinstance(result.error, StepError)
    assert result.error.returncode == 4
    assert "probe_env.py" in result.error.step


def test_a_missing_tap_executable_is_a_usage_error_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot start"):
        run(tmp_path, ["/nonexistent/tap-x"], fake("target_collect.py", str(tmp_path / "o")))


def test_a_missing_state_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        run(
            tmp_path,
            fake("tap_counter.py"),
            fake("target_collect.py", str(tmp_path / "o")),
            state_in=tmp_path / "nope.json",
        )


def test_plugin_names_without_meltano_are_refused_with_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "tap-x", "target-y"])
    assert result.exit_code == 2
    assert "meltano invoke flext-context run" in result.output


def test_run_command_prints_a_summary_on_stderr_and_nothing_on_stdout(tmp_path: Path) -> None:
    tap = " ".join(fake("tap_counter.py", "--records", "3"))
    target = " ".join(fake("target_collect.py", str(tmp_path / "o")))
    env = {"FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "l.jsonl")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flext_meltano_context",
            "run",
            "--tap-cmd",
            tap,
            "--target-cmd",
            target,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "users" in done.stderr
    assert "3 records" in done.stderr


def start_cli(tmp_path: Path, tap: list[str], target: list[str]) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "lineage.jsonl"),
        "FLEXT_CONTEXT_GRACE_SECONDS": "3",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flext_meltano_context",
            "run",
            "--tap-cmd",
            " ".join(tap),
            "--target-cmd",
            " ".join(target),
            "--state-out",
            str(tmp_path / "state.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, lines: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path.name} never reached {lines} lines")


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"]
)
def test_a_signal_stops_gracefully_keeps_confirmed_state_and_records_aborted(
    tmp_path: Path, signum: int, code: int
) -> None:
    out, pids = tmp_path / "out.jsonl", tmp_path / "pids"
    pids.mkdir()
    proc = start_cli(
        tmp_path,
        fake("tap_counter.py", "--records", "8", "--hang", "--pid-dir", str(pids), "--grandchild"),
        fake("target_collect.py", str(out), "--confirm-at-end", "--pid-dir", str(pids)),
    )
    wait_for(out, 8)
    proc.send_signal(signum)
    _stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    # The tap wrote its final STATE on SIGTERM; the target confirmed it at end of input.
    assert json.loads((tmp_path / "state.json").read_text())["bookmarks"] == {"users": {"id": 8}}
    done = events(tmp_path)[-1]
    assert done["event"] == "run_completed"
    assert done["data"]["status"] == "aborted"
    assert_no_orphans(pids)


def test_a_second_signal_stops_everything_at_once(tmp_path: Path) -> None:
    out, pids = tmp_path / "out.jsonl", tmp_path / "pids"
    pids.mkdir()
    proc = start_cli(
        tmp_path,
        fake(
            "tap_counter.py", "--records", "3", "--hang", "--ignore-sigterm", "--pid-dir", str(pids)
        ),
        fake("target_collect.py", str(out), "--pid-dir", str(pids)),
    )
    wait_for(out, 3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert time.monotonic() - started < 2.5  # not the 3 s grace period
    assert proc.returncode == 130
    assert_no_orphans(pids)


def test_aborted_error_carries_the_shell_exit_code() -> None:
    assert AbortedError(signal.SIGTERM, "x").exit_code == 143


def meltano_env(tmp_path: Path, path: str) -> dict[str, str]:
    root = tmp_path / "project"
    (root / ".meltano").mkdir(parents=True)
    return {
        **os.environ,
        "MELTANO_PROJECT_ROOT": str(root),
        "MELTANO_SYS_DIR_ROOT": str(root / ".meltano"),
        "MELTANO_ENVIRONMENT": "dev",
        "PATH": path,
    }


def test_meltano_not_found_is_a_usage_error_naming_what_to_do(tmp_path: Path) -> None:
    env = meltano_env(tmp_path, str(tmp_path / "empty-bin"))
    settings = Settings(lineage_path=tmp_path / "l.jsonl")
    with pytest.raises(UsageError, match="Meltano was not found"):
        execute(PipelineSpec(tap="tap-x", target="target-y"), environ=env, settings=settings)
    assert not (tmp_path / "l.jsonl").exists()


def test_a_held_state_lock_stops_a_meltano_run_before_anything_starts(tmp_path: Path) -> None:
    from flext_meltano_context.errors import LockedError
    from flext_meltano_context.state import StateLock

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    never = bin_dir / "meltano"
    never.write_text(f"#!/bin/sh\ntouch {tmp_path / 'meltano-ran'}\nexit 1\n")
    never.chmod(0o755)
    env = meltano_env(tmp_path, str(bin_dir))
    locks = tmp_path / "project" / ".meltano" / "flext-context" / "locks"
    holder = StateLock(locks, "dev:tap-x-to-target-y")
    holder.acquire(run_id="the-other-run", correlation_id="c")
    settings = Settings(lineage_path=tmp_path / "l.jsonl")
    with pytest.raises(LockedError, match="the-other-run"):
        execute(PipelineSpec(tap="tap-x", target="target-y"), environ=env, settings=settings)
    holder.release()
    assert not (tmp_path / "meltano-ran").exists()


def test_record_column_setting_adds_the_correlation_id_to_each_record(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    settings = Settings(lineage_path=tmp_path / "l.jsonl", record_column_streams=frozenset({"*"}))
    result = execute(
        spec(fake("tap_counter.py", "--records", "3"), fake("target_collect.py", str(out))),
        environ=dict(os.environ),
        settings=settings,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["_sdc_correlation_id"] for row in rows} == {result.correlation_id}


def test_strict_mode_stops_at_a_bad_line_and_fails_the_run(tmp_path: Path) -> None:
    from flext_meltano_context.errors import StrictModeError

    out, pids = tmp_path / "out.jsonl", tmp_path / "pids"
    pids.mkdir()
    settings = Settings(lineage_path=tmp_path / "l.jsonl", strict=True, grace_seconds=3)
    result = execute(
        spec(
            fake(
                "tap_counter.py", "--records", "50", "--garbage-after", "2", "--pid-dir", str(pids)
            ),
            fake("target_collect.py", str(out)),
        ),
        environ=dict(os.environ),
        settings=settings,
    )
    assert isinstance(result.error, StrictModeError)
    assert result.exit_code == 1
    assert len(out.read_text().splitlines()) == 2
    assert result.phases[0].status == "failed"
    assert_no_orphans(pids)


def test_a_tap_that_cannot_start_ends_the_run_in_the_log_and_leaves_no_target(
    tmp_path: Path,
) -> None:
    not_a_program = tmp_path / "tap-garbage"
    not_a_program.write_bytes(b"\x00\x01 not an executable format\n")
    not_a_program.chmod(0o755)
    pids = tmp_path / "pids"
    pids.mkdir()
    target = fake("target_collect.py", str(tmp_path / "out.jsonl"), "--pid-dir", str(pids))
    with pytest.raises(UsageError, match="tap-garbage"):
        run(tmp_path, [str(not_a_program)], target)
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds[0] == "run_started"
    assert kinds[-1] == "run_completed"
    completed = events(tmp_path)[-1]["data"]
    assert completed["status"] == "failed"
    assert "tap-garbage" in completed["error"]
    # The target had started first: it is stopped, not left behind.
    deadline = time.monotonic() + 5
    while not list(pids.glob("*.pid")) and time.monotonic() < deadline:
        time.sleep(0.05)
    if list(pids.glob("*.pid")):
        assert_no_orphans(pids)


# -- a target that stops reading fails the load, deterministically (issue 10 section 1) --------

REPEAT = 20
SMALL_TAP = ("tap_counter.py", "--records", "20")  # 26 lines, far below one pipe buffer


def large_tap_env() -> dict[str, str]:
    return {**os.environ, "BENCH_RECORDS": "40000"}  # about 6 MB: more than every pipe holds


def run_with(tmp_path: Path, tap: list[str], target: list[str], env: dict[str, str]) -> RunResult:
    settings = Settings(lineage_path=tmp_path / "lineage.jsonl", grace_seconds=3, landing=False)
    return execute(spec(tap, target), environ=env, settings=settings)


def test_a_target_that_stops_reading_a_small_stream_fails_with_exact_counts(
    tmp_path: Path,
) -> None:
    stream = subprocess.run(fake(*SMALL_TAP), capture_output=True, check=True).stdout
    head = sum(len(line) for line in stream.splitlines(keepends=True)[:4])
    expected = (
        f"target 'target_head.py' exited 0 after reading {head:,} of {len(stream):,} bytes; "
        "17 records never reached it"
    )
    target = fake("target_head.py", "--lines", "4", "--delay", "0.2")
    for attempt in range(REPEAT):
        result = run_with(tmp_path, fake(*SMALL_TAP), target, dict(os.environ))
        assert (result.status, str(result.error)) == ("failed", expected), attempt
        assert [p.status for p in result.phases] == ["success", "failed"]


def test_a_target_that_stops_reading_a_large_stream_fails_every_time(tmp_path: Path) -> None:
    target = fake("target_head.py", "--lines", "4")
    for attempt in range(REPEAT):
        result = run_with(tmp_path, fake("bench_tap.py"), target, large_tap_env())
        assert result.status == "failed", attempt
        message = str(result.error)
        assert message.startswith("target 'target_head.py' exited 0 after reading "), message
        assert "records never reached it" in message
        assert result.phases[1].status == "failed"


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_target_that_stops_reading_and_exits_non_zero_fails_every_time(
    tmp_path: Path, size: str
) -> None:
    tap = fake(*SMALL_TAP) if size == "small" else fake("bench_tap.py")
    env = dict(os.environ) if size == "small" else large_tap_env()
    target = fake("target_head.py", "--lines", "4", "--code", "3")
    for attempt in range(REPEAT):
        result = run_with(tmp_path, tap, target, env)
        assert isinstance(result.error, StepError), attempt
        assert (result.error.step, result.error.returncode) == ("target_head.py", 3)


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_target_that_reads_everything_succeeds_every_time(tmp_path: Path, size: str) -> None:
    """The passing control beside the early exits: same reader, reading to the end."""
    tap = fake(*SMALL_TAP) if size == "small" else fake("bench_tap.py")
    env = dict(os.environ) if size == "small" else large_tap_env()
    for attempt in range(REPEAT):
        result = run_with(tmp_path, tap, fake("target_head.py"), env)
        assert (result.status, result.error) == ("success", None), attempt
    assert result.records == (20 if size == "small" else 40000)


def test_a_target_exiting_early_keeps_the_states_it_confirmed(tmp_path: Path) -> None:
    state_out = tmp_path / "state.json"
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "20"),
        # SCHEMA, 1-5, STATE 5, 6-10, STATE 10, 11: then it stops reading.
        fake("target_head.py", "--lines", "14", "--confirm-states", "--delay", "0.2"),
        state_out=state_out,
    )
    assert result.status == "failed"
    assert str(result.error).endswith("; 9 records never reached it")
    load = next(
        e
        for e in events(tmp_path)
        if e["event"] == "phase_completed" and e["data"]["phase"] == "load"
    )["data"]["metrics"]
    assert load["bytes_unread"] > 0
    assert load["end_of_input_first"] is True
    assert json.loads(state_out.read_text())["bookmarks"] == {"users": {"id": 10}}
    assert result.confirmed_states == 2


# -- cross-checks and incomplete counts (issue 10) ---------------------------------------------


def test_cross_checks_compare_the_plugins_counts_with_the_relays(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        fake("tap_counter.py", "--records", "7"),
        fake("target_collect.py", str(tmp_path / "o")),
    )
    found = next(e for e in events(tmp_path) if e["event"] == "cross_checks")["data"]["checks"]
    assert {c["kind"]: c["status"] for c in found} == {
        "target_lines": "ok",
        "tap_record_count": "ok",
    }
    tap_check = next(c for c in found if c["kind"] == "tap_record_count")
    assert (tap_check["stream"], tap_check["expected"], tap_check["reported"]) == ("users", 7, 7)
    assert result.anomaly_count == 0
    assert completed_data(tmp_path)["counting_error"] is None
    assert "  cross-checks ok: target lines, tap record_count users" in result.notes()


def test_a_tap_metric_that_disagrees_is_a_count_mismatch_anomaly(tmp_path: Path) -> None:
    # Resuming at id 5, the fake reports record_count 3 of the 3 it sent; a wrong count is
    # simulated by a tap that prints a METRIC for a stream it never sent.
    script = tmp_path / "tap_lies.py"
    script.write_text(
        "import json, sys\n"
        "sys.stdout.write(json.dumps({'type': 'SCHEMA', 'stream': 's', 'schema': {}, "
        "'key_properties': []}) + '\\n')\n"
        "sys.stdout.write(json.dumps({'type': 'RECORD', 'stream': 's', 'record': {}}) + '\\n')\n"
        "m = {'type': 'counter', 'metric': 'record_count', 'value': 2, 'tags': {'stream': 's'}}\n"
        "print('INFO METRIC: ' + json.dumps(m), file=sys.stderr)\n"
    )
    result = run(tmp_path, [sys.executable, str(script)], fake("target_head.py"))
    assert result.status == "success"  # the load itself is fine; the record says what disagrees
    (check,) = result.cross_checks
    assert (check.kind, check.stream, check.expected, check.reported) == (
        "tap_record_count",
        "s",
        1,
        2,
    )
    assert check.status == "count_mismatch"
    assert "  cross-check tap record_count s: count_mismatch (relayed 1, reported 2)" in (
        result.notes()
    )
    anomalies = next(e for e in events(tmp_path) if e["event"] == "anomalies")["data"]
    assert [a["kind"] for a in anomalies["first"]] == ["count_mismatch"]
    assert result.anomaly_count == 1


def completed_data(tmp_path: Path) -> dict[str, Any]:
    done = events(tmp_path)[-1]
    assert done["event"] == "run_completed"
    data: dict[str, Any] = done["data"]
    return data


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("On", True),
        ("YES", True),
        ("1", True),
        ("enabled", True),
        ("false", False),
        ("off", False),
        ("no", False),
        ("0", False),
        ("Disabled", False),
    ],
)
def test_every_boolean_setting_reads_the_same_words(raw: str, value: bool) -> None:
    for name, field in (
        ("FLEXT_CONTEXT_STRICT", "strict"),
        ("FLEXT_CONTEXT_LANDING", "landing"),
        ("FLEXT_CONTEXT_INJECT_STATE", "inject_state"),
        ("FLEXT_CONTEXT_MELTANO_SERVER", "meltano_server"),
    ):
        assert getattr(Settings.from_env({name: raw}), field) is value


def test_a_boolean_setting_that_is_no_boolean_is_refused_naming_it() -> None:
    with pytest.raises(UsageError, match=r"FLEXT_CONTEXT_STRICT='maybe' is not a boolean; use"):
        Settings.from_env({"FLEXT_CONTEXT_STRICT": "maybe"})


def test_defaults_and_the_timeout_settings() -> None:
    conf = Settings.from_env({})
    assert (conf.grace_seconds, conf.timeout_seconds, conf.landing, conf.strict) == (
        20.0,
        None,
        True,
        False,
    )
    assert Settings.from_env({"MELTANO_RUN_TIMEOUT": "90"}).timeout_seconds == 90.0
    both = {"MELTANO_RUN_TIMEOUT": "90", "FLEXT_CONTEXT_TIMEOUT": "5"}
    assert Settings.from_env(both).timeout_seconds == 5.0
    with pytest.raises(UsageError, match="FLEXT_CONTEXT_TIMEOUT='-1' is not a positive number"):
        Settings.from_env({"FLEXT_CONTEXT_TIMEOUT": "-1"})


def test_the_spec_types_are_importable_from_the_pipeline_too() -> None:
    from flext_meltano_context import pipeline, spec

    assert pipeline.RunResult is spec.RunResult
    assert pipeline.PhaseResult is spec.PhaseResult
    assert pipeline.PipelineSpec is spec.PipelineSpec
    assert pipeline.Settings is spec.Settings


def test_a_counting_error_marks_counts_incomplete_and_checks_nothing_against_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from flext_meltano_context.relay import relay as real

    def relay_that_lost_count(*args: Any, **kwargs: Any) -> Any:
        # The seam: a real relay whose counting broke (forwarding goes on, as relay.py does).
        return replace(real(*args, **kwargs), counting_error="ValueError: a counting bug")

    monkeypatch.setattr("flext_meltano_context.pipeline.relay", relay_that_lost_count)
    settings = Settings(lineage_path=tmp_path / "lineage.jsonl", grace_seconds=3)
    result = execute(
        spec(fake("tap_counter.py", "--records", "4"), fake("target_head.py")),
        environ=dict(os.environ),
        settings=settings,
    )
    assert result.status == "success"  # every byte was forwarded; only the counts are unsure
    assert result.counting_error == "ValueError: a counting bug"
    assert completed_data(tmp_path)["counting_error"] == "ValueError: a counting bug"
    assert "counts incomplete: the relay stopped counting: ValueError" in "\n".join(result.notes())
    landed = next(e for e in events(tmp_path) if e["event"] == "landing")["data"]["streams"]
    assert [(row["stream"], row["status"]) for row in landed] == [("users", "not checked")]
    assert landed[0]["reason"] == "the relay's counts are incomplete: ValueError: a counting bug"
    assert not any(e["event"] == "cross_checks" for e in events(tmp_path))
