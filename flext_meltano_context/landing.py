"""Landing reconciliation: after a load, count what landed per stream and compare (issue 7).

Each destination family (DuckDB, PostgreSQL, SQLite, JSONL and CSV files) names its tables or
files after the stream the way its target does, and is counted read-only. Databases are counted
by a short script run with the target's own interpreter when it has the driver (the file a
target-duckdb wrote with duckdb 2.x cannot be opened by an older duckdb), else with ours.

Two levels: `exact` counts the rows whose `_sdc_correlation_id` is this run's correlation id
(the record column must be on for the stream) against the distinct primary keys relayed (upserting
targets) or the records relayed (appending ones); `approximate` compares the row count before
and after the load, exact for appends and an upper bound for upserts. A probe never raises into
the run: what it could not do is a `not checked` result with the reason. Secrets in the target
config never leave this module: every reason is scrubbed of them.
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
from typing import Any

import structlog

from targets_wrapper import naming
from targets_wrapper.config import config_path_in, read_config

log = structlog.get_logger("flext_meltano_context.landing")

COLUMN = "_sdc_correlation_id"
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
    level: str | None = None  # exact or approximate
    bound: str | None = None  # approximate only: "exact" (appends, new table) or "upper_bound"
    reason: str | None = None
    dataset: Mapping[str, str] | None = None  # OpenLineage {namespace, name}

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

    def finish(
        self,
        relayed: Mapping[str, int],
        distinct_keys: Mapping[str, int],
        keyed: Mapping[str, bool],
        exact_streams: frozenset[str],
        correlation_id: str,
    ) -> Landing:
        """Count what landed per stream now the target has exited 0; never raises."""
        began = time.monotonic()
        try:
            results = _finish(self, relayed, distinct_keys, keyed, exact_streams, correlation_id)
        except Exception as exc:  # noqa: BLE001 - a probe must never fail the run
            reason = self.scrub(f"probe failed: {type(exc).__name__}: {exc}")
            results = [_unchecked(s, n, reason) for s, n in relayed.items()]
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
) -> Check:
    """Everything to do before the target starts: family, config, counts before the load."""
    family = family_of(names)
    if family is None:
        shown = Path(names[0]).name if names and names[0] else "?"
        return Check(None, reason=f"no landing probe for target {shown!r}")
    if config is None:
        why = config_error or "no target config (pass --target-config FILE)"
        return Check(family, reason=why)
    check = Check(family, config, config_source, cwd=cwd, python=_python_for(argv, family))
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
    )


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
    """Row counts before the load, for the approximate level."""
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
    distinct_keys: Mapping[str, int],
    keyed: Mapping[str, bool],
    exact_streams: frozenset[str],
    correlation_id: str,
) -> list[StreamLanding]:
    if check.family is None or check.reason is not None:
        reason = check.reason or "no landing probe for this target"
        return [_unchecked(stream, n, reason) for stream, n in relayed.items()]
    exact = {s for s in relayed if "*" in exact_streams or s in exact_streams}
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
                StreamLanding(stream, expected, basis, landed, status, "exact", dataset=dataset)
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
                    "approximate",
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
                "the relayed figure is an upper bound; turn the record column on for exact counts"
            )
        out.append(
            StreamLanding(
                stream,
                expected,
                basis,
                new_rows,
                status,
                "approximate",
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


def _count_file(check: Check, stream: str, exact: bool, cid: str, n_streams: int) -> Count:
    conf = check.config
    if check.family == "jsonl":
        # target-jsonl 0.1.4: {destination_path}/{custom_name or stream}[-%Y%m%dT%H%M%S].jsonl
        folder = _path(check, str(conf.get("destination_path") or "."))
        name = str(conf.get("custom_name") or stream)
        if conf.get("custom_name") and n_streams > 1:
            return None, None, None, "every stream goes to one custom_name file: not separable"
        files = [
            p
            for p in folder.glob(f"{glob_escape(name)}*.jsonl")
            if re.fullmatch(re.escape(name) + r"(-\d{8}T\d{6})?\.jsonl", p.name)
        ]
        dataset = {"namespace": f"file://{folder.resolve()}", "name": f"{name}.jsonl"}
        if exact:
            recent = [p for p in files if p.stat().st_mtime >= check.started_at - 2]
            return sum(_jsonl_matches(p, cid) for p in recent), dataset, None, None
        landed = sum(_lines(p) for p in files)
        if check.before is None:
            return landed, dataset, None, None
        before = sum(check.before.get(str(p), 0) for p in files)
        return landed, dataset, (before, before > 0), None
    # meltanolabs-target-csv 0.5.0: {output_path}/{file_naming_scheme}, replaced each run
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
    dataset = {"namespace": f"file://{folder.resolve()}", "name": pattern}
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
    opts = "-c default_transaction_read_only=on -c statement_timeout=60000 -c lock_timeout=5000"
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
if req["op"] == "snapshot":
    counts = {}
    for schema in req["schemas"]:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = "
                    + ph + " AND table_type = 'BASE TABLE'", (schema,))
        for (table,) in cur.fetchall()[:__MAX__]:
            sql = "SELECT count(*) FROM " + q(schema) + "." + q(table)
            counts[schema + "." + table] = one(sql)[0]
    print(json.dumps({"counts": counts}))
else:
    counts, errors = [], []
    for schema, table, cid in req["tables"]:
        exists = one("SELECT count(*) FROM information_schema.tables WHERE table_schema = " + ph
                     + " AND table_name = " + ph, (schema, table))[0]
        if not exists:
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


def _run_db_probe(check: Check, request: Mapping[str, Any]) -> dict[str, Any]:
    """Run the probe script with the target's interpreter (or ours); its JSON reply."""
    python = check.python or sys.executable
    payload = json.dumps({**request, "family": check.family, "config": dict(check.config)})
    try:
        done = subprocess.run(
            [python, "-c", _PROBE],
            input=payload,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            cwd=check.cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the {check.family} count took over {PROBE_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise RuntimeError(check.scrub(tail))
    reply: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return reply
