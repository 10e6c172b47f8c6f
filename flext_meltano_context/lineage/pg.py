"""The lineage log in a PostgreSQL table: the same records and hash chain as the JSONL file.

Each event is a row with the record's fields as columns (`data` as `json`, kept as its canonical
text) and one chain per table: `seq` is the row's place in the chain, `prev` the previous row's
`hash`, and `hash` the sha256 of the record's canonical JSON, exactly as in a file. A writer takes
`pg_advisory_xact_lock` inside its transaction, reads the last row, inserts the next one and
commits: many machines append to one chain without forking it. A run's events are also numbered
`(run_id, run_seq)`, unique in the table, so an event pushed twice is stored once.

What a file fsyncs is committed with `synchronous_commit` on; the other events are committed
at once too, without waiting for the WAL flush (the next synchronous commit flushes them).
`verify` recomputes every row's hash from its columns, so a plain SQL `UPDATE` or `DELETE` (or
a changed `seq`/`run_seq`) is named, whatever rights its author had.
"""

from __future__ import annotations

import contextlib
import hashlib
import urllib.parse
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any

import msgspec

from flext_meltano_context.errors import FlextContextError, UsageError
from flext_meltano_context.lineage.log import (
    FORMAT_VERSION,
    ZERO_HASH,
    VerifyResult,
    canonical,
    iso,
    with_hash,
)

if TYPE_CHECKING:
    import psycopg

DEFAULT_SCHEMA = "flext_context"
DEFAULT_TABLE = "lineage_events"
_OWN_OPTIONS = ("schema", "table")
_SCHEMES = ("postgresql://", "postgres://")
_COLUMNS = "seq, v, ts, event, run_id, run_seq, correlation_id, data, prev, hash"
_NETWORK_DEFAULTS = (
    ("connect_timeout", "5"),
    ("tcp_user_timeout", "30000"),
    ("keepalives_idle", "15"),
    ("keepalives_interval", "5"),
    ("keepalives_count", "3"),
)


class StoreUnavailableError(FlextContextError):
    """The PostgreSQL store did not answer or refused the write; the local log keeps the events."""


def is_postgres_url(text: str) -> bool:
    """Whether `text` names a PostgreSQL store rather than a file."""
    return text.startswith(_SCHEMES)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a store is: libpq's URL without our options, the schema and the table."""

    conninfo: str  # may hold a password: give it to libpq, never print it
    schema: str
    table: str
    name: str  # for people and logs: no password
    key: str  # the store's identity, the same for every user and password


def parse_url(url: str) -> Location:
    """A store location from `postgresql://user@host:port/db?schema=S&table=T`."""
    if not is_postgres_url(url):
        raise UsageError(f"not a PostgreSQL URL: it must start with {' or '.join(_SCHEMES)}")
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    own = {key: value for key, value in query if key in _OWN_OPTIONS}
    rest = [(key, value) for key, value in query if key not in _OWN_OPTIONS]
    # A store that is down or cut off must cost the run seconds, not minutes: libpq defaults
    # the user did not set (connect, unacknowledged data, dead-peer detection).
    given = {key for key, _ in rest}
    for key, value in _NETWORK_DEFAULTS:
        if key not in given:
            rest.append((key, value))
    schema = own.get("schema") or DEFAULT_SCHEMA
    table = own.get("table") or DEFAULT_TABLE
    conninfo = urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urllib.parse.urlencode(rest), "")
    )
    host = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].partition(":")[0] if "@" in parts.netloc else ""
    shown = f"{parts.scheme}://{user + '@' if user else ''}{host}{parts.path}"
    where = f"{host}{parts.path} ({schema}.{table})"
    return Location(conninfo, schema, table, f"{shown} ({schema}.{table})", where)


def _password(url: str) -> str | None:
    netloc = urllib.parse.urlsplit(url).netloc
    userinfo = netloc.rpartition("@")[0]
    return urllib.parse.unquote(userinfo.partition(":")[2]) if ":" in userinfo else None


def _lock_key(location: Location) -> int:
    digest = hashlib.sha256(f"flext-context:{location.schema}.{location.table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _Row(msgspec.Struct, array_like=True):
    seq: int
    v: int
    ts: str
    event: str
    run_id: str
    run_seq: int | None
    correlation_id: str
    data: str
    prev: str
    hash: str


def _body(row: _Row, *, seq: int | None = None, run_seq: int | None = None) -> bytes:
    """The canonical JSON of a row's record, assembled from its columns (keys in sorted order)."""
    # encode_basestring is what json.dumps(..., ensure_ascii=False) uses for a string.
    text = encode_basestring
    run_seq = row.run_seq if run_seq is None else run_seq
    return (
        f'{{"correlation_id":{text(row.correlation_id)},"data":{row.data},'
        f'"event":{text(row.event)},"prev":{text(row.prev)},"run_id":{text(row.run_id)},'
        + ("" if run_seq is None else f'"run_seq":{run_seq},')
        + f'"seq":{row.seq if seq is None else seq},"ts":{text(row.ts)},"v":{row.v}}}'
    ).encode("utf-8")


def _pieces(row: _Row) -> tuple[str, str, str]:
    """A row's canonical JSON around its `prev` and `seq`: body = a + prev + b + seq + c."""
    body = _body(row).decode("utf-8")
    at_prev = body.index(',"prev":"') + len(',"prev":"')
    at_seq = body.index(',"seq":', at_prev + 64) + len(',"seq":')
    after_seq = body.index(",", at_seq)
    return body[:at_prev], body[at_prev + 64 : at_seq], body[after_seq:]


# One event in one statement after the lock: the server reads the tail, chains the row and hashes
# the same canonical JSON the client would (the body's text around prev and seq comes from here).
_INSERT_ONE = """
INSERT INTO {table} (seq, v, ts, event, run_id, run_seq, correlation_id, data, prev, hash)
SELECT n.seq, %(v)s, %(ts)s, %(event)s, %(run_id)s, %(run_seq)s, %(correlation_id)s,
       %(data)s::json, n.prev,
       encode(sha256(convert_to(%(a)s || n.prev || %(b)s || n.seq::text || %(c)s, 'UTF8')), 'hex')
FROM (SELECT coalesce((SELECT seq FROM {table} ORDER BY seq DESC LIMIT 1), 0) + 1 AS seq,
             coalesce((SELECT hash FROM {table} ORDER BY seq DESC LIMIT 1), %(zero)s) AS prev) n
ON CONFLICT (run_id, run_seq) DO NOTHING
RETURNING seq, prev, hash
"""


class PgStore:
    """One lineage chain in one PostgreSQL table; connects on first use."""

    def __init__(self, url: str) -> None:
        self.location = parse_url(url)
        self._secret = _password(url)
        self._conn: psycopg.Connection[Any] | None = None
        self._ready = False
        self._answers: dict[tuple[tuple[str, ...] | None, str | None], list[bytes]] = {}

    def __str__(self) -> str:
        return self.location.name

    # --- connection -------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            import psycopg
        except ImportError as exc:
            raise UsageError(
                "a PostgreSQL lineage store needs psycopg: pip install "
                "'flext-meltano-context[postgres]'"
            ) from exc
        try:
            self._conn = psycopg.connect(self.location.conninfo, application_name="flext-context")
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to the lineage store {self}: {self._scrub(str(exc)).strip()}"
            ) from exc
        if not self._ready:
            self._ensure_table(self._conn)
            self._ready = True
        return self._conn

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, if one is open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Guard a write: on failure drop the connection (the next write reconnects), a driver
        error raised as StoreUnavailableError with the password scrubbed."""
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            self.close()
            raise StoreUnavailableError(
                f"cannot write to the lineage store {self}: {self._scrub(str(exc)).strip()}"
            ) from exc
        except BaseException:
            self.close()
            raise

    def _table(self) -> Any:
        from psycopg import sql

        return sql.Identifier(self.location.schema, self.location.table)

    def _ensure_table(self, conn: psycopg.Connection[Any]) -> None:
        """Create the schema and table when missing; a writer role with no CREATE right is fine."""
        import psycopg
        from psycopg import sql

        name = f"{self.location.schema}.{self.location.table}"
        table, schema = self._table(), sql.Identifier(self.location.schema)
        try:
            with conn.transaction():
                found = conn.execute(
                    "SELECT to_regclass(%s)",
                    [sql.Identifier(self.location.schema, self.location.table).as_string(conn)],
                ).fetchone()
                if found is not None and found[0] is not None:
                    return
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(self.location)])
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        "seq bigint PRIMARY KEY, v integer NOT NULL, ts text NOT NULL, "
                        "event text NOT NULL, run_id text NOT NULL, run_seq integer NOT NULL, "
                        "correlation_id text NOT NULL, data json NOT NULL, "
                        "prev text NOT NULL, hash text NOT NULL, UNIQUE (run_id, run_seq))"
                    ).format(table)
                )
                conn.execute(
                    sql.SQL(
                        "CREATE INDEX IF NOT EXISTS {} ON {} (event, seq) "
                        "WHERE event IN ('run_started', 'run_completed')"
                    ).format(sql.Identifier(f"{self.location.table}_runs"), table)
                )
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot create the lineage table {name} in {self}: "
                f"{self._scrub(str(exc)).strip()}; create it as an owner (README: 'Lineage in "
                "PostgreSQL') and grant the writer INSERT and SELECT"
            ) from exc

    # --- writing ----------------------------------------------------------------------------

    def append(
        self,
        event: str,
        *,
        run_id: str,
        correlation_id: str,
        data: Mapping[str, Any],
        fsync: bool = False,
        run_seq: int | None = None,
    ) -> dict[str, Any]:
        """Append one event now (as `LineageLog.append`) and return the record as stored."""
        if run_seq is None:
            raise UsageError("a store event needs its run_seq (the recorder numbers them)")
        record = {
            "v": FORMAT_VERSION,
            "ts": iso(),
            "event": event,
            "run_id": run_id,
            "run_seq": run_seq,
            "correlation_id": correlation_id,
            "data": data,
        }
        stored = self.insert([record], fsync=fsync)
        return stored[0] if stored else record

    def insert(
        self, records: Sequence[Mapping[str, Any]], *, fsync: bool = False
    ) -> list[dict[str, Any]]:
        """Chain `records` (each with `run_id` and `run_seq`) onto the table, in order.

        Records whose `(run_id, run_seq)` the table has already are skipped: pushing twice stores
        once. Returns the records inserted, with their new `seq`, `prev` and `hash`.
        """

        if not records:
            return []
        self._answers.clear()  # what was read before no longer is the whole answer
        if len(records) == 1:
            return self._insert_one(records[0], fsync=fsync)
        conn = self._connect()
        table = self._table()
        from psycopg import sql

        with self._writing(), conn.transaction():
            if not fsync:
                conn.execute("SET LOCAL synchronous_commit = off")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(self.location)])
            have = {
                (run_id, run_seq)
                for run_id, run_seq in conn.execute(
                    sql.SQL(
                        "SELECT run_id, run_seq FROM {} WHERE (run_id, run_seq) IN "
                        "(SELECT * FROM unnest(%s::text[], %s::int[]))"
                    ).format(table),
                    [[r["run_id"] for r in records], [int(r["run_seq"]) for r in records]],
                )
            }
            last = conn.execute(
                sql.SQL("SELECT seq, hash FROM {} ORDER BY seq DESC LIMIT 1").format(table)
            ).fetchone()
            seq, prev = (int(last[0]), str(last[1])) if last else (0, ZERO_HASH)
            rows, stored = [], []
            for record in records:
                if (record["run_id"], int(record["run_seq"])) in have:
                    continue
                have.add((record["run_id"], int(record["run_seq"])))
                seq += 1
                full = {
                    key: record[key]
                    for key in ("v", "ts", "event", "run_id", "run_seq", "correlation_id")
                }
                full.update(seq=seq, prev=prev, data=record["data"])
                data_text = canonical(record["data"]).decode("utf-8")
                row = _Row(
                    seq,
                    int(full["v"]),
                    str(full["ts"]),
                    str(full["event"]),
                    str(full["run_id"]),
                    int(full["run_seq"]),
                    str(full["correlation_id"]),
                    data_text,
                    prev,
                    "",
                )
                prev = hashlib.sha256(_body(row)).hexdigest()
                full["hash"] = prev
                rows.append((*msgspec.structs.astuple(row)[:-1], prev))
                stored.append(full)
            if rows:
                with conn.cursor().copy(
                    sql.SQL("COPY {} ({}) FROM STDIN").format(table, sql.SQL(_COLUMNS))
                ) as copy:
                    for values in rows:
                        copy.write_row(values)
        return stored

    def _insert_one(self, record: Mapping[str, Any], *, fsync: bool) -> list[dict[str, Any]]:
        """One event in one round trip (a pipeline: lock, insert-select, commit)."""
        from psycopg import sql

        row = _Row(
            0,
            int(record["v"]),
            str(record["ts"]),
            str(record["event"]),
            str(record["run_id"]),
            int(record["run_seq"]),
            str(record["correlation_id"]),
            canonical(record["data"]).decode("utf-8"),
            ZERO_HASH,
            "",
        )
        a, b, c = _pieces(row)
        params = {
            **{k: getattr(row, k) for k in ("v", "ts", "event", "run_id", "run_seq", "data")},
            "correlation_id": row.correlation_id,
            "a": a,
            "b": b,
            "c": c,
            "zero": ZERO_HASH,
        }
        conn = self._connect()
        with self._writing():
            with conn.pipeline(), conn.transaction():
                if not fsync:
                    conn.execute("SET LOCAL synchronous_commit = off")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(self.location)])
                cursor = conn.execute(
                    sql.SQL(_INSERT_ONE).format(table=self._table()), params, prepare=True
                )
            found = cursor.fetchone()
        if found is None:
            return []  # the store had it already
        seq, prev, digest = int(found[0]), str(found[1]), str(found[2])
        return [{**record, "seq": seq, "prev": prev, "hash": digest}]

    # --- reading ----------------------------------------------------------------------------

    def _rows(self, where: str = "", params: Sequence[Any] = ()) -> Generator[_Row, None, None]:
        import psycopg
        from psycopg import sql

        conn = self._connect()
        query = sql.SQL(
            "SELECT seq, v, ts, event, run_id, run_seq, correlation_id, data::text, prev, hash "
            "FROM {} " + where + " ORDER BY seq"
        ).format(self._table())
        try:
            with conn.transaction(), conn.cursor(name="flext_context_read") as cursor:
                cursor.itersize = 5000
                cursor.execute(query, list(params))
                for values in cursor:
                    yield _Row(*values)
        except psycopg.Error as exc:
            self.close()
            raise StoreUnavailableError(
                f"cannot read the lineage store {self}: {self._scrub(str(exc)).strip()}"
            ) from exc

    def lines(
        self, *, events: Sequence[str] | None = None, run_id: str | None = None
    ) -> Iterator[bytes]:
        """Every record as the JSONL line it would be in a file, in chain order.

        `events` and `run_id` narrow the query (by the runs index and the run id key).
        """
        # One command asks the same narrow question more than once (`check` lists the runs to
        # find the run, then again to find the one before it): answer it once per store object.
        key = (tuple(events) if events is not None else None, run_id)
        if key in self._answers:
            yield from self._answers[key]
            return
        found: list[bytes] = []
        where: list[str] = []
        params: list[Any] = []
        if events is not None:
            where.append("event = ANY(%s)")
            params.append(list(events))
        if run_id is not None:
            where.append("run_id = %s")
            params.append(run_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        for row in self._rows(clause, params):
            line = with_hash(_body(row), row.hash)
            if where:
                found.append(line)
            yield line
        if where:
            self._answers[key] = found

    def read(self) -> Iterator[dict[str, Any]]:
        """Every record in chain order."""
        for line in self.lines():
            yield msgspec.json.decode(line)

    def verify(self) -> VerifyResult:
        """Check the chain row by row; name the first edited, deleted or reordered row."""
        sha = hashlib.sha256
        expected_prev, expected_seq = ZERO_HASH, 1
        per_run: dict[str, int] = {}
        count = 0
        previous: _Row | None = None

        def bad(seq: int, kind: str, reason: str) -> VerifyResult:
            return VerifyResult(
                str(self), count, len(per_run), False, seq, kind, reason, unit="row seq"
            )

        rows = self._rows()
        mismatch: tuple[_Row, int] | None = None
        for row in rows:
            count += 1
            expected_run_seq = per_run.get(row.run_id, 0) + 1
            if sha(_body(row)).hexdigest() != row.hash:
                mismatch = (row, expected_run_seq)
                break
            if row.prev != expected_prev:
                rows.close()
                if row.seq > expected_seq:
                    return bad(
                        row.seq,
                        "deleted",
                        f"seq jumps from {expected_seq - 1} to {row.seq}: "
                        f"{row.seq - expected_seq} row(s) before it are gone",
                    )
                if previous is not None:
                    return bad(
                        previous.seq,
                        "edited",
                        f"event {previous.event!r} of run {previous.run_id}: its hash was "
                        "recomputed after a change; the next row's prev still names the old one",
                    )
                return bad(row.seq, "deleted", "the first row does not start the chain")
            if row.seq != expected_seq:
                rows.close()
                return bad(row.seq, "malformed", f"seq {row.seq} where {expected_seq} was expected")
            if row.run_seq is not None and row.run_seq != expected_run_seq:
                rows.close()
                return bad(
                    row.seq,
                    "reordered",
                    f"event {row.event!r} of run {row.run_id} has run_seq {row.run_seq} where "
                    f"{expected_run_seq} comes next",
                )
            per_run[row.run_id] = expected_run_seq
            expected_prev, expected_seq, previous = row.hash, row.seq + 1, row
        rows.close()  # ends the read transaction before any diagnosis query
        if mismatch is not None:
            row, expected_run_seq = mismatch
            kind, why = self._diagnose(row, expected_run_seq)
            return bad(row.seq, kind, f"event {row.event!r} of run {row.run_id}: {why}")
        return VerifyResult(
            str(self), count, len(per_run), True, last_hash=expected_prev, unit="row seq"
        )

    def _diagnose(self, row: _Row, expected_run_seq: int) -> tuple[str, str]:
        """Why a row's hash does not match: a changed `seq` or `run_seq` (reordered), or an edit."""
        from psycopg import sql

        sha = hashlib.sha256
        if (
            row.run_seq is not None
            and row.run_seq != expected_run_seq
            and sha(_body(row, run_seq=expected_run_seq)).hexdigest() == row.hash
        ):
            return "reordered", (
                f"it was written as run_seq {expected_run_seq}, now says {row.run_seq}"
            )
        # Which seq was it written with? Its predecessor's place (unless that moved too),
        # else a nearby one: a swap moves rows a short way.
        conn = self._connect()
        with conn.transaction():
            found = conn.execute(
                sql.SQL("SELECT seq FROM {} WHERE hash = %s").format(self._table()), [row.prev]
            ).fetchone()
        near = range(max(1, row.seq - 64), row.seq + 65)
        candidates = [int(found[0]) + 1] if found else [1] if row.prev == ZERO_HASH else []
        for seq in (*candidates, *near):
            if seq != row.seq and sha(_body(row, seq=seq)).hexdigest() == row.hash:
                return "reordered", f"it was written as seq {seq}, now says {row.seq}"
        return "edited", "its hash does not match its columns"
