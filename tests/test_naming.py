"""Where targets put a stream: one naming for the landing check and the dbt lineage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flext_meltano_context import dbt, landing
from targets_wrapper import naming
from tests.conftest import install_tool

CONFIG = {
    "path": "/x/wh.duckdb",
    "default_target_schema": "raw",
    "schema_mapping": {"sales": {"target_schema": "crm"}},
}


def test_a_stream_with_three_parts_takes_its_schema_rule_from_the_middle_part() -> None:
    # target-duckdb 0.8.0 db_sync.py stream_name_to_dict: more than two parts split into
    # catalog_name=s[0], schema_name=s[1], table_name="_".join(s[2:]); DbSync.__init__ looks
    # schema_name up in schema_mapping. So `cat-sales-orders` lands in crm, `sales-x-y` in raw.
    default, rules = naming.duckdb_schemas(CONFIG)
    assert naming.duckdb_table(
        "cat-sales-orders", default_schema=default, schema_mapping=rules
    ) == (
        "crm",
        "orders",
    )
    assert naming.duckdb_table("sales-x-y", default_schema=default, schema_mapping=rules) == (
        "raw",
        "y",
    )
    assert naming.duckdb_table("sales-Orders", default_schema=default, schema_mapping=rules) == (
        "crm",
        "orders",
    )


@pytest.mark.parametrize(
    "stream",
    ["users", "sales-Orders", "cat-sales-orders", "sales-x-y", "a-b-c-d", "my.table"],
    ids=["one-part", "two-parts", "three-parts", "first-part-mapped", "four-parts", "dotted"],
)
def test_landing_and_dbt_lineage_name_a_streams_table_alike(stream: str) -> None:
    house = dbt.warehouse_from_config(CONFIG)
    assert house is not None
    relation = house.table_of(stream)
    check = landing.prepare(
        names=["target-duckdb"],
        argv=["target-duckdb"],
        config=CONFIG,
        config_source="test",
        approximate=False,
    )
    schema, table, dataset = landing._destination(check, stream)
    assert relation is not None
    assert (relation.schema, relation.name) == (schema, table)
    assert relation.dataset_name == dataset["name"]


@pytest.mark.parametrize(
    ("config", "catalog"),
    [
        ({"path": "/data/warehouse.duckdb"}, "warehouse"),
        ({"filepath": "out/w.db", "dbname": "named"}, "named"),
        ({"path": "md:my_db?motherduck_token=SECRET"}, "my_db"),
        ({"path": "md:"}, "my_db"),
    ],
    ids=["file", "dbname", "motherduck-token", "motherduck-default"],
)
def test_the_catalog_is_named_as_get_catalog_name_does(
    config: dict[str, str], catalog: str
) -> None:
    assert naming.duckdb_catalog(config) == catalog


@pytest.mark.e2e
def test_target_duckdb_loads_each_stream_where_the_naming_says(tmp_path: Path) -> None:
    bin_dir = install_tool("target-duckdb==0.8.0", "duckdb==1.2.2")
    path = str(tmp_path / "wh.duckdb")
    config = {**CONFIG, "path": path}
    (tmp_path / "config.json").write_text(json.dumps(config))
    streams = ["users", "sales-Orders", "cat-sales-items", "sales-x-y"]
    properties = {"id": {"type": "integer"}, "name": {"type": "string"}}
    schema = {"type": "object", "properties": properties}
    lines = []
    for stream in streams:
        lines.append(
            {"type": "SCHEMA", "stream": stream, "schema": schema, "key_properties": ["id"]}
        )
        lines.append({"type": "RECORD", "stream": stream, "record": {"id": 1, "name": "a"}})
    done = subprocess.run(
        [str(bin_dir / "target-duckdb"), "--config", str(tmp_path / "config.json")],
        input="".join(json.dumps(line) + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    probe = (
        "import duckdb, json, sys; c = duckdb.connect(sys.argv[1], read_only=True); "
        "print(json.dumps(sorted(c.execute('select table_catalog, table_schema, table_name "
        "from information_schema.tables').fetchall())))"
    )
    found = subprocess.run(
        [str(bin_dir / "python"), "-c", probe, path],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    default, rules = naming.duckdb_schemas(config)
    expected = sorted(
        ["wh", *naming.duckdb_table(s, default_schema=default, schema_mapping=rules)]
        for s in streams
    )
    assert json.loads(found.stdout) == expected
