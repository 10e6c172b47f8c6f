"""The dbt phase on artifacts recorded from a real `dbt build` of the sample project.

tests/data/dbt/ holds that build's run_results.json and a trimmed manifest.json (nodes, sources,
parent_map). The row counts are checked against a DuckDB file built here with the same tables.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from flext_meltano_context import dbt
from flext_meltano_context.lineage.report import build_report, report_schema

DATA = Path(__file__).resolve().parent / "data" / "dbt"
RECORDED_CID = "01a21790-ac65-735d-9b5a-301e459ade64"


def artifacts(tmp_path: Path, correlation_id: str = RECORDED_CID) -> Path:
    """A copy of the recorded artifacts whose run_results name `correlation_id`."""
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(DATA / "manifest.json", target / "manifest.json")
    results = json.loads((DATA / "run_results.json").read_text())
    results["metadata"]["env"]["FLEXT_CORRELATION_ID"] = correlation_id
    (target / "run_results.json").write_text(json.dumps(results))
    return target


def warehouse(tmp_path: Path) -> dbt.Warehouse:
    """A DuckDB file named like the sample's, with the tables dbt built there."""
    import duckdb

    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as db:
        db.execute("create schema raw; create schema analytics")
        db.execute("create table raw.users as select range as id from range(5)")
        db.execute("create table raw.orders as select range as id from range(7)")
        db.execute("create view analytics.stg_users as select * from raw.users")
        db.execute("create view analytics.stg_orders as select * from raw.orders")
        db.execute("create table analytics.user_orders as select * from raw.users")
    config = {"filepath": str(path), "default_target_schema": "raw"}
    found = dbt.warehouse_from_config(config)
    assert found is not None
    return found


def test_target_duckdb_names_tables_as_its_db_sync_does() -> None:
    house = dbt.Warehouse("/x/wh.duckdb", "wh", "raw", {"sales": "crm"})
    assert house.table_of("Users") == dbt.Relation("wh", "raw", "users")
    assert house.table_of("sales-Orders") == dbt.Relation("wh", "crm", "orders")
    assert house.table_of("a-b-c-d") == dbt.Relation("wh", "raw", "c_d")
    assert house.table_of("my.table") == dbt.Relation("wh", "raw", "my_table")
    assert house.namespace == "duckdb:///x/wh.duckdb"
    assert dbt.warehouse_from_config({"path": "md:my_db"}) is None


def test_artifacts_of_this_run_give_node_results_rows_and_lineage(tmp_path: Path) -> None:
    house = warehouse(tmp_path)
    found = dbt.collect(
        "dbt-duckdb:build",
        artifacts(tmp_path),
        correlation_id=RECORDED_CID,
        exit_code=0,
        warehouse=house,
        streams=["users", "orders"],
    )
    assert found.missing is None
    assert found.invocation_id == "29ad98e1-6c07-4c00-9b35-3f7ef95bfc26"
    rows = {n.unique_id.split(".")[-1]: n.rows for n in found.nodes if n.resource_type == "model"}
    assert rows == {"stg_users": 5, "stg_orders": 7, "user_orders": 5}
    model = next(n for n in found.nodes if n.unique_id.endswith("user_orders"))
    assert (model.status, model.rows_from, model.materialized) == ("success", "count", "table")
    assert model.compile_s is not None
    assert model.execute_s is not None
    pairs = {(e["source"]["name"], e["target"]["name"]) for e in found.edges}
    assert pairs == {
        ("raw.users", "raw.users"),
        ("raw.orders", "raw.orders"),
        ("raw.users", "analytics.stg_users"),
        ("raw.orders", "analytics.stg_orders"),
        ("analytics.stg_users", "analytics.user_orders"),
        ("analytics.stg_orders", "analytics.user_orders"),
    }
    names = {item["name"] for item in found.results_event()["outputs"]}
    assert "warehouse.analytics.user_orders" in names


def test_artifacts_of_another_run_are_reported_missing_with_the_reason(tmp_path: Path) -> None:
    found = dbt.collect(
        "dbt-duckdb:run",
        artifacts(tmp_path, correlation_id="someone-else"),
        correlation_id=RECORDED_CID,
        exit_code=2,
        warehouse=None,
        streams=[],
    )
    assert found.nodes == ()
    assert found.missing is not None
    assert "'someone-else'" in found.missing
    assert "older dbt invocation" in found.missing


def test_no_artifacts_at_all_are_reported_missing(tmp_path: Path) -> None:
    found = dbt.collect(
        "dbt-duckdb:run", tmp_path, correlation_id="c", exit_code=2, warehouse=None, streams=[]
    )
    assert found.missing is not None
    assert "no run_results.json" in found.missing


def test_rows_affected_is_used_when_the_adapter_reports_it(tmp_path: Path) -> None:
    target = artifacts(tmp_path)
    results = json.loads((target / "run_results.json").read_text())
    for item in results["results"]:
        item["adapter_response"] = {"rows_affected": 42}
    (target / "run_results.json").write_text(json.dumps(results))
    found = dbt.collect(
        "b", target, correlation_id=RECORDED_CID, exit_code=0, warehouse=None, streams=[]
    )
    assert {(n.rows, n.rows_from) for n in found.nodes if n.resource_type == "model"} == {
        (42, "adapter")
    }


def test_a_failing_model_is_named_in_the_error(tmp_path: Path) -> None:
    target = artifacts(tmp_path)
    results = json.loads((target / "run_results.json").read_text())
    broken = next(i for i in results["results"] if i["unique_id"].endswith("user_orders"))
    broken.update(status="error", message="Binder Error: column x not found")
    (target / "run_results.json").write_text(json.dumps(results))
    found = dbt.collect(
        "b", target, correlation_id=RECORDED_CID, exit_code=1, warehouse=None, streams=[]
    )
    error = dbt.DbtFailedError("dbt-duckdb:run", 1, ["boom"], found.failed_nodes)
    assert "model.flext_sample.user_orders: error: Binder Error" in str(error)


@pytest.mark.parametrize(
    ("block", "argv", "appended"),
    [
        ("dbt-duckdb:build", ["meltano", "invoke", "dbt-duckdb:build"], True),
        ("dbt-duckdb:deps", ["meltano", "invoke", "dbt-duckdb:deps"], False),
    ],
    ids=["build-gets-target-path", "deps-does-not"],
)
def test_block_command_points_dbt_at_the_run_directory(
    tmp_path: Path, block: str, argv: list[str], appended: bool
) -> None:
    out, env = dbt.block_command(block, argv, tmp_path)
    assert env == {"DBT_TARGET_PATH": str(tmp_path)}
    assert (out[-2:] == ["--target-path", str(tmp_path)]) is appended


def test_report_carries_the_chain_and_node_results(tmp_path: Path) -> None:
    import jsonschema  # type: ignore[import-untyped]  # no stubs in the test extra

    house = warehouse(tmp_path)
    found = dbt.collect(
        "dbt-duckdb:build",
        artifacts(tmp_path),
        correlation_id=RECORDED_CID,
        exit_code=0,
        warehouse=house,
        streams=["users", "orders"],
    )
    datasets = dbt.stream_datasets(house, ["users", "orders"])

    def record(seq: int, event: str, data: dict[str, Any]) -> dict[str, Any]:
        return {"seq": seq, "ts": "2026-11-26T00:00:00Z", "event": event, "run_id": "r",
                "correlation_id": "c", "data": data, "hash": "0" * 64}  # fmt: skip

    records = [
        record(
            1, "run_started", {"pipeline": {"name": "p", "tap": "t", "target": "target-duckdb"}}
        ),
        *[
            record(2, "stream_stats", {"stream": s, "counts": {"RECORD": 1}, **datasets[s]})
            for s in ("users", "orders")
        ],
        record(3, "dbt_results", found.results_event()),
        record(4, "lineage_edges", {"phase": "dbt-duckdb:build", "edges": list(found.edges)}),
    ]
    report = build_report(records)
    jsonschema.validate(report, report_schema())
    edges = {(e["source"], e["target"]) for e in report["edges"]}
    chain = [
        "stream:users",
        "table:raw.users",
        "source:raw.users",
        "model:analytics.stg_users",
        "model:analytics.user_orders",
    ]
    assert all(pair in edges for pair in itertools.pairwise(chain))
    (block,) = report["dbt"]
    assert {n["rows"] for n in block["nodes"] if n["resource_type"] == "model"} == {5, 7}
