"""The lineage log: append-only JSON Lines with a sha256 hash chain across the whole file.

Each line is one record::

    {"correlation_id":..,"data":{..},"event":..,"prev":"<64 hex>","run_id":..,"seq":N,"ts":..,"v":1,
     "hash":"<64 hex>"}

`hash` is the sha256 (hex) of the canonical JSON of the record without `hash`: keys sorted at every
level, separators `,` and `:`, no whitespace, non-ASCII kept as UTF-8, no NaN/Infinity. The line is
that canonical JSON with `,"hash":"<hex>"` inserted before its final `}`, so the hash of a line is
also the sha256 of its bytes with that member removed (which is how `verify` checks it quickly).
`prev` is the previous line's `hash` (64 zeros on the first line); `seq` counts lines from 1.
`run_seq` counts one run's events from 1 (logs written before it existed have none): with the run
id it names an event wherever it is stored, so pushing it to a store twice stores it once.

A writer holds `flock(LOCK_EX)` on the file, reads the last line's hash from the end of the file,
and writes the whole new line with one `os.write` (the file is opened `O_APPEND`), fsyncing when
asked: concurrent runs never interleave or fork the chain. A crash can leave at most one partial
last line (no trailing newline); the next writer seals it: it ends that line with a newline and
writes a `sealed_partial_line` record naming the line's byte offset, length and sha256, chained to
the last whole record. A whole last line that is not a record is sealed the same way (no newline
added). `verify` accepts a sealed line and reports it.

Deleting lines at the very end of the file cannot be detected from the file alone (no chain does
that); compare the line count or last hash with a copy kept elsewhere when that matters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from flext_meltano_context.clock import iso as iso  # one home for timestamps (issue 11)
from flext_meltano_context.errors import FlextContextError
from flext_meltano_context.pipes import write_all

FORMAT_VERSION = 1
ZERO_HASH = "0" * 64
SEALED_EVENT = "sealed_partial_line"
_HASH_MEMBER = b',"hash":"'
_SUFFIX_LEN = len(_HASH_MEMBER) + 64 + len(b'"}\n')  # `,"hash":"<64 hex>"}` and the newline
_TAIL_BLOCK = 1 << 16


class LineageLogError(FlextContextError):
    """The lineage log could not be written or read."""


def canonical(record: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of `record` that its hash is computed over."""
    return json.dumps(
        record,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_jsonable,
    ).encode("utf-8")


def _jsonable(value: Any) -> Any:
    """JSON for the few non-JSON values callers hand us: datetimes as ISO UTC, paths as text."""
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, (Path, bytes)):
        return os.fsdecode(value) if isinstance(value, Path) else value.decode("utf-8", "replace")
    raise TypeError(f"lineage data must be JSON: {type(value).__name__} is not")


def line_hash(line: bytes) -> str | None:
    """The hash a written line claims, or None if the line does not end like a record."""
    if len(line) < _SUFFIX_LEN + 2 or not line.endswith(b'"}\n'):
        return None
    if line[-_SUFFIX_LEN : -_SUFFIX_LEN + len(_HASH_MEMBER)] != _HASH_MEMBER:
        return None
    return line[-67:-3].decode("ascii", "replace")


def line_body_hash(line: bytes) -> str:
    """sha256 of a line with its `hash` member removed: the record's canonical JSON."""
    digest = hashlib.sha256(line[:-_SUFFIX_LEN])
    digest.update(b"}")
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _Tail:
    seq: int
    hash: str
    partial: bytes | None  # a last line that is not a record, without its newline
    partial_offset: int
    partial_ends_line: bool = False  # the partial line has its newline already


class LineageLog:
    """One lineage log file: append records to the hash chain, read them back."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def verify(self) -> VerifyResult:
        """Check the file's hash chain (see `verify`)."""
        return verify(self.path)

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
        """Append one record (one `write` under an exclusive lock) and return it as written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LineageLogError(
                f"cannot open the lineage log {self.path}: {exc.strerror}; "
                "check the directory exists and is writable, or set FLEXT_CONTEXT_LINEAGE_PATH"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close()
            tail = _read_tail(fd, self.path)
            out = b""
            seq, prev = tail.seq, tail.hash
            if tail.partial is not None:
                seal = {
                    "offset": tail.partial_offset,
                    "length": len(tail.partial),
                    "sha256": hashlib.sha256(tail.partial).hexdigest(),
                }
                sealed, prev = _encode(SEALED_EVENT, seq + 1, run_id, correlation_id, seal, prev)
                out = sealed if tail.partial_ends_line else b"\n" + sealed
                seq += 1
            line, _ = _encode(event, seq + 1, run_id, correlation_id, data, prev, run_seq)
            out += line
            _write_all(fd, out)
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            raise LineageLogError(
                f"cannot append to the lineage log {self.path}: {exc.strerror}"
            ) from exc
        finally:
            os.close(fd)
        written: dict[str, Any] = msgspec.json.decode(line)
        return written

    def read(self) -> Iterator[dict[str, Any]]:
        """Every whole record in file order (sealed partial lines are skipped)."""
        for line in self.lines():
            yield msgspec.json.decode(line)

    def lines(
        self, *, events: Sequence[str] | None = None, run_id: str | None = None
    ) -> Iterator[bytes]:
        """The raw bytes of every line that is a whole record (newline included).

        `events` and `run_id` are the store interface's hints; a file ignores them.
        """
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                if line_hash(line) is not None:
                    yield line


def _encode(
    event: str,
    seq: int,
    run_id: str,
    correlation_id: str,
    data: Mapping[str, Any],
    prev: str,
    run_seq: int | None = None,
) -> tuple[bytes, str]:
    """The line for one record (newline included) and its hash."""
    record: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "seq": seq,
        "ts": iso(),
        "event": event,
        "run_id": run_id,
        "correlation_id": correlation_id,
        "data": data,
        "prev": prev,
    }
    if run_seq is not None:
        record["run_seq"] = run_seq
    try:
        return seal_record(record)
    except (TypeError, ValueError) as exc:
        raise LineageLogError(f"cannot record {event!r}: {exc}") from exc


def seal_record(record: Mapping[str, Any]) -> tuple[bytes, str]:
    """The line (newline included) and hash of `record`, a record without its `hash`."""
    body = canonical(record)
    digest = hashlib.sha256(body).hexdigest()
    return with_hash(body, digest), digest


def with_hash(body: bytes, digest: str) -> bytes:
    """The line for a record's canonical JSON `body` and its hash."""
    return body[:-1] + _HASH_MEMBER + digest.encode() + b'"}\n'


def _write_all(fd: int, data: bytes) -> None:
    write_all(fd, data)


def _read_back(fd: int, end: int) -> tuple[bytes, int, int]:
    """The bytes before `end`, read backwards until they hold the whole last line.

    Returns (bytes, file offset of their first byte, index of the newline before the last line,
    -1 when the last line starts the file).
    """
    buf = b""
    while True:
        start = max(0, end - _TAIL_BLOCK)
        buf = os.pread(fd, end - start, start) + buf
        end = start
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0 or start == 0:
            return buf, start, cut


def _read_tail(fd: int, path: Path) -> _Tail:
    """The last whole line's seq and hash, and any partial bytes after it, read from the end."""
    size = os.fstat(fd).st_size
    if size == 0:
        return _Tail(0, ZERO_HASH, None, 0)
    buf, base, cut = _read_back(fd, size)
    if not buf.endswith(b"\n"):
        # A crash mid-write left a partial line: seal it, chain on from the line before it.
        cut = buf.rfind(b"\n")
        partial_offset = base + cut + 1
        partial = buf[cut + 1 :]
        before = _read_tail_before(fd, path, partial_offset)
        return _Tail(before.seq, before.hash, partial, partial_offset)
    last = buf[cut + 1 :]
    claimed = line_hash(last)
    if claimed is None:
        # A whole line that is not a record (edited by hand?): treat it as a partial line.
        offset = base + cut + 1
        before = _read_tail_before(fd, path, offset)
        return _Tail(before.seq, before.hash, last[:-1], offset, partial_ends_line=True)
    try:
        seq = int(msgspec.json.decode(last)["seq"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise LineageLogError(
            f"the last line of {path} is not a lineage record ({exc}); "
            "run 'flext-context verify' to see what happened to the log"
        ) from exc
    return _Tail(seq, claimed, None, 0)


def _read_tail_before(fd: int, path: Path, offset: int) -> _Tail:
    """The tail of the file as if it ended at `offset` (used to skip a partial last line)."""
    if offset == 0:
        return _Tail(0, ZERO_HASH, None, 0)
    buf, _, cut = _read_back(fd, offset)
    last = buf[cut + 1 :]
    claimed = line_hash(last)
    if claimed is None:
        raise LineageLogError(
            f"{path} ends with two lines that are not lineage records; "
            "run 'flext-context verify' and move the damaged log aside"
        )
    return _Tail(int(msgspec.json.decode(last)["seq"]), claimed, None, 0)


# --- verification ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SealedLine:
    """A partial line left by a crash and sealed by the next writer."""

    line: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What `verify` found: `ok`, and otherwise the first bad line (or store row) and why."""

    path: Path | str  # the file, or a store's name (never with a password)
    lines: int
    runs: int
    ok: bool
    line: int | None = None  # 1-based number of the first bad line; a store row's seq
    kind: str | None = None  # edited | deleted | reordered | truncated | malformed
    reason: str | None = None
    sealed: tuple[SealedLine, ...] = field(default_factory=tuple)
    last_hash: str = ZERO_HASH
    unit: str = "line"  # how `line` is named: "line" in a file, "row seq" in a store

    def describe(self) -> str:
        """One line for people."""
        if self.ok:
            sealed = f"; {len(self.sealed)} sealed partial line(s)" if self.sealed else ""
            return (
                f"{self.path}: intact, {self.lines} {self.unit.split()[0]}s, {self.runs} runs, "
                f"last hash {self.last_hash[:16]}{sealed}"
            )
        return f"{self.path}: {self.unit} {self.line}: {self.kind}: {self.reason}"


class _Head(msgspec.Struct):
    seq: int
    prev: str
    event: str
    run_id: str


def verify(path: Path) -> VerifyResult:
    """Check the hash chain of the log at `path` from the first line to the last."""
    path = Path(path)
    decode = msgspec.json.Decoder(_Head).decode
    sha = hashlib.sha256
    expected_prev, expected_seq = ZERO_HASH, 1
    runs: set[str] = set()
    sealed: list[SealedLine] = []
    pending: tuple[int, int, bytes] | None = None  # line, offset, bytes of an unreadable line
    lineno = offset = 0

    def bad(line: int, kind: str, reason: str) -> VerifyResult:
        return VerifyResult(path, lineno, len(runs), False, line, kind, reason, tuple(sealed))

    try:
        handle = path.open("rb")
    except OSError as exc:
        raise LineageLogError(f"cannot read the lineage log {path}: {exc.strerror}") from exc
    with handle:
        for line in handle:
            lineno += 1
            here, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                return bad(
                    lineno,
                    "truncated",
                    f"partial last line at byte {here} ({len(line)} bytes, no newline): a writer "
                    "stopped mid-line; the next run will seal it, or the file was cut",
                )
            claimed = line_hash(line)
            if claimed is None:
                if pending is not None:
                    return bad(pending[0], "malformed", "not a lineage record and not sealed")
                pending = (lineno, here, line[:-1])
                continue
            if claimed != line_body_hash(line):
                return bad(lineno, "edited", "its hash does not match its content")
            try:
                head = decode(line)
            except msgspec.DecodeError as exc:
                return bad(lineno, "malformed", f"hash matches but the record is not valid: {exc}")
            if head.event == SEALED_EVENT:
                seal = msgspec.json.decode(line)["data"]
                if pending is None or (
                    seal.get("offset"),
                    seal.get("sha256"),
                ) != (pending[1], sha(pending[2]).hexdigest()):
                    return bad(lineno, "malformed", "seals a partial line that is not there")
                sealed.append(SealedLine(pending[0], pending[1], len(pending[2])))
                pending = None
            elif pending is not None:
                return bad(pending[0], "malformed", "not a lineage record and not sealed")
            if head.prev != expected_prev:
                if head.seq > expected_seq and _comes_later(handle, decode, expected_seq):
                    kind, why = "reordered", f"seq {expected_seq} comes later than seq {head.seq}"
                elif head.seq > expected_seq:
                    kind, why = "deleted", f"seq jumps from {expected_seq - 1} to {head.seq}"
                elif head.seq < expected_seq:
                    kind, why = "reordered", f"seq {head.seq} comes after {expected_seq - 1}"
                else:
                    kind, why = "deleted", "seq is in order but the line before it was replaced"
                return bad(lineno, kind, f"prev does not match the previous line's hash ({why})")
            if head.seq != expected_seq:
                return bad(lineno, "malformed", f"seq {head.seq} where {expected_seq} was expected")
            expected_prev, expected_seq = claimed, head.seq + 1
            runs.add(head.run_id)
    if pending is not None:
        return bad(pending[0], "malformed", "last line is not a lineage record")
    return VerifyResult(
        path, lineno, len(runs), True, sealed=tuple(sealed), last_hash=expected_prev
    )


def _comes_later(lines: Iterator[bytes], decode: Any, seq: int) -> bool:
    """Whether a record with `seq` is among the remaining `lines` (a move, not a deletion)."""
    needle = b'"seq":%d,' % seq
    for line in lines:
        if needle in line and line_hash(line) is not None:
            with contextlib.suppress(msgspec.DecodeError):
                if decode(line).seq == seq:
                    return True
    return False
