"""The `flext-context` command line: parse, call one function, map errors to exit codes.

Each command imports what it needs inside its body, so `flext-context --help` loads only click.
Exit codes: 0 success, 1 a failed run or gate, 2 bad usage (nothing started), 128+N a signal.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from flext_meltano_context.__about__ import __version__

F = TypeVar("F", bound=Callable[..., Any])


def _exits(func: F) -> F:
    """Turn FlextContextError into one clear stderr line and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from flext_meltano_context.errors import FlextContextError

        try:
            return func(*args, **kwargs)
        except FlextContextError as exc:
            click.echo(f"flext-context: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="flext-context")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    envvar="FLEXT_CONTEXT_LOG_FORMAT",
    help="Log lines on stderr: console on a terminal, JSON lines otherwise (auto).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    envvar="FLEXT_CONTEXT_LOG_LEVEL",
    help="Least severe log level shown.",
)
def cli(log_format: str, log_level: str) -> None:
    """Observability and lineage for Meltano/Singer pipelines.

    Runs tap, target and dbt with one correlation id, relays the Singer stream byte for byte while
    counting every message, keeps Singer state safe, and records an audit trail of each run.
    stdout carries data only; logs and summaries go to stderr.

    \b
    Under Meltano:  meltano invoke flext-context run tap-x target-y [dbt-x:run]
    Standalone:     flext-context run --tap-cmd "tap-x --config c.json" --target-cmd "target-y"
    In a pipe:      tap-x | flext-context relay --stats s.json | target-y
    """
    from flext_meltano_context import logs

    logs.configure(log_format, log_level)  # type: ignore[arg-type]  # click.Choice guarantees it


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="flext-context")
