"""FlextContext: correlation, service, request and timing context on one ContextVar.

Every value is immutable and every context manager restores the outer value on exit, exceptions
included, so threads and asyncio tasks never see each other's context. The importers
(`set_from_context`, `from_env`) never raise on bad input: a bad field is dropped with a warning and
the rest is applied in one step, so a caller's request path is never half-updated.

Import precedence for the correlation id, first found wins:
`FLEXT_CORRELATION_ID` / `X-Correlation-Id`, then the trace id of `TRACEPARENT` (as a UUID), then
`MELTANO_RUN_ID`. Header and variable names match case-insensitively, `-` and `_` alike, so HTTP
headers, lowercase gRPC metadata and a process environment all work.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar

from flext_meltano_context import ids

MAX_VALUE_LENGTH = 256
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")
_TEXT = re.compile(r"[\x20-\x7e]{1,256}")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ContextState:
    """Everything the current context knows; replaced, never mutated."""

    correlation_id: str | None = None
    parent_correlation_id: str | None = None
    service_name: str | None = None
    service_version: str | None = None
    user_id: str | None = None
    operation_name: str | None = None
    request_id: str | None = None
    request_metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    operation: dict[str, Any] | None = None  # the innermost timed operation (a tree node)


_EMPTY_STATE = ContextState()
_current: ContextVar[ContextState] = ContextVar("flext_context", default=_EMPTY_STATE)


def current() -> ContextState:
    """The context of the running thread or task."""
    return _current.get()


@contextmanager
def _bound(**changes: Any) -> Iterator[ContextState]:
    token = _current.set(replace(_current.get(), **changes))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def _warn(event: str, **fields: Any) -> None:
    # structlog is imported here, not at module import: `flext-context --help` stays fast.
    import structlog

    structlog.get_logger("flext_meltano_context.context").warning(event, **fields)


def _check_id(kind: str, value: str) -> str:
    if not _ID.fullmatch(value):
        shown = repr(value)[:40]
        raise ValueError(
            f"{kind} {shown} is not a valid id: use 1-128 letters, digits and ._:/@+=-"
        )
    return value


class Correlation:
    """Correlation ids: one per unit of work, parents linking nested units."""

    @staticmethod
    @contextmanager
    def new_correlation() -> Iterator[str]:
        """Run the block under a fresh UUIDv7 correlation id; the outer one becomes its parent."""
        outer = _current.get().correlation_id
        cid = ids.uuid7()
        with _bound(correlation_id=cid, parent_correlation_id=outer):
            yield cid

    @staticmethod
    @contextmanager
    def inherit_correlation(environ: Mapping[str, str] | None = None) -> Iterator[str]:
        """Run the block under the current id, else one imported from `environ`, else a new one."""
        state = _current.get()
        if state.correlation_id is not None:
            yield state.correlation_id
            return
        import os

        imported = _parse(os.environ if environ is None else environ)
        changes = {k: v for k, v in imported.items() if k in _CORRELATION_FIELDS}
        changes.setdefault("correlation_id", ids.uuid7())
        with _bound(**changes) as ctx:
            assert ctx.correlation_id is not None  # noqa: S101 - set on the line above
            yield ctx.correlation_id

    @staticmethod
    def get_correlation_id() -> str | None:
        return _current.get().correlation_id

    @staticmethod
    def get_parent_correlation_id() -> str | None:
        return _current.get().parent_correlation_id

    @staticmethod
    def set_correlation_id(correlation_id: str) -> None:
        """Set the correlation id of the current context (not restored: prefer new_correlation)."""
        _current.set(
            replace(
                _current.get(),
                correlation_id=_check_id("correlation id", correlation_id),
            )
        )


class Service:
    """The service (process, plugin, API) doing the work."""

    @staticmethod
    @contextmanager
    def service_context(name: str, version: str | None = None) -> Iterator[None]:
        """Run the block as service `name` (and `version`)."""
        with _bound(service_name=name, service_version=version):
            yield

    @staticmethod
    def get_service_name() -> str | None:
        return _current.get().service_name

    @staticmethod
    def get_service_version() -> str | None:
        return _current.get().service_version


class Request:
    """The request being served: who asked, for what."""

    @staticmethod
    @contextmanager
    def request_context(
        user_id: str | None = None,
        operation_name: str | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Iterator[None]:
        """Run the block for one request; `request_id` defaults to a new UUIDv7."""
        frozen = MappingProxyType(dict(metadata)) if metadata else _EMPTY
        with _bound(
            user_id=user_id,
            operation_name=operation_name,
            request_id=request_id or ids.uuid7(),
            request_metadata=frozen,
        ):
            yield

    @staticmethod
    def get_user_id() -> str | None:
        return _current.get().user_id

    @staticmethod
    def get_operation_name() -> str | None:
        return _current.get().operation_name

    @staticmethod
    def get_request_id() -> str | None:
        return _current.get().request_id

    @staticmethod
    def get_request_metadata() -> dict[str, Any]:
        return dict(_current.get().request_metadata)


class Performance:
    """Timed operations; nested ones form a tree linked by span ids."""

    @staticmethod
    @contextmanager
    def timed_operation(name: str) -> Iterator[dict[str, Any]]:
        """Time the block; the yielded dict is filled with the timing when the block ends."""
        parent = _current.get().operation
        op: dict[str, Any] = {
            "operation": name,
            "span_id": ids.new_span_id(),
            "parent_span_id": parent["span_id"] if parent else None,
            "start_time": time.time(),
            "end_time": None,
            "duration_seconds": None,
            "metadata": {},
            "children": [],
        }
        if parent is not None:
            parent["children"].append(op)
        started = time.perf_counter()
        try:
            with _bound(operation=op):
                yield op
        finally:
            op["duration_seconds"] = time.perf_counter() - started
            op["end_time"] = op["start_time"] + op["duration_seconds"]

    @staticmethod
    def add_operation_metadata(key: str, value: Any) -> None:
        """Attach `key: value` to the innermost timed operation (ignored outside one)."""
        op = _current.get().operation
        if op is None:
            _warn(
                "operation_metadata_ignored",
                key=key,
                reason="no timed operation is running",
            )
            return
        op["metadata"][key] = value

    @staticmethod
    def get_operation_metadata() -> dict[str, Any]:
        op = _current.get().operation
        return dict(op["metadata"]) if op else {}


# Import: normalized name -> ContextState field. Earlier names win within one field.
_IMPORT_NAMES: dict[str, tuple[str, ...]] = {
    "correlation_id": ("flext_correlation_id", "x_correlation_id"),
    "parent_correlation_id": ("flext_parent_correlation_id", "x_parent_correlation_id"),
    "service_name": ("flext_service_name", "x_service_name"),
    "service_version": ("flext_service_version", "x_service_version"),
    "user_id": ("flext_user_id", "x_user_id"),
    "operation_name": ("flext_operation_name", "x_operation_name"),
    "request_id": ("flext_request_id", "x_request_id"),
}
_ID_FIELDS = frozenset({"correlation_id", "parent_correlation_id", "request_id"})
_CORRELATION_FIELDS = frozenset({"correlation_id", "parent_correlation_id"})


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _parse(mapping: Mapping[str, Any]) -> dict[str, str]:
    """Validated context fields from headers, metadata or environment; bad ones dropped, warned."""
    found: dict[str, str] = {}
    try:
        items = list(mapping.items())
    except Exception as exc:  # noqa: BLE001 - an importer must never raise into the caller
        _warn("context_import_rejected", reason=f"not a mapping: {type(exc).__name__}")
        return {}
    normalized: dict[str, Any] = {}
    for key, value in items:
        if isinstance(key, str):
            normalized.setdefault(_normalize(key), value)
    for target, names in _IMPORT_NAMES.items():
        for name in names:
            if name not in normalized:
                continue
            value = normalized[name]
            if _valid(target, value):
                found[target] = value
                break
            _warn(
                "context_value_ignored",
                name=name,
                reason=_why(value),
                value=_excerpt(value),
            )
    if "correlation_id" not in found:
        for name, parse in (
            ("traceparent", _from_traceparent),
            ("meltano_run_id", _from_run_id),
        ):
            if name in normalized:
                value = normalized[name]
                cid = parse(value)
                if cid is not None:
                    found["correlation_id"] = cid
                    break
                _warn(
                    "context_value_ignored",
                    name=name,
                    reason=_why(value),
                    value=_excerpt(value),
                )
    return found


def _valid(target: str, value: Any) -> bool:
    if not isinstance(value, str):
        return False
    pattern = _ID if target in _ID_FIELDS else _TEXT
    return pattern.fullmatch(value) is not None


def _why(value: Any) -> str:
    if not isinstance(value, str):
        return f"not a string but {type(value).__name__}"
    if len(value) > MAX_VALUE_LENGTH:
        return f"{len(value)} characters, over the {MAX_VALUE_LENGTH} allowed"
    return "malformed"


def _excerpt(value: Any) -> str:
    return repr(value)[:40]


def _from_traceparent(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > MAX_VALUE_LENGTH:
        return None
    parsed = ids.parse_traceparent(value)
    return ids.uuid_of_trace_id(parsed[0]) if parsed else None


def _from_run_id(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) and ids.is_uuid(value) else None


class Serialization:
    """Carrying the context across processes and services."""

    @staticmethod
    def get_correlation_context() -> dict[str, str]:
        """Propagation headers for an outgoing request (only the values that are set)."""
        state = _current.get()
        headers: dict[str, str] = {}
        pairs = (
            ("X-Correlation-Id", state.correlation_id),
            ("X-Parent-Correlation-Id", state.parent_correlation_id),
            ("X-Service-Name", state.service_name),
            ("X-Service-Version", state.service_version),
            ("X-Request-Id", state.request_id),
            ("X-User-Id", state.user_id),
            ("X-Operation-Name", state.operation_name),
        )
        headers.update({name: value for name, value in pairs if value is not None})
        if (tp := _traceparent(state)) is not None:
            headers["traceparent"] = tp
        return headers

    @staticmethod
    def set_from_context(mapping: Mapping[str, Any]) -> dict[str, str]:
        """Import headers, gRPC metadata or an environment; returns the fields applied."""
        found = _parse(mapping)
        if found:
            fields: dict[str, Any] = dict(found)
            _current.set(replace(_current.get(), **fields))
        return found

    @staticmethod
    def get_full_context() -> dict[str, Any]:
        """Everything current, JSON-serializable."""
        state = _current.get()
        op = state.operation
        return {
            "correlation_id": state.correlation_id,
            "parent_correlation_id": state.parent_correlation_id,
            "service_name": state.service_name,
            "service_version": state.service_version,
            "user_id": state.user_id,
            "operation_name": state.operation_name,
            "request_id": state.request_id,
            "request_metadata": dict(state.request_metadata),
            "operation": op["operation"] if op else None,
            "span_id": op["span_id"] if op else None,
            "trace_id": ids.trace_id_of(state.correlation_id) if state.correlation_id else None,
        }

    @staticmethod
    def to_env() -> dict[str, str]:
        """Environment variables that carry the context into a child process."""
        state = _current.get()
        env: dict[str, str] = {}
        pairs = (
            ("FLEXT_CORRELATION_ID", state.correlation_id),
            ("FLEXT_PARENT_CORRELATION_ID", state.parent_correlation_id),
            ("FLEXT_SERVICE_NAME", state.service_name),
            ("FLEXT_SERVICE_VERSION", state.service_version),
            ("FLEXT_REQUEST_ID", state.request_id),
        )
        env.update({name: value for name, value in pairs if value is not None})
        if state.correlation_id is not None and ids.is_uuid(state.correlation_id):
            env["MELTANO_RUN_ID"] = state.correlation_id.lower()
        if (tp := _traceparent(state)) is not None:
            env["TRACEPARENT"] = tp
        return env

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Import the context a parent process exported (`os.environ` by default)."""
        import os

        return Serialization.set_from_context(os.environ if environ is None else environ)


def _traceparent(state: ContextState) -> str | None:
    if state.correlation_id is None or (trace := ids.trace_id_of(state.correlation_id)) is None:
        return None
    span = state.operation["span_id"] if state.operation else ids.new_span_id()
    return ids.traceparent(trace, span)


class Utilities:
    """Reading and resetting the whole context."""

    @staticmethod
    def get_context_summary() -> str:
        """One readable line, e.g. `correlation=0192... service=etl@1.0 operation=extract`."""
        full = Serialization.get_full_context()
        service = full["service_name"]
        if service and full["service_version"]:
            service = f"{service}@{full['service_version']}"
        parts = {
            "correlation": full["correlation_id"],
            "parent": full["parent_correlation_id"],
            "service": service,
            "request": full["request_id"],
            "user": full["user_id"],
            "operation": full["operation"] or full["operation_name"],
        }
        text = " ".join(f"{k}={v}" for k, v in parts.items() if v)
        return text or "(empty context)"

    @staticmethod
    def clear_context() -> None:
        """Forget everything in the current context."""
        _current.set(_EMPTY_STATE)


class FlextContext:
    """The FLEXT context API: `FlextContext.Correlation.new_correlation()` and friends."""

    Correlation: ClassVar[type[Correlation]] = Correlation
    Service: ClassVar[type[Service]] = Service
    Request: ClassVar[type[Request]] = Request
    Performance: ClassVar[type[Performance]] = Performance
    Serialization: ClassVar[type[Serialization]] = Serialization
    Utilities: ClassVar[type[Utilities]] = Utilities
