"""The `flext-context` command line: parse, call one function, map errors to exit codes.

Each command imports what it needs inside its body, so `flext-context --help` loads only click.
Exit codes: 0 success, 1 a failed run or gate, 2 bad usage (nothing started), 128+N a signal.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

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
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
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


def _meltano_flag(name: str, envvar: str, text: str) -> Callable[[F], F]:
    return click.option(
        name, is_flag=True, default=False, envvar=envvar, show_envvar=True, help=text
    )


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("blocks", nargs=-1)
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
@click.option(
    "--dry-run",
    is_flag=True,
    help="Resolve the blocks and print the plan (commands, state ids, where catalog and state "
    "come from); start nothing.",
)
@_meltano_flag(
    "--full-refresh", "MELTANO_RUN_FULL_REFRESH", "Ignore stored state: extract everything."
)
@_meltano_flag(
    "--refresh-catalog",
    "MELTANO_RUN_REFRESH_CATALOG",
    "Drop the cached catalog so the tap's discovery runs again.",
)
@_meltano_flag(
    "--no-state-update",
    "MELTANO_RUN_NO_STATE_UPDATE",
    "Run without state: none loaded, none stored (as meltano run).",
)
@click.option(
    "--force",
    "-f",
    is_flag=True,
    envvar="MELTANO_RUN_FORCE",
    show_envvar=True,
    help="Run even if another run holds the state lock.",
)
@click.option(
    "--state-id-suffix",
    envvar="MELTANO_RUN_STATE_ID_SUFFIX",
    show_envvar=True,
    help="Meltano: append this to each pipeline's state id, as meltano run.",
)
@click.option(
    "--state-strategy",
    type=click.Choice(["auto", "merge", "overwrite"]),
    default="auto",
    show_default=True,
    envvar="MELTANO_RUN_STATE_STRATEGY",
    show_envvar=True,
    help="merge: merge the new state into the stored one; overwrite: replace it; auto: merge "
    "only under --full-refresh (Meltano's state service rules).",
)
@click.option(
    "--run-id",
    metavar="UUID",
    envvar="MELTANO_RUN_ID",
    show_envvar=True,
    help="The invocation's correlation id (a UUID), shared by every pipeline and child.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    envvar="MELTANO_RUN_TIMEOUT",
    show_envvar=True,
    help="Stop the invocation gracefully after this many seconds, as meltano run (exit 1); "
    "each pipeline also gets it as FLEXT_CONTEXT_TIMEOUT.",
)
@click.option(
    "--install",
    "install",
    flag_value="install",
    default=None,
    help="Meltano: install the plugins the blocks name that are missing or changed, before "
    "anything runs (as meltano run; Meltano 4.4 reads no variable for this).",
)
@click.option(
    "--no-install",
    "install",
    flag_value="no_install",
    help="Meltano: install nothing; the plugins must be installed (the default here).",
)
@click.option(
    "--only-install",
    "install",
    flag_value="only_install",
    help="Meltano: (re)install the plugins the blocks name, then exit 0 without running.",
)
@click.option(
    "--strict/--no-strict",
    default=None,
    help="Fail on the first malformed Singer message (FLEXT_CONTEXT_STRICT).",
)
@click.option(
    "--record-column",
    "record_column",
    metavar="STREAMS",
    default=None,
    help="Comma-separated streams (* for all) whose records get _sdc_correlation_id "
    "(FLEXT_CONTEXT_RECORD_COLUMN_STREAMS).",
)
@click.option(
    "--inject-state/--no-inject-state",
    default=None,
    help="Merge flext_context into the STATE messages the target sees "
    "(FLEXT_CONTEXT_INJECT_STATE).",
)
@click.option(
    "--landing/--no-landing",
    default=None,
    help="Count what landed in the destination after the load (FLEXT_CONTEXT_LANDING).",
)
@click.option(
    "--grace-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="How long a stopped child may take to finish (FLEXT_CONTEXT_GRACE_SECONDS).",
)
@click.option(
    "--log",
    "log_path",
    metavar="PATH|URL",
    default=None,
    help="The lineage log or PostgreSQL store to append to (FLEXT_CONTEXT_LINEAGE_PATH).",
)
@click.option(
    "--result-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the invocation's result (correlation id, run ids, status, records and landing "
    "per pipeline) to this file as JSON.",
)
@click.option(
    "--target-config",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The target's config, to count what landed (default: its --config, or Meltano's).",
)
@_exits
def run(
    blocks: tuple[str, ...],
    tap_cmd: str | None,
    target_cmd: str | None,
    transform_cmd: tuple[str, ...],
    state_in: Path | None,
    state_out: Path | None,
    dry_run: bool,
    full_refresh: bool,
    refresh_catalog: bool,
    no_state_update: bool,
    force: bool,
    state_id_suffix: str | None,
    state_strategy: str,
    run_id: str | None,
    timeout: float | None,
    install: str | None,
    strict: bool | None,
    record_column: str | None,
    inject_state: bool | None,
    landing: bool | None,
    grace_seconds: float | None,
    log_path: str | None,
    result_json: Path | None,
    target_config: Path | None,
) -> None:
    """Run BLOCKS as `meltano run` does, each pipeline counted, with one correlation id.

    \b
    BLOCKS: tap/target pairs, mappings between them, PLUGIN:COMMAND blocks and job names from
    meltano.yml, left to right; a failure skips the rest.
    \b
    Under Meltano:  meltano invoke flext-context run tap-x target-y [dbt-x:run] [JOB ...]
    Standalone:     flext-context run --tap-cmd "tap-x -c c.json" --target-cmd "target-y"
    Each option wins over its environment variable. Exit codes: 0 success, 1 a failed run, 2 bad
    usage (nothing started), 130/143 stopped by a signal. A summary goes to stderr; the lineage
    log gets every event of the run.
    """
    import os

    from flext_meltano_context import dryrun, options
    from flext_meltano_context import invocation as runner

    overrides = options.setting_overrides(
        strict=strict,
        record_column=record_column,
        inject_state=inject_state,
        landing=landing,
        grace_seconds=grace_seconds,
        log_path=log_path,
        timeout=timeout,
    )
    flags = options.flags(
        full_refresh=full_refresh,
        refresh_catalog=refresh_catalog,
        no_state_update=no_state_update,
        force=force,
        state_id_suffix=state_id_suffix,
        state_strategy=state_strategy,
        run_id=run_id,
        timeout=timeout,
        install=install,
    )
    env = {**os.environ, **overrides}
    if tap_cmd is not None or target_cmd is not None:
        if blocks:
            raise_usage("give either plugin names or --tap-cmd/--target-cmd, not both")
        steps = options.standalone_steps(
            tap_cmd, target_cmd, transform_cmd, state_in, state_out, flags, target_config
        )
        words: tuple[str, ...] = ()
        text = None
    else:
        if state_in is not None or state_out is not None or transform_cmd:
            raise_usage("--state, --state-out and --transform-cmd are for standalone mode")
        if not blocks:
            raise_usage(
                "name the blocks to run: 'run TAP TARGET [PLUGIN:COMMAND ...]' or a job, or use "
                "--tap-cmd/--target-cmd"
            )
        from flext_meltano_context.meltano import discard_prestarted

        # The Meltano helper is started beside the block parse; one that no pipeline took
        # (a dry run, only-install, a failure before the first pipeline) ends with the command.
        click.get_current_context().call_on_close(discard_prestarted)
        plan, steps = options.meltano_steps(blocks, env, flags, target_config)
        words = plan.words
        text = dryrun.describe(plan, flags, env) if dry_run else None
    if dry_run:
        click.echo(text if text is not None else dryrun.describe_standalone(steps))
        return
    if words and flags.install is not None:
        options.install(plan, env, flags.install)
        if flags.install == "only_install":
            return
    result = runner.run_steps(steps, env=env, flags=flags, words=words)
    if result_json is not None:
        from flext_meltano_context import result as result_file

        result_file.write(result, result_json)
    error = result.error
    if error is not None:
        raise error


def raise_usage(message: str) -> NoReturn:
    from flext_meltano_context.errors import UsageError

    raise UsageError(message)


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
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report to this file (atomically) instead of stdout.",
)
@_LOG_OPTION
@_exits
def report(
    run_id: str | None, last: bool, fmt: str, output: Path | None, log_path: str | None
) -> None:
    """Report one run (RUN_ID or a unique prefix of it, or --last) from the lineage log."""
    import json

    from flext_meltano_context.errors import UsageError
    from flext_meltano_context.lineage.report import (
        build_report,
        child_records,
        resolve_run_id,
        run_records,
    )

    if run_id and last:
        raise UsageError("give a RUN_ID or --last, not both")
    path = _open_lineage(log_path)
    records = run_records(path, resolve_run_id(path, run_id))
    if fmt == "openlineage":
        from flext_meltano_context.lineage.openlineage import run_events

        text = "".join(json.dumps(event, sort_keys=True) + "\n" for event in run_events(records))
    else:
        data = build_report(records, child_records(path, records))
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
    help="Fail when a stream has more than P percent fewer records than the pipeline's previous "
    "successful run.",
    metavar="P",
)
@click.option(
    "--pipeline",
    default=None,
    help="Check only this pipeline (its name, e.g. tap-x-to-target-y): its run within the "
    "invocation checked, or its last run. An invocation's runs are otherwise checked each.",
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
    pipeline: str | None,
    log_path: str | None,
) -> None:
    """CI gate on one run: exit 0 when every rule holds, 1 with one line per violated rule.

    For an invocation of several pipelines (its parent run) the rules apply to each pipeline's
    run, or to the one --pipeline names; --require-success also to the invocation itself.
    """
    from flext_meltano_context.errors import UsageError
    from flext_meltano_context.lineage import gate
    from flext_meltano_context.lineage.report import build_report, resolve_run_id

    if run_id and last:
        raise UsageError("give a RUN_ID or --last, not both")
    minimums = _min_records(min_records)
    path = _open_lineage(log_path)
    runs, parent = _runs_to_check(path, resolve_run_id(path, run_id), pipeline, run_id is None)
    problems: list[str] = []
    if parent is not None and require_success and pipeline is None:
        problems += gate.violations(build_report(parent), require_success=True)
    passed = []
    for records in runs:
        data = build_report(records)
        previous = gate.previous_success(path, data) if max_drop_pct is not None else None
        found = gate.violations(
            data,
            require_success=require_success,
            min_records=minimums,
            max_drop_pct=max_drop_pct,
            previous=previous,
            require_landed=require_landed,
            allow_unchecked=allow_unchecked,
        )
        name = data["pipeline"]["name"]
        problems += [f"{name}: {problem}" if parent is not None else problem for problem in found]
        if max_drop_pct is not None and previous is None:
            click.echo(
                f"note: no earlier successful run of {name!r}; "
                "--max-drop-pct had nothing to compare with",
                err=True,
            )
        compared = f"; compared with run {previous['run_id']}" if previous else ""
        passed.append(f"run {data['run_id']} ({data['status']}){compared}")
    for problem in problems:
        click.echo(f"check failed: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"check passed: {', '.join(passed)}", err=True)


def _runs_to_check(
    path: LineageStore, run_id: str, pipeline: str | None, latest: bool
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]] | None]:
    """The runs `check` applies its rules to, and the invocation's own records when a parent."""
    from flext_meltano_context.errors import UsageError
    from flext_meltano_context.lineage.report import build_report, list_runs, run_records

    records = run_records(path, run_id)
    children: list[str] = []
    for record in records:
        if record.get("event") == "run_completed":
            children = [str(c) for c in (record.get("data") or {}).get("child_run_ids") or []]
    if children:
        runs = [run_records(path, child) for child in children]
        if pipeline is not None:
            runs = [r for r in runs if build_report(r)["pipeline"]["name"] == pipeline]
            if not runs:
                raise UsageError(f"invocation {run_id} ran no pipeline named {pipeline!r}")
        return runs, records
    if pipeline is not None and build_report(records)["pipeline"]["name"] != pipeline:
        found = list_runs(path, pipeline=pipeline) if latest else []
        if not found:
            raise UsageError(f"no run of pipeline {pipeline!r} to check in {path}")
        return [run_records(path, found[-1].run_id)], None
    return [records], None


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
