"""Landing reconciliation: after a load, ask the destination what landed per stream (issues 7, 10).

Each destination family (DuckDB, PostgreSQL, SQLite, JSONL and CSV files) names its tables or
files after the stream the way its target does, and is read read-only. Databases are probed by a
short script run with the target's own interpreter when it has the driver (the file a
target-duckdb wrote with duckdb 2.x cannot be opened by an older duckdb), else with ours.

Three levels, named in every result:
- `by key` (default for a stream with key properties): the distinct keys the relay forwarded are
  streamed to the probe, which anti-joins them against the table, each key cast to the type the
  destination gave its column: `ok` when every key is there, else `missing N` with a few sample
  keys. A key that cannot be compared with its column (a float on a text column, an object, a
  null) makes the stream `not checked`, never `ok`.
- `by column` (opt-in record column `_sdc_correlation_id`): the rows carrying this run's
  correlation id against the distinct keys (upserting targets) or records (appending ones).
- `by count`: rows before and after the load, exact for appends, an upper bound for upserts.
A probe never raises into the run: what it could not do is a `not checked` result with the
reason. Secrets in the target config never leave this module: every reason is scrubbed of them.
The check by key lives in `keyprobe`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context.keys import KeySet
from targets_wrapper import naming
from targets_wrapper.config import config_path_in, read_config

if TYPE_CHECKING:
    from flext_meltano_context.keys import KeyCollector

log = structlog.get_logger("flext_meltano_context.landing")

COLUMN = "_sdc_correlation_id"
BY_KEY, BY_COLUMN, BY_COUNT = "by key", "by column", "by count"
DEFAULT_SAMPLE_KEYS = 5
MAX_SAMPLE_CHARS = 200
PROBE_TIMEOUT = 120.0
MAX_SNAPSHOT_TABLES = 500
_FAMILIES = (
    ("duckdb", ("target-duckdb", "target_duckdb")),
    ("postgres", ("target-postgres", "target_postgres")),
    ("sqlite", ("target-sqlite", "target_sqlite")),
    ("jsonl", ("target-jsonl", "target_jsonl")),
    ("csv", ("target-csv", "target_csv")),
)
_SECRET_KEYS = ("password", "token", "secret", "sqlalchemy_url", "key")


@dataclass(frozen=True, slots=True)
class StreamLanding:
    """One stream's reconciliation: what the target had to land, what landed, the verdict."""

    stream: str
    relayed: int  # what should have landed: records, or distinct keys for an upserting target
    basis: str  # "records" or "distinct_keys"
    landed: int | None
    status: str  # ok, missing, extra, not checked
    level: str | None = None  # by key, by column or by count
    bound: str | None = None  # by count only: "exact" (appends, new table) or "upper_bound"
    reason: str | None = None
    dataset: Mapping[str, str] | None = None  # OpenLineage {namespace, name}
    samples: tuple[Mapping[str, Any], ...] = ()  # by key: a few missing keys, {column: value}
    key_columns: tuple[str, ...] = ()

    @property
    def difference(self) -> int:
        return 0 if self.landed is None else self.relayed - self.landed

    @property
    def label(self) -> str:
        """`ok`, `missing 1`, `extra 2` or `not checked`."""
        if self.status in {"missing", "extra"}:
            return f"{self.status} {abs(self.difference)}"
        return self.status

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "relayed": self.relayed,
            "basis": self.basis,
            "landed": self.landed,
            "status": self.status,
            "label": self.label,
            "difference": self.difference,
            "level": self.level,
            "bound": self.bound,
            "reason": self.reason,
            "dataset": dict(self.dataset) if self.dataset else None,
            "samples": [dict(sample) for sample in self.samples],
            "key_columns": list(self.key_columns),
        }


@dataclass(frozen=True, slots=True)
class Landing:
    """The reconciliation of one run, as the `landing` lineage event records it."""

    family: str | None
    config_source: str | None
    streams: tuple[StreamLanding, ...]
    duration_s: float = 0.0

    def event_data(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "config_source": self.config_source,
            "duration_s": self.duration_s,
            "streams": [s.to_dict() for s in self.streams],
        }


@dataclass(slots=True)
class Check:
    """A reconciliation prepared before the load (config read, counts taken) and finished after."""

    family: str | None
    config: Mapping[str, Any] = field(default_factory=dict)
    config_source: str | None = None
    reason: str | None = None  # why nothing can be checked
    python: str | None = None  # interpreter with the target's driver
    cwd: str | None = None  # where relative paths in the config are resolved
    started_at: float = field(default_factory=time.time)
    before: dict[str, int] | None = None  # destination -> rows before the load
    covered: tuple[str, ...] = ()  # schemas (or directories) the snapshot covered
    before_error: str | None = None
    sample_keys: int = DEFAULT_SAMPLE_KEYS  # missing keys shown per stream (0: none)
    workdir: Path | None = None  # where the keys for the probe are written (else a temp dir)

    def finish(
        self,
        relayed: Mapping[str, int],
        keys: KeySet | None,
        key_properties: Mapping[str, Sequence[str]],
        column_streams: frozenset[str],
        correlation_id: str,
        *,
        counting_error: str | None = None,
    ) -> Landing:
        """Ask the destination what landed per stream now the target has exited 0; never raises.

        `relayed`: records per stream; `keys`: the distinct keys the relay forwarded;
        `key_properties`: each stream's SCHEMA keys; `column_streams`: streams given the record
        column (`*` all); `counting_error`: the relay stopped counting, so nothing is compared.
        The key set is closed (its spilled files removed) before this returns.
        """
        began = time.monotonic()
        try:
            results = _finish(
                self, relayed, keys, key_properties, column_streams, correlation_id, counting_error
            )
        except Exception as exc:  # noqa: BLE001 - a probe must never fail the run
            reason = self.scrub(f"probe failed: {type(exc).__name__}: {exc}")
            results = [_unchecked(s, n, reason) for s, n in relayed.items()]
        finally:
            if keys is not None:
                keys.close()
        return Landing(
            self.family, self.config_source, tuple(results), round(time.monotonic() - began, 3)
        )

    def scrub(self, text: str) -> str:
        """`text` without any secret value of the target config."""
        for value in _secrets(self.config):
            text = text.replace(value, "***")
        return text[:500]


def _secrets(config: Mapping[str, Any]) -> list[str]:
    found = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            found += _secrets(value)
        elif (
            isinstance(value, str)
            and len(value) >= 3
            and any(word in key.lower() for word in _SECRET_KEYS)
        ):
            found.append(value)
            match = re.match(r"[^:]+://[^:/@]*:([^@]+)@", value)  # a URL's password, alone
            if match:
                found.append(match.group(1))
    return sorted(found, key=len, reverse=True)


def family_of(names: Sequence[str]) -> str | None:
    """The destination family of a target, from its plugin name and executable."""
    for name in names:
        base = Path(name).name.lower()
        for family, needles in _FAMILIES:
            if any(needle in base for needle in needles):
                return family
    return None


def prepare(
    *,
    names: Sequence[str],
    argv: Sequence[str],
    config: Mapping[str, Any] | None,
    config_source: str | None,
    approximate: bool,
    cwd: str | None = None,
    config_error: str | None = None,
    sample_keys: int = DEFAULT_SAMPLE_KEYS,
    workdir: Path | None = None,
) -> Check:
    """Everything to do before the target starts: family, config, counts before the load."""
    family = family_of(names)
    if family is None:
        shown = Path(names[0]).name if names and names[0] else "?"
        return Check(None, reason=f"no landing probe for target {shown!r}")
    if config is None:
        why = config_error or "no target config (pass --target-config FILE)"
        return Check(family, reason=why)
    check = Check(
        family,
        config,
        config_source,
        cwd=cwd,
        python=_python_for(argv, family),
        sample_keys=sample_keys,
        workdir=workdir,
    )
    if approximate:
        try:
            _snapshot(check)
        except Exception as exc:  # noqa: BLE001 - reported with the results, never raised
            check.before_error = check.scrub(f"{type(exc).__name__}: {exc}")
    return check


def prepare_run(
    *,
    target: str,
    argv: Sequence[str],
    target_config: Path | None,
    meltano: Any | None,
    approximate: bool,
    cwd: str | None = None,
    sample_keys: int = DEFAULT_SAMPLE_KEYS,
    workdir: Path | None = None,
) -> Check:
    """The check for one run: config from `--target-config`, the target's `--config`, or Meltano.

    Never raises: a config that cannot be read is a `not checked` reason.
    """
    names = [target, *argv[:2]]
    if family_of(names) is None:
        return prepare(names=names, argv=argv, config=None, config_source=None, approximate=False)
    config: dict[str, Any] | None = None
    source: str | None = None
    error: str | None = None
    in_argv = config_path_in(argv)
    try:
        if target_config is not None:
            config, source = read_config(target_config), "target-config"
        elif in_argv is not None:
            path = in_argv if in_argv.is_absolute() or cwd is None else Path(cwd) / in_argv
            config, source = read_config(path), "target-argv"
        elif meltano is not None:
            config, source = meltano.dump_config(target), "meltano-dump-config"
    except Exception as exc:  # noqa: BLE001 - reported as the reason nothing was checked
        error = f"cannot read the target config: {type(exc).__name__}: {str(exc)[:300]}"
    return prepare(
        names=names,
        argv=argv,
        config=config,
        config_source=source,
        approximate=approximate,
        cwd=cwd,
        config_error=error,
        sample_keys=sample_keys,
        workdir=workdir,
    )


def sample_keys_from_env(environ: Mapping[str, str]) -> int:
    """How many missing keys a result shows, from FLEXT_CONTEXT_LANDING_SAMPLE_KEYS."""
    from flext_meltano_context.errors import UsageError

    raw = environ.get("FLEXT_CONTEXT_LANDING_SAMPLE_KEYS", "").strip()
    if not raw:
        return DEFAULT_SAMPLE_KEYS
    if not raw.isdigit() or int(raw) > 1000:
        raise UsageError(
            f"FLEXT_CONTEXT_LANDING_SAMPLE_KEYS={raw[:20]!r} is not a whole number from 0 to "
            "1000 (default 5; 0 hides the sample keys)"
        )
    return int(raw)


def for_run(
    *,
    target: str,
    argv: Sequence[str],
    target_config: Path | None,
    meltano: Any | None,
    column_streams: frozenset[str],
    cwd: str | None,
    workdir: Path | None,
    environ: Mapping[str, str],
) -> tuple[Check, KeyCollector | None]:
    """The run's landing check and, when it can run, the collector of the keys relayed.

    Keys are collected whenever the check can run (issue 10): they are what the check by key
    compares. Bad settings raise UsageError before any child starts.
    """
    from flext_meltano_context.keys import KeyCollector, budget_from_env

    budget = budget_from_env(environ)
    check = prepare_run(
        target=target,
        argv=argv,
        target_config=target_config,
        meltano=meltano,
        approximate="*" not in column_streams,
        cwd=cwd,
        sample_keys=sample_keys_from_env(environ),
        workdir=workdir,
    )
    if check.reason is not None:
        return check, None
    return check, KeyCollector(KeySet(budget, workdir))


def _python_for(argv: Sequence[str], family: str) -> str | None:
    """The target's own interpreter (beside its executable), for the database families."""
    if family not in {"duckdb", "postgres"} or not argv:
        return None
    first = Path(argv[0])
    candidates = [first] if first.name.startswith("python") else [first.parent / "python"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _unchecked(stream: str, relayed: int, reason: str) -> StreamLanding:
    return StreamLanding(stream, relayed, "records", None, "not checked", reason=reason)


# --- where each family's table is, and its dataset name ---------------------------------------


def _path(check: Check, value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    return (Path(check.cwd) / path) if check.cwd is not None else path.absolute()


def _destination(check: Check, stream: str) -> tuple[str, str, Mapping[str, str]]:
    """(schema, table, dataset) of a database family's table for `stream`."""
    conf = check.config
    if check.family == "duckdb":
        default, rules = naming.duckdb_schemas(conf)
        found, table = naming.duckdb_table(stream, default_schema=default, schema_mapping=rules)
        schema = found or ""
        catalog = naming.duckdb_catalog(conf)
        # A query string may carry a token (MotherDuck: `md:db?motherduck_token=...`): the
        # dataset is named after the database, never after its connection options.
        raw = str(conf.get("path") or conf.get("filepath") or "").split("?", 1)[0]
        where = raw if "://" in raw or raw.startswith("md:") else _path(check, raw)
        namespace = f"duckdb://{where}"
        return schema, table, {"namespace": namespace, "name": f"{catalog}.{schema}.{table}"}
    if check.family == "postgres":
        schema, table = naming.postgres_table(conf, stream)
        host, port, database = _pg_where(conf)
        return (
            schema,
            table,
            {
                "namespace": f"postgres://{host}:{port}",
                "name": f"{database}.{schema}.{table}",
            },
        )
    table = naming.sqlite_table(stream)
    db = _sqlite_path(check)
    return "main", table, {"namespace": f"sqlite://{db}", "name": table}


def _sqlite_path(check: Check) -> Path:
    return _path(check, str(check.config.get("database", ""))).with_suffix(".db")


def _pg_where(conf: Mapping[str, Any]) -> tuple[str, int, str]:
    url = conf.get("sqlalchemy_url")
    if url:
        match = re.match(r"[^:]+://(?:[^@/]*@)?([^:/?]+)(?::(\d+))?/([^?]+)", str(url))
        if match:
            return match.group(1), int(match.group(2) or 5432), match.group(3)
    return (
        str(conf.get("host", "localhost")),
        int(conf.get("port", 5432)),
        str(conf.get("database", "postgres")),
    )


def _upserts(check: Check, keyed: bool) -> bool:
    """Whether the family replaces rows by primary key (then distinct keys are what lands)."""
    if check.family in {"jsonl", "csv"}:
        return False
    if check.family == "postgres":
        return keyed and check.config.get("load_method", "append-only") != "overwrite"
    return keyed


# --- counting ---------------------------------------------------------------------------------


def _snapshot(check: Check) -> None:
    """Row counts before the load, for the `by count` level."""
    if check.family in {"duckdb", "postgres"}:
        conf = check.config
        schemas = {str(conf.get("default_target_schema") or "").strip()} - {""}
        for value in (conf.get("schema_mapping") or {}).values():
            schemas.add(str(value.get("target_schema")))
        if check.family == "postgres" and not schemas:
            schemas = {"melty"}
        raw = str(conf.get("path") or conf.get("filepath") or "")
        if check.family == "duckdb" and "://" not in raw and not _path(check, raw).exists():
            check.before = {}  # a new database file: every table is new
        else:
            reply = _run_db_probe(check, {"op": "snapshot", "schemas": sorted(schemas)})
            check.before = {k: int(v) for k, v in reply["counts"].items()}
        check.covered = tuple(sorted(schemas))
    elif check.family == "sqlite":
        db = _sqlite_path(check)
        check.before = {}
        check.covered = ("main",)
        if db.exists():
            with _sqlite(db) as conn:
                tables = [
                    r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                for table in tables[:MAX_SNAPSHOT_TABLES]:
                    quoted = table.replace('"', '""')
                    count = conn.execute(f'SELECT count(*) FROM "{quoted}"').fetchone()  # noqa: S608 - quoted identifier
                    check.before[f"main.{table}"] = int(count[0])
    elif check.family == "jsonl":
        folder = _path(check, str(check.config.get("destination_path") or "."))
        check.before = {str(p): _lines(p) for p in folder.glob("*.jsonl")}
        check.covered = (str(folder),)


def _lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


class _sqlite:  # noqa: N801 - a context manager read like a function
    """A read-only SQLite connection (URI mode=ro): it takes no write lock."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *_exc: object) -> None:
        self.conn.close()


def _finish(
    check: Check,
    relayed: Mapping[str, int],
    keys: KeySet | None,
    key_properties: Mapping[str, Sequence[str]],
    column_streams: frozenset[str],
    correlation_id: str,
    counting_error: str | None,
) -> list[StreamLanding]:
    if counting_error is not None:  # the first reason: our own counts cannot be trusted
        reason = check.scrub(f"the relay's counts are incomplete: {counting_error}")
        return [_unchecked(stream, n, reason) for stream, n in relayed.items()]
    if check.family is None or check.reason is not None:
        reason = check.reason or "no landing probe for this target"
        return [_unchecked(stream, n, reason) for stream, n in relayed.items()]
    by_column = {s for s in relayed if "*" in column_streams or s in column_streams}
    by_key = {
        s: tuple(key_properties.get(s) or ())
        for s in relayed
        if s not in by_column and key_properties.get(s) and keys is not None
    }
    done: dict[str, StreamLanding] = {}
    if by_key and keys is not None:
        from flext_meltano_context.keyprobe import by_key as probe_by_key

        done.update(probe_by_key(check, by_key, keys))
    rest = {s: n for s, n in relayed.items() if s not in done}
    if rest:
        distinct = {s: keys.count(s) for s in rest if keys is not None and keys.count(s)}
        keyed = {s: bool(key_properties.get(s)) for s in rest}
        for row in _counted(check, rest, distinct, keyed, by_column, correlation_id):
            done[row.stream] = row
    return [done[s] for s in relayed]


def _counted(
    check: Check,
    relayed: Mapping[str, int],
    distinct_keys: Mapping[str, int],
    keyed: Mapping[str, bool],
    exact: set[str],
    correlation_id: str,
) -> list[StreamLanding]:
    """The `by column` and `by count` levels: rows counted, against records or distinct keys."""
    plans: dict[str, tuple[int, str]] = {}
    for stream, records in relayed.items():
        upsert = _upserts(check, keyed.get(stream, False))
        if upsert and stream in distinct_keys:
            plans[stream] = (distinct_keys[stream], "distinct_keys")
        else:
            plans[stream] = (records, "records")
    counts = _count(check, list(relayed), exact, correlation_id)
    out = []
    for stream in relayed:
        expected, basis = plans[stream]
        upsert = _upserts(check, keyed.get(stream, False))
        landed, dataset, before, error = counts[stream]
        if error is not None:
            out.append(
                StreamLanding(
                    stream, expected, basis, None, "not checked", reason=error, dataset=dataset
                )
            )
            continue
        if stream in exact:
            status = _verdict(expected, landed)
            out.append(
                StreamLanding(stream, expected, basis, landed, status, BY_COLUMN, dataset=dataset)
            )
            continue
        if before is None:
            why = check.before_error or "no row count from before the load"
            out.append(
                StreamLanding(
                    stream,
                    expected,
                    basis,
                    None,
                    "not checked",
                    BY_COUNT,
                    reason=why,
                    dataset=dataset,
                )
            )
            continue
        new_rows = (landed or 0) - before[0]
        table_was_new = not before[1]
        note = None
        if not upsert or (table_was_new and basis == "distinct_keys"):
            status, bound = _verdict(expected, new_rows), "exact"
        else:
            status, bound = ("extra" if new_rows > expected else "ok"), "upper_bound"
            unit = "key(s)" if basis == "distinct_keys" else "record(s)"
            note = (
                f"{new_rows} new row(s) for {expected} relayed {unit}: updated rows add none, so "
                "the relayed figure is an upper bound; keys or the record column give exact checks"
            )
        out.append(
            StreamLanding(
                stream,
                expected,
                basis,
                new_rows,
                status,
                BY_COUNT,
                bound,
                reason=note,
                dataset=dataset,
            )
        )
    return out


def _verdict(expected: int, landed: int | None) -> str:
    if landed is None or landed == expected:
        return "ok"
    return "missing" if landed < expected else "extra"


Count = tuple[int | None, Mapping[str, str] | None, tuple[int, bool] | None, str | None]


def _count(check: Check, streams: list[str], exact: set[str], cid: str) -> dict[str, Count]:
    """(landed, dataset, (rows before, table existed before), error) per stream."""
    if check.family in {"duckdb", "postgres", "sqlite"}:
        return _count_tables(check, streams, exact, cid)
    return {s: _count_file(check, s, s in exact, cid, len(streams)) for s in streams}


def _before(check: Check, schema: str, table: str) -> tuple[int, bool] | None:
    if check.before is None or schema not in check.covered:
        return None
    key = f"{schema}.{table}"
    return (check.before[key], True) if key in check.before else (0, False)


def _count_tables(check: Check, streams: list[str], exact: set[str], cid: str) -> dict[str, Count]:
    where = {s: _destination(check, s) for s in streams}
    queries = [[where[s][0], where[s][1], cid if s in exact else None] for s in streams]
    if check.family == "sqlite":
        reply = _sqlite_counts(check, queries)
    else:
        reply = _run_db_probe(check, {"op": "count", "tables": queries})
    out: dict[str, Count] = {}
    for stream, count, error in zip(streams, reply["counts"], reply["errors"], strict=True):
        schema, table, dataset = where[stream]
        if error == "no such table":
            count, error = 0, None  # nothing landed: the target never created it
        out[stream] = (
            count,
            dataset,
            _before(check, schema, table),
            check.scrub(f"count failed: {error}") if error else None,
        )
    return out


def _sqlite_counts(check: Check, queries: list[list[Any]]) -> dict[str, list[Any]]:
    db = _sqlite_path(check)
    counts: list[Any] = []
    errors: list[Any] = []
    if not db.exists():
        return {"counts": [0] * len(queries), "errors": ["no such table"] * len(queries)}
    with _sqlite(db) as conn:
        for _schema, table, cid in queries:
            quoted = table.replace('"', '""')
            sql = f'SELECT count(*) FROM "{quoted}"'  # noqa: S608 - quoted identifier
            try:
                row = (
                    conn.execute(f"{sql} WHERE {COLUMN} = ?", (cid,)).fetchone()
                    if cid
                    else conn.execute(sql).fetchone()
                )
                counts.append(int(row[0]))
                errors.append(None)
            except sqlite3.Error as exc:
                missing = "no such table" in str(exc)
                counts.append(None)
                errors.append("no such table" if missing else str(exc))
    return {"counts": counts, "errors": errors}


def _jsonl_files(check: Check, stream: str) -> tuple[list[Path], dict[str, str]]:
    """target-jsonl 0.1.4: {destination_path}/{custom_name or stream}[-%Y%m%dT%H%M%S].jsonl."""
    conf = check.config
    folder = _path(check, str(conf.get("destination_path") or "."))
    name = str(conf.get("custom_name") or stream)
    files = [
        p
        for p in folder.glob(f"{glob_escape(name)}*.jsonl")
        if re.fullmatch(re.escape(name) + r"(-\d{8}T\d{6})?\.jsonl", p.name)
    ]
    return files, {"namespace": f"file://{folder.resolve()}", "name": f"{name}.jsonl"}


def _csv_files(check: Check, stream: str) -> tuple[list[Path], dict[str, str]]:
    """meltanolabs-target-csv 0.5.0: {output_path}/{file_naming_scheme}, this run's."""
    conf = check.config
    scheme = str(conf.get("file_naming_scheme") or "{stream_name}.csv")
    folder = _path(
        check,
        str(
            conf.get("output_path")
            or conf.get("destination_path")
            or conf.get("output_path_prefix")
            or "."
        ),
    )
    pattern = glob_escape(scheme).replace("{stream_name}", glob_escape(stream))
    pattern = re.sub(r"\{[a-z_]+\}", "*", pattern)
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    files = [p for p in files if p.stat().st_mtime >= check.started_at - 2]
    return files, {"namespace": f"file://{folder.resolve()}", "name": pattern}


def _count_file(check: Check, stream: str, exact: bool, cid: str, n_streams: int) -> Count:
    conf = check.config
    if check.family == "jsonl":
        if conf.get("custom_name") and n_streams > 1:
            return None, None, None, "every stream goes to one custom_name file: not separable"
        files, dataset = _jsonl_files(check, stream)
        if exact:
            recent = [p for p in files if p.stat().st_mtime >= check.started_at - 2]
            return sum(_jsonl_matches(p, cid) for p in recent), dataset, None, None
        landed = sum(_lines(p) for p in files)
        if check.before is None:
            return landed, dataset, None, None
        before = sum(check.before.get(str(p), 0) for p in files)
        return landed, dataset, (before, before > 0), None
    files, dataset = _csv_files(check, stream)
    if not files:
        return 0, dataset, (0, False), None
    rows = _csv_rows(files[-1], cid if exact else None)
    return rows, dataset, (0, False), None  # the file is replaced: what it holds is this run's


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _jsonl_matches(path: Path, cid: str) -> int:
    needle = cid.encode()
    found = 0
    with path.open("rb") as handle:
        for line in handle:
            if needle in line:
                try:
                    found += json.loads(line).get(COLUMN) == cid
                except (ValueError, AttributeError):
                    continue
    return found


def _csv_rows(path: Path, cid: str | None) -> int:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if cid is None:
            return sum(1 for _ in reader)
        return sum(1 for row in reader if row.get(COLUMN) == cid)


# --- database probes, run with the target's interpreter ---------------------------------------

# Reads a JSON request on stdin, prints one JSON reply; read-only, short lock and statement
# timeouts. Kept free of third-party imports but the driver of its family.
_PROBE = r"""
import json, sys
req = json.load(sys.stdin)
fam, conf = req["family"], req["config"]
def duck():
    import duckdb
    path = conf.get("path") or conf.get("filepath")
    return duckdb.connect(path, read_only=True)
def pg():
    # The probe by key needs a temporary table, and CREATE is refused in a read-only
    # transaction: it creates its table first, then makes its transaction read-only.
    ro = "" if req["op"] == "missing" else "-c default_transaction_read_only=on "
    opts = ro + "-c statement_timeout=600000 -c lock_timeout=5000"
    url = conf.get("sqlalchemy_url")
    try:
        import psycopg as drv
    except ImportError:
        import psycopg2 as drv
    if url:
        url = url.split("://", 1)
        url = url[0].split("+")[0] + "://" + url[1]
        return drv.connect(url, options=opts, connect_timeout=10)
    return drv.connect(host=conf.get("host"), port=conf.get("port", 5432), user=conf.get("user"),
                       password=conf.get("password"), dbname=conf.get("database"),
                       options=opts, connect_timeout=10)
def q(name):
    return '"' + str(name).replace('"', '""') + '"'
conn = duck() if fam == "duckdb" else pg()
cur = conn.cursor()
def one(sql, args=()):
    cur.execute(sql, args) if args else cur.execute(sql)
    return cur.fetchone()
ph = "?" if fam == "duckdb" else "%s"
def exists(schema, table):
    return one("SELECT count(*) FROM information_schema.tables WHERE table_schema = " + ph
               + " AND table_name = " + ph, (schema, table))[0]
def text(col):  # a wire column holding x + hex of UTF-8 text, as text
    if fam == "duckdb":
        return "decode(from_hex(substr(" + col + ", 2)))"
    return "convert_from(decode(substr(" + col + ", 2), 'hex'), 'UTF8')"
def missing(schema, table, cols, types, path, n):
    names = ["c%d" % i for i in range(len(cols))]
    if fam == "duckdb":
        spec = "{" + ", ".join("'%s': 'VARCHAR'" % c for c in names) + "}"
        keys = ("read_csv(" + ph + ", delim='" + chr(9) + "', header=false, "
                "auto_detect=false, columns=" + spec + ")")
        args = (path,)
    else:
        cur.execute("CREATE TEMP TABLE flext_keys (" + ", ".join(c + " text" for c in names)
                    + ") ON COMMIT DROP")
        cur.execute("SET TRANSACTION READ ONLY")
        sql = "COPY flext_keys FROM STDIN"
        if hasattr(cur, "copy"):
            with open(path, "rb") as f, cur.copy(sql) as copy:
                while block := f.read(1 << 20):
                    copy.write(block)
        else:
            with open(path, "rb") as f:
                cur.copy_expert(sql, f)
        keys, args = "flext_keys", ()
    match = []
    for col, name, (typ, hexed) in zip(cols, names, types):
        src = text("k." + name) if hexed else "k." + name
        match.append("t." + q(col) + " = CAST(" + src + " AS " + typ + ")")
    absent = (" FROM " + keys + " AS k WHERE NOT EXISTS (SELECT 1 FROM " + q(schema) + "."
              + q(table) + " AS t WHERE " + " AND ".join(match) + ")")
    # One pass: the count of missing keys rides on each of the few sample rows returned.
    sql = ("SELECT count(*) OVER ()" + "".join(", k." + c for c in names) + absent
           + " LIMIT " + str(max(1, int(n))))
    cur.execute(sql, args) if args else cur.execute(sql)
    found = cur.fetchall()
    count = found[0][0] if found else 0
    rows = [list(r[1:]) for r in found][:int(n)]
    if fam == "postgres":
        conn.rollback()
    return int(count), rows
if req["op"] == "snapshot":
    counts = {}
    for schema in req["schemas"]:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = "
                    + ph + " AND table_type = 'BASE TABLE'", (schema,))
        for (table,) in cur.fetchall()[:__MAX__]:
            sql = "SELECT count(*) FROM " + q(schema) + "." + q(table)
            counts[schema + "." + table] = one(sql)[0]
    print(json.dumps({"counts": counts}))
elif req["op"] == "columns":
    found, errors = [], []
    for schema, table, cols in req["tables"]:
        if not exists(schema, table):
            found.append(None); errors.append("no such table"); continue
        cur.execute("SELECT column_name, data_type FROM information_schema.columns WHERE "
                    "table_schema = " + ph + " AND table_name = " + ph, (schema, table))
        found.append(dict(cur.fetchall()))
        errors.append(None)
    print(json.dumps({"columns": found, "errors": errors}))
elif req["op"] == "missing":
    counts, samples, errors = [], [], []
    for schema, table, cols, types, path in req["tables"]:
        try:
            count, rows = missing(schema, table, cols, types, path, req["samples"])
            counts.append(count); samples.append(rows); errors.append(None)
        except Exception as exc:
            counts.append(None); samples.append([])
            errors.append(type(exc).__name__ + ": " + str(exc)[:300])
            if fam == "postgres":
                conn.rollback()
    print(json.dumps({"missing": counts, "samples": samples, "errors": errors}))
else:
    counts, errors = [], []
    for schema, table, cid in req["tables"]:
        if not exists(schema, table):
            counts.append(None); errors.append("no such table"); continue
        sql = "SELECT count(*) FROM " + q(schema) + "." + q(table)
        try:
            row = one(sql + " WHERE " + q("__COLUMN__") + " = " + ph, (cid,)) if cid else one(sql)
            counts.append(int(row[0])); errors.append(None)
        except Exception as exc:
            counts.append(None); errors.append(type(exc).__name__ + ": " + str(exc)[:300])
            if fam == "postgres":
                conn.rollback()
    print(json.dumps({"counts": counts, "errors": errors}))
conn.close()
""".replace("__MAX__", str(MAX_SNAPSHOT_TABLES)).replace("__COLUMN__", COLUMN)


def _run_db_probe(
    check: Check, request: Mapping[str, Any], *, timeout: float = PROBE_TIMEOUT
) -> dict[str, Any]:
    """Run the probe script with the target's interpreter (or ours); its JSON reply."""
    python = check.python or sys.executable
    payload = json.dumps({**request, "family": check.family, "config": dict(check.config)})
    try:
        done = subprocess.run(
            [python, "-c", _PROBE],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=check.cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the {check.family} probe took over {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise RuntimeError(check.scrub(tail))
    reply: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return reply
