"""Logging: structlog to stderr, with the current FlextContext on every event.

stdout carries data (the Singer stream, reports), so every log line goes to stderr. Only `cli.py`
calls `configure`; library code calls `structlog.get_logger()` and logs key-value events.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

from flext_meltano_context.context import current

LogFormat = Literal["auto", "console", "json"]


def add_context(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Put correlation id, service and operation of the current context on the event."""
    state = current()
    if state.correlation_id is not None:
        event_dict.setdefault("correlation_id", state.correlation_id)
    if state.service_name is not None:
        event_dict.setdefault("service", state.service_name)
    op = state.operation["operation"] if state.operation else state.operation_name
    if op is not None:
        event_dict.setdefault("operation", op)
    return event_dict


def configure(fmt: LogFormat = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Console lines on a terminal, JSON lines elsewhere or when asked; always stderr."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
