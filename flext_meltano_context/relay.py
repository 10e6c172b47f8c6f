"""The relay: copy a Singer stream from one file descriptor to another, counting on the way.

It is the only hot path of the product. Bytes are forwarded first, in large chunks, and counted
afterwards (a counting bug must never cost a record); each chunk's whole lines are decoded in one
batch for `type` and `stream` only. Without an injection the sink receives exactly the bytes of
the source. Bad lines are forwarded and reported, never filtered (issue 3).
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import hashlib
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, eq
from typing import Any

import msgspec
import structlog

from flext_meltano_context import singer
from flext_meltano_context.errors import StrictModeError

MAX_ANOMALIES = 100
PIPE_SIZE = 1 << 20
_EXCERPT = 80
_stream_of = attrgetter("stream")
Buf = bytes | bytearray  # a region is a bytearray when it grew across chunks (long lines)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


@dataclass(frozen=True, slots=True)
class Injection:
    """What the relay may add to the stream; each part follows the rules tested in FACTS.md."""

    correlation_id: str  # value for the _sdc_correlation_id column
    state_context: Mapping[str, str] | None = None  # merged as "flext_context" into STATE values
    record_column_streams: frozenset[str] = frozenset()  # streams that get the column ("*" = all)


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A line forwarded as it was but not a well-formed Singer message."""

    kind: str  # blank_line invalid_json invalid_utf8 not_an_object missing_type missing_stream
    #            record_without_schema
    line: int  # 1-based
    offset: int  # byte offset of the line's start in the source
    excerpt: str
    stream: str | None = None


@dataclass(frozen=True, slots=True)
class StreamStats:
    """One stream as the sink received it."""

    name: str
    counts: Mapping[str, int]  # by message type: RECORD, SCHEMA, STATE..., BATCH
    bytes: int  # the stream's lines, line endings included
    first_record_at: float | None  # epoch seconds, to the chunk
    last_record_at: float | None
    schema: Mapping[str, Any] | None  # the latest SCHEMA message's "schema", as forwarded
    key_properties: tuple[str, ...] = ()

    @property
    def records(self) -> int:
        return self.counts.get("RECORD", 0)


@dataclass(frozen=True, slots=True)
class RelayStats:
    """Everything the relay saw; immutable, JSON-ready through `to_dict()`."""

    streams: Mapping[str, StreamStats]
    counts: Mapping[str, int]  # totals by message type
    lines: int
    bytes: int  # bytes read from the source and forwarded
    anomalies: tuple[Anomaly, ...]  # the first MAX_ANOMALIES
    anomaly_count: int
    states_seen: int
    last_state: Any  # decoded `value` of the last STATE forwarded (as forwarded); None if none
    digest: str | None  # sha256 hex of the bytes the sink received
    started_at: float
    first_byte_at: float | None
    ended_at: float
    sink_closed_early: bool
    bytes_out: int = 0  # bytes the sink accepted (differs from `bytes` with an injection)
    counting_error: str | None = None  # counting stopped here; forwarding went on (a bug)

    def records(self) -> int:
        return self.counts.get("RECORD", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "streams": {
                name: {
                    "counts": dict(s.counts),
                    "records": s.records,
                    "bytes": s.bytes,
                    "first_record_at": s.first_record_at,
                    "last_record_at": s.last_record_at,
                    "schema": s.schema,
                    "key_properties": list(s.key_properties),
                }
                for name, s in self.streams.items()
            },
            "counts": dict(self.counts),
            "records": self.records(),
            "lines": self.lines,
            "bytes": self.bytes,
            "bytes_out": self.bytes_out,
            "anomaly_count": self.anomaly_count,
            "anomalies": [
                {"kind": a.kind, "line": a.line, "offset": a.offset, "excerpt": a.excerpt}
                | ({"stream": a.stream} if a.stream is not None else {})
                for a in self.anomalies
            ],
            "states_seen": self.states_seen,
            "last_state": self.last_state,
            "digest": self.digest,
            "started_at": self.started_at,
            "first_byte_at": self.first_byte_at,
            "ended_at": self.ended_at,
            "sink_closed_early": self.sink_closed_early,
            "counting_error": self.counting_error,
        }


@dataclass(frozen=True, slots=True)
class RelayProgress:
    """A live snapshot for progress display."""

    records: Mapping[str, int]  # RECORD count per stream
    bytes: int
    lines: int
    elapsed: float


class _Strict(Exception):  # noqa: N818 - internal signal, never escapes this module
    """The first anomalous line in strict mode: forward the `keep` lines before it, then stop."""

    def __init__(self, keep: int) -> None:
        self.keep = keep


@dataclass(slots=True)
class _Tally:
    """The mutable counters behind RelayStats; fed one region of whole lines at a time."""

    strict: bool
    injection: Injection | None
    lines: int = 0
    nbytes: int = 0
    types: Counter[str] = field(default_factory=Counter)
    streams: dict[str, Counter[str]] = field(default_factory=dict)
    stream_bytes: Counter[str] = field(default_factory=Counter)
    first_record: dict[str, float] = field(default_factory=dict)
    last_record: dict[str, float] = field(default_factory=dict)
    schemas: dict[str, Any] = field(default_factory=dict)
    key_properties: dict[str, tuple[str, ...]] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    anomaly_count: int = 0
    states_seen: int = 0
    last_state: bytes | None = None
    state_context: dict[str, str] | None = None
    column_cell: bytes = b""
    column_streams: set[str] = field(default_factory=set)  # latest SCHEMA got the column
    prefixes: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.injection is not None:
            if self.injection.state_context is not None:
                self.state_context = dict(self.injection.state_context)
            self.column_cell = msgspec.json.encode(self.injection.correlation_id)

    def feed(
        self,
        lines: list[Buf],
        ended: bool,
        size: int,
        now: float,
        rewrite: bool,
        chunk: bytes = b"",
        rest: int = 0,
    ) -> Sequence[Buf] | None:
        """Count whole lines (`size` bytes; the last lacks its newline only at end of input).

        `chunk[rest:]` holds all lines but the first, still as read (for one UTF-8 check).
        Returns the lines as the sink must get them when an injection changed any of them,
        else None: forward them as they are.
        """
        try:
            # The common case in one C loop: every line a RECORD with a stream, or a STATE.
            streams = list(map(_stream_of, map(singer.RECORD_OR_STATE.decode, lines)))
            _check_utf8(lines[0], chunk, rest)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._one_by_one(lines, self._heads(lines, chunk, rest), now, rewrite, ended)
        except UnicodeDecodeError:
            return self._one_by_one(lines, None, now, rewrite, ended)
        kinds = Counter(streams)
        states = kinds.pop(None, 0)
        names = kinds.keys()
        if not ended or not names <= self.schemas.keys():
            return self._one_by_one(lines, self._heads(lines, b"", 0), now, rewrite, ended)
        state_at: list[int] = []
        i = -1
        for _ in range(states):
            i = streams.index(None, i + 1)
            state_at.append(i)
        forwarded: Sequence[Buf] = lines
        out = None
        if rewrite and self._rewrites(names, states > 0):
            if states and self.state_context is not None:
                forwarded = list(lines)
                for i in state_at:
                    forwarded[i] = self._patched_state(lines[i])
            out = self._spliced(forwarded, kinds) if names & self.column_streams else forwarded
            if out is None:
                return self._one_by_one(lines, self._heads(lines, b"", 0), now, rewrite, ended)
        # The fast path: only RECORDs of known streams and STATEs, counted in C loops.
        self.lines += len(lines)
        self.nbytes += size
        for name, n in kinds.items():
            self.streams[name]["RECORD"] += n
            self.first_record.setdefault(name, now)
            self.last_record[name] = now
        if kinds:
            self.types["RECORD"] += len(lines) - states
        state_bytes = 0
        if states:
            self.types["STATE"] += states
            for i in state_at:
                state_bytes += len(lines[i]) + 1
                self._saw_state(forwarded[i])
        if len(kinds) == 1:
            self.stream_bytes[next(iter(kinds))] += size - state_bytes
        elif kinds:
            sizes = list(map(len, lines))
            for name in kinds:
                picked = list(compress(sizes, map(eq, repeat(name), streams)))
                self.stream_bytes[name] += sum(picked) + len(picked)
        return out

    def _spliced(self, lines: Sequence[Buf], kinds: Counter[str]) -> Sequence[Buf] | None:
        """The column added to every RECORD of the chunk by a few whole-chunk replaces.

        Exact, or None (take the line-by-line path): anchored at line starts (a newline never
        occurs inside a JSON line), used only when every RECORD of a column stream starts with
        the prefix singer-sdk or singer-python writes, followed by a property or `}`.
        """
        body = b"\n" + b"\n".join(lines)
        if singer.COLUMN_KEY in body:
            return None
        cell = singer.COLUMN_KEY + b":" + self.column_cell
        for name in kinds.keys() & self.column_streams:
            found = 0
            for prefix in self.prefixes[name]:
                start = b"\n" + prefix
                full = body.count(start + b'"')
                empty = 0 if found + full == kinds[name] else body.count(start + b"}")
                if full + empty:
                    body = body.replace(start, start + cell + b",")
                    if empty:
                        body = body.replace(start + cell + b",}", start + cell + b"}")
                found += full + empty
                if found == kinds[name]:
                    break
            if found != kinds[name]:
                return None
        return [body[1:]]

    @staticmethod
    def _heads(lines: Sequence[Buf], chunk: bytes, rest: int) -> list[singer.Head] | None:
        """`type` and `stream` of every line, or None if some line needs the exact path."""
        try:
            heads = list(map(singer.HEAD.decode, lines))
            _check_utf8(lines[0], chunk, rest)
        except _DECODE_ERRORS:
            return None
        return heads

    def _rewrites(self, names: Iterable[str], has_state: bool) -> bool:
        """Whether the injection changes some line of a fast-path region."""
        if has_state and self.state_context is not None:
            return True
        return any(name in self.column_streams for name in names)

    def _one_by_one(
        self,
        lines: Sequence[Buf],
        heads: list[singer.Head] | None,
        now: float,
        rewrite: bool,
        ended: bool,
    ) -> list[Buf] | None:
        """The exact path: one line at a time, in order (schemas, anomalies, injections)."""
        out: list[Buf] | None = [] if rewrite else None
        changed = False
        last = len(lines) - 1
        for i, line in enumerate(lines):
            if heads is not None:
                head = heads[i]
                seen = singer.Line(head.type, head.stream, None)
                if head.stream is None and head.type in singer.STREAM_TYPES:
                    seen = singer.Line(head.type, None, "missing_stream")
            else:
                seen = singer.classify(line)
            kind, stream, anomaly = seen.type, seen.stream, seen.anomaly
            if kind == "RECORD" and stream is not None and stream not in self.schemas:
                anomaly = anomaly or "record_without_schema"
            if anomaly is not None:
                self._anomaly(anomaly, line, stream)
                if self.strict:
                    raise _Strict(i)
            size = len(line) + (1 if ended or i < last else 0)  # the input's last may lack \n
            self.lines += 1
            self.nbytes += size
            forwarded = line
            if kind is not None:
                self.types[kind] += 1
                if stream is not None:
                    self.streams.setdefault(stream, Counter())[kind] += 1
                    self.stream_bytes[stream] += size
                if kind == "SCHEMA" and stream is not None:
                    forwarded = self._schema(line, stream, seen.parsed)
                elif kind == "RECORD" and stream is not None:
                    self.first_record.setdefault(stream, now)
                    self.last_record[stream] = now
                    if stream in self.column_streams:
                        forwarded = self._record(line, stream)
                elif kind == "STATE":
                    forwarded = self._state(line)
            if out is not None:
                changed = changed or forwarded is not line
                out.append(forwarded)
        return out if changed else None

    def _anomaly(self, kind: str, line: Buf, stream: str | None) -> None:
        self.anomaly_count += 1
        if len(self.anomalies) < MAX_ANOMALIES:
            text = bytes(line[:_EXCERPT]).decode("utf-8", errors="backslashreplace")
            suffix = "..." if len(line) > _EXCERPT else ""
            self.anomalies.append(
                Anomaly(kind, self.lines + 1, self.nbytes, text + suffix, stream),
            )

    def _schema(self, line: Buf, stream: str, parsed: dict[str, Any] | None) -> Buf:
        forwarded = line
        injection = self.injection
        if injection is not None and (
            "*" in injection.record_column_streams or stream in injection.record_column_streams
        ):
            patched = self._with_ending(line, singer.add_column_to_schema)
            if patched is not line:
                forwarded = patched
                self.column_streams.add(stream)
                self.prefixes[stream] = singer.record_prefixes(stream)
                parsed = None
            else:
                self.column_streams.discard(stream)
        try:
            schema, keys = singer.read_schema(forwarded, parsed)
        except (msgspec.DecodeError, msgspec.ValidationError):
            schema, keys = None, ()
        self.schemas[stream] = schema
        self.key_properties[stream] = keys
        return forwarded

    def _state(self, line: Buf) -> Buf:
        forwarded = self._patched_state(line)
        self._saw_state(forwarded)
        return forwarded

    def _patched_state(self, line: Buf) -> Buf:
        context = self.state_context
        if context is None:
            return line
        return self._with_ending(line, lambda ln: singer.merge_state_context(ln, context))

    def _saw_state(self, forwarded: Buf) -> None:
        self.states_seen += 1
        self.last_state = singer.state_value(forwarded)

    def _record(self, line: Buf, stream: str) -> Buf:
        prefixes, cell = self.prefixes[stream], self.column_cell
        return self._with_ending(line, lambda ln: singer.add_column_to_record(ln, prefixes, cell))

    @staticmethod
    def _with_ending(line: Buf, patch: Callable[[bytes], bytes | None]) -> Buf:
        """`patch` applied to the line without its `\\r` (CRLF input keeps its CRLF)."""
        cr = line.endswith(b"\r")
        try:
            patched = patch(bytes(line[:-1]) if cr else bytes(line))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return line
        if patched is None:
            return line
        return patched + b"\r" if cr else patched

    def snapshot(self, elapsed: float) -> RelayProgress:
        return RelayProgress(
            records={name: c["RECORD"] for name, c in self.streams.items()},
            bytes=self.nbytes,
            lines=self.lines,
            elapsed=elapsed,
        )

    def stats(self, **times: Any) -> RelayStats:
        streams = {
            name: StreamStats(
                name=name,
                counts=dict(counts),
                bytes=self.stream_bytes[name],
                first_record_at=self.first_record.get(name),
                last_record_at=self.last_record.get(name),
                schema=self.schemas.get(name),
                key_properties=self.key_properties.get(name, ()),
            )
            for name, counts in self.streams.items()
        }
        last = singer.decode_value(self.last_state) if self.last_state is not None else None
        return RelayStats(
            streams=streams,
            counts=dict(self.types),
            lines=self.lines,
            bytes=self.nbytes,
            anomalies=tuple(self.anomalies),
            anomaly_count=self.anomaly_count,
            states_seen=self.states_seen,
            last_state=last,
            **times,
        )


def _enlarge_pipe(fd: int) -> None:
    """Ask for a larger pipe buffer: fewer context switches between tap, relay and target."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError as exc:  # not a pipe, or above /proc/sys/fs/pipe-max-size: keep the default
        structlog.get_logger().debug("pipe_not_enlarged", fd=fd, reason=exc.strerror)


def relay(
    source: int,
    sink: int,
    *,
    digest: bool = False,
    strict: bool = False,
    injection: Injection | None = None,
    progress: Callable[[RelayProgress], None] | None = None,
    progress_interval: float = 0.25,
    chunk_size: int = 1 << 20,
    close_sink: bool = True,
    on_lines: Callable[[list[Buf]], None] | None = None,
) -> RelayStats:
    """Copy `source` to `sink` until end of input, counting every Singer message.

    `on_lines` (optional, e.g. the landing check's key collector) sees each region of whole
    lines once they are counted; without it the hot path is unchanged.

    The sink closing early (the target died) ends the relay at once with
    `sink_closed_early=True`; what to do with the source is the caller's decision. In strict
    mode the first anomalous line is not forwarded: StrictModeError (with `.stats`) is raised.
    """
    started_at = time.time()
    began = time.monotonic()
    next_progress = began + progress_interval
    tally = _Tally(strict=strict, injection=injection)
    hasher = _Digest() if digest else None
    # Without strict mode nor injection each chunk goes out before it is looked at.
    passthrough = not strict and injection is None
    first_byte_at: float | None = None
    tail = bytearray()  # the partial last line, carried to the next chunk
    lines: list[Buf]
    sent = 0
    closed_early = False
    stopped: _Strict | None = None
    counting_error: str | None = None
    _enlarge_pipe(source)
    _enlarge_pipe(sink)
    try:
        while True:
            data = os.read(source, chunk_size)
            now = time.time()
            if first_byte_at is None and data:
                first_byte_at = now
            if passthrough and data:
                sent += _write_all(sink, data, hasher)
            if data:
                lines = list(data.split(b"\n"))
                if len(lines) == 1:
                    tail += data  # a long line: memory grows with the line, not the stream
                    continue
                rest = len(lines[0]) + 1
                size = len(data) - len(lines[-1]) + len(tail)
                if tail:
                    tail += lines[0]
                    lines[0] = tail
                tail = bytearray(lines.pop())
                ended = True
            elif tail:
                lines, size, rest, ended = [tail], len(tail), 0, False
                tail = bytearray()
            else:
                break
            if counting_error is not None:
                continue  # counting failed earlier: keep forwarding (pass-through mode only)
            try:
                out = tally.feed(lines, ended, size, now, injection is not None, data, rest)
            except _Strict as stop:
                stopped = stop
                if stop.keep:
                    sent += _write_all(sink, _joined(lines[: stop.keep], True), hasher)
                break
            except Exception as exc:  # a counting bug must never cost a record
                if not passthrough:
                    raise  # nothing was forwarded for these lines: the caller must know
                counting_error = f"{type(exc).__name__}: {exc}"
                structlog.get_logger().error("relay_counting_failed", error=counting_error)
                continue
            if on_lines is not None:
                on_lines(lines)
            if not passthrough:
                sent += _write_all(sink, _joined(lines if out is None else out, ended), hasher)
            if progress is not None:
                clock = time.monotonic()
                if clock >= next_progress:
                    next_progress = clock + progress_interval
                    progress(tally.snapshot(clock - began))
            if not data:
                break
    except BrokenPipeError:
        closed_early = True
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
        closed_early = True
    finally:
        if close_sink:
            _close(sink)
    stats = tally.stats(
        digest=hasher.hexdigest() if hasher is not None else None,  # waits for the thread
        started_at=started_at,
        first_byte_at=first_byte_at,
        ended_at=time.time(),
        sink_closed_early=closed_early,
        bytes_out=sent,
        counting_error=counting_error,
    )
    if closed_early:
        structlog.get_logger().warning(
            "sink_closed_early", lines=stats.lines, records=stats.records()
        )
    if stopped is not None:
        first = stats.anomalies[-1] if stats.anomalies else None
        where = f"line {first.line} (byte {first.offset}): {first.kind}" if first else "a line"
        error = StrictModeError(
            f"strict mode stopped the stream at {where}; that line and the rest were not"
            " forwarded. Fix the tap's output or run without --strict to forward and report it",
        )
        error.stats = stats  # type: ignore[attr-defined]  # StrictModeError carries the stats
        raise error
    return stats


def _check_utf8(first: Buf, chunk: bytes, rest: int) -> None:
    """Raise UnicodeDecodeError unless the lines are UTF-8: msgspec skips records unchecked.

    `first` is the chunk's first line (completed with the carried tail); `chunk[rest:]` holds
    the other lines as read, checked in one call.
    """
    if not first.isascii():
        first.decode("utf-8")
    if rest < len(chunk) and not chunk.isascii():
        # final=False: a character cut by the chunk's end belongs to the next chunk's first line.
        codecs.utf_8_decode(memoryview(chunk)[rest:], "strict", False)


def _joined(lines: Sequence[Buf], ended: bool) -> bytes:
    body = b"\n".join(lines)
    return body + b"\n" if ended else body


class _Digest:
    """A running sha256 computed on a second thread while the relay decodes the next chunk.

    hashlib releases the GIL on large buffers, so on a machine with a spare core the digest costs
    little wall time. At most one chunk waits, so memory stays flat.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flext-digest")
        self._pending: Future[None] | None = None

    def update(self, data: bytes | memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._hash.update, data)

    def hexdigest(self) -> str:
        if self._pending is not None:
            self._pending.result()
        self._pool.shutdown()
        return self._hash.hexdigest()


def _write_all(fd: int, data: bytes, hasher: _Digest | None) -> int:
    """Write every byte (pipes may take less than asked); the digest sees what was accepted."""
    view = memoryview(data)
    total = len(view)
    done = 0
    try:
        while done < total:
            done += os.write(fd, view[done:])
    finally:
        if hasher is not None:
            hasher.update(data if done == total else bytes(view[:done]))
        view.release()
    return done


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # EPIPE on close of a dead pipe: the stats already say so
        structlog.get_logger().debug("sink_close_failed", reason=exc.strerror)
