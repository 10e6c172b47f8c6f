"""What the pipeline records with: redact, append to the lineage log, emit OpenLineage if set up.

With a PostgreSQL store (`FLEXT_CONTEXT_LINEAGE_PATH=postgresql://...` or `systemdb`), every event
is still appended to the local log first (the spool), then written to the store. A store that
does not answer never fails the run: the recorder stops writing to it, and the run's end (or the
next run, or `flext-context lineage push`) pushes what the store lacks, in order, exactly once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context.errors import FlextContextError
from flext_meltano_context.lineage.log import LineageLog
from flext_meltano_context.lineage.redact import redact

if TYPE_CHECKING:
    from flext_meltano_context.lineage.openlineage import Emitter
    from flext_meltano_context.lineage.pg import PgStore

# Subtrees that hold names (column -> type), not values: keys there are not secrets.
_NAME_SUBTREES: Mapping[str, tuple[str, ...]] = {"stream_stats": ("schema",)}

log = structlog.get_logger("flext_meltano_context.lineage")


def hostname(environ: Mapping[str, str] | None = None) -> str:
    """This machine's name for the record: `FLEXT_CONTEXT_HOSTNAME`, else the host name."""
    env = os.environ if environ is None else environ
    return env.get("FLEXT_CONTEXT_HOSTNAME") or socket.gethostname()


class Recorder:
    """Records one run's events in the lineage log (and as OpenLineage events when configured)."""

    def __init__(
        self,
        path: Path,
        *,
        run_id: str,
        correlation_id: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        from flext_meltano_context.lineage.store import configured_store

        env = os.environ if environ is None else environ
        self.log = LineageLog(path)
        self.run_id = run_id
        self.correlation_id = correlation_id
        self.host = hostname(env)
        self.store: PgStore | None = configured_store(env)
        self._direct: bool | None = None  # None: the store was not tried yet this run
        self._seq = 0
        self._emitter: Emitter | None = _emitter_from_env()

    def record(self, event: str, data: Mapping[str, Any], *, fsync: bool = False) -> None:
        """Append `event` with `data` (secrets redacted); OpenLineage failures only warn."""
        clean = redact(data, keep=_NAME_SUBTREES.get(event, ()))
        if event == "run_started" and "host" not in clean:
            clean = {**clean, "host": self.host}  # which machine ran it, in a shared store
        self._seq += 1
        written = self.log.append(
            event,
            run_id=self.run_id,
            correlation_id=self.correlation_id,
            data=clean,
            fsync=fsync,
            run_seq=self._seq,
        )
        if self.store is not None:
            self._to_store(self.store, written, fsync)
        if self._emitter is not None:
            self._emitter.on_record(written)

    def _to_store(self, store: PgStore, written: Mapping[str, Any], fsync: bool) -> None:
        """Write one event to the store; the first one pushes any backlog (older runs) first."""
        if self._direct is None:
            self._direct = self._push(store, "run_started")
            return  # the push sent this event too
        if not self._direct:
            return
        try:
            store.insert([written], fsync=fsync)
        except FlextContextError as exc:
            self._direct = False
            log.warning(
                "lineage_store_unavailable",
                store=str(store),
                reason=str(exc),
                spool=str(self.log.path),
                then="the run goes on; its end or the next run pushes the events",
            )

    def _push(self, store: PgStore, when: str) -> bool:
        from flext_meltano_context.lineage.push import push

        try:
            result = push(self.log.path, store)  # this run's events are among those read
        except FlextContextError as exc:
            log.warning(
                "lineage_store_unavailable",
                store=str(store),
                reason=str(exc),
                spool=str(self.log.path),
                then="the events stay in the local log; 'flext-context lineage push' sends them",
                at=when,
            )
            return False
        # At the start, this run's first event is among those inserted; say so only for others.
        pushed = result.inserted - 1 if when == "run_started" else result.inserted
        if pushed > 0:
            log.info("lineage_pushed", store=str(store), events=pushed, at=when)
        return True

    def close(self) -> None:
        """Push what the store still lacks, then flush and close the OpenLineage transport."""
        if self.store is not None:
            if self._direct is False:  # some events did not reach the store: push them now
                self._push(self.store, "run_completed")
            self.store.close()
        if self._emitter is not None:
            self._emitter.close()
            self._emitter = None


def _emitter_from_env() -> Emitter | None:
    from flext_meltano_context.lineage import openlineage

    try:
        return openlineage.emitter_from_env()
    except openlineage.OpenLineageSetupError as exc:
        structlog.get_logger().warning("openlineage_disabled", reason=str(exc))
        return None
