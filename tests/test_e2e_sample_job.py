"""The sample project's job through `flext-context run` and through `meltano run`, side by side.

`load-and-mirror` has two tap/target pairs, the second through a real mapper from PyPI
(meltano-map-transform renames users to customers and keeps only paid orders). One copy of the
sample project runs the job through flext-context, a twin copy (same files, same modification times)
through `meltano run`; each pair's stored state must agree. The twin then runs mapper mode
through plain `meltano run`.
"""

from __future__ import annotations

import csv
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the test extra
import pytest

from flext_meltano_context.lineage.log import LineageLog
from flext_meltano_context.result import result_schema
from tests.test_e2e_sample import NOT_COPIED, ROOT, SAMPLE, meltano

pytestmark = pytest.mark.e2e

PAIRS = ("dev:tap-spreadsheets-to-target-duckdb", "dev:tap-spreadsheets-to-target-duckdb-mirror")


@dataclass(frozen=True)
class JobRuns:
    ours: Path
    twin: Path
    result: dict[str, Any]
    dry_run: str


def lineage(project: Path) -> list[dict[str, Any]]:
    return list(LineageLog(project / ".meltano" / "flext-context" / "lineage.jsonl").read())


def state_of(project: Path, sid: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(meltano(project, "state", "get", sid).stdout)
    return found


@pytest.fixture(scope="module")
def job_runs(tmp_path_factory: pytest.TempPathFactory) -> JobRuns:
    base = tmp_path_factory.mktemp("job")
    ours = base / "sample_project"
    shutil.copytree(SAMPLE, ours, ignore=NOT_COPIED)
    manifest = ours / "meltano.yml"
    manifest.write_text(
        manifest.read_text().replace("pip_url: -e ..[duckdb]", f"pip_url: -e {ROOT}[duckdb]")
    )
    meltano(ours, "install")
    twin = base / "twin"
    shutil.copytree(ours, twin, symlinks=True)  # plugin venvs stay where they were installed
    dry = meltano(ours, "invoke", "flext-context", "run", "--dry-run", "load-and-mirror")
    result_path = base / "result.json"
    meltano(
        ours, "invoke", "flext-context", "run", "--result-json", str(result_path), "load-and-mirror"
    )
    meltano(twin, "run", "load-and-mirror")
    return JobRuns(ours, twin, json.loads(result_path.read_text()), dry.stdout)


def test_dry_run_of_the_job_names_both_pairs_and_the_mapping(job_runs: JobRuns) -> None:
    out = job_runs.dry_run
    assert "job load-and-mirror:" in out
    assert "state id: dev:tap-spreadsheets-to-target-duckdb\n" in out
    assert "state id: dev:tap-spreadsheets-to-target-duckdb-mirror" in out
    assert "mapping users-as-customers (mapper meltano-map-transform)" in out


def test_the_job_runs_both_pairs_with_one_correlation_id(job_runs: JobRuns) -> None:
    result = job_runs.result
    jsonschema.validate(result, result_schema())
    assert result["status"] == "success"
    first, second = result["pipelines"]
    assert {k: v["records"] for k, v in first["streams"].items()} == {
        "users": 2000,
        "orders": 5000,
    }
    # Both sides of the mapping: what left the tap, what entered the target.
    with (job_runs.ours / "data" / "orders" / "orders-2026-11-01.csv").open() as orders:
        paid = sum(1 for row in csv.DictReader(orders) if row["status"] == "paid")
    assert 0 < paid < 5000
    assert {k: (v.get("tap_records"), v["records"]) for k, v in second["streams"].items()} == {
        "users": (2000, 0),
        "orders": (5000, paid),
        "customers": (0, 2000),
    }
    assert second["streams"]["customers"]["landing"] in {"ok", "not checked"}
    parent, *started = [r for r in lineage(job_runs.ours) if r["event"] == "run_started"]
    assert parent["run_id"] == result["invocation_id"]
    assert {r["correlation_id"] for r in (parent, *started)} == {result["correlation_id"]}
    assert [r["run_id"] for r in started] == [first["run_id"], second["run_id"]]


def test_each_pair_keeps_the_state_meltano_run_keeps(job_runs: JobRuns) -> None:
    for sid in PAIRS:
        ours = state_of(job_runs.ours, sid)["singer_state"]
        theirs = state_of(job_runs.twin, sid)["singer_state"]
        assert ours["bookmarks"] == theirs["bookmarks"], sid
        assert set(ours["bookmarks"]) == {"users", "orders"}


def test_mapper_mode_through_plain_meltano_run_counts_the_real_pipeline(job_runs: JobRuns) -> None:
    twin = job_runs.twin
    given = str(uuid.uuid4())
    meltano(
        twin,
        "run",
        "--full-refresh",
        "tap-spreadsheets",
        "flext-count",
        "target-duckdb",
        env={"MELTANO_RUN_ID": given},
    )
    records = lineage(twin)
    (started,) = [r for r in records if r["event"] == "run_started"]
    assert started["correlation_id"] == given
    counts = {
        r["data"]["stream"]: r["data"]["counts"]["RECORD"]
        for r in records
        if r["event"] == "stream_stats"
    }
    assert counts == {"users": 2000, "orders": 5000}
    meltano(twin, "invoke", "flext-context", "check", "--require-success", "--min-records",
            "orders=5000")  # fmt: skip
