"""OpenLineage: events valid against the spec, file transport output, parent context for dbt-ol."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from flext_meltano_context.ids import uuid7
from flext_meltano_context.lineage import verify
from flext_meltano_context.lineage.example import record_example_run
from flext_meltano_context.lineage.openlineage import (
    FACET_URLS,
    is_configured,
    openlineage_context_env,
    run_events,
)
from flext_meltano_context.lineage.report import run_records
from tests.conftest import OPENLINEAGE_SPEC
from tests.test_lineage_report import record_real_run

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")


def spec_dir() -> Path | None:
    """The shared OpenLineage spec copy: beside the checkout, or beside a folder holding it."""
    for root in (OPENLINEAGE_SPEC.parent.parent, *OPENLINEAGE_SPEC.parent.parent.parents):
        found = root / "shared" / "openlineage-spec"
        if (found / "OpenLineage.json").is_file():
            return found
    return None


@pytest.fixture(scope="module")
def validate_event() -> Any:
    """Validate a RunEvent, and each facet against the schema its `_schemaURL` names, offline."""
    spec = spec_dir()
    if spec is None:
        pytest.skip(f"OpenLineage spec not found at {OPENLINEAGE_SPEC} (the shared spec copy)")
    resources = []
    for file in [spec / "OpenLineage.json", *(spec / "facets").glob("*.json")]:
        schema = json.loads(file.read_text())
        resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
    registry = referencing.Registry().with_resources(resources)
    core = json.loads((spec / "OpenLineage.json").read_text())
    validator_class = jsonschema.Draft202012Validator

    def facets_of(event: dict[str, Any]) -> list[dict[str, Any]]:
        found = [*event["run"].get("facets", {}).values(), *event["job"].get("facets", {}).values()]
        for dataset in [*event.get("inputs", []), *event.get("outputs", [])]:
            for key in ("facets", "inputFacets", "outputFacets"):
                found.extend(dataset.get(key, {}).values())
        return found

    def validate(event: dict[str, Any]) -> None:
        validator_class({"$ref": core["$id"] + "#/$defs/RunEvent"}, registry=registry).validate(
            event
        )
        for facet in facets_of(event):
            url = facet["_schemaURL"]
            assert url in FACET_URLS.values()
            validator_class({"$ref": url}, registry=registry).validate(facet)

    return validate


@pytest.mark.parametrize("status", ["success", "failed", "aborted"])
def test_every_event_we_build_validates_against_the_spec(
    tmp_path: Path, validate_event: Any, status: str
) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log, status=status)
    events = run_events(run_records(log, run))
    for event in events:
        validate_event(event)
    kinds = [(e["job"]["name"].rpartition(".")[2], e["eventType"]) for e in events]
    if status == "success":
        assert kinds == [
            ("tap-example-to-target-duckdb", "START"),
            ("extract", "START"),
            ("load", "START"),
            ("extract", "COMPLETE"),
            ("load", "COMPLETE"),
            ("dbt-duckdb:run", "START"),
            ("dbt-duckdb:run", "COMPLETE"),
            ("tap-example-to-target-duckdb", "COMPLETE"),
        ]
    final = events[-1]
    assert final["run"]["runId"] == run
    assert (
        final["eventType"] == {"success": "COMPLETE", "failed": "FAIL", "aborted": "ABORT"}[status]
    )
    assert ("errorMessage" in final["run"]["facets"]) is (status != "success")
    users = next(d for d in final["inputs"] if d["name"] == "users")
    assert users["namespace"] == "singer://tap-example"
    assert users["inputFacets"]["inputStatistics"]["rowCount"] == 1200
    assert users["facets"]["schema"]["fields"][0] == {"name": "id", "type": "integer"}
    assert {d["name"] for d in final["outputs"]} == {"users", "orders"}


def test_phase_runs_are_children_of_the_pipeline_run_and_its_root(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log)
    events = run_events(run_records(log, run))
    load = next(e for e in events if e["job"]["name"].endswith(".load"))
    parent = load["run"]["facets"]["parent"]
    assert parent["run"] == {"runId": run}
    assert parent["root"]["run"] == {"runId": run}
    assert parent["job"] == {"namespace": "flext-context", "name": "tap-example-to-target-duckdb"}
    started = next(r for r in run_records(log, run) if r["event"] == "run_started")
    assert load["run"]["runId"] == started["data"]["phase_run_ids"]["load"]


def test_an_inherited_parent_becomes_our_parent_and_root(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    airflow_run, airflow_root = uuid7(), uuid7()
    inherited = json.loads(
        openlineage_context_env(
            airflow_run, ("airflow", "dag.task"), airflow_root, ("airflow", "dag")
        )["OPENLINEAGE_CONTEXT"]
    )
    run = record_example_run(log, extra={"openlineage_parent": inherited})
    events = run_events(run_records(log, run))
    pipeline_parent = events[0]["run"]["facets"]["parent"]
    assert pipeline_parent["run"]["runId"] == airflow_run
    assert pipeline_parent["root"]["job"] == {"namespace": "airflow", "name": "dag"}
    phase_parent = events[1]["run"]["facets"]["parent"]
    assert (phase_parent["run"]["runId"], phase_parent["root"]["run"]["runId"]) == (
        run,
        airflow_root,
    )


def test_dbt_ol_reads_the_context_we_hand_to_children(monkeypatch: pytest.MonkeyPatch) -> None:
    utils = pytest.importorskip("openlineage.common.provider.dbt.utils")
    parent, root = uuid7(), uuid7()
    env = openlineage_context_env(
        parent, ("flext-context", "p.dbt:run"), root, ("flext-context", "p")
    )
    for name in ("OPENLINEAGE_CONTEXT", "OPENLINEAGE_PARENT_ID", "OPENLINEAGE_ROOT_PARENT_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    meta = utils.get_parent_run_metadata()
    assert (meta.run_id, meta.job_namespace, meta.job_name) == (
        parent,
        "flext-context",
        "p.dbt:run",
    )
    assert (meta.root_parent_run_id, meta.root_parent_job_name) == (root, "p")
    monkeypatch.delenv("OPENLINEAGE_CONTEXT")  # older dbt-ol: the legacy variables alone
    legacy = utils.get_parent_run_metadata()
    assert (legacy.run_id, legacy.job_name, legacy.root_parent_run_id) == (
        parent,
        "p.dbt:run",
        root,
    )


def test_openlineage_is_configured_only_the_ways_the_client_reads(tmp_path: Path) -> None:
    assert not is_configured({}, cwd=tmp_path) or (Path.home() / ".openlineage").exists()
    assert is_configured({"OPENLINEAGE_URL": "http://x"}, cwd=tmp_path)
    assert is_configured({"OPENLINEAGE__TRANSPORT__TYPE": "console"}, cwd=tmp_path)
    assert not is_configured({"OPENLINEAGE_URL": "http://x", "OPENLINEAGE_DISABLED": "true"})
    (tmp_path / "openlineage.yml").write_text("transport:\n  type: console\n")
    assert is_configured({}, cwd=tmp_path)


@pytest.mark.usefixtures("clean_env")
def test_file_transport_receives_the_events_the_log_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, validate_event: Any
) -> None:
    pytest.importorskip("openlineage.client")
    sent = tmp_path / "events.jsonl"
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(sent))
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log, status="failed")
    written = [json.loads(line) for line in sent.read_text().splitlines()]
    assert written == run_events(run_records(log, run))
    for event in written:
        validate_event(event)


@pytest.mark.usefixtures("clean_env")
def test_a_lineage_server_that_is_down_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openlineage.client")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "http")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__RETRY__TOTAL", "0")
    log = tmp_path / "lineage.jsonl"
    structlog.reset_defaults()
    with capture_logs() as logs:
        run = record_example_run(log)
    warnings = [entry for entry in logs if entry["event"] == "openlineage_emit_failed"]
    assert len(warnings) == 1
    assert "Connection" in warnings[0]["error"]
    assert warnings[0]["log_level"] == "warning"
    assert verify(log).ok
    assert run_records(log, run)[-1]["data"]["status"] == "success"


@pytest.mark.usefixtures("clean_env")
def test_disabled_openlineage_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = tmp_path / "events.jsonl"
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(sent))
    monkeypatch.setenv("OPENLINEAGE_DISABLED", "true")
    record_example_run(tmp_path / "lineage.jsonl")
    assert not sent.exists()


def test_events_of_a_real_run_validate_and_carry_what_landed_as_row_count(
    tmp_path: Path, validate_event: Any
) -> None:
    log, run = record_real_run(tmp_path)
    events = run_events(run_records(log, run))
    for event in events:
        validate_event(event)
    final = events[-1]
    assert (final["eventType"], final["run"]["runId"]) == ("COMPLETE", run)
    outputs = {o["name"]: o for o in final["outputs"]}
    folder = (tmp_path / "out").resolve()
    assert set(outputs) == {"users.jsonl", "orders.jsonl"}
    for name, rows in (("users.jsonl", 4), ("orders.jsonl", 5)):  # users id 3 never landed
        assert outputs[name]["namespace"] == f"file://{folder}"
        assert outputs[name]["outputFacets"]["outputStatistics"]["rowCount"] == rows
    inputs = {i["name"]: i["inputFacets"]["inputStatistics"]["rowCount"] for i in final["inputs"]}
    assert inputs == {"users": 5, "orders": 5}
