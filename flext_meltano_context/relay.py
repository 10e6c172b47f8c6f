"""The relay: copy a Singer stream from one file descriptor to another, counting on the way.

It is the only hot path of the product. Bytes are forwarded first, in large chunks, and counted
afterwards (a counting bug must never cost a record). Without an injection the sink receives
exactly the bytes of the source. Bad lines are forwarded and reported, never filtered (issue 3).

Counting is done by a scanner, fed chunk by chunk: the compiled one (`_scanner.c`, issue 14)
when it is built and no injection rewrites lines, else the pure-Python one (msgspec batch
decodes). Both send every line they cannot count in bulk through one exact path (`_Counts.line`),
so their results are the same; `_Injector` holds what an injection changes.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, eq
from typing import Any, cast

import msgspec
import structlog

from flext_meltano_context import clock, scanner, singer
from flext_meltano_context.errors import StrictModeError
from flext_meltano_context.keys import KeyCollector, KeySet
from flext_meltano_context.pipes import WriteError, enlarge_pipe, write_all

MAX_ANOMALIES = 100
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

    def event_data(self) -> dict[str, Any]:
        """The `stream_stats` lineage event as both recorders write it (the pipeline adds more)."""
        return {
            "stream": self.name,
            "counts": dict(self.counts),
            "bytes": self.bytes,
            "first_record_at": clock.epoch_iso(self.first_record_at),
            "last_record_at": clock.epoch_iso(self.last_record_at),
            "schema": singer.schema_summary(self.schema, self.key_properties),
        }


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
    """The first anomalous line in strict mode: forward `pieces` (the lines before it), stop."""

    def __init__(self, keep: int = 0, at: int = 0) -> None:
        self.keep = keep  # lines of the region before the bad one (pure-Python scanner)
        self.at = at  # the bad line's offset in its buffer (compiled scanner)
        self.pieces: list[Buf | memoryview] = []


@dataclass(slots=True)
class _Counts:
    """What the relay counted so far; both scanners feed it, RelayStats is made from it."""

    strict: bool
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

    def line(self, line: Buf, size: int, now: float, head: singer.Head | None) -> singer.Line:
        """Count one line exactly (`size` with its newline); strict mode stops at an anomaly."""
        if head is not None:
            seen = singer.Line(head.type, head.stream, None)
            if head.stream is None and head.type in singer.STREAM_TYPES:
                seen = singer.Line(head.type, None, "missing_stream")
        else:
            seen = singer.classify(line)
        kind, stream, anomaly = seen.type, seen.stream, seen.anomaly
        if kind == "RECORD" and stream is not None and stream not in self.schemas:
            anomaly = anomaly or "record_without_schema"
        if anomaly is not None:
            self.anomaly(anomaly, line, stream)
            if self.strict:
                raise _Strict
        self.lines += 1
        self.nbytes += size
        if kind is not None:
            self.types[kind] += 1
            if stream is not None:
                self.streams.setdefault(stream, Counter())[kind] += 1
                self.stream_bytes[stream] += size
                if kind == "RECORD":
                    self.first_record.setdefault(stream, now)
                    self.last_record[stream] = now
        return seen

    def records(
        self,
        lines: list[Buf],
        streams: list[str | None],
        kinds: Counter[str | None],
        state_at: list[int],
        size: int,
        now: float,
    ) -> None:
        """Count a region of RECORDs of known streams (`kinds`) and plain STATEs (`state_at`)."""
        self.lines += len(lines)
        self.nbytes += size
        for name, n in kinds.items():
            assert name is not None  # noqa: S101 - STATEs were popped
            self.streams[name]["RECORD"] += n
            self.first_record.setdefault(name, now)
            self.last_record[name] = now
        if kinds:
            self.types["RECORD"] += len(lines) - len(state_at)
        state_bytes = 0
        if state_at:
            self.types["STATE"] += len(state_at)
            state_bytes = sum(len(lines[i]) + 1 for i in state_at)
        if len(kinds) == 1:
            self.stream_bytes[cast(str, next(iter(kinds)))] += size - state_bytes
        elif kinds:
            sizes = list(map(len, lines))
            for name in kinds:
                picked = list(compress(sizes, map(eq, repeat(name), streams)))
                self.stream_bytes[cast(str, name)] += sum(picked) + len(picked)

    def anomaly(self, kind: str, line: Buf, stream: str | None) -> None:
        self.anomaly_count += 1
        if len(self.anomalies) < MAX_ANOMALIES:
            text = bytes(line[:_EXCERPT]).decode("utf-8", errors="backslashreplace")
            suffix = "..." if len(line) > _EXCERPT else ""
            self.anomalies.append(
                Anomaly(kind, self.lines + 1, self.nbytes, text + suffix, stream),
            )

    def schema(self, forwarded: Buf, stream: str, parsed: dict[str, Any] | None) -> None:
        """Keep a SCHEMA's `schema` and `key_properties` (as forwarded)."""
        try:
            schema, keys = singer.read_schema(forwarded, parsed)
        except (msgspec.DecodeError, msgspec.ValidationError):
            schema, keys = None, ()
        self.schemas[stream] = schema
        self.key_properties[stream] = keys

    def state(self, forwarded: Buf) -> None:
        self.states_seen += 1
        self.last_state = singer.state_value(forwarded)

    def message(self, line: Buf, seen: singer.Line) -> None:
        """A SCHEMA's or STATE's content kept as it came (no injection)."""
        if seen.type == "SCHEMA" and seen.stream is not None:
            self.schema(line, seen.stream, seen.parsed)
        elif seen.type == "STATE":
            self.state(line)

    def stats(
        self, extra: Iterable[tuple[str, int, int, float | None, float | None]], **times: Any
    ) -> RelayStats:
        """RelayStats, with `extra` (name, records, bytes, first, last) counted elsewhere added."""
        streams = {name: Counter(c) for name, c in self.streams.items()}
        stream_bytes = Counter(self.stream_bytes)
        first, last = dict(self.first_record), dict(self.last_record)
        types = Counter(self.types)
        for name, records, nbytes, began, ended in extra:
            if records:
                streams.setdefault(name, Counter())["RECORD"] += records
                stream_bytes[name] += nbytes
                types["RECORD"] += records
            if began is not None and ended is not None:
                first[name] = min(first.get(name, began), began)
                last[name] = max(last.get(name, ended), ended)
        return RelayStats(
            streams={
                name: StreamStats(
                    name=name,
                    counts=dict(counts),
                    bytes=stream_bytes[name],
                    first_record_at=first.get(name),
                    last_record_at=last.get(name),
                    schema=self.schemas.get(name),
                    key_properties=self.key_properties.get(name, ()),
                )
                for name, counts in streams.items()
            },
            counts=dict(types),
            lines=self.lines,
            bytes=self.nbytes,
            anomalies=tuple(self.anomalies),
            anomaly_count=self.anomaly_count,
            states_seen=self.states_seen,
            last_state=singer.decode_value(self.last_state)
            if self.last_state is not None
            else None,
            **times,
        )


def _indexes(items: list[str | None], value: None, count: int) -> list[int]:
    """The positions of the first `count` occurrences of `value` (found in C loops)."""
    found: list[int] = []
    i = -1
    for _ in range(count):
        i = items.index(value, i + 1)
        found.append(i)
    return found


@dataclass(slots=True)
class _Injector:
    """What an Injection changes in the stream: the column in SCHEMAs and RECORDs, STATE context."""

    injection: Injection
    state_context: dict[str, str] | None = None
    column_cell: bytes = b""
    column_streams: set[str] = field(default_factory=set)  # latest SCHEMA got the column
    prefixes: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.injection.state_context is not None:
            self.state_context = dict(self.injection.state_context)
        self.column_cell = msgspec.json.encode(self.injection.correlation_id)

    def rewrites(self, names: Iterable[str], has_state: bool) -> bool:
        """Whether the injection changes some line of a fast-path region."""
        if has_state and self.state_context is not None:
            return True
        return any(name in self.column_streams for name in names)

    def schema(self, line: Buf, stream: str) -> Buf:
        """The SCHEMA as forwarded: with the column when the stream is selected and can take it."""
        selected = self.injection.record_column_streams
        if "*" not in selected and stream not in selected:
            return line
        patched = _with_ending(line, singer.add_column_to_schema)
        if patched is line:
            self.column_streams.discard(stream)
            return line
        self.column_streams.add(stream)
        self.prefixes[stream] = singer.record_prefixes(stream)
        return patched

    def state(self, line: Buf) -> Buf:
        context = self.state_context
        if context is None:
            return line
        return _with_ending(line, lambda ln: singer.merge_state_context(ln, context))

    def record(self, line: Buf, stream: str) -> Buf:
        if stream not in self.column_streams:
            return line
        prefixes, cell = self.prefixes[stream], self.column_cell
        return _with_ending(line, lambda ln: singer.add_column_to_record(ln, prefixes, cell))

    def spliced(self, lines: Sequence[Buf], kinds: Counter[str]) -> Sequence[Buf] | None:
        """The column added to every RECORD of the region by a few whole-region replaces.

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


@dataclass(frozen=True, slots=True)
class _Fed:
    """One chunk's whole lines: what to forward (when not passed through) and, if asked, lines."""

    pieces: list[Buf | memoryview]
    lines: list[Buf] | None


class _PyScanner:
    """The pure-Python scanner: msgspec batch decodes, exact per-line path when they fail."""

    def __init__(
        self,
        counts: _Counts,
        injector: _Injector | None,
        keys: KeyCollector | None,
        forward: bool,
    ) -> None:
        self.counts = counts
        self.injector = injector
        self.keys = keys
        self.forward = forward  # the relay writes what feed() returns (not passed through)
        self.tail = bytearray()  # the partial last line, carried to the next chunk

    def feed(self, data: bytes, now: float) -> _Fed | None:
        """Count the whole lines `data` completes (end of input when empty)."""
        rest = 0
        if data:
            lines: list[Buf] = list(data.split(b"\n"))
            if len(lines) == 1:
                self.tail += data  # a long line: memory grows with the line, not the stream
                return None
            rest = len(lines[0]) + 1
            size = len(data) - len(lines[-1]) + len(self.tail)
            if self.tail:
                self.tail += lines[0]
                lines[0] = self.tail
            self.tail = bytearray(lines.pop())
            ended = True
        elif self.tail:
            lines, size, ended = [self.tail], len(self.tail), False
            self.tail = bytearray()
        else:
            return None
        try:
            out = self._region(lines, ended, size, now, data, rest)
        except _Strict as stop:
            if self.keys is not None:
                self.keys.feed(lines[: stop.keep])
            stop.pieces = [_joined(lines[: stop.keep], True)] if stop.keep else []
            raise
        if self.keys is not None:
            self.keys.feed(lines)
        if not self.forward:
            return _Fed([], lines)
        return _Fed([_joined(lines if out is None else out, ended)], lines)

    def _region(
        self, lines: list[Buf], ended: bool, size: int, now: float, chunk: bytes, rest: int
    ) -> Sequence[Buf] | None:
        """Count whole lines; the lines as the sink must get them when an injection changed any.

        `chunk[rest:]` holds all lines but the first, still as read (for one UTF-8 check).
        """
        try:
            # The common case in one C loop: every line a RECORD with a stream, or a STATE.
            streams = list(map(_stream_of, map(singer.RECORD_OR_STATE.decode, lines)))
            _check_utf8(lines[0], chunk, rest)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._one_by_one(lines, _heads(lines, chunk, rest), now, ended)
        except UnicodeDecodeError:
            return self._one_by_one(lines, None, now, ended)
        kinds = Counter(streams)
        states = kinds.pop(None, 0)
        names = cast("set[str]", kinds.keys())
        if not ended or not names <= self.counts.schemas.keys():
            return self._one_by_one(lines, _heads(lines, b"", 0), now, ended)
        state_at = _indexes(streams, None, states)
        forwarded: Sequence[Buf] = lines
        out: Sequence[Buf] | None = None
        injector = self.injector
        if injector is not None and injector.rewrites(names, states > 0):
            if states and injector.state_context is not None:
                forwarded = list(lines)
                for i in state_at:
                    forwarded[i] = injector.state(lines[i])
            out = (
                injector.spliced(forwarded, kinds) if names & injector.column_streams else forwarded
            )
            if out is None:
                return self._one_by_one(lines, _heads(lines, b"", 0), now, ended)
        self.counts.records(lines, streams, kinds, state_at, size, now)
        for i in state_at:
            self.counts.state(forwarded[i])
        return out

    def _one_by_one(
        self, lines: Sequence[Buf], heads: list[singer.Head] | None, now: float, ended: bool
    ) -> list[Buf] | None:
        """The exact path: one line at a time, in order (schemas, anomalies, injections)."""
        out: list[Buf] = []
        changed = False
        last = len(lines) - 1
        injector = self.injector
        for i, line in enumerate(lines):
            size = len(line) + (1 if ended or i < last else 0)  # the input's last may lack \n
            try:
                seen = self.counts.line(line, size, now, heads[i] if heads is not None else None)
            except _Strict as stop:
                stop.keep = i
                raise
            if injector is None:
                self.counts.message(line, seen)
                continue
            forwarded = line
            if seen.type == "SCHEMA" and seen.stream is not None:
                forwarded = injector.schema(line, seen.stream)
                self.counts.schema(
                    forwarded, seen.stream, None if forwarded is not line else seen.parsed
                )
            elif seen.type == "RECORD" and seen.stream is not None:
                forwarded = injector.record(line, seen.stream)
            elif seen.type == "STATE":
                forwarded = injector.state(line)
                self.counts.state(forwarded)
            changed = changed or forwarded is not line
            out.append(forwarded)
        return out if changed else None

    def finish(self) -> None:
        """Nothing is held back: keys went to the KeySet region by region."""

    def extra(self) -> list[tuple[str, int, int, float | None, float | None]]:
        return []


def _heads(lines: Sequence[Buf], chunk: bytes, rest: int) -> list[singer.Head] | None:
    """`type` and `stream` of every line, or None if some line needs the exact path."""
    try:
        heads = list(map(singer.HEAD.decode, lines))
        _check_utf8(lines[0], chunk, rest)
    except _DECODE_ERRORS:
        return None
    return heads


class _CScanner:
    """The compiled scanner: C counts clean RECORDs and their keys; Python sees only the rest.

    Every line the C code does not accept (SCHEMA, STATE, anomalies, unknown streams, ...) comes
    back as an event and takes the pure-Python exact path, so the results are the same.
    """

    def __init__(
        self, counts: _Counts, keys: KeyCollector | None, want_lines: bool, forward: bool
    ) -> None:
        module, _reason = scanner.compiled()
        assert module is not None  # noqa: S101 - chosen by scanner.use_compiled()
        self.counts = counts
        self.keys = keys
        self.want_lines = want_lines
        self.forward = forward
        self.c = module.Scanner()
        self.tail = bytearray()

    def feed(self, data: bytes, now: float) -> _Fed | None:
        """Count the whole lines `data` completes (end of input when empty)."""
        regions: list[tuple[Buf, int, int]] = []
        if not data:
            if not self.tail:
                return None
            regions.append((self.tail, 0, len(self.tail)))
            self.tail = bytearray()
        else:
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                self.tail += data  # a long line: memory grows with the line, not the stream
                return None
            start = 0
            if self.tail:
                start = data.index(b"\n") + 1
                self.tail += data[:start]
                regions.append((self.tail, 0, len(self.tail)))
            if start < cut:
                regions.append((data, start, cut))
            self.tail = bytearray(data[cut:])
        for n, (buf, start, stop) in enumerate(regions):
            try:
                self._region(buf, start, stop, now)
            except _Strict as halt:
                done = [memoryview(b)[a:z] for b, a, z in regions[:n]]
                halt.pieces = [*done, memoryview(buf)[start : halt.at]]
                raise
        if self.c.key_count > _DRAIN_KEYS or self.c.key_bytes > _DRAIN_BYTES:
            self.finish()
        pieces: list[Buf | memoryview] = []
        if self.forward or self.want_lines:
            pieces = [memoryview(b)[a:z] for b, a, z in regions]
        lines: list[Buf] | None = None
        if self.want_lines:
            body = b"".join(pieces)
            lines = list(body.split(b"\n"))
            if data:
                lines.pop()  # the empty piece after the last newline
        return _Fed(pieces, lines)

    def _region(self, buf: Buf, start: int, stop: int, now: float) -> None:
        """Scan whole lines in C; take each event line through the exact path."""
        scan, counts = self.c.scan, self.counts
        pos = start
        while pos < stop:
            lines, size, at, end = scan(buf, pos, stop, now)
            counts.lines += lines
            counts.nbytes += size
            if at < 0:
                return
            line = buf[at:end]
            try:
                seen = counts.line(line, end - at + (end < stop), now, None)
            except _Strict as halt:
                halt.at = at
                raise
            counts.message(line, seen)
            if self.keys is not None:
                self.keys.feed([line])
            if seen.type == "SCHEMA" and seen.stream is not None:
                self._register(seen.stream)
            pos = end + 1

    def _register(self, stream: str) -> None:
        """Tell C a stream has a SCHEMA, and its key properties when keys are collected."""
        names = self.keys.key_names(stream) if self.keys is not None else None
        try:
            self.c.register(
                stream.encode("utf-8"),
                tuple(name.encode("utf-8") for name in names) if names else None,
            )
        except UnicodeEncodeError:
            return  # a lone surrogate: its lines stay events, counted in Python

    def finish(self) -> None:
        """Hand the keys gathered in C to the KeySet (its memory budget applies there)."""
        if self.keys is None:
            return
        for name, keys in self.c.drain():
            self.keys.keys.add_many(name.decode("utf-8"), keys)

    def extra(self) -> list[tuple[str, int, int, float | None, float | None]]:
        return [(name.decode("utf-8"), *rest) for name, *rest in self.c.streams()]


# Keys held in C before they move to the KeySet: a table this small stays in the CPU's caches.
_DRAIN_KEYS = 1 << 14
_DRAIN_BYTES = 8 << 20


def _snapshot(
    counts: _Counts, extra: list[tuple[str, int, int, float | None, float | None]], elapsed: float
) -> RelayProgress:
    # list(): one C call, safe while the scan thread adds a stream (the GIL is held for it)
    records = {name: c["RECORD"] for name, c in list(counts.streams.items())}
    for name, n, *_ in extra:
        records[name] = records.get(name, 0) + n
    return RelayProgress(records=records, bytes=counts.nbytes, lines=counts.lines, elapsed=elapsed)


@dataclass(slots=True)
class _Pump:
    """The relay loop's own state: what was sent, when the first byte came, how it ended."""

    source: int
    sink: int
    scan: _PyScanner | _CScanner
    passthrough: bool
    hasher: _Digest | None
    chunk_size: int
    sent: int = 0
    first_byte_at: float | None = None
    stopped: bool = False  # strict mode stopped the stream
    counting_error: str | None = None
    on_sent: Callable[[Buf | memoryview], None] | None = None

    def send(self, data: Buf | memoryview) -> None:
        try:
            self.sent += write_all(self.sink, data)
        except WriteError as exc:
            self.sent += exc.written
            accepted = bytes(memoryview(data)[: exc.written])
            if self.hasher is not None:
                self.hasher.update(accepted)
            if self.on_sent is not None:
                self.on_sent(accepted)
            raise
        if self.hasher is not None:
            self.hasher.update(data)
        if self.on_sent is not None:
            self.on_sent(data)

    def run(
        self,
        on_lines: Callable[[list[Buf]], None] | None,
        progress: Callable[[RelayProgress], None] | None,
        progress_interval: float,
    ) -> None:
        """Read, forward, count, until end of input (or strict mode stops the stream).

        Passing through with the compiled scanner, a chunk is counted on a second thread while
        the next one is read and forwarded (the scan releases the GIL); at most one chunk waits,
        so memory stays flat.
        """
        began = time.monotonic()
        next_progress = began + progress_interval
        behind = None
        if self.passthrough and on_lines is None and isinstance(self.scan, _CScanner):
            behind = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flext-scan")
        pending: Future[_Fed | None] | None = None
        try:
            while True:
                data = os.read(self.source, self.chunk_size)
                now = time.time()
                if self.first_byte_at is None and data:
                    self.first_byte_at = now
                if self.passthrough and data:
                    self.send(data)
                if behind is not None:
                    self._wait(pending)
                    pending = (
                        behind.submit(self.scan.feed, data, now)
                        if self.counting_error is None
                        else None
                    )
                elif self.counting_error is None:
                    self._forward(self._count(data, now), on_lines)
                    if self.stopped:
                        return
                clock = time.monotonic()
                if progress is not None and clock >= next_progress:
                    next_progress = clock + progress_interval
                    progress(_snapshot(self.scan.counts, self.scan.extra(), clock - began))
                if not data:
                    return
        finally:
            if behind is not None:
                self._wait(pending)  # also when the sink closed: the counts stay whole
                behind.shutdown()

    def _wait(self, pending: Future[_Fed | None] | None) -> None:
        """The previous chunk's count, done on the second thread."""
        if pending is None:
            return
        try:
            pending.result()
        except Exception as exc:  # noqa: BLE001 - a counting bug never costs a record: reported
            self._counting_failed(exc)

    def _forward(self, fed: _Fed | None, on_lines: Callable[[list[Buf]], None] | None) -> None:
        if fed is None:
            return
        if on_lines is not None and fed.lines is not None:
            on_lines(fed.lines)
        if not self.passthrough:
            for piece in fed.pieces:
                self.send(piece)

    def _counting_failed(self, exc: Exception) -> None:
        self.counting_error = f"{type(exc).__name__}: {exc}"
        structlog.get_logger().error("relay_counting_failed", error=self.counting_error)

    def _count(self, data: bytes, now: float) -> _Fed | None:
        try:
            return self.scan.feed(data, now)
        except _Strict as stop:
            self.stopped = True
            for piece in stop.pieces:
                self.send(piece)
            return None
        except Exception as exc:  # a counting bug must never cost a record
            if not self.passthrough:
                raise  # nothing was forwarded for these lines: the caller must know
            self._counting_failed(exc)
            return None


def _scanner_for(
    strict: bool,
    injection: Injection | None,
    keys: KeySet | None,
    on_lines: Callable[[list[Buf]], None] | None,
) -> _PyScanner | _CScanner:
    """The compiled scanner when it is usable and no injection rewrites lines, else Python's."""
    counts = _Counts(strict=strict)
    collector = KeyCollector(keys) if keys is not None else None
    forward = strict or injection is not None  # else every chunk went out before counting
    if injection is None and scanner.use_compiled():
        return _CScanner(counts, collector, want_lines=on_lines is not None, forward=forward)
    injector = _Injector(injection) if injection is not None else None
    return _PyScanner(counts, injector, collector, forward)


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
    keys: KeySet | None = None,
    on_sent: Callable[[Buf | memoryview], None] | None = None,
) -> RelayStats:
    """Copy `source` to `sink` until end of input, counting every Singer message.

    `keys` (optional) receives the canonical key of every record of a stream whose latest
    SCHEMA has key properties (issue 10). `on_lines` sees each region of whole lines once they
    are counted; without either the hot path is unchanged. `on_sent` sees every piece the sink
    accepted, as sent (raw chunks: the compiled scanner keeps its fast path).

    The sink closing early (the target died) ends the relay at once with
    `sink_closed_early=True`; what to do with the source is the caller's decision. In strict
    mode the first anomalous line is not forwarded: StrictModeError (with `.stats`) is raised.
    """
    started_at = time.time()
    scan = _scanner_for(strict, injection, keys, on_lines)
    # Without strict mode nor injection each chunk goes out before it is looked at.
    passthrough = not strict and injection is None
    pump = _Pump(source, sink, scan, passthrough, _Digest() if digest else None, chunk_size)
    pump.on_sent = on_sent
    closed_early = False
    enlarge_pipe(source)
    enlarge_pipe(sink)
    try:
        pump.run(on_lines, progress, progress_interval)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
        closed_early = True
    finally:
        if close_sink:
            _close(sink)
    scan.finish()  # keys gathered before a counting error are kept, as the Python path does
    stats = scan.counts.stats(
        scan.extra(),
        digest=pump.hasher.hexdigest() if pump.hasher is not None else None,  # waits for the thread
        started_at=started_at,
        first_byte_at=pump.first_byte_at,
        ended_at=time.time(),
        sink_closed_early=closed_early,
        bytes_out=pump.sent,
        counting_error=pump.counting_error,
    )
    if closed_early:
        structlog.get_logger().warning(
            "sink_closed_early", lines=stats.lines, records=stats.records()
        )
    if pump.stopped:
        first = stats.anomalies[-1] if stats.anomalies else None
        where = f"line {first.line} (byte {first.offset}): {first.kind}" if first else "a line"
        raise StrictModeError(
            f"strict mode stopped the stream at {where}; that line and the rest were not"
            " forwarded. Fix the tap's output or run without --strict to forward and report it",
            stats,
        )
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

    def update(self, data: Buf | memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._hash.update, data)

    def hexdigest(self) -> str:
        if self._pending is not None:
            self._pending.result()
        self._pool.shutdown()
        return self._hash.hexdigest()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # EPIPE on close of a dead pipe: the stats already say so
        structlog.get_logger().debug("sink_close_failed", reason=exc.strerror)
