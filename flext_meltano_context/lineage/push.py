"""Push a JSON Lines log (a run's spool, or any old log) into a PostgreSQL store.

`push` sends what the store does not have yet, in file order, once per `(run_id, run_seq)`; a
small cursor file beside the spool remembers how far the store has everything, so a push reads
only what is new. The file's chain is checked on the way: an edited log is never laundered into
a store whose own chain would then look intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from flext_meltano_context.errors import FlextContextError
from flext_meltano_context.lineage.log import SEALED_EVENT, ZERO_HASH, line_body_hash, line_hash
from flext_meltano_context.lineage.pg import PgStore


class PushRefusedError(FlextContextError):
    """The file to push has a broken chain: pushing it would launder an edit into the store."""


@dataclass(frozen=True, slots=True)
class PushResult:
    """What a push did."""

    read: int  # events read from the file (sealed partial lines not counted)
    inserted: int
    already: int  # events the store had: nothing doubled

    def describe(self, source: object, store: object) -> str:
        """One line for people."""
        return (
            f"pushed {self.inserted} event(s) from {source} to {store}; "
            f"{self.already} were there already"
        )


def _cursor_path(spool: Path) -> Path:
    return spool.with_name(spool.name + ".pushed")


def _read_cursor(spool: Path, store: PgStore) -> tuple[int, str]:
    """How far (byte offset, hash of the record before it) the store has every event of `spool`."""
    try:
        entry = json.loads(_cursor_path(spool).read_text("utf-8")).get(store.location.key)
    except (OSError, ValueError, AttributeError):
        return 0, ZERO_HASH
    if not isinstance(entry, dict):
        return 0, ZERO_HASH
    offset, last = int(entry.get("offset", 0)), str(entry.get("hash", ZERO_HASH))
    # The cursor is trusted only while the record before it is still the one it names.
    if offset and not _ends_with_record(spool, offset, last):
        return 0, ZERO_HASH
    return offset, last


def _ends_with_record(spool: Path, offset: int, digest: str) -> bool:
    try:
        with spool.open("rb") as handle:
            handle.seek(max(0, offset - 67))
            return handle.read(min(offset, 67)) == f'{digest}"}}\n'.encode()[-min(offset, 67) :]
    except OSError:
        return False


def _write_cursor(spool: Path, store: PgStore, offset: int, digest: str) -> None:
    path = _cursor_path(spool)
    with contextlib.suppress(OSError), path.open("a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        try:
            cursors = json.loads(handle.read() or "{}")
        except ValueError:
            cursors = {}
        old = cursors.get(store.location.key) or {}
        if int(old.get("offset", 0)) > offset:
            return  # another push got further
        cursors[store.location.key] = {"offset": offset, "hash": digest}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(cursors, sort_keys=True) + "\n")


class _Head(msgspec.Struct):
    seq: int
    prev: str
    event: str
    run_id: str
    run_seq: int | None = None


def push(source: Path, store: PgStore, *, use_cursor: bool = True) -> PushResult:
    """Send the events of the JSONL log `source` that `store` lacks, in file order.

    The file's chain is checked on the way (a broken chain refuses the push before anything of
    that part is sent). Events of logs older than `run_seq` are numbered per run in file order.
    """
    start, expected_prev = _read_cursor(source, store) if use_cursor else (0, ZERO_HASH)
    decode = msgspec.json.Decoder(_Head).decode
    counts: dict[str, int] | None = None  # per-run numbers for events without run_seq
    batch: list[dict[str, Any]] = []
    read = inserted = already = 0
    offset = start
    try:
        handle = source.open("rb")
    except FileNotFoundError:
        return PushResult(0, 0, 0)
    except OSError as exc:
        raise FlextContextError(f"cannot read {source}: {exc.strerror}") from exc

    def flush(end: int, last: str) -> None:
        nonlocal inserted, already
        if batch:
            done = len(store.insert(batch, fsync=True))
            inserted, already = inserted + done, already + len(batch) - done
            batch.clear()
        if use_cursor:
            _write_cursor(source, store, end, last)

    with handle:
        handle.seek(start)
        for line in handle:
            offset += len(line)
            claimed = line_hash(line)
            if claimed is None:
                continue  # a partial line; its seal record follows
            if claimed != line_body_hash(line):
                raise PushRefusedError(
                    f"{source} has an edited line at byte {offset - len(line)}; run "
                    f"'flext-context verify {source}' (nothing from there on was pushed)"
                )
            head = decode(line)
            if head.prev != expected_prev:
                raise PushRefusedError(
                    f"{source}: the chain breaks at seq {head.seq}; run 'flext-context verify "
                    f"{source}' (nothing from there on was pushed)"
                )
            expected_prev = claimed
            if head.event == SEALED_EVENT:
                continue
            record: dict[str, Any] = msgspec.json.decode(line)
            if head.run_seq is None:
                if counts is None:
                    counts = _legacy_counts(source, start)
                counts[head.run_id] = counts.get(head.run_id, 0) + 1
                record["run_seq"] = counts[head.run_id]
            batch.append(record)
            read += 1
            if len(batch) >= 1000:
                flush(offset, claimed)
        flush(offset, expected_prev)
    return PushResult(read, inserted, already)


def _legacy_counts(source: Path, end: int) -> dict[str, int]:
    """Events without `run_seq` per run in the first `end` bytes of `source`."""
    counts: dict[str, int] = {}
    if end == 0:
        return counts
    decode = msgspec.json.Decoder(_Head).decode
    with source.open("rb") as handle:
        done = 0
        for line in handle:
            done += len(line)
            if done > end:
                break
            if line_hash(line) is None:
                continue
            head = decode(line)
            if head.run_seq is None and head.event != SEALED_EVENT:
                counts[head.run_id] = counts.get(head.run_id, 0) + 1
    return counts
