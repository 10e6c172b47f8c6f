"""State ids, the flext_context stamp, state files, and the lock per state id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from flext_meltano_context.errors import LockedError, UsageError
from flext_meltano_context.state import (
    StateLock,
    attach_context,
    loaded,
    read_state_file,
    state_id,
    write_json_atomic,
)


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [(None, "dev:tap-x-to-target-y"), ("blue", "dev:tap-x-to-target-y:blue")],
    ids=["plain", "suffix"],
)
def test_state_id_is_meltano_runs(suffix: str | None, expected: str) -> None:
    assert state_id("dev", "tap-x", "target-y", suffix) == expected


def test_attached_context_names_the_writer_and_keeps_the_bookmarks() -> None:
    value = {"bookmarks": {"users": {"id": 3}}, "flext_context": {"run_id": "old"}}
    stamped = attach_context(value, correlation_id="c", run_id="r", written_at="t")
    assert stamped["bookmarks"] == value["bookmarks"]
    assert stamped["flext_context"] == {"correlation_id": "c", "run_id": "r", "written_at": "t"}
    described = loaded(stamped)
    assert (described.written_by_run_id, described.streams) == ("r", ["users"])


def test_state_file_round_trips_and_accepts_meltano_state_get_output(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"bookmarks": {"a": {}}})
    read = read_state_file(path)
    assert read is not None
    assert read.value == {"bookmarks": {"a": {}}}
    path.write_text(json.dumps({"singer_state": {"bookmarks": {"b": {}}}}))
    read = read_state_file(path)
    assert read is not None
    assert read.streams == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["garbage", "a-list"])
def test_a_bad_state_file_is_a_usage_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=r"state\.json"):
        read_state_file(path)


def test_a_second_holder_is_refused_with_the_first_holders_name(tmp_path: Path) -> None:
    first = StateLock(tmp_path, "dev:tap-to-target")
    first.acquire(run_id="run-1", correlation_id="c")
    with pytest.raises(LockedError, match="run-1") as caught:
        StateLock(tmp_path, "dev:tap-to-target").acquire(run_id="run-2", correlation_id="c")
    assert caught.value.exit_code == 2
    first.release()
    again = StateLock(tmp_path, "dev:tap-to-target")
    again.acquire(run_id="run-3", correlation_id="c")
    again.release()


def test_force_runs_despite_the_lock(tmp_path: Path) -> None:
    first = StateLock(tmp_path, "s")
    first.acquire(run_id="run-1", correlation_id="c")
    with capture_logs() as logs:
        StateLock(tmp_path, "s").acquire(run_id="run-2", correlation_id="c", force=True)
    assert logs[0]["event"] == "state_lock_forced"
    first.release()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from flext_meltano_context.state import StateLock;"
        "StateLock(Path(sys.argv[1]), 's').acquire(run_id='dead-run', correlation_id='c')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)  # exits holding it
    lock = StateLock(tmp_path, "s")
    with capture_logs() as logs:
        lock.acquire(run_id="run-2", correlation_id="c")
    assert logs[0]["event"] == "stale_state_lock_taken_over"
    assert "dead-run" in logs[0]["holder"]
    lock.release()


def test_atomic_writes_get_the_mode_a_plain_write_would_give(tmp_path: Path) -> None:
    import os
    import stat

    from flext_meltano_context.state import write_text_atomic

    fresh = tmp_path / "report.html"
    write_text_atomic(fresh, "<p>hi</p>")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    kept = tmp_path / "state.json"
    kept.write_text("{}")
    kept.chmod(0o600)
    write_text_atomic(kept, '{"a": 1}')
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_text() == '{"a": 1}'


EMPTY_STAMP = {"flext_context": {"correlation_id": "c", "run_id": "r", "written_at": "t"}}


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ({}, False),  # Meltano's BookmarkWriter skips it: it would replace the bookmarks
        (EMPTY_STAMP, False),  # only our own stamp: the tap's part is empty
        ({"bookmarks": {}}, True),  # not falsy: Meltano stores it, so do we
        ({"bookmarks": {"users": {"id": 3}}}, True),
        ({"currently_syncing": None}, True),
    ],
    ids=["empty", "only-our-stamp", "empty-bookmarks", "bookmarks", "other-key"],
)
def test_an_empty_state_is_counted_as_ignored_and_never_written(
    value: dict[str, object], stored: bool
) -> None:
    from flext_meltano_context.runenv import identity_from_env
    from flext_meltano_context.state import Persister

    written: list[dict[str, object]] = []
    persister = Persister(written.append, identity_from_env({}, job_name="tap-to-target"))
    with capture_logs() as logs:
        persister.offer(value)
    persister.finish()
    assert (persister.persisted, persister.confirmed, persister.ignored_empty) == (
        (1, 1, 0) if stored else (0, 0, 1)
    )
    assert [{k: v for k, v in w.items() if k != "flext_context"} for w in written] == (
        [{k: v for k, v in value.items() if k != "flext_context"}] if stored else []
    )
    assert [e["event"] for e in logs] == ([] if stored else ["state_ignored"])


def test_an_empty_state_after_a_real_one_keeps_the_real_one() -> None:
    from flext_meltano_context.runenv import identity_from_env
    from flext_meltano_context.state import Persister

    written: list[dict[str, object]] = []
    persister = Persister(written.append, identity_from_env({}, job_name="tap-to-target"))
    persister.offer({"bookmarks": {"users": {"id": 3}}})
    persister.offer({})
    persister.finish()
    assert [w["bookmarks"] for w in written] == [{"users": {"id": 3}}]
    assert persister.ignored_empty == 1


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("said", "kept"),
    [("{}", True), ('{"bookmarks": {"users": {"id": 99}}}', False)],
    ids=["empty-state-kept-out", "real-state-stored"],
)
def test_standalone_state_out_is_not_replaced_by_an_empty_state(
    tmp_path: Path, said: str, kept: bool
) -> None:
    import os

    from flext_meltano_context.pipeline import PipelineSpec, Settings, execute
    from tests.conftest import fake

    state_file = tmp_path / "state.json"
    before = {"bookmarks": {"users": {"id": 4}}}
    state_file.write_text(json.dumps(before))
    spec = PipelineSpec(
        tap="tap",
        target="target",
        tap_cmd=tuple(fake("tap_counter.py", "--records", "3")),
        target_cmd=tuple(fake("target_says.py", str(tmp_path / "out.jsonl"), "--say", said)),
        state_in=state_file,
        state_out=state_file,
    )
    settings = Settings(lineage_path=tmp_path / "lineage.jsonl", grace_seconds=3)
    result = execute(spec, environ=dict(os.environ), settings=settings)
    assert result.status == "success"
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3  # records 5, 6, 7
    after = json.loads(state_file.read_text())
    ignored = [
        e["data"]["count"]
        for e in map(json.loads, (tmp_path / "lineage.jsonl").read_text().splitlines())
        if e["event"] == "state_ignored"
    ]
    if kept:
        assert after == before
        assert not result.state_persisted
        assert ignored == [1]
    else:
        assert after["bookmarks"] == {"users": {"id": 99}}
        assert result.state_persisted
        assert ignored == []


@pytest.mark.e2e
@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("said", "kept"),
    [("{}", True), ('{"bookmarks": {"users": {"id": 99}}}', False)],
    ids=["empty-state-kept-out", "real-state-stored"],
)
def test_under_meltano_an_empty_state_never_replaces_the_stored_bookmarks(
    tmp_path: Path, said: str, kept: bool
) -> None:
    from tests.test_meltano_server import make_project
    from tests.test_pipeline_meltano import events, meltano, stored_state

    root = make_project(tmp_path, say=said)
    sid = "dev:tap-counter-to-target-says"
    before = {"singer_state": {"bookmarks": {"users": {"id": 4}}}}
    stored = meltano(root, "--environment=dev", "state", "set", "--force", sid, json.dumps(before))
    assert stored.returncode == 0, stored.stderr
    done = meltano(root, "invoke", "flext-context", "run", "tap-counter", "target-says")
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 10  # ids 5 to 14
    after = stored_state(root, sid)
    if kept:
        assert after == before
        assert events(tmp_path, "state_persisted") == []
        assert "state_ignored" in done.stderr
        assert [e["data"]["count"] for e in events(tmp_path, "state_ignored")] == [1]
    else:
        assert after["singer_state"]["bookmarks"] == {"users": {"id": 99}}
        assert len(events(tmp_path, "state_persisted")) == 1
        assert events(tmp_path, "state_ignored") == []
