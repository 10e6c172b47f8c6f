"""Mapper mode: the stream passes through byte for byte, counted and recorded, under meltano run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]  # no stubs in the test extra
import pytest

from flext_meltano_context.lineage.report import build_report, report_schema, run_records
from tests.conftest import FAKES
from tests.test_pipeline_meltano import BIN, events, meltano, project

pytestmark = pytest.mark.usefixtures("clean_env")

STREAM = (
    b'{"type":"SCHEMA","stream":"users","schema":{"properties":{"id":{"type":"integer"}}},'
    b'"key_properties":["id"]}\n'
    + b"".join(
        b'{"type":"RECORD","stream":"users","record":{"id":%d,"f":1.10}}\n' % n
        for n in range(1, 2001)
    )
    + b'{"type":"STATE","value":{"bookmarks":{"users":{"id":2000}}}}\n'
    + b'not json at all \xc3\xa9\n'
    + b'{"type":"RECORD","stream":"orders","record":{"id":1}}'  # no final newline
)  # fmt: skip


def mapper(stdin: bytes, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "flext-context-mapper")],
        input=stdin,
        capture_output=True,
        env={
            "FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "lineage.jsonl"),
            "PATH": str(BIN),
            **env,
        },
        check=False,
        timeout=60,
    )


def test_the_mapper_passes_the_stream_through_byte_for_byte_and_records_it(tmp_path: Path) -> None:
    given = str(uuid.uuid4())
    done = mapper(STREAM, tmp_path, MELTANO_RUN_ID=given)
    assert done.returncode == 0, done.stderr
    assert done.stdout == STREAM
    (started,) = events(tmp_path, "run_started")
    assert started["correlation_id"] == given
    assert started["data"]["pipeline"]["mapper"]["cannot_see"]
    completed = events(tmp_path, "run_completed")[0]["data"]
    assert completed["digest"] == hashlib.sha256(STREAM).hexdigest()
    assert completed["records"] == 2001
    report = build_report(run_records(tmp_path / "lineage.jsonl", started["run_id"]))
    jsonschema.validate(report, report_schema())
    assert {row["stream"]: row["records"] for row in report["streams"]} == {
        "users": 2000,
        "orders": 1,
    }
    assert report["anomalies"]["count"] >= 1


def test_without_a_meltano_run_id_the_mapper_uses_its_own_correlation_id(tmp_path: Path) -> None:
    done = mapper(b"", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    (started,) = events(tmp_path, "run_started")
    assert started["correlation_id"] == started["run_id"]
    assert events(tmp_path, "run_completed")[0]["data"]["records"] == 0


def test_a_bad_mapper_config_exits_2_and_passes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    done = subprocess.run(
        [str(BIN / "flext-context-mapper"), "--config", str(bad)],
        input=STREAM, capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert b"cannot read --config" in done.stderr
    assert done.stdout == b""


def mapper_project(tmp_path: Path) -> Path:
    root = project(tmp_path)
    text = (
        (root / "meltano.yml")
        .read_text()
        .replace(
            "  utilities:\n",
            f"""  mappers:
  - name: flext-context-mapper
    namespace: flext_context_mapper
    executable: {BIN / "flext-context-mapper"}
    mappings:
    - name: flext-count
      config:
        lineage_path: {tmp_path / "lineage.jsonl"}
  utilities:
""",
            1,
        )
    )
    (root / "meltano.yml").write_text(text)
    return root


@pytest.mark.e2e
def test_plain_meltano_run_with_the_flext_count_mapping_counts_and_records(tmp_path: Path) -> None:
    root = mapper_project(tmp_path)
    given = str(uuid.uuid4())
    # Meltano does not hand --run-id to plugins; MELTANO_RUN_ID set by the caller reaches both.
    done = meltano(
        root, "run", "tap-counter", "flext-count", "target-collect", MELTANO_RUN_ID=given
    )
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == list(range(1, 11))
    (started,) = events(tmp_path, "run_started")
    assert started["correlation_id"] == given
    assert started["data"]["pipeline"]["tap"] == "tap-counter"
    (stats,) = events(tmp_path, "stream_stats")
    assert stats["data"]["counts"]["RECORD"] == 10
    check = meltano(
        root, "invoke", "flext-context", "check", "--min-records", "users=10", "--require-success"
    )
    assert check.returncode == 0, check.stderr
    too_many = meltano(root, "invoke", "flext-context", "check", "--min-records", "users=11")
    assert too_many.returncode == 1
    # meltano run stored the target's state as usual; the mapper did not touch it.
    state = meltano(root, "--environment=dev", "state", "get", "dev:tap-counter-to-target-collect")
    assert json.loads(state.stdout.strip().splitlines()[-1])["singer_state"]["bookmarks"] == {
        "users": {"id": 10}
    }


@pytest.mark.e2e
def test_a_target_failing_after_the_mapper_finished_is_beyond_what_the_mapper_sees(
    tmp_path: Path,
) -> None:
    """The documented blind spot: the target's exit (`flext-context run` reports it)."""
    root = mapper_project(tmp_path)
    done = meltano(root, "run", "tap-counter", "flext-count", "target-broken")
    assert done.returncode == 1
    # Meltano kills the other blocks when a loader fails: the mapper either finished first (all
    # 10 records relayed: success, it cannot know) or was killed and left its run open.
    for completed in events(tmp_path, "run_completed"):
        assert completed["data"]["status"] == "success"
        assert completed["data"]["records"] == 10
    (started,) = events(tmp_path, "run_started")
    assert any("exit code" in item for item in started["data"]["pipeline"]["mapper"]["cannot_see"])


def test_the_mapper_is_a_console_script_with_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flext_meltano_context.mapper", "--help"],
        capture_output=True, text=True, check=False, cwd=FAKES.parent.parent,
    )  # fmt: skip
    assert done.returncode == 0
    assert "mappers:" in done.stdout


def test_a_mapper_stopped_by_sigterm_closes_its_run_as_aborted(tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [str(BIN / "flext-context-mapper")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "lineage.jsonl"), "PATH": str(BIN)},
    )
    assert proc.stdin is not None
    proc.stdin.write(STREAM[:300])
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while not (tmp_path / "lineage.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    (completed,) = events(tmp_path, "run_completed")
    assert completed["data"]["status"] == "aborted"
