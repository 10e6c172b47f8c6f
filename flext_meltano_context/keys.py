"""Distinct primary keys per stream, collected from relayed lines for landing reconciliation.

An upserting target keeps one row per key, so the exact expectation for such a stream is the
number of distinct key values relayed, not the number of records (issue 7). Fed by the relay's
`on_lines` hook only when reconciliation asks for it: the plain relay never pays for it. Each
record is decoded for its key properties only (a struct per stream, other fields skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

Buf = bytes | bytearray


class _Head(msgspec.Struct, gc=False):
    type: str = ""
    stream: str | None = None


class _Schema(msgspec.Struct, gc=False):
    key_properties: list[str] | None = None


class KeyCollector:
    """Counts distinct key values per keyed stream; streams without keys are not tracked."""

    def __init__(self) -> None:
        self._head = msgspec.json.Decoder(_Head)
        self._schema = msgspec.json.Decoder(_Schema)
        self._decoders: dict[str, tuple[tuple[str, ...], msgspec.json.Decoder[Any]]] = {}
        self._seen: dict[str, set[Any]] = {}
        self.keyed: dict[str, bool] = {}

    def feed(self, lines: Sequence[Buf]) -> None:
        """Look at one region of whole lines (as the relay read them)."""
        head, decoders, seen = self._head.decode, self._decoders, self._seen
        for line in lines:
            try:
                msg = head(line)
                if msg.type == "RECORD" and msg.stream in decoders:
                    keys, decoder = decoders[msg.stream]
                    record = decoder.decode(line).record
                    seen[msg.stream].add(tuple(_raw(getattr(record, k)) for k in keys))
                elif msg.type == "SCHEMA" and msg.stream is not None:
                    self._on_schema(msg.stream, line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # the relay reports malformed lines; a key we cannot read is no key

    def _on_schema(self, stream: str, line: Buf) -> None:
        keys = tuple(self._schema.decode(line).key_properties or ())
        self.keyed[stream] = bool(keys)
        if not keys:
            self._decoders.pop(stream, None)
            return
        fields = [(f"k{i}", msgspec.Raw, None) for i in range(len(keys))]
        record_type = msgspec.defstruct(
            "KeyValues", fields, rename=dict(zip([f[0] for f in fields], keys, strict=True))
        )
        wrapper = msgspec.defstruct("KeyedRecord", [("record", record_type)])
        names = tuple(f[0] for f in fields)
        self._decoders[stream] = (names, msgspec.json.Decoder(wrapper))
        self._seen.setdefault(stream, set())

    def distinct(self) -> dict[str, int]:
        """Distinct key values per keyed stream."""
        return {stream: len(values) for stream, values in self._seen.items()}


def _raw(value: msgspec.Raw | None) -> bytes | None:
    return None if value is None else bytes(value)
