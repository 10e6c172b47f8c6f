"""The lineage log: hash chain, single-write appends under a lock, sealing, verify on tampering."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from flext_meltano_context.lineage import LineageLog, Recorder, default_log_path, verify
from flext_meltano_context.lineage.log import ZERO_HASH, canonical


def _log(path: Path, runs: int = 2, events: int = 3) -> list[bytes]:
    for run in range(runs):
        recorder = Recorder(path, run_id=f"run-{run}", correlation_id=f"corr-{run}")
        for index in range(events):
            recorder.record("phase_completed", {"phase": "extract", "n": index})
        recorder.close()
    return path.read_bytes().splitlines(keepends=True)


def test_each_line_hashes_its_canonical_json_and_chains_to_the_previous(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    lines = _log(path)
    prev = ZERO_HASH
    for seq, line in enumerate(lines, start=1):
        record = json.loads(line)
        claimed = record.pop("hash")
        assert claimed == hashlib.sha256(canonical(record)).hexdigest()
        assert (record["prev"], record["seq"], record["v"]) == (prev, seq, 1)
        assert record["ts"].endswith("Z")
        prev = claimed
    result = verify(path)
    assert (result.ok, result.lines, result.runs) == (True, 6, 2)


def test_append_returns_the_record_as_written(tmp_path: Path) -> None:
    log = LineageLog(tmp_path / "sub" / "lineage.jsonl")
    written = log.append("run_started", run_id="r", correlation_id="c", data={"a": (1, 2)})
    assert written == json.loads((tmp_path / "sub" / "lineage.jsonl").read_bytes())
    assert written["data"] == {"a": [1, 2]}
    assert list(log.read()) == [written]


def _edit(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"n":2', b'"n":9')
    return lines


def _delete(lines: list[bytes]) -> list[bytes]:
    del lines[2]
    return lines


def _delete_first(lines: list[bytes]) -> list[bytes]:
    return lines[1:]


def _reorder(lines: list[bytes]) -> list[bytes]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def _truncate(lines: list[bytes]) -> list[bytes]:
    lines[-1] = lines[-1][:40]
    return lines


def _garbage(lines: list[bytes]) -> list[bytes]:
    lines.insert(3, b"not json at all\n")
    return lines


def _rehash_edit(lines: list[bytes]) -> list[bytes]:
    """An edit whose author recomputed that line's hash: the next line's prev gives it away."""
    record = json.loads(lines[2])
    del record["hash"]
    record["data"]["n"] = 9
    body = canonical(record)
    digest = hashlib.sha256(body).hexdigest().encode()
    lines[2] = body[:-1] + b',"hash":"' + digest + b'"}\n'
    return lines


@pytest.mark.parametrize(
    ("tamper", "line", "kind"),
    [
        (_edit, 3, "edited"),
        (_delete, 3, "deleted"),
        (_delete_first, 1, "deleted"),
        (_reorder, 3, "reordered"),
        (_truncate, 6, "truncated"),
        (_garbage, 4, "malformed"),
        (_rehash_edit, 4, "deleted"),
    ],
    ids=["edited", "deleted", "first-deleted", "reordered", "truncated", "garbage", "rehashed"],
)
def test_verify_names_the_first_bad_line_and_why(
    tmp_path: Path, tamper: Callable[[list[bytes]], list[bytes]], line: int, kind: str
) -> None:
    path = tmp_path / "lineage.jsonl"
    path.write_bytes(b"".join(tamper(_log(path))))
    result = verify(path)
    assert (result.ok, result.line, result.kind) == (False, line, kind)
    assert f"line {line}: {kind}" in result.describe()


def test_moved_lines_are_reported_as_reordered_and_deleted_ones_as_deleted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lineage.jsonl"
    lines = _log(path)
    path.write_bytes(b"".join([*lines[:2], lines[4], lines[3], lines[2], lines[5]]))
    assert (verify(path).line, verify(path).kind) == (3, "reordered")
    path.write_bytes(b"".join([lines[0], lines[1], lines[3], lines[2], *lines[4:]]))
    assert (verify(path).line, verify(path).kind) == (3, "reordered")
    path.write_bytes(b"".join([*lines[:3], lines[1], *lines[3:]]))
    assert (verify(path).line, verify(path).kind) == (4, "reordered")
    # The control: the same jump in seq with the line gone from the file is a deletion.
    path.write_bytes(b"".join([lines[0], lines[1], lines[3], *lines[4:]]))
    assert (verify(path).line, verify(path).kind) == (3, "deleted")


def test_a_whole_last_line_that_is_not_a_record_is_sealed_so_verify_accepts_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lineage.jsonl"
    lines = _log(path, runs=1)
    path.write_bytes(b"".join([*lines, b'{"edited by hand": true}\n']))
    assert (verify(path).line, verify(path).kind) == (4, "malformed")
    Recorder(path, run_id="next", correlation_id="c").record("run_started", {})
    result = verify(path)
    assert result.ok, result.describe()
    assert [(s.line, s.length) for s in result.sealed] == [(4, 24)]
    assert len(path.read_bytes().splitlines()) == 6  # no empty line added before the seal
    # The control: a partial line (no newline) gets the newline it lacks, and verifies too.
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines, b'{"partial']))
    Recorder(path, run_id="third", correlation_id="c").record("run_started", {})
    assert verify(path).ok, verify(path).describe()


def test_recorder_numbers_each_runs_events_from_one(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    _log(path, runs=2, events=3)
    records = list(LineageLog(path).read())
    assert [(r["run_id"], r["run_seq"]) for r in records] == [
        ("run-0", 1),
        ("run-0", 2),
        ("run-0", 3),
        ("run-1", 1),
        ("run-1", 2),
        ("run-1", 3),
    ]


def test_a_log_written_before_run_seq_existed_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    log = LineageLog(path)
    log.append("run_started", run_id="old", correlation_id="c", data={})
    log.append("run_completed", run_id="old", correlation_id="c", data={"status": "success"})
    assert all("run_seq" not in record for record in log.read())
    Recorder(path, run_id="new", correlation_id="c").record("run_started", {})
    assert verify(path).ok


def test_a_partial_last_line_is_sealed_by_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    lines = _log(path, runs=1)
    partial = lines[-1][:50]
    path.write_bytes(b"".join([*lines[:-1], partial]))
    assert verify(path).kind == "truncated"
    Recorder(path, run_id="next", correlation_id="c").record("run_started", {})
    result = verify(path)
    assert result.ok, result.describe()
    assert [(s.line, s.length) for s in result.sealed] == [(3, 50)]
    seal = json.loads(path.read_bytes().splitlines()[3])
    assert seal["event"] == "sealed_partial_line"
    assert seal["data"] == {
        "offset": len(b"".join(lines[:-1])),
        "length": 50,
        "sha256": hashlib.sha256(partial).hexdigest(),
    }
    assert seal["prev"] == json.loads(lines[1])["hash"]
    assert [r["event"] for r in LineageLog(path).read()][-2:] == [
        "sealed_partial_line",
        "run_started",
    ]


def test_a_seal_that_names_the_wrong_bytes_fails_verify(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    lines = _log(path, runs=1)
    path.write_bytes(b"".join([*lines[:-1], lines[-1][:50]]))
    Recorder(path, run_id="next", correlation_id="c").record("run_started", {})
    data = path.read_bytes().splitlines(keepends=True)
    data[2] = data[2][:10] + b"X" + data[2][11:]
    path.write_bytes(b"".join(data))
    result = verify(path)
    assert (result.ok, result.line, result.kind) == (False, 4, "malformed")


_WRITER = """
import sys
from collections.abc import Callable
from pathlib import Path
from flext_meltano_context.lineage import Recorder
recorder = Recorder(Path(sys.argv[1]), run_id=sys.argv[2], correlation_id="c")
for index in range(200):
    recorder.record("stream_stats", {"stream": f"s{index}", "pad": "x" * (index * 37)})
"""


def test_concurrent_writers_never_interleave_or_fork_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{n}"]) for n in range(4)
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0, 0]
    result = verify(path)
    assert (result.ok, result.lines, result.runs) == (True, 800, 4)


def test_default_log_path_follows_setting_then_meltano_then_cwd(tmp_path: Path) -> None:
    assert default_log_path({"FLEXT_CONTEXT_LINEAGE_PATH": "/x/l.jsonl"}) == Path("/x/l.jsonl")
    assert default_log_path({"MELTANO_PROJECT_ROOT": "/p"}) == Path(
        "/p/.meltano/flext-context/lineage.jsonl"
    )
    assert default_log_path({}, cwd=tmp_path) == tmp_path / ".flext-context" / "lineage.jsonl"


def test_verify_of_an_empty_or_fresh_log_is_intact(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    path.write_bytes(b"")
    assert verify(path).ok


def test_verify_takes_the_log_as_path_or_as_log_option(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flext_meltano_context.cli import cli

    path = tmp_path / "lineage.jsonl"
    lines = _log(path)
    runner = CliRunner()
    for args in (["verify", str(path)], ["verify", "--log", str(path)]):
        done = runner.invoke(cli, args, catch_exceptions=False)
        assert done.exit_code == 0, done.output
        assert "intact, 6 lines, 2 runs" in done.output
    path.write_bytes(b"".join(_edit(lines)))
    done = runner.invoke(cli, ["verify", "--log", str(path)], catch_exceptions=False)
    assert done.exit_code == 1
    assert "line 3: edited" in done.output
    both = runner.invoke(cli, ["verify", str(path), "--log", str(tmp_path / "other.jsonl")])
    assert both.exit_code == 2


def test_runs_name_the_host_each_run_started_on(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flext_meltano_context.cli import cli

    path = tmp_path / "lineage.jsonl"
    for host in ("runner-1", "runner-2"):
        recorder = Recorder(
            path, run_id=f"run-{host}", correlation_id="c", environ={"FLEXT_CONTEXT_HOSTNAME": host}
        )
        recorder.record("run_started", {"pipeline": {"name": "p"}})
        recorder.record("run_completed", {"status": "success", "records": 1})
        recorder.close()
    done = CliRunner().invoke(cli, ["runs", "--log", str(path)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    header, newest, oldest = done.output.splitlines()
    assert "HOST" in header
    assert ("runner-2" in newest, "runner-1" in oldest) == (True, True)
    page = tmp_path / "runs.html"
    done = CliRunner().invoke(
        cli, ["runs", "--log", str(path), "--format", "html", "-o", str(page)]
    )
    assert done.exit_code == 0, done.output
    assert "runner-1" in page.read_text("utf-8")


def test_lineage_push_without_a_store_says_where_to_name_one(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flext_meltano_context.cli import cli

    path = tmp_path / "lineage.jsonl"
    _log(path, runs=1)
    done = CliRunner(env={"FLEXT_CONTEXT_LINEAGE_PATH": str(path)}).invoke(
        cli, ["lineage", "push", "--from", str(path)]
    )
    assert done.exit_code == 2
    assert "no store to push to: give --to postgresql://" in done.output
