"""The sample project end to end: real Meltano, tap-spreadsheets, target-duckdb and dbt-duckdb.

One session copies sample_project/ to a temporary directory, runs `meltano install` once, then
runs the pipeline twice through `meltano invoke flext-context run` (the second run after a new
day's files arrive, with `dbt-duckdb:build`). The tests read what those runs left: the lineage
log, the stored state and the DuckDB file (opened read-only with the duckdb of this venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flext_meltano_context.lineage.log import LineageLog

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_project"
FAKES = Path(__file__).resolve().parent / "fakes"
MELTANO = Path(sys.executable).parent / "meltano"
STATE_ID = "dev:tap-spreadsheets-to-target-duckdb"
PIPELINE = ["tap-spreadsheets", "target-duckdb"]
# Left out of the copy: what a run or `meltano install` writes, and later days' data files.
NOT_COPIED = shutil.ignore_patterns(
    ".meltano", "*.duckdb", "*.duckdb.wal", "target", "dbt_packages", "logs", ".user.yml",
    "*-2026-11-0[2-9].csv",
)  # fmt: skip


def meltano(project: Path, *args: str, env: Mapping[str, str] | None = None, check: bool = True):
    """Run `meltano ARGS` in `project`; its output, text; fails the test with stderr if `check`."""
    done = subprocess.run(
        [str(MELTANO), *args],
        cwd=project,
        env={**os.environ, "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "0", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if check and done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-40:])
        pytest.fail(f"meltano {' '.join(args)} exited {done.returncode}:\n{tail}")
    return done


def stored_state(project: Path) -> dict[str, Any]:
    """What `meltano state get` prints for the sample pipeline ({} when nothing is stored)."""
    result: dict[str, Any] = json.loads(meltano(project, "state", "get", STATE_ID).stdout)
    return result


def runs(project: Path) -> dict[str, list[dict[str, Any]]]:
    """The lineage log's records grouped by run id, in log order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in LineageLog(project / ".meltano" / "flext-context" / "lineage.jsonl").read():
        grouped.setdefault(record["run_id"], []).append(record)
    return grouped


def event(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The data of the one `name` event among `records`."""
    found: list[dict[str, Any]] = [r["data"] for r in records if r["event"] == name]
    assert len(found) == 1, f"expected one {name} event, found {len(found)}"
    return found[0]


def record_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """RECORD messages relayed per stream, from the run's stream_stats events."""
    return {
        r["data"]["stream"]: r["data"]["counts"].get("RECORD", 0)
        for r in records
        if r["event"] == "stream_stats"
    }


def table_counts(project: Path, *tables: str) -> dict[str, int]:
    """`count(*)` of each table in the sample warehouse, opened read-only."""
    import duckdb

    counts = {}
    with duckdb.connect(str(project / "warehouse.duckdb"), read_only=True) as db:
        for table in tables:  # names are this module's constants, never input
            row = db.sql(f"select count(*) from {table}").fetchone()  # noqa: S608
            assert row is not None
            counts[table] = int(row[0])
    return counts


@dataclass(frozen=True)
class SampleRuns:
    """Two runs of the sample pipeline and what they left behind."""

    project: Path
    first: list[dict[str, Any]]
    second: list[dict[str, Any]]
    rows_after_first: dict[str, int]
    rows_after_second: dict[str, int]
    state_after_second: dict[str, Any]


@pytest.fixture(scope="session")
def sample_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of sample_project/ with its plugins installed (flext-context from this checkout)."""
    project = tmp_path_factory.mktemp("e2e") / "sample_project"
    shutil.copytree(SAMPLE, project, ignore=NOT_COPIED)
    manifest = project / "meltano.yml"
    text = manifest.read_text()
    assert "pip_url: -e ..[duckdb]" in text, "sample_project installs flext-context from `-e ..`"
    manifest.write_text(text.replace("pip_url: -e ..[duckdb]", f"pip_url: -e {ROOT}[duckdb]"))
    meltano(project, "install")
    return project


@pytest.fixture(scope="session")
def sample_runs(sample_project: Path) -> SampleRuns:
    """Run 1 loads day 1; day 2's files arrive; run 2 resumes and builds the dbt models."""
    project = sample_project
    meltano(project, "invoke", "flext-context", "run", *PIPELINE)
    rows_after_first = table_counts(project, "raw.users", "raw.orders")
    subprocess.run(
        [sys.executable, str(project / "data" / "generate.py"), "--day", "2"],
        check=True,
        capture_output=True,
    )
    meltano(project, "invoke", "flext-context", "run", *PIPELINE, "dbt-duckdb:build")
    first, second = runs(project).values()
    return SampleRuns(
        project=project,
        first=first,
        second=second,
        rows_after_first=rows_after_first,
        rows_after_second=table_counts(project, "raw.users", "raw.orders"),
        state_after_second=stored_state(project),
    )


def test_first_run_loads_day_one_and_succeeds(sample_runs: SampleRuns) -> None:
    assert event(sample_runs.first, "run_completed")["status"] == "success"
    assert record_counts(sample_runs.first) == {"users": 2000, "orders": 5000}
    assert not [r for r in sample_runs.first if r["event"] == "state_loaded"]


def test_second_run_resumes_from_the_state_the_first_run_stored(sample_runs: SampleRuns) -> None:
    first_started = sample_runs.first[0]
    loaded = event(sample_runs.second, "state_loaded")
    assert loaded["state_id"] == STATE_ID
    assert loaded["written_by_run_id"] == first_started["run_id"]
    assert loaded["written_by_correlation_id"] == first_started["correlation_id"]
    # only the new day's files are read: the bookmark skips day 1
    assert record_counts(sample_runs.second) == {"users": 150, "orders": 400}


def test_stream_counts_equal_rows_in_duckdb(sample_runs: SampleRuns) -> None:
    first, second = record_counts(sample_runs.first), record_counts(sample_runs.second)
    assert sample_runs.rows_after_first == {
        "raw.users": first["users"],
        "raw.orders": first["orders"],
    }
    assert sample_runs.rows_after_second == {
        "raw.users": first["users"] + second["users"],
        "raw.orders": first["orders"] + second["orders"],
    }


def test_stored_state_names_the_run_that_wrote_it(sample_runs: SampleRuns) -> None:
    state = sample_runs.state_after_second["singer_state"]
    assert set(state["bookmarks"]) == {"users", "orders"}
    second = sample_runs.second[0]
    assert state["flext_context"]["run_id"] == second["run_id"]
    assert state["flext_context"]["correlation_id"] == second["correlation_id"]
    assert event(sample_runs.second, "state_persisted")["state_id"] == STATE_ID


def test_dbt_build_runs_after_the_load_and_the_mart_has_a_row_per_user(
    sample_runs: SampleRuns,
) -> None:
    phases = {
        r["data"]["phase"]: r["data"] for r in sample_runs.second if r["event"] == "phase_completed"
    }
    assert phases["dbt-duckdb:build"]["status"] == "success"
    assert phases["dbt-duckdb:build"]["started_at"] >= phases["load"]["ended_at"]
    rows = table_counts(sample_runs.project, "analytics.user_orders")
    assert rows == {"analytics.user_orders": sample_runs.rows_after_second["raw.users"]}


def test_failing_target_leaves_the_stored_state_untouched(sample_runs: SampleRuns) -> None:
    project = sample_runs.project
    before = stored_state(project)
    # The warehouse cannot be opened: target-duckdb exits 1 before it confirms any state.
    broken = {"TARGET_DUCKDB_FILEPATH": str(project / "missing" / "warehouse.duckdb")}
    done = meltano(
        project, "invoke", "flext-context", "run", *PIPELINE, "--full-refresh",
        env=broken, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "target-duckdb" in done.stderr
    assert stored_state(project) == before
    failed = list(runs(project).values())[-1]
    assert event(failed, "run_completed")["status"] == "failed"
    assert not [r for r in failed if r["event"] == "state_persisted"]


# --- every child process sees the run's context ------------------------------------------

PROBE_PROJECT = """\
default_environment: dev
project_id: flext-context-probe
send_anonymous_usage_stats: false
environments:
  - name: dev
plugins:
  extractors:
    - name: tap-probe
      namespace: tap_probe
      executable: {bin}/tap-probe
      capabilities: [catalog, discover, state]
  loaders:
    - name: target-probe
      namespace: target_probe
      executable: {bin}/target-probe
  utilities:
    - name: dbt-probe
      namespace: dbt_probe
      executable: {bin}/dbt-probe
      commands:
        run: run
    - name: flext-context
      namespace: flext_context
      pip_url: -e {root}
      executable: flext-context
"""


@pytest.fixture(scope="session")
def probe_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Meltano project whose tap, target and dbt are tests/fakes/probe_plugin.py."""
    project = tmp_path_factory.mktemp("probe")
    bin_dir = project / "bin"
    bin_dir.mkdir()
    for role in ("tap", "target", "dbt"):
        (bin_dir / f"{role}-probe").symlink_to(FAKES / "probe_plugin.py")
    (project / "meltano.yml").write_text(PROBE_PROJECT.format(bin=bin_dir, root=ROOT))
    meltano(project, "install")  # installs flext-context; the probes have nothing to install
    return project


def seen_by_probes(probe_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each probe role's recorded starts; the tap's discovery start is left out."""
    seen = {}
    for role in ("tap", "target", "dbt"):
        lines = (probe_dir / f"{role}.jsonl").read_text().splitlines()
        starts = [json.loads(line) for line in lines]
        seen[role] = [s for s in starts if "--discover" not in s["argv"]]
    return seen


def test_every_child_sees_the_same_correlation_id(probe_project: Path, tmp_path: Path) -> None:
    env = {"PROBE_DIR": str(tmp_path)}
    meltano(probe_project, "invoke", "flext-context", "run", "tap-probe", "target-probe",
            "dbt-probe:run", env=env)  # fmt: skip
    run = list(runs(probe_project).values())[-1]
    run_id, correlation_id = run[0]["run_id"], run[0]["correlation_id"]
    seen = seen_by_probes(tmp_path)
    assert {role: len(starts) for role, starts in seen.items()} == {"tap": 1, "target": 1, "dbt": 1}
    for role, (start,) in seen.items():
        assert start["env"]["FLEXT_CORRELATION_ID"] == correlation_id, role
        assert start["env"]["FLEXT_RUN_ID"] == run_id, role
        assert start["env"]["MELTANO_RUN_ID"] == run_id, role
        assert start["env"]["DBT_ENV_CUSTOM_ENV_FLEXT_CORRELATION_ID"] == correlation_id, role
        assert start["env"]["TRACEPARENT"].split("-")[1] == correlation_id.replace("-", ""), role
        openlineage = json.loads(start["env"]["OPENLINEAGE_CONTEXT"])
        assert openlineage["parent"]["root"]["run"]["runId"] == run_id, role
    phases = {role: start["env"]["FLEXT_PHASE"] for role, (start,) in seen.items()}
    assert phases == {"tap": "extract", "target": "load", "dbt": "transform"}
    assert event(run, "run_completed")["records"] == 3


def test_correlation_id_given_by_the_caller_reaches_every_child(
    probe_project: Path, tmp_path: Path
) -> None:
    given = "0190b7a4-0000-7000-8000-00000000c0de"
    env = {"PROBE_DIR": str(tmp_path), "FLEXT_CORRELATION_ID": given}
    meltano(probe_project, "invoke", "flext-context", "run", "tap-probe", "target-probe",
            "dbt-probe:run", env=env)  # fmt: skip
    run = list(runs(probe_project).values())[-1]
    assert run[0]["correlation_id"] == given
    assert run[0]["run_id"] != given
    for role, (start,) in seen_by_probes(tmp_path).items():
        assert start["env"]["FLEXT_CORRELATION_ID"] == given, role
        assert start["env"]["MELTANO_RUN_ID"] == run[0]["run_id"], role


# --- the dbt phase (issue 6) ---------------------------------------------------------------


def test_report_edges_lead_from_each_stream_to_the_mart(sample_runs: SampleRuns) -> None:
    from flext_meltano_context.lineage.report import build_report

    report = build_report(sample_runs.second)
    children: dict[str, set[str]] = {}
    for edge in report["edges"]:
        children.setdefault(edge["source"], set()).add(edge["target"])

    def reaches(node: str, goal: str) -> bool:
        return node == goal or any(reaches(child, goal) for child in children.get(node, ()))

    for stream in ("users", "orders"):
        assert reaches(f"stream:{stream}", "model:analytics.user_orders"), stream
        assert f"source:raw.{stream}" in children[f"table:raw.{stream}"]


def test_model_row_counts_equal_count_star(sample_runs: SampleRuns) -> None:
    results = event(sample_runs.second, "dbt_results")
    assert results["missing"] is None
    assert results["invocation_id"]
    rows = {n["relation"]: n["rows"] for n in results["nodes"] if n["resource_type"] == "model"}
    expected = table_counts(
        sample_runs.project, "analytics.stg_users", "analytics.stg_orders", "analytics.user_orders"
    )
    assert rows == {f"warehouse.{name}": count for name, count in expected.items()}


def test_a_broken_model_fails_the_run_and_is_named(sample_runs: SampleRuns) -> None:
    project = sample_runs.project
    broken = project / "transform" / "models" / "marts" / "broken_orders.sql"
    broken.write_text("select no_such_column from {{ ref('stg_orders') }}\n")
    try:
        done = meltano(project, "invoke", "flext-context", "run", *PIPELINE, "dbt-duckdb:run",
                       check=False)  # fmt: skip
    finally:
        broken.unlink()
    assert done.returncode == 1
    assert "model.flext_sample.broken_orders" in done.stderr
    run = list(runs(project).values())[-1]
    assert event(run, "run_completed")["status"] == "failed"
    assert "broken_orders" in event(run, "run_completed")["error"]
    statuses = {n["unique_id"]: n["status"] for n in event(run, "dbt_results")["nodes"]}
    assert statuses["model.flext_sample.broken_orders"] == "error"
    assert statuses["model.flext_sample.user_orders"] == "success"
    assert stored_state(project)["singer_state"]["bookmarks"]  # the EL state stays stored
