"""The landing check by key (issue 10): which of the keys the relay forwarded are in the table.

The keys are written to a file as wire rows (numbers as decimal text, strings as `x` + hex of
their UTF-8 bytes) and streamed to the probe, which anti-joins them against the table read-only,
each cast to the type the destination gave its column (DuckDB: `read_csv` in a read-only
connection; PostgreSQL: a temporary table filled with COPY, then a read-only transaction). SQLite
is probed in our process (the database attached read-only), JSONL and CSV files by reading their
key columns. A key that cannot be compared with its column makes the stream `not checked`.
"""

from __future__ import annotations

import csv
import re
import sqlite3
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from flext_meltano_context.keys import KeySet, Uncomparable, canonical, decode
from flext_meltano_context.landing import (
    BY_KEY,
    MAX_SAMPLE_CHARS,
    PROBE_TIMEOUT,
    Check,
    StreamLanding,
    _csv_files,
    _destination,
    _jsonl_files,
    _run_db_probe,
    _sqlite_path,
)
from flext_meltano_context.lineage.redact import redact

# How a column's type compares with key values: the class of the type the destination gave it.
_INTEGER_TYPES = frozenset(
    {"bigint", "integer", "int", "int2", "int4", "int8", "smallint", "tinyint", "hugeint"}
    | {"ubigint", "uinteger", "usmallint", "utinyint", "uhugeint", "long", "short"}
)
_FLOAT_TYPES = frozenset({"double", "double precision", "real", "float", "float4", "float8"})
_TEXT_TYPES = ("varchar", "text", "character varying", "character", "char", "bpchar", "string")
_SAFE_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9 _]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?")


def column_class(data_type: str) -> str:
    """`integer`, `numeric`, `float`, `text`, `boolean`, `json` or `other`, from a SQL type name."""
    name = data_type.strip().lower()
    base = name.split("(", 1)[0].strip()
    if base in _INTEGER_TYPES:
        return "integer"
    if base in {"decimal", "numeric"}:
        return "numeric"
    if base in _FLOAT_TYPES:
        return "float"
    if base in _TEXT_TYPES:
        return "text"
    if base in {"boolean", "bool"}:
        return "boolean"
    if base in {"json", "jsonb"}:
        return "json"
    return "other"


def wire_value(value: Any, klass: str) -> str | Uncomparable:
    """One key value as the probe receives it for a column of class `klass`.

    Numbers and booleans travel as their decimal text (cast in SQL to the column's type),
    strings as `x` + the hex of their UTF-8 bytes (never empty, never quoted, decoded in SQL).
    What cannot be compared with the column is an Uncomparable saying why.
    """
    if isinstance(value, Uncomparable):
        return Uncomparable(f"a key value that is no scalar ({value[:40]})")
    if value is None:
        return Uncomparable("a null key property")
    if isinstance(value, bool):
        if klass == "boolean":
            return "true" if value else "false"
        return Uncomparable(f"a boolean key on a {klass} column")
    if isinstance(value, int):
        if klass in {"integer", "numeric", "float"}:
            return str(value)
        if klass == "text":
            return "x" + str(value).encode().hex()
        return Uncomparable(f"an integer key on a {klass} column")
    if isinstance(value, float):
        if klass == "float":
            return f"{value:.17g}"
        return Uncomparable(f"a non-integral number key on a {klass} column")
    if klass in {"text", "other"}:
        return "x" + str(value).encode("utf-8", "surrogatepass").hex()
    return Uncomparable(f"a string key on a {klass} column")


def _unwire(text: str) -> Any:
    """A wire value back as the value it stands for (for sample keys)."""
    if text.startswith("x"):
        return bytes.fromhex(text[1:]).decode("utf-8", "backslashreplace")
    if text in {"true", "false"}:
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _sample(columns: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    """One missing key for the report, redacted as the lineage log redacts it."""
    shown = {}
    for name, value in zip(columns, values, strict=True):
        if isinstance(value, str) and len(value) > MAX_SAMPLE_CHARS:
            value = value[:MAX_SAMPLE_CHARS] + "…"
        shown[name] = value
    out: dict[str, Any] = redact(shown)
    return out


@dataclass(frozen=True, slots=True)
class _KeyJob:
    """One keyed stream's probe: where its table is and the file of its keys, as wire rows."""

    stream: str
    schema: str
    table: str
    dataset: Mapping[str, str]
    columns: tuple[str, ...]  # the key properties, as the SCHEMA names them
    names: tuple[str, ...]  # the table's columns for them
    types: tuple[str, ...]
    path: Path
    keys: int


def by_key(
    check: Check, streams: Mapping[str, tuple[str, ...]], keys: KeySet
) -> dict[str, StreamLanding]:
    """Each keyed stream's result by key: `ok`, `missing N` with samples, or `not checked`."""
    out: dict[str, StreamLanding] = {}
    for stream, columns in streams.items():
        if not keys.count(stream):
            out[stream] = _key_unchecked(stream, 0, columns, "no key values were collected")
    todo = {s: c for s, c in streams.items() if s not in out}
    if not todo:
        return out
    if check.family in {"jsonl", "csv"}:
        for stream, columns in todo.items():
            out[stream] = _file_by_key(check, stream, columns, keys)
        return out
    with tempfile.TemporaryDirectory(prefix="flext-probe-", dir=check.workdir) as folder:
        out.update(_tables_by_key(check, todo, keys, Path(folder)))
    return out


def _all_missing(
    check: Check,
    keys: KeySet,
    stream: str,
    columns: Sequence[str],
    dataset: Mapping[str, str],
) -> StreamLanding:
    """Nothing landed (no database or no table): every relayed key is missing, with samples."""
    total, first = _first_keys(keys, stream, check.sample_keys)
    samples = [_sample(columns, decode(key)) for key in first]
    return _key_result(stream, total, total, "missing", columns, dataset=dataset, samples=samples)


def _key_unchecked(
    stream: str,
    relayed: int,
    columns: Sequence[str],
    reason: str,
    dataset: Mapping[str, str] | None = None,
) -> StreamLanding:
    """A stream whose keys could not be compared with the destination: `not checked`, why."""
    return _key_result(
        stream, relayed, None, "not checked", columns, reason=reason, dataset=dataset
    )


def _key_result(
    stream: str,
    relayed: int,
    missing: int | None,
    status: str,
    columns: Sequence[str],
    *,
    reason: str | None = None,
    dataset: Mapping[str, str] | None = None,
    samples: Sequence[Mapping[str, Any]] = (),
) -> StreamLanding:
    landed = None if missing is None else relayed - missing
    return StreamLanding(
        stream,
        relayed,
        "distinct_keys",
        landed,
        status,
        BY_KEY,
        reason=reason,
        dataset=dataset,
        samples=tuple(samples),
        key_columns=tuple(columns),
    )


def _tables_by_key(
    check: Check, streams: Mapping[str, tuple[str, ...]], keys: KeySet, folder: Path
) -> dict[str, StreamLanding]:
    """DuckDB and PostgreSQL: the key columns' types, then one probe anti-joining every stream."""
    where = {s: _destination(check, s) for s in streams}
    if check.family == "sqlite":
        return {
            s: _sqlite_by_key(check, s, where[s][1], where[s][2], cols, keys)
            for s, cols in streams.items()
        }
    asked = [[where[s][0], where[s][1], list(cols)] for s, cols in streams.items()]
    reply = _run_db_probe(check, {"op": "columns", "tables": asked})
    out: dict[str, StreamLanding] = {}
    jobs: list[_KeyJob] = []
    for index, ((stream, columns), types, error) in enumerate(
        zip(streams.items(), reply["columns"], reply["errors"], strict=True)
    ):
        path = folder / f"{index}.keys"  # not the stream's name: it may hold any character
        job = _job(check, stream, columns, where[stream], types, error, keys, path)
        if isinstance(job, StreamLanding):
            out[stream] = job
        else:
            jobs.append(job)
    if jobs:
        out.update(_run_jobs(check, jobs))
    return out


def _job(
    check: Check,
    stream: str,
    columns: tuple[str, ...],
    where: tuple[str, str, Mapping[str, str]],
    types: Mapping[str, Any] | None,
    error: str | None,
    keys: KeySet,
    path: Path,
) -> _KeyJob | StreamLanding:
    """The stream's probe with its keys written to `path`, or its result when none is needed."""
    schema, table, dataset = where
    if error == "no such table":  # nothing landed: the target never created it
        return _all_missing(check, keys, stream, columns, dataset)
    reason: str | None = None
    if error is not None or types is None:
        reason = check.scrub(f"cannot read the key columns: {error}")
    else:
        named = resolve_columns(columns, types)
        if isinstance(named, Uncomparable):
            reason = f"{named} of table {schema}.{table}"
        else:
            typed = tuple(str(types[c]) for c in named)
            written = _write_wire(keys, stream, columns, typed, path)
            if not isinstance(written, Uncomparable):
                return _KeyJob(stream, schema, table, dataset, columns, named, typed, path, written)
            reason = str(written)
    return _key_unchecked(stream, keys.count(stream), columns, reason, dataset=dataset)


def _run_jobs(check: Check, jobs: Sequence[_KeyJob]) -> dict[str, StreamLanding]:
    """One probe process anti-joining each stream's keys against its table."""
    request = {
        "op": "missing",
        "samples": check.sample_keys,
        "tables": [[j.schema, j.table, list(j.names), _typed(j.types), str(j.path)] for j in jobs],
    }
    # The anti-join reads every key: allow it time in proportion to their number.
    timeout = max(PROBE_TIMEOUT, sum(j.keys for j in jobs) / 20_000)
    reply = _run_db_probe(check, request, timeout=timeout)
    out: dict[str, StreamLanding] = {}
    for job, missing, samples, error in zip(
        jobs, reply["missing"], reply["samples"], reply["errors"], strict=True
    ):
        if error is not None:
            out[job.stream] = _key_unchecked(
                job.stream,
                job.keys,
                job.columns,
                check.scrub(f"the probe by key failed: {error}"),
                dataset=job.dataset,
            )
            continue
        shown = [_sample(job.columns, [_unwire(v) for v in row]) for row in samples]
        out[job.stream] = _key_result(
            job.stream,
            job.keys,
            int(missing),
            "missing" if missing else "ok",
            job.columns,
            dataset=job.dataset,
            samples=shown[: check.sample_keys],
        )
    return out


def resolve_columns(
    properties: Sequence[str], types: Mapping[str, Any]
) -> tuple[str, ...] | Uncomparable:
    """The table's column for each key property: the same name, else the one name equal to it
    ignoring case and punctuation (targets lower-case and snake-case names: `userId`, `userid`).
    """
    out = []
    for name in properties:
        if name in types:
            out.append(name)
            continue
        folded = [c for c in types if c.casefold() == name.casefold()]
        if len(folded) != 1:
            bare = re.sub(r"[^0-9a-z]", "", name.casefold())
            folded = [c for c in types if re.sub(r"[^0-9a-z]", "", c.casefold()) == bare]
        if len(folded) != 1:
            return Uncomparable(f"no column for key property {name!r}")
        out.append(folded[0])
    return tuple(out)


def _typed(types: Sequence[str]) -> list[list[Any]]:
    """Each key column's SQL type, and whether its wire values are hex text (text and others)."""
    return [[t.strip(), column_class(t) in {"text", "other"}] for t in types]


def _first_keys(keys: KeySet, stream: str, n: int) -> tuple[int, list[bytes]]:
    first: list[bytes] = []
    total = 0
    for key in keys.iter(stream):
        if total < n:
            first.append(key)
        total += 1
    return total, first


def _plan(columns: Sequence[str], types: Sequence[str]) -> list[str] | Uncomparable:
    """Each key column's class, or why the stream's keys cannot be compared."""
    classes = []
    for name, data_type in zip(columns, types, strict=True):
        klass = column_class(data_type)
        if klass == "json" or not _SAFE_TYPE.fullmatch(data_type.strip()):
            return Uncomparable(f"key column {name!r} has type {data_type[:60]}: not compared")
        classes.append(klass)
    return classes


def _write_wire(
    keys: KeySet, stream: str, columns: Sequence[str], types: Sequence[str], path: Path
) -> int | Uncomparable:
    """Write the stream's keys as tab-separated wire rows; how many, or why not comparable."""
    classes = _plan(columns, types)
    if isinstance(classes, Uncomparable):
        return classes
    written = 0
    single = classes[0] if len(classes) == 1 else None
    with path.open("wb", buffering=1 << 20) as out:
        for key in keys.iter(stream):
            # One integer key on a number column, the commonest: its payload is its wire row.
            if single in _NUMBER_CLASSES and key[0] == _INTEGER_TAG:
                out.write(key[5:] + b"\n")
                written += 1
                continue
            row = _fast_wire(key, classes)
            if row is None:  # a rarer kind of key: decode it and say why it does not compare
                slow = _slow_wire(key, columns, classes)
                if isinstance(slow, Uncomparable):
                    return slow
                row = slow
            out.write(row)
            written += 1
    return written


def _fast_wire(key: bytes, classes: Sequence[str]) -> bytes | None:
    """The wire row of a key of integers and strings, read straight off its canonical bytes.

    The canonical form is the contract (keys.py): tag, 4-byte little-endian length, payload. An
    integer's payload is its decimal text, a string's its UTF-8 bytes: exactly what the wire
    carries for number and text columns. Anything else: None, and the slow path decides.
    """
    parts = []
    at = 0
    for klass in classes:
        tag = key[at : at + 1]
        size = int.from_bytes(key[at + 1 : at + 5], "little")
        payload = key[at + 5 : at + 5 + size]
        at += 5 + size
        if tag == b"I" and klass in _NUMBER_CLASSES:
            parts.append(payload)
        elif tag == b"S" and klass in _TEXT_CLASSES:
            parts.append(b"x" + payload.hex().encode("ascii"))
        else:
            return None
    if at != len(key):
        return None
    return b"\t".join(parts) + b"\n"


_NUMBER_CLASSES = frozenset({"integer", "numeric", "float"})
_INTEGER_TAG = ord("I")
_TEXT_CLASSES = frozenset({"text", "other"})


def _slow_wire(key: bytes, columns: Sequence[str], classes: Sequence[str]) -> bytes | Uncomparable:
    row = []
    for name, value, klass in zip(columns, decode(key), classes, strict=True):
        wire = wire_value(value, klass)
        if isinstance(wire, Uncomparable):
            return Uncomparable(f"key column {name!r}: {wire}, so keys are not compared")
        row.append(wire)
    return ("\t".join(row) + "\n").encode("ascii")


def _sqlite_by_key(
    check: Check,
    stream: str,
    table: str,
    dataset: Mapping[str, str],
    columns: tuple[str, ...],
    keys: KeySet,
) -> StreamLanding:
    """SQLite in our process: a memory database, the destination attached read-only."""
    db = _sqlite_path(check)
    total = keys.count(stream)
    if not db.exists():
        return _all_missing(check, keys, stream, columns, dataset)
    conn = sqlite3.connect("file::memory:", uri=True, timeout=5)
    try:
        conn.execute("ATTACH DATABASE ? AS dst", (f"{db.resolve().as_uri()}?mode=ro",))
        info = {
            row[1]: str(row[2] or "") for row in conn.execute(f"PRAGMA dst.table_info({_q(table)})")
        }
        if not info:
            return _all_missing(check, keys, stream, columns, dataset)
        named = resolve_columns(columns, info)
        if isinstance(named, Uncomparable):
            return _key_unchecked(
                stream, total, columns, f"{named} in table {table!r}", dataset=dataset
            )
        classes = [_sqlite_class(info[c]) for c in named]
        insert = f"INSERT INTO temp.flext_keys VALUES ({', '.join('?' for _ in columns)})"  # noqa: S608
        conn.execute(
            f"CREATE TEMP TABLE flext_keys ({', '.join(f'c{i}' for i in range(len(columns)))})"
        )
        batch: list[tuple[Any, ...]] = []
        for key in keys.iter(stream):
            row = []
            for name, value, klass in zip(columns, decode(key), classes, strict=True):
                wire = wire_value(value, klass)
                if isinstance(wire, Uncomparable):
                    return _key_unchecked(
                        stream,
                        total,
                        columns,
                        f"key column {name!r}: {wire}, so keys are not compared",
                        dataset=dataset,
                    )
                row.append(_unwire(wire))
            batch.append(tuple(row))
            if len(batch) >= 10_000:
                conn.executemany(insert, batch)
                batch.clear()
        conn.executemany(insert, batch)
        match = " AND ".join(f"t.{_q(c)} = k.c{i}" for i, c in enumerate(named))
        absent_sql = (
            f"FROM temp.flext_keys k WHERE NOT EXISTS "  # noqa: S608 - quoted identifiers
            f"(SELECT 1 FROM dst.{_q(table)} t WHERE {match})"
        )
        missing = int(conn.execute(f"SELECT count(*) {absent_sql}").fetchone()[0])
        rows = conn.execute(f"SELECT * {absent_sql} LIMIT ?", (check.sample_keys,)).fetchall()
    except sqlite3.Error as exc:
        return _key_unchecked(
            stream, total, columns, check.scrub(f"the probe by key failed: {exc}"), dataset=dataset
        )
    finally:
        conn.close()
    samples = [_sample(columns, row) for row in rows]
    return _key_result(
        stream,
        total,
        missing,
        "missing" if missing else "ok",
        columns,
        dataset=dataset,
        samples=samples,
    )


def _sqlite_class(declared: str) -> str:
    """SQLite's column affinity (its rules, in order) as a column class."""
    upper = declared.upper()
    if "INT" in upper:
        return "integer"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "float"
    if not upper or "BLOB" in upper:
        return "other"
    return "numeric"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _file_by_key(
    check: Check, stream: str, columns: tuple[str, ...], keys: KeySet
) -> StreamLanding:
    """JSONL and CSV files: the key columns of the rows in the stream's files, against the keys."""
    total = keys.count(stream)
    present: set[Any] | Uncomparable
    compare: Callable[[bytes], Any]
    if check.family == "jsonl":
        files, dataset = _jsonl_files(check, stream)
        present = _jsonl_keys(files, columns)
        compare = bytes  # both sides are canonical keys
    else:
        files, dataset = _csv_files(check, stream)
        present = _csv_keys(files[-1:], columns)
        compare = _csv_key
    if isinstance(present, Uncomparable):
        return _key_unchecked(stream, total, columns, str(present), dataset=dataset)
    if compare is bytes:  # canonical keys on both sides: one C-level pass
        absent = [key for key in keys.iter(stream) if key not in present]
        samples = [_sample(columns, decode(key)) for key in absent[: check.sample_keys]]
        status = "missing" if absent else "ok"
        return _key_result(
            stream, total, len(absent), status, columns, dataset=dataset, samples=samples
        )
    missing = 0
    samples = []
    for key in keys.iter(stream):
        form = compare(key)
        if isinstance(form, Uncomparable):
            return _key_unchecked(
                stream, total, columns, f"{form}, so keys are not compared", dataset=dataset
            )
        if form not in present:
            missing += 1
            if len(samples) < check.sample_keys:
                samples.append(_sample(columns, decode(key)))
    status = "missing" if missing else "ok"
    return _key_result(stream, total, missing, status, columns, dataset=dataset, samples=samples)


def _jsonl_keys(files: Sequence[Path], columns: Sequence[str]) -> set[bytes]:
    fields = [(f"k{i}", msgspec.Raw, msgspec.Raw(b"")) for i in range(len(columns))]
    row_type = msgspec.defstruct(
        "KeyRow", fields, rename=dict(zip([f[0] for f in fields], columns, strict=True))
    )
    decoder = msgspec.json.Decoder(row_type)
    names = [f[0] for f in fields]
    present: set[bytes] = set()
    for path in files:
        with path.open("rb") as handle:
            for line in handle:
                try:
                    row = decoder.decode(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # not a row of ours (a blank line); it holds no key
                raws = [bytes(r) if len(r) else None for r in (getattr(row, n) for n in names)]
                present.add(canonical(raws))
    return present


def _csv_key(key: bytes) -> tuple[str, ...] | Uncomparable:
    """A canonical key as the text a CSV file holds for it."""
    out = []
    for value in decode(key):
        wire = wire_value(value, "text")
        if isinstance(wire, Uncomparable):
            return Uncomparable(f"{wire} (CSV files hold text)")
        out.append(_csv_number(str(_unwire(wire))))
    return tuple(out)


def _csv_keys(files: Sequence[Path], columns: Sequence[str]) -> set[Any] | Uncomparable:
    present: set[Any] = set()
    for path in files:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            absent = [c for c in columns if c not in (reader.fieldnames or [])]
            if absent:
                return Uncomparable(f"key column {absent[0]!r} is not in {path.name}")
            for row in reader:
                present.add(tuple(_csv_number(row[c]) for c in columns))
    return present


def _csv_number(text: str) -> str:
    """An integral number written as `1.0` reads as `1`, as the canonical key form has it."""
    if re.fullmatch(r"-?\d+\.0+", text):
        return text.split(".", 1)[0]
    return text
