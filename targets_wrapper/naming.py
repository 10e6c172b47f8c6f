"""Where a target puts a stream: the schema and table each target family names after it.

Each rule is read from the target's own source (cited per function). Landing reconciliation
counts these tables and the dbt phase links streams to dbt sources through them; both ask here,
so the two always name a stream's table alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse


def duckdb_table(
    stream: str, *, default_schema: str | None, schema_mapping: Mapping[str, str]
) -> tuple[str | None, str]:
    """(schema, table) target-duckdb 0.8 loads `stream` into; schema None when none is configured.

    db_sync.py `stream_name_to_dict`: `a-b` is schema part `a`, table `b`; `a-b-c-d` is catalog
    part `a`, schema part `b`, table `c_d`. The schema part only picks a `schema_mapping` rule
    (`DbSync.__init__`), else `default_target_schema` applies; the catalog part is never used (the
    connection's catalog is). `DbSync.table_name` replaces "." and "-" with "_" and lowercases.
    """
    parts = stream.split("-")
    key = parts[0] if len(parts) == 2 else parts[1] if len(parts) > 2 else None
    table = parts[1] if len(parts) == 2 else "_".join(parts[2:]) if len(parts) > 2 else stream
    schema = (schema_mapping.get(key) if key is not None else None) or default_schema
    return schema, table.replace(".", "_").replace("-", "_").lower()


def duckdb_schemas(config: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
    """target-duckdb's `default_target_schema` (None if blank) and its `schema_mapping` rules."""
    default = str(config.get("default_target_schema") or "").strip() or None
    mapping = config.get("schema_mapping")
    rules = {
        str(name): str(rule["target_schema"])
        for name, rule in (mapping.items() if isinstance(mapping, Mapping) else ())
        if isinstance(rule, Mapping) and rule.get("target_schema")
    }
    return default, rules


def duckdb_catalog(config: Mapping[str, Any]) -> str:
    """The catalog target-duckdb 0.8 qualifies its tables with (db_sync.py `get_catalog_name`).

    `database` or `dbname` if set, else the path's file name without its extension; a query
    string (MotherDuck's `md:db?motherduck_token=...`) is not part of it; `md:` alone is `my_db`.
    """
    named = config.get("database") or config.get("dbname")
    if named:
        return str(named)
    raw = config.get("path") or config.get("filepath")
    parsed = urlparse(raw if isinstance(raw, str) else "")
    stem = os.path.splitext(os.path.basename(parsed.path))[0]  # noqa: PTH119, PTH122 - as db_sync
    if parsed.scheme in {"md", "motherduck"} and stem == "":
        return "my_db"
    return stem


def postgres_table(config: Mapping[str, Any], stream: str) -> tuple[str, str]:
    """(schema, table) meltanolabs-target-postgres 0.8.1 loads into (sinks.py `schema_name`).

    `default_target_schema` if set, else the stream's second-to-last part for `a-b` and `a-b-c`,
    else `melty`; the table is the last part, its name kept as it is (identity `conform_name`).
    """
    parts = stream.split("-")
    schema = config.get("default_target_schema") or "melty"
    if not config.get("default_target_schema") and len(parts) in {2, 3}:
        schema = parts[-2]
    table = stream if len(parts) == 1 else parts[-1]
    return str(schema), table


def sqlite_table(stream: str) -> str:
    """The table target-sqlite 0.2.0 names `stream` (utils: non-word -> "_", then underscore)."""
    table = re.sub("[^0-9a-zA-Z_]+", "_", stream)
    table = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", table)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", table).replace("-", "_").lower()
