"""Singer lines as bytes: read only `type`/`stream`, patch only what an injection asks for.

The relay forwards bytes; this module decides what a line is and, when asked, rewrites exactly
one line. Rewrites keep every value the tap wrote as raw JSON text (`msgspec.Raw`), so numbers,
escapes and key order inside values survive: a float in a record or a state stays the same text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

COLUMN = "_sdc_correlation_id"
COLUMN_KEY = b'"_sdc_correlation_id"'
COLUMN_SCHEMA = msgspec.Raw(b'{"type":["string","null"]}')
STATE_KEY = "flext_context"
# Types that name a stream; a line of these without a string `stream` is an anomaly.
STREAM_TYPES = frozenset({"RECORD", "SCHEMA", "ACTIVATE_VERSION", "BATCH"})


class Head(msgspec.Struct, frozen=True, gc=False):
    """The two fields the hot path needs; everything else in the line is skipped, never built."""

    type: str
    stream: str | None = None


class _Record(msgspec.Struct, tag="RECORD", tag_field="type", gc=False):
    stream: str


class _State(msgspec.Struct, tag="STATE", tag_field="type", gc=False):
    stream: None = None  # a STATE naming a stream is unusual: take the exact path


class _Body(msgspec.Struct, gc=False):
    """SCHEMA and STATE lines: the parts kept for lineage and state, still as raw JSON."""

    type: str
    stream: str | None = None
    schema: msgspec.Raw = msgspec.Raw()  # empty when absent (msgspec has no `Raw | None`)
    key_properties: msgspec.Raw = msgspec.Raw()
    value: msgspec.Raw = msgspec.Raw()


HEAD = msgspec.json.Decoder(Head)
# The hot path: a line decodes here only if it is a RECORD with a stream or a plain STATE.
RECORD_OR_STATE = msgspec.json.Decoder(_Record | _State)
_BODY = msgspec.json.Decoder(_Body)
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENCODE = msgspec.json.Encoder().encode
_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


@dataclass(frozen=True, slots=True)
class Line:
    """What a line is: its type and stream, or why it is not a Singer message."""

    type: str | None
    stream: str | None
    anomaly: str | None
    parsed: dict[str, Any] | None = None  # set when only the standard library could parse it


def classify(line: bytes | bytearray) -> Line:
    """The slow, exact path for one line (no newline): used when the fast batch decode failed.

    The arbiter of "is it JSON" is the standard library, as in singer-python and singer-sdk
    targets: it accepts `NaN` and `Infinity`, which msgspec refuses.
    """
    if not line.strip():
        return Line(None, None, "blank_line")
    anomaly = None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        anomaly = "invalid_utf8"
        text = line.decode("utf-8", errors="surrogateescape")
    parsed = None
    if anomaly is None:
        try:
            head = HEAD.decode(line)
        except _ERRORS:
            pass  # not necessarily bad: fall through to the standard library below
        else:
            return _checked(head.type, head.stream, None, None)
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return Line(None, None, anomaly or "invalid_json")
    if not isinstance(parsed, dict):
        return Line(None, None, anomaly or "not_an_object")
    kind = parsed.get("type")
    if not isinstance(kind, str):
        return Line(None, None, anomaly or "missing_type")
    stream = parsed.get("stream")
    return _checked(kind, stream if isinstance(stream, str) else None, anomaly, parsed)


def _checked(kind: str, stream: str | None, anomaly: str | None, parsed: Any) -> Line:
    if anomaly is None and stream is None and kind in STREAM_TYPES:
        anomaly = "missing_stream"
    return Line(kind, stream, anomaly, parsed)


def read_schema(
    line: bytes | bytearray, parsed: dict[str, Any] | None
) -> tuple[Any, tuple[str, ...]]:
    """A SCHEMA line's `schema` (decoded) and `key_properties` (strings only)."""
    if parsed is None:
        body = _BODY.decode(line)
        schema = msgspec.json.decode(body.schema) if len(body.schema) else None
        keys = msgspec.json.decode(body.key_properties) if len(body.key_properties) else None
    else:
        schema, keys = parsed.get("schema"), parsed.get("key_properties")
    key_properties = tuple(k for k in keys if isinstance(k, str)) if isinstance(keys, list) else ()
    return (schema if isinstance(schema, dict) else None), key_properties


def schema_summary(schema: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, Any]:
    """A stream's columns with their declared types and its key properties, for lineage."""
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    columns: dict[str, Any] = {}
    if isinstance(properties, Mapping):
        for name, spec in properties.items():
            kind = spec.get("type") if isinstance(spec, Mapping) else None
            columns[str(name)] = kind if isinstance(kind, (str, list)) else None
    return {"properties": columns, "key_properties": list(keys)}


def state_value(line: bytes | bytearray) -> bytes | None:
    """A STATE line's `value` as raw JSON text (decoded only when someone asks for it)."""
    try:
        value = _BODY.decode(line).value
    except _ERRORS:
        return None
    return bytes(value) if len(value) else None


def decode_value(raw: bytes) -> Any:
    """Raw JSON to Python: integers stay integers; `NaN` is accepted as the targets accept it."""
    try:
        return msgspec.json.decode(raw)
    except _ERRORS:
        pass
    try:  # invalid UTF-8 (already reported as an anomaly) stays visible as surrogate escapes
        return json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return None


def merge_state_context(line: bytes, context: dict[str, str]) -> bytes | None:
    """The STATE line with `context` merged into `value["flext_context"]`; None if not possible.

    Only `value` gains a key; every other value stays the tap's raw text, so bookmarks and their
    numbers are untouched (FACTS: a separate STATE of our own would erase the bookmarks).
    """
    try:
        fields = _FIELDS.decode(line)
        value = _FIELDS.decode(fields["value"])
    except (*_ERRORS, KeyError):
        return None
    merged: dict[str, Any] = {}
    if STATE_KEY in value:
        try:
            old = msgspec.json.decode(value[STATE_KEY])
        except _ERRORS:
            old = None
        if isinstance(old, dict):
            merged.update(old)
    merged.update(context)
    value[STATE_KEY] = msgspec.Raw(_ENCODE(merged))
    fields["value"] = msgspec.Raw(_ENCODE(value))
    return _ENCODE(fields)


def add_column_to_schema(line: bytes) -> bytes | None:
    """The SCHEMA line with the `_sdc_correlation_id` property; None if it has no `properties`.

    Deterministic: the same input line always gives the same output. Never touches
    `key_properties` nor `required`.
    """
    try:
        fields = _FIELDS.decode(line)
        schema = _FIELDS.decode(fields["schema"])
        properties = _FIELDS.decode(schema["properties"])
    except (*_ERRORS, KeyError):
        return None
    properties[COLUMN] = COLUMN_SCHEMA
    schema["properties"] = msgspec.Raw(_ENCODE(properties))
    fields["schema"] = msgspec.Raw(_ENCODE(schema))
    return _ENCODE(fields)


def record_prefixes(stream: str) -> tuple[bytes, bytes]:
    """How singer-sdk and singer-python start a RECORD line of `stream`, up to the record's `{`."""
    name = _ENCODE(stream)
    return (
        b'{"type":"RECORD","stream":' + name + b',"record":{',
        b'{"type": "RECORD", "stream": ' + name + b', "record": {',
    )


def add_column_to_record(line: bytes, prefixes: tuple[bytes, bytes], cell: bytes) -> bytes:
    """The RECORD line with `"_sdc_correlation_id": <cell>` as the record's first property.

    Lines written by singer-sdk or singer-python are spliced (the record's bytes are not parsed
    again); any other layout goes through raw-JSON fields. Unparseable lines stay as they are.
    """
    if COLUMN_KEY not in line:
        for prefix in prefixes:
            if line.startswith(prefix):
                rest = line[len(prefix) :]
                comma = b"" if rest.lstrip().startswith(b"}") else b","
                return b"".join((prefix, COLUMN_KEY, b":", cell, comma, rest))
    try:
        fields = _FIELDS.decode(line)
        record = _FIELDS.decode(fields["record"])
    except (*_ERRORS, KeyError):
        return line
    record[COLUMN] = msgspec.Raw(cell)
    fields["record"] = msgspec.Raw(_ENCODE(record))
    return _ENCODE(fields)
