"""Where lineage events are kept: a JSON Lines file or a PostgreSQL table, behind one interface.

Both implement `LineageStore` (append, lines, read, verify), so `runs`, `report`, `check` and
`verify` read either the same way. With a PostgreSQL store, each run still writes its local
JSON Lines log first: that file is the spool (see `push`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flext_meltano_context.errors import UsageError
from flext_meltano_context.lineage.log import (
    LineageLog,
    VerifyResult,
)
from flext_meltano_context.lineage.pg import PgStore, is_postgres_url

SYSTEMDB = "systemdb"


@runtime_checkable
class LineageStore(Protocol):
    """What the recorder writes to and the reports read from."""

    def append(
        self,
        event: str,
        *,
        run_id: str,
        correlation_id: str,
        data: Mapping[str, Any],
        fsync: bool = False,
        run_seq: int | None = None,
    ) -> dict[str, Any]: ...

    def lines(
        self, *, events: Sequence[str] | None = None, run_id: str | None = None
    ) -> Iterator[bytes]:
        """Every record as its JSONL line, in chain order.

        `events` and `run_id` are hints: a store may leave out other records (a file yields
        them all), so readers filter the lines themselves as well.
        """
        ...

    def read(self) -> Iterator[dict[str, Any]]: ...

    def verify(self) -> VerifyResult: ...


Source = Path | LineageStore  # what the readers (report, gate) accept


def is_store_location(text: str) -> bool:
    """Whether a `lineage_path` value names a database store rather than a file."""
    return text == SYSTEMDB or is_postgres_url(text)


def store_url(location: str, environ: Mapping[str, str] | None = None) -> str:
    """The PostgreSQL URL a store location means (`systemdb`: Meltano's system database)."""
    if location != SYSTEMDB:
        return location
    env = os.environ if environ is None else environ
    uri = env.get("MELTANO_DATABASE_URI", "")
    scheme, sep, rest = uri.partition("://")
    driverless = scheme.split("+")[0]  # SQLAlchemy's postgresql+psycopg:// is libpq's postgresql://
    if not sep or driverless not in {"postgresql", "postgres"}:
        found = f"a {driverless} URI" if sep else "not set"
        raise UsageError(
            f"lineage_path 'systemdb' needs Meltano's system database to be PostgreSQL, but "
            f"MELTANO_DATABASE_URI is {found}; set lineage_path to a postgresql:// URL or a file "
            "path, or run under 'meltano invoke' with a PostgreSQL system database"
        )
    return f"postgresql://{rest}"


def open_log(location: Source | str, environ: Mapping[str, str] | None = None) -> LineageStore:
    """The store a location names: a store as is, a PostgreSQL URL or `systemdb`, else a file."""
    if isinstance(location, LineageStore):
        return location
    text = os.fspath(location)
    if isinstance(location, str) and is_store_location(text):
        return PgStore(store_url(text, environ))
    return LineageLog(Path(text).expanduser())


def configured_store(environ: Mapping[str, str] | None = None) -> PgStore | None:
    """The database store `FLEXT_CONTEXT_LINEAGE_PATH` names, if it names one."""
    env = os.environ if environ is None else environ
    location = env.get("FLEXT_CONTEXT_LINEAGE_PATH", "")
    return PgStore(store_url(location, env)) if is_store_location(location) else None
