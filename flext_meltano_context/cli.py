"""The `flext-context` command line: parse, call one function, map errors to exit codes.

Each command imports what it needs inside its body, so `flext-context --help` loads only click.
Exit codes: 0 success, 1 a failed run or gate, 2 bad usage (nothing started), 128+N a signal.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from flext_meltano_context.__about__ import __version__

if TYPE_CHECKING:
    from flext_meltano_context.lineage.store import LineageStore

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


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """`--version`: the version, then which relay scanner is active (issue 14)."""
    if not value or ctx.resilient_parsing:
        return
    from flext_meltano_context import scanner

    click.echo(f"flext-context, version {__version__}\n{scanner.describe()}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the relay scanner in use, then exit.",
)
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


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("plugins", nargs=-1)
@click.option(
    "--tap-cmd", help="Standalone: the tap's command line (split like a shell, no shell)."
)
@click.option("--target-cmd", help="Standalone: the target's command line.")
@click.option(
    "--transform-cmd",
    multiple=True,
    help="Standalone: a command to run after a successful load (repeatable).",
)
@click.option(
    "--state",
    "state_in",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Standalone: resume from this state file (a bare state value, as --state-out writes).",
)
@click.option(
    "--state-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Standalone: write each state the target confirms here (atomically).",
)
@click.option("--full-refresh", is_flag=True, help="Ignore stored state: extract everything.")
@click.option("--state-id-suffix", help="Meltano: append this to the state id, as meltano run.")
@click.option("--force", is_flag=True, help="Run even if another run holds the state lock.")
@click.option(
    "--target-config",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Standalone: the target's config, to count what landed (default: its --config).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop the run gracefully after SECONDS, as on SIGTERM, and exit 1 "
    "(default: $FLEXT_CONTEXT_TIMEOUT, else $MELTANO_RUN_TIMEOUT).",
)
@_exits
def run(
    plugins: tuple[str, ...],
    tap_cmd: str | None,
    target_cmd: str | None,
    transform_cmd: tuple[str, ...],
    state_in: Path | None,
    state_out: Path | None,
    full_refresh: bool,
    state_id_suffix: str | None,
    force: bool,
    target_config: Path | None,
    timeout: float | None,
) -> None:
    """Run TAP TARGET [TRANSFORMER:COMMAND ...] with one correlation id, counted and recorded.

    \b
    Under Meltano:  meltano invoke flext-context run tap-x target-y [dbt-x:run]
    Standalone:     flext-context run --tap-cmd "tap-x -c c.json" --target-cmd "target-y"
    Exit codes: 0 success, 1 a failed run, 2 bad usage (nothing started), 130/143 stopped by a
    signal. A summary goes to stderr; the lineage log gets every event of the run.
    """
    import dataclasses
    import shlex

    from flext_meltano_context.errors import UsageError
    from flext_meltano_context.pipeline import execute
    from flext_meltano_context.progress import Progress, summary
    from flext_meltano_context.spec import PipelineSpec, Settings, step_name

    standalone = tap_cmd is not None or target_cmd is not None
    if standalone:
        if plugins:
            raise UsageError("give either plugin names or --tap-cmd/--target-cmd, not both")
        if tap_cmd is None or target_cmd is None:
            raise UsageError("standalone mode needs both --tap-cmd and --target-cmd")
        try:
            tap_argv, target_argv = shlex.split(tap_cmd), shlex.split(target_cmd)
            transforms = tuple(tuple(shlex.split(cmd)) for cmd in transform_cmd)
        except ValueError as exc:
            raise UsageError(f"cannot split a command line: {exc}") from exc
        if not tap_argv or not target_argv:
            raise UsageError("--tap-cmd and --target-cmd must not be empty")
        spec = PipelineSpec(
            tap=step_name(tap_argv),
            target=step_name(target_argv),
            tap_cmd=tuple(tap_argv),
            target_cmd=tuple(target_argv),
            transform_cmds=transforms,
            state_in=state_in,
            state_out=state_out,
            full_refresh=full_refresh,
            force=force,
            target_config=target_config,
        )
    else:
        if len(plugins) < 2:
            raise UsageError(
                "name a tap and a target: 'run TAP TARGET [TRANSFORMER:COMMAND ...]', or use "
                "--tap-cmd/--target-cmd"
            )
        if state_in is not None or state_out is not None or transform_cmd:
            raise UsageError("--state, --state-out and --transform-cmd are for standalone mode")
        spec = PipelineSpec(
            tap=plugins[0],
            target=plugins[1],
            transformers=tuple(plugins[2:]),
            full_refresh=full_refresh,
            state_id_suffix=state_id_suffix,
            force=force,
            target_config=target_config,
        )
    settings = Settings.from_env()
    if timeout is not None:
        settings = dataclasses.replace(settings, timeout_seconds=timeout)
    progress = Progress()
    try:
        result = execute(spec, progress=progress, settings=settings)
    finally:
        progress.finish()
    click.echo("\n".join([summary(result), *result.notes()]), err=True)
    if result.error is not None:
        raise result.error


# --- lineage: runs, report, verify, check (issue 5) -------------------------------------------

_LOG_OPTION = click.option(
    "--log",
    "log_path",
    metavar="PATH|URL",
    default=None,
    help="Lineage log: a JSONL file, a postgresql://user@host/db[?schema=S&table=T] store, or "
    "'systemdb' (default: $FLEXT_CONTEXT_LINEAGE_PATH, else .meltano/flext-context/"
    "lineage.jsonl under Meltano, else ./.flext-context/lineage.jsonl).",
)


def _open_lineage(log_path: str | None) -> LineageStore:
    """The lineage log or store `--log` names, else the configured one: the one way to open it."""
    import os

    from flext_meltano_context.lineage import default_log_path
    from flext_meltano_context.lineage.store import open_log

    if log_path is None:
        log_path = os.environ.get("FLEXT_CONTEXT_LINEAGE_PATH") or str(default_log_path())
    store = open_log(log_path)
    close = getattr(store, "close", None)
    if close is not None:
        click.get_current_context().call_on_close(close)
    return store


def _write_output(text: str, output: Path | None) -> None:
    """Text to stdout, or to `output` through a temp file and os.replace."""
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    from flext_meltano_context.errors import FlextContextError
    from flext_meltano_context.state import write_text_atomic

    try:
        write_text_atomic(output, text)
    except OSError as exc:
        raise FlextContextError(f"cannot write {output}: {exc.strerror}") from exc
    click.echo(f"wrote {output}", err=True)


@cli.command()
@_LOG_OPTION
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--pipeline", default=None, help="Only runs of this pipeline (its name).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "html"]),
    default="table",
    show_default=True,
    help="html: one self-contained page (use with -o FILE).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (atomically) instead of stdout.",
)
@_exits
def runs(
    log_path: str | None, limit: int, pipeline: str | None, fmt: str, output: Path | None
) -> None:
    """List recent runs, newest first: status, host, duration, records, correlation id."""
    import json

    from flext_meltano_context.lineage.report import list_runs
    from flext_meltano_context.lineage.runs_html import hosts as run_hosts

    store = _open_lineage(log_path)
    if fmt == "html":
        from flext_meltano_context.lineage.runs_html import overview, to_html

        _write_output(to_html(overview(store, limit=limit, pipeline=pipeline), str(store)), output)
        return
    found = list_runs(store, pipeline=pipeline)[-limit:][::-1]
    hosts = run_hosts(store, {run.run_id for run in found}) if found else {}
    if fmt == "json":
        listed = [{**run.to_dict(), "host": hosts.get(run.run_id)} for run in found]
        _write_output(json.dumps(listed, indent=2) + "\n", output)
        return
    if not found:
        click.echo(f"no runs in {store}", err=True)
        return
    header = (
        "RUN ID",
        "PIPELINE",
        "STATUS",
        "HOST",
        "STARTED",
        "DURATION",
        "RECORDS",
        "CORRELATION ID",
    )
    rows = [
        (
            run.run_id,
            run.pipeline,
            run.status,
            hosts.get(run.run_id, ""),
            (run.started_at or "")[:19].replace("T", " "),
            "" if run.duration_s is None else f"{run.duration_s:.1f}s",
            "" if run.records is None else str(run.records),
            run.correlation_id,
        )
        for run in found
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    text = "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in (header, *rows)
    )
    _write_output(text, output)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--last", is_flag=True, help="The last run in the log (the default).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "markdown", "html", "openlineage"]),
    default="json",
    show_default=True,
    help="openlineage: the run's RunEvents as JSON Lines.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@_LOG_OPTION
@_exits
def report(
    run_id: str | None, last: bool, fmt: str, output: Path | None, log_path: str | None
) -> None:
    """Report one run (RUN_ID or a unique prefix of it, or --last) from the lineage log."""
    import json

    from flext_meltano_context.errors import UsageError
    from flext_meltano_context.lineage.report import build_report, resolve_run_id, run_records

    if run_id and last:
        raise UsageError("give a RUN_ID or --last, not both")
    path = _open_lineage(log_path)
    records = run_records(path, resolve_run_id(path, run_id))
    if fmt == "openlineage":
        from flext_meltano_context.lineage.openlineage import run_events

        text = "".join(json.dumps(event, sort_keys=True) + "\n" for event in run_events(records))
    else:
        data = build_report(records)
        if fmt == "json":
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        elif fmt == "markdown":
            from flext_meltano_context.lineage.render import to_markdown

            text = to_markdown(data)
        else:
            from flext_meltano_context.lineage.render import to_html

            text = to_html(data)
    _write_output(text, output)


@cli.command()
@click.argument("path", required=False, metavar="[PATH|URL]")
@_LOG_OPTION
@_exits
def verify(path: str | None, log_path: str | None) -> None:
    """Check the lineage log's hash chain: exit 0 when intact, else name the first bad line.

    PATH (or --log) is a JSONL file or a PostgreSQL store; in a store the first edited, deleted
    or reordered row is named by its seq, plain SQL changes included.
    """
    from flext_meltano_context.errors import FlextContextError, UsageError

    if path is not None and log_path is not None and path != log_path:
        raise UsageError("give the log as PATH or as --log, not both")
    result = _open_lineage(path or log_path).verify()
    if not result.ok:
        raise FlextContextError(result.describe())
    click.echo(result.describe())
    for sealed in result.sealed:
        click.echo(
            f"note: line {sealed.line} is a partial line ({sealed.length} bytes at byte "
            f"{sealed.offset}) left by a crash and sealed by the next writer",
            err=True,
        )


@cli.group()
def lineage() -> None:
    """The lineage store: push the local log's events to a PostgreSQL store."""


@lineage.command("push")
@click.option(
    "--from",
    "source",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Import this JSONL log (all of it) instead of pushing the local spool.",
)
@click.option(
    "--to",
    "--log",
    "log_path",
    metavar="URL",
    default=None,
    help="The store (default: $FLEXT_CONTEXT_LINEAGE_PATH, a postgresql:// URL or 'systemdb').",
)
@_exits
def lineage_push(source: Path | None, log_path: str | None) -> None:
    """Send the events a store lacks, in order, each once (by run id and sequence number).

    Without --from, the local log (the spool the runs write first) is pushed from where the last
    push stopped. A log whose chain is broken is refused from the break on.
    """
    import os

    from flext_meltano_context.errors import UsageError
    from flext_meltano_context.lineage import default_log_path
    from flext_meltano_context.lineage.pg import PgStore
    from flext_meltano_context.lineage.push import push

    store = _open_lineage(log_path or os.environ.get("FLEXT_CONTEXT_LINEAGE_PATH") or "")
    if not isinstance(store, PgStore):
        raise UsageError(
            "no store to push to: give --to postgresql://... (or 'systemdb'), or set "
            "FLEXT_CONTEXT_LINEAGE_PATH to one"
        )
    spool = source if source is not None else default_log_path()
    try:
        result = push(spool, store, use_cursor=source is None)
    finally:
        store.close()
    click.echo(result.describe(spool, store), err=True)


def _min_records(values: tuple[str, ...]) -> dict[str, int]:
    from flext_meltano_context.errors import UsageError

    out = {}
    for value in values:
        stream, sep, number = value.rpartition("=")
        if not sep or not stream or not number.isdigit():
            raise UsageError(f"--min-records wants STREAM=N, got {value!r}")
        out[stream] = int(number)
    return out


@cli.command()
@click.argument("run_id", required=False)
@click.option("--last", is_flag=True, help="Check the last run in the log (the default).")
@click.option("--require-success", is_flag=True, help="Fail unless the run succeeded.")
@click.option(
    "--require-landed",
    is_flag=True,
    help="Fail unless every stream is proven landed: fails on missing rows, on a count_mismatch "
    "and on a stream not checked.",
)
@click.option(
    "--allow-unchecked",
    is_flag=True,
    help="With --require-landed: accept streams the landing check could not check.",
)
@click.option("--min-records", multiple=True, metavar="STREAM=N", help="Repeatable.")
@click.option(
    "--max-drop-pct",
    type=click.FloatRange(min=0),
    default=None,
    help="Fail when a stream has P%% fewer records than the pipeline's previous successful run.",
)
@_LOG_OPTION
@_exits
def check(
    run_id: str | None,
    last: bool,
    require_success: bool,
    require_landed: bool,
    allow_unchecked: bool,
    min_records: tuple[str, ...],
    max_drop_pct: float | None,
    log_path: str | None,
) -> None:
    """CI gate on one run: exit 0 when every rule holds, 1 with one line per violated rule."""
    from flext_meltano_context.errors import UsageError
    from flext_meltano_context.lineage import gate
    from flext_meltano_context.lineage.report import build_report, resolve_run_id, run_records

    if run_id and last:
        raise UsageError("give a RUN_ID or --last, not both")
    minimums = _min_records(min_records)
    path = _open_lineage(log_path)
    data = build_report(run_records(path, resolve_run_id(path, run_id)))
    previous = gate.previous_success(path, data) if max_drop_pct is not None else None
    problems = gate.violations(
        data,
        require_success=require_success,
        min_records=minimums,
        max_drop_pct=max_drop_pct,
        previous=previous,
        require_landed=require_landed,
        allow_unchecked=allow_unchecked,
    )
    if max_drop_pct is not None and previous is None:
        click.echo(
            f"note: no earlier successful run of {data['pipeline']['name']!r}; "
            "--max-drop-pct had nothing to compare with",
            err=True,
        )
    for problem in problems:
        click.echo(f"check failed: {problem}", err=True)
    if problems:
        sys.exit(1)
    compared = f"; compared with run {previous['run_id']}" if previous else ""
    click.echo(f"check passed: run {data['run_id']} ({data['status']}){compared}", err=True)


@cli.command("relay")
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the stats as JSON to this file (default: one JSON line on stderr).",
)
@click.option("--strict", is_flag=True, help="Stop before forwarding the first bad line; exit 1.")
@click.option("--digest", is_flag=True, help="Add the sha256 of the bytes forwarded to the stats.")
@click.option(
    "--inject-state-correlation",
    is_flag=True,
    help='Merge "flext_context": {"correlation_id": ...} into each STATE value forwarded.',
)
@click.option(
    "--record-column",
    "record_columns",
    multiple=True,
    metavar="STREAM",
    help="Add _sdc_correlation_id to this stream's SCHEMA and RECORDs (repeat; * = all).",
)
@_exits
def relay_command(
    stats_path: Path | None,
    strict: bool,
    digest: bool,
    inject_state_correlation: bool,
    record_columns: tuple[str, ...],
) -> None:
    """Relay a Singer stream from stdin to stdout byte for byte, counting every message.

    \b
    tap-x | flext-context relay --stats s.json | target-y
    The correlation id is FLEXT_CORRELATION_ID (or TRACEPARENT's trace id), else a new one.
    Exit 0 when everything was delivered; 1 if the target closed its input early or, with
    --strict, on the first bad line (the stats are written in both cases).
    """
    import json
    import os

    from flext_meltano_context.context import FlextContext
    from flext_meltano_context.errors import RelayError, StrictModeError
    from flext_meltano_context.relay import Injection, RelayStats, relay

    def write_stats(stats: RelayStats) -> None:
        text = json.dumps(stats.to_dict(), ensure_ascii=False)
        if stats_path is None:
            click.echo(text, err=True)
            return
        partial = stats_path.with_name(f".{stats_path.name}.partial")
        partial.write_text(text + "\n", encoding="utf-8")
        partial.replace(stats_path)

    with FlextContext.Correlation.inherit_correlation() as correlation_id:
        injection = None
        if inject_state_correlation or record_columns:
            context = {"correlation_id": correlation_id}
            run_id = os.environ.get("MELTANO_RUN_ID")
            if run_id:
                context["run_id"] = run_id
            injection = Injection(
                correlation_id=correlation_id,
                state_context=context if inject_state_correlation else None,
                record_column_streams=frozenset(record_columns),
            )
        try:
            stats = relay(0, 1, digest=digest, strict=strict, injection=injection)
        except StrictModeError as exc:
            write_stats(exc.stats)
            raise
        finally:
            # fd 1 is closed so the target sees end of input now; keep Python's stdout valid.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        write_stats(stats)
        if stats.sink_closed_early:
            raise RelayError(
                f"the reader of stdout closed it after {stats.lines} lines"
                f" ({stats.records()} records); the rest of stdin was not forwarded"
            )
