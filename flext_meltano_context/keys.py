"""Distinct primary keys per stream, collected from relayed lines for landing checks by key.

The landing check asks the destination which of the keys the relay forwarded are there
(issue 10), so each keyed stream's distinct key values are kept in a canonical byte form that the
pure-Python collector and the compiled scanner produce alike (issue 14):

- a key is the concatenation of one component per key property, in `key_properties` order;
- a component is a tag byte, a 4-byte little-endian payload length, and the payload:
  `I` integer (decimal digits, `-` sign, no leading zeros: `1`, `1.0` and `1e0` are `I1`),
  `D` a finite non-integral number (`'%.17g' % value`), `S` a string (its UTF-8 bytes, escapes
  resolved; a lone surrogate as `surrogatepass` encodes it), `T`/`F` true/false, `N` null or a
  missing property (empty payloads), `O` anything else (an object, an array, `NaN`: the raw JSON
  text, stripped; such a key cannot be compared with a column).

`decode()` turns a canonical key back into typed Python values for the destination probe.
"""

from __future__ import annotations

import decimal
import heapq
import json
import re
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

Buf = bytes | bytearray
_LEN = struct.Struct("<I")
_SLOW_STRING = re.compile(rb'[\x00-\x1f"\\]')  # an escape, a quote or a control character
MAX_INTEGER_DIGITS = 400  # a wider integral number (1e999) is kept as `D`


class Uncomparable(str):
    """A key component that no column can be compared with (an object, an array, NaN)."""


def component(raw: bytes | None) -> bytes:
    """The canonical component of one key property's raw JSON value (None: missing)."""
    if raw is None:
        return b"N" + _LEN.pack(0)
    text = raw.strip()
    first = text[:1]
    # Fast paths for the usual keys (the landing probe reads a million of them): a plain
    # integer, and a string without escapes or control characters; same bytes as below.
    if text.isdigit() and (first != b"0" or len(text) == 1):
        return b"I" + _LEN.pack(len(text)) + text
    if first == b'"' and len(text) > 1 and text[-1:] == b'"':
        inner = text[1:-1]
        if not _SLOW_STRING.search(inner):
            try:
                inner.decode("utf-8")
            except UnicodeDecodeError:
                return _tagged(b"O", text)  # json.loads refuses it too
            return b"S" + _LEN.pack(len(inner)) + inner
    if first == b'"':
        try:
            value = json.loads(text)
        except ValueError:
            return _tagged(b"O", text)
        return _tagged(b"S", value.encode("utf-8", "surrogatepass"))
    if text == b"null":
        return b"N" + _LEN.pack(0)
    if text == b"true":
        return b"T" + _LEN.pack(0)
    if text == b"false":
        return b"F" + _LEN.pack(0)
    if first == b"-" or first.isdigit():
        number = _number(text)
        if number is not None:
            return number
    return _tagged(b"O", text)


def _number(text: bytes) -> bytes | None:
    try:
        msgspec.json.decode(text)  # a JSON number, as a target would read it
        value = decimal.Decimal(text.decode("ascii"))
    except (msgspec.DecodeError, decimal.InvalidOperation, UnicodeDecodeError):
        return None
    if not value.is_finite():
        return None
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # noqa: S101 - finite above
    if value == value.to_integral_value() and len(digits) + max(exponent, 0) <= MAX_INTEGER_DIGITS:
        return _tagged(b"I", str(int(value)).encode("ascii"))
    return _tagged(b"D", (b"%.17g" % float(value)))


def _tagged(tag: bytes, payload: bytes) -> bytes:
    return tag + _LEN.pack(len(payload)) + payload


def canonical(raw_values: Sequence[bytes | None]) -> bytes:
    """The canonical key of one record: its key properties' raw JSON values, in order."""
    return b"".join(map(component, raw_values))


def decode(key: bytes) -> tuple[Any, ...]:
    """A canonical key as typed values: int, float, str, bool, None, or Uncomparable."""
    out: list[Any] = []
    at = 0
    while at < len(key):
        tag = key[at : at + 1]
        (size,) = _LEN.unpack_from(key, at + 1)
        payload = key[at + 5 : at + 5 + size]
        at += 5 + size
        if tag == b"I":
            out.append(int(payload))
        elif tag == b"D":
            out.append(float(payload))
        elif tag == b"S":
            out.append(payload.decode("utf-8", "surrogatepass"))
        elif tag in (b"T", b"F"):
            out.append(tag == b"T")
        elif tag == b"N":
            out.append(None)
        else:
            out.append(Uncomparable(payload.decode("utf-8", "backslashreplace")))
    return tuple(out)


DEFAULT_BUDGET_MB = 256
# What one key costs in memory besides its bytes: the bytes object's header and allocator
# rounding (~40), its list slot and the list's over-allocation (~9), and the sort's merge buffer
# (~4). A list, not a set: a set's table costs 30-50 bytes a key more and doubles on growth,
# which is what made a set-backed KeySet pass its budget (benchmarks/keys.py).
_PER_KEY = 56
_RECORD = struct.Struct("<I")  # a spilled key: its length, then its bytes


class KeySet:
    """Distinct canonical keys per stream, in memory up to a budget, then spilled to disk.

    The interface the relay fills and the landing probe reads. Keys are appended to a list per
    stream; past `budget_bytes` the lists are sorted and stripped of repeats, and if that does not
    free half the budget they are written as sorted run files (one per stream and spill) in a
    directory of their own (under `spill_dir`, the run's work directory, else the system's
    temporary directory). Reading merges the runs and the keys in memory and skips repeats, so
    `iter()` yields each distinct key once and `count()` is exact. `close()` removes the files
    (so does garbage collection).
    """

    def __init__(
        self, budget_bytes: int = DEFAULT_BUDGET_MB << 20, spill_dir: Path | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self._parent = spill_dir
        self._keys: dict[str, list[bytes]] = {}
        self._size: dict[str, int] = {}  # mean key length per stream, for the estimate
        self._distinct: set[str] = set()  # streams whose list is sorted and without repeats
        self._runs: dict[str, list[Path]] = {}
        self._counted: dict[str, int] = {}  # exact distinct counts of spilled streams, cached
        self._used = 0
        self._dir: Path | None = None
        self._cleanup: weakref.finalize[Any, Any] | None = None
        self.spills = 0

    def add_many(self, stream: str, keys: Iterable[bytes]) -> None:
        batch = keys if isinstance(keys, list) else list(keys)
        if not batch:
            return
        held = self._keys.setdefault(stream, [])
        held.extend(batch)
        self._distinct.discard(stream)
        self._counted.pop(stream, None)
        mean = sum(map(len, batch)) // len(batch) + 1
        self._size[stream] = max(self._size.get(stream, 0), mean)
        self._used += len(batch) * (mean + _PER_KEY)
        if self._used > self.budget_bytes:
            self._shrink()

    def streams(self) -> list[str]:
        return sorted(self._keys.keys() | self._runs.keys())

    def count(self, stream: str) -> int:
        """The stream's distinct keys, exactly (a merge pass over spilled runs, then cached)."""
        if stream not in self._runs:
            return len(self._sorted(stream))
        if stream not in self._counted:
            self._counted[stream] = sum(1 for _ in self.iter(stream))
        return self._counted[stream]

    def iter(self, stream: str) -> Iterator[bytes]:
        """The stream's distinct keys, each once, in byte order."""
        held = self._sorted(stream)
        runs = self._runs.get(stream)
        if not runs:
            return iter(held)
        return _distinct(heapq.merge(held, *(_read_run(p) for p in runs)))

    @property
    def spilled(self) -> bool:
        return bool(self._runs)

    def _sorted(self, stream: str) -> list[bytes]:
        """The stream's keys in memory, sorted and without repeats (in place)."""
        held = self._keys.get(stream, [])
        if stream not in self._distinct:
            held.sort()
            _strip_repeats(held)
            self._distinct.add(stream)
        return held

    def _shrink(self) -> None:
        """Past the budget: drop repeats; spill when that does not free half of it."""
        for stream in self._keys:
            self._sorted(stream)
        self._used = sum(
            len(held) * (self._size[stream] + _PER_KEY) for stream, held in self._keys.items()
        )
        if self._used > self.budget_bytes // 2:
            self.spill()

    def spill(self) -> None:
        """Write every stream's keys in memory to a sorted run file and free that memory."""
        folder = self._folder()
        for stream in list(self._keys):
            held = self._sorted(stream)
            if not held:
                continue
            runs = self._runs.setdefault(stream, [])
            path = folder / f"{len(self._runs)}-{len(runs)}.keys"
            with path.open("wb", buffering=1 << 20) as out:
                pack = _RECORD.pack
                for key in held:
                    out.write(pack(len(key)))
                    out.write(key)
            runs.append(path)
            self._keys[stream] = []  # a new list: the old one and its keys are freed
            del held
        self._used = 0
        self.spills += 1

    def _folder(self) -> Path:
        if self._dir is None:
            if self._parent is not None:
                self._parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="flext-keys-", dir=self._parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def close(self) -> None:
        self._keys.clear()
        self._runs.clear()
        self._counted.clear()
        self._distinct.clear()
        self._used = 0
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup, self._dir = None, None


def _strip_repeats(ordered: list[bytes]) -> None:
    """Remove adjacent repeats from a sorted list, in place (no second list in memory)."""
    if len(ordered) < 2:
        return
    write = 1
    previous = ordered[0]
    for key in ordered:
        if key != previous:
            ordered[write] = key
            write += 1
            previous = key
    del ordered[write:]


def _read_run(path: Path) -> Iterator[bytes]:
    unpack = _RECORD.unpack
    with path.open("rb", buffering=1 << 20) as handle:
        while head := handle.read(4):
            (size,) = unpack(head)
            yield handle.read(size)


def _distinct(ordered: Iterable[bytes]) -> Iterator[bytes]:
    previous: bytes | None = None
    for key in ordered:
        if key != previous:
            yield key
            previous = key


def budget_from_env(environ: Mapping[str, str]) -> int:
    """The key set's memory budget in bytes, from FLEXT_CONTEXT_LANDING_KEY_BUDGET_MB."""
    from flext_meltano_context.errors import UsageError

    raw = environ.get("FLEXT_CONTEXT_LANDING_KEY_BUDGET_MB", "").strip()
    if not raw:
        return DEFAULT_BUDGET_MB << 20
    try:
        megabytes = float(raw)
    except ValueError:
        megabytes = -1.0
    if not megabytes > 0:
        raise UsageError(
            f"FLEXT_CONTEXT_LANDING_KEY_BUDGET_MB={raw[:20]!r} is not a positive number of "
            "megabytes (default 256)"
        )
    return int(megabytes * (1 << 20))


class _Head(msgspec.Struct, gc=False):
    type: str = ""
    stream: str | None = None


class _Schema(msgspec.Struct, gc=False):
    key_properties: list[str] | None = None


class _AnyRecord(msgspec.Struct, gc=False):
    record: dict[str, msgspec.Raw]


_ANY_RECORD: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_AnyRecord)
_MISSING = msgspec.Raw(b"")


class KeyCollector:
    """The pure-Python collector: fed whole lines, keeps canonical keys of keyed streams."""

    def __init__(self, keyset: KeySet | None = None) -> None:
        self.keys = keyset if keyset is not None else KeySet()
        self._head = msgspec.json.Decoder(_Head)
        self._schema = msgspec.json.Decoder(_Schema)
        self._decoders: dict[str, tuple[tuple[str, ...], msgspec.json.Decoder[Any]]] = {}
        self._key_names: dict[str, tuple[str, ...]] = {}
        self.keyed: dict[str, bool] = {}

    def feed(self, lines: Sequence[Buf]) -> None:
        """Look at one region of whole lines (as the relay read them)."""
        head, decoders = self._head.decode, self._decoders
        found: dict[str, list[bytes]] = {}
        for line in lines:
            try:
                msg = head(line)
                if msg.type == "RECORD" and msg.stream in decoders:
                    names, decoder = decoders[msg.stream]
                    record = decoder.decode(line).record
                    if decoder is _ANY_RECORD:
                        raws = [_raw(record.get(name, _MISSING)) for name in names]
                    else:
                        raws = [_raw(getattr(record, name)) for name in names]
                    found.setdefault(msg.stream, []).append(canonical(raws))
                elif msg.type == "SCHEMA" and msg.stream is not None:
                    self._on_schema(msg.stream, line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # the relay reports malformed lines; a key we cannot read is no key
        for stream, keys in found.items():
            self.keys.add_many(stream, keys)

    def _on_schema(self, stream: str, line: Buf) -> None:
        keys = tuple(self._schema.decode(line).key_properties or ())
        self.keyed[stream] = bool(keys)
        if not keys:
            self._decoders.pop(stream, None)
            self._key_names.pop(stream, None)
            return
        unique = list(dict.fromkeys(keys))  # ["id", "id"] is legal JSON: one field, twice
        try:
            fields = [(f"k{i}", msgspec.Raw, msgspec.Raw(b"")) for i in range(len(unique))]
            record_type = msgspec.defstruct(
                "KeyValues", fields, rename=dict(zip([f[0] for f in fields], unique, strict=True))
            )
            wrapper = msgspec.defstruct("KeyedRecord", [("record", record_type)])
            names = tuple(f"k{unique.index(key)}" for key in keys)
            self._decoders[stream] = (names, msgspec.json.Decoder(wrapper))
        except ValueError:  # a name msgspec cannot rename to (a backslash, a quote): a dict
            self._decoders[stream] = (keys, _ANY_RECORD)
        self._key_names[stream] = keys

    def key_names(self, stream: str) -> tuple[str, ...] | None:
        """The key properties whose values are collected for `stream` now; None if unkeyed."""
        return self._key_names.get(stream)

    def distinct(self) -> dict[str, int]:
        """Distinct key values per keyed stream."""
        return {stream: self.keys.count(stream) for stream in self.keys.streams()}


def _raw(value: msgspec.Raw) -> bytes | None:
    return bytes(value) if len(value) else None  # an empty Raw: the property was missing
