"""Identifiers: UUIDv7 run and correlation ids, W3C trace and span ids.

One UUIDv7 serves as a Meltano run id, an OpenLineage runId and (its 32 hex digits) a W3C trace id.
Python 3.11 has no `uuid.uuid7`, so it is written here after RFC 9562 section 5.7.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

_lock = threading.Lock()
_last_ms = 0
_last_seq = 0


def uuid7() -> str:
    """A new UUIDv7 string: 48-bit Unix milliseconds, then random bits; monotonic per process."""
    global _last_ms, _last_seq
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # Same (or a backwards) millisecond: bump a 12-bit counter so ids stay ordered.
            ms = _last_ms
            _last_seq += 1
            if _last_seq > 0xFFF:
                ms += 1
                _last_seq = 0
        else:
            _last_seq = int.from_bytes(os.urandom(2), "big") & 0x7FF  # leave room to count up
        _last_ms = ms
        seq = _last_seq
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand
    return str(uuid.UUID(int=value))


def is_uuid(value: str) -> bool:
    """True when `value` is a canonical UUID string (any version), as Meltano's `--run-id` wants."""
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except (ValueError, AttributeError, TypeError):
        return False


def trace_id_of(value: str) -> str | None:
    """The W3C trace id for a UUID id (its 32 hex digits), None for ids that are not UUIDs."""
    if not is_uuid(value):
        return None
    hex_ = uuid.UUID(value).hex
    return None if hex_ == "0" * 32 else hex_


def uuid_of_trace_id(trace_id: str) -> str:
    """The UUID string whose hex digits are `trace_id` (the inverse of `trace_id_of`)."""
    return str(uuid.UUID(hex=trace_id))


def new_span_id() -> str:
    """A random non-zero 16-hex-digit W3C span id."""
    while True:
        span = os.urandom(8).hex()
        if span != "0" * 16:
            return span


def traceparent(trace_id: str, span_id: str) -> str:
    """A W3C `traceparent` header value, version 00, sampled."""
    return f"00-{trace_id}-{span_id}-01"


def parse_traceparent(value: str) -> tuple[str, str] | None:
    """(trace id, span id) of a valid W3C `traceparent`, or None when malformed."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, _flags = match.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id
