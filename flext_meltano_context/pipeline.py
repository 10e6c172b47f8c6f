"""One run of tap -> relay -> target (then transformer blocks): processes, state, lineage.

Meltano mode (under `meltano invoke`, `MELTANO_PROJECT_ROOT` set) launches every plugin as
`meltano invoke` would (see `preflight`) and keeps state exactly as `meltano run` does; standalone
mode runs any Singer commands with `--state`/`--state-out` files. `execute()` returns a RunResult
and raises only for bad input found before any child starts; `run_pipeline()` raises the run's
error as well.

Read top to bottom: `execute` prepares and cleans up; `_run` starts the children under one
`stopping.supervised` block, `_extract_load` relays and gathers the facts into an `Outcome`,
`outcome.judge` says what they mean, then the record, the landing check and the blocks.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from flext_meltano_context import dbt, ids, landing, preflight, runenv, state, stopping
from flext_meltano_context.__about__ import __version__
from flext_meltano_context.children import Exit
from flext_meltano_context.errors import (
    AbortedError,
    FlextContextError,
    StepError,
    StrictModeError,
    UsageError,
)
from flext_meltano_context.keys import KeyCollector
from flext_meltano_context.lineage.ci import ci_context
from flext_meltano_context.lineage.recorder import Recorder
from flext_meltano_context.outcome import Delivery, Outcome, RecentBytes, Verdict, judge
from flext_meltano_context.relay import Injection, RelayProgress, RelayStats, relay
from flext_meltano_context.spec import (
    CrossCheck,
    PhaseResult,
    PipelineSpec,
    RunResult,
    Settings,
    step_name,
)
from taps_wrapper.tap import Tap
from targets_wrapper.target import Target

__all__ = [
    "PhaseResult",
    "PipelineSpec",
    "RunResult",
    "Settings",
    "execute",
    "run_pipeline",
    "step_name",
]

log = structlog.get_logger("flext_meltano_context.pipeline")


def run_pipeline(spec: PipelineSpec, **kwargs: Any) -> RunResult:
    """Run the pipeline; raise its error (StepError, AbortedError...) when it did not succeed."""
    result = execute(spec, **kwargs)
    if result.error is not None:
        raise result.error
    return result


def execute(
    spec: PipelineSpec,
    *,
    environ: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    progress: Callable[[RelayProgress], None] | None = None,
) -> RunResult:
    """Run the pipeline once; bad input raises UsageError before anything starts."""
    env = dict(os.environ if environ is None else environ)
    conf = settings or Settings.from_env(env)
    if not spec.standalone and not env.get("MELTANO_PROJECT_ROOT"):
        raise UsageError(
            "plugin names need Meltano: run 'meltano invoke flext-context run TAP TARGET', "
            "or give commands with --tap-cmd and --target-cmd"
        )
    if spec.standalone and spec.target_cmd is None:
        raise UsageError("--tap-cmd needs --target-cmd")
    identity = runenv.identity_from_env(env, job_name=f"{spec.tap}-to-{spec.target}")
    started = time.time()
    prepared = (
        preflight.prepare_standalone(spec)
        if spec.standalone
        else preflight.prepare_meltano(spec, env, identity, use_server=conf.meltano_server)
    )
    try:  # from here on the lock, the work directory and the helper are released whatever happens
        run = _open_run(spec, prepared, env, conf, identity, started)
        try:
            return _run(run, progress)
        except BaseException as exc:
            # A run that ends by an exception (a signal before the tap started, a child that
            # could not be started) still gets its end in the log, so no run is left open there.
            status = "aborted" if isinstance(exc, (AbortedError, KeyboardInterrupt)) else "failed"
            run.recorder.record(
                "run_completed", _completed(run, status, None, str(exc) or repr(exc))
            )
            raise
        finally:
            run.recorder.close()
    finally:
        _release(prepared)


def _release(prepared: preflight.Prepared) -> None:
    if prepared.server is not None:
        prepared.server.close()
    if prepared.lock is not None:
        prepared.lock.release()
    if prepared.workdir is not None:
        shutil.rmtree(prepared.workdir, ignore_errors=True)


class SafeRecorder:
    """The recorder, but a failed lineage write is reported and the run goes on (issue 11).

    Killing tap and target because the disk is full would lose more than the record: the run
    ends normally, its state kept, and fails with the lineage error at the end.
    """

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self.error: str | None = None

    def record(self, event: str, data: Mapping[str, Any], *, fsync: bool = False) -> None:
        try:
            self._recorder.record(event, data, fsync=fsync)
        except FlextContextError as exc:
            if self.error is None:
                self.error = str(exc)
                log.error("lineage_write_failed", lineage_event=event, error=str(exc))

    def close(self) -> None:
        self._recorder.close()


@dataclass(frozen=True, slots=True)
class _Run:
    """Everything a run knows before its first child starts."""

    spec: PipelineSpec
    prepared: preflight.Prepared
    env: Mapping[str, str]
    conf: Settings
    identity: runenv.RunIdentity
    started: float
    recorder: SafeRecorder
    phase_ids: Mapping[str, str]
    tap_name: str
    target_name: str


def _names(spec: PipelineSpec, prepared: preflight.Prepared) -> tuple[str, str]:
    """How the run names its tap and target: plugin names, or the standalone commands' scripts."""
    if not spec.standalone:
        return spec.tap, spec.target
    return step_name(prepared.tap_argv), step_name(prepared.target_argv)


def _open_run(
    spec: PipelineSpec,
    prepared: preflight.Prepared,
    env: Mapping[str, str],
    conf: Settings,
    identity: runenv.RunIdentity,
    started: float,
) -> _Run:
    """The run's recorder, its `run_started` event written (this write must succeed)."""
    tap_name, target_name = _names(spec, prepared)
    phase_ids = {"extract": ids.uuid7(), "load": ids.uuid7()}
    phase_ids.update({block: ids.uuid7() for block, _argv in prepared.transform_argvs})
    recorder = Recorder(
        conf.lineage_path,
        run_id=identity.run_id,
        correlation_id=identity.correlation_id,
        environ=env,  # the store (FLEXT_CONTEXT_LINEAGE_PATH) and host name of this run
    )
    recorder.record(
        "run_started",
        {
            "pipeline": {
                "name": identity.job.name,
                "tap": tap_name,
                "target": target_name,
                "transformers": [block for block, _argv in prepared.transform_argvs],
                "state_id": prepared.state_id,
                "mode": prepared.mode,
            },
            "parent_correlation_id": identity.parent_correlation_id,
            "inherited_correlation_from": identity.inherited_from,
            "openlineage_parent": identity.openlineage_parent(),
            "ci": ci_context(env),
            "flext_context_version": __version__,
            "phase_run_ids": phase_ids,
        },
        fsync=True,
    )
    return _Run(
        spec,
        prepared,
        env,
        conf,
        identity,
        started,
        SafeRecorder(recorder),
        phase_ids,
        tap_name,
        target_name,
    )


def _completed(
    run: _Run,
    status: str,
    stats: RelayStats | None,
    error: str | None,
    ended: float | None = None,
) -> dict[str, Any]:
    """The `run_completed` event's data."""
    end = time.time() if ended is None else ended
    return {
        "status": status,
        "started_at": state.iso(run.started),
        "ended_at": state.iso(end),
        "duration_s": round(end - run.started, 3),
        "records": sum(s.records for s in stats.streams.values()) if stats else 0,
        "bytes": stats.bytes if stats else 0,
        "digest": stats.digest if stats else None,
        "error": error[:2000] if error is not None else None,
        "counting_error": stats.counting_error if stats else None,
    }


def _run(run: _Run, progress: Callable[[RelayProgress], None] | None) -> RunResult:
    """Extract and load, judge, record, check what landed, run the blocks: one sitting."""
    if run.prepared.loaded is not None:
        run.recorder.record("state_loaded", run.prepared.loaded.event_data(run.prepared.state_id))
    with stopping.supervised(run.conf.grace_seconds, run.conf.timeout_seconds) as stopper:
        check, keys = _landing_check(run)  # a signal meanwhile ends the run as aborted
        el = _extract_load(run, stopper, keys, progress)
        verdict = judge(el.outcome)
        checks = _record_el(run, el, verdict)
        found = None
        if check is not None and el.outcome.stats is not None and verdict.error is None:
            found = _finish_landing(run, check, keys, el.outcome.stats)
        blocks, block_error = _run_blocks(run, stopper, el, verdict)
    outcome = replace(
        el.outcome,
        signum=stopper.signum,
        timed_out_after=stopper.timed_out_after,
        block_error=block_error,
    )
    return _result(run, el, verdict, outcome, blocks, checks, found)


# --- extract and load ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What the extract-and-load step leaves: the facts, and the plugins' own numbers."""

    outcome: Outcome
    tap_metrics: Mapping[str, Mapping[str, float]]
    target_metrics: Mapping[str, Mapping[str, float]]
    target_lines: int | None  # the SDK target's "completed processing N lines of input"
    persister: state.Persister | None


def _extract_load(
    run: _Run,
    stopper: stopping.Stopper,
    keys: KeyCollector | None,
    progress: Callable[[RelayProgress], None] | None,
) -> _Loaded:
    """Start target and tap, relay until the tap's end, then wait for both on the deadline."""
    persister = (
        state.Persister(run.prepared.write_state, run.identity)
        if run.prepared.write_state is not None
        else None
    )
    try:
        target, tap = _start(run, stopper, persister)
        recent = RecentBytes()
        stats, relay_error = _relay(run, stopper, tap, target, keys, recent, progress)
        if relay_error is not None or (stats is not None and stats.sink_closed_early):
            stopper.stop_tap()
        target.close_input()
        stopper.reap(target.child)
        stopper.reap(tap.child)
        tap_exit, target_exit = tap.child.wait(), target.child.wait()
        target.join_output()
    finally:
        if persister is not None:  # the last confirmed state is stored before anything is judged
            persister.finish(stopper.wait_store)  # after a stop, within the deadline (issue 11)
    outcome = Outcome(
        tap_name=run.tap_name,
        target_name=run.target_name,
        tap=tap_exit,
        target=target_exit,
        stats=stats,
        delivery=_delivery(target, stats, recent, run.conf),
        signum=stopper.signum,
        timed_out_after=stopper.timed_out_after,
        relay_error=relay_error,
        state_tracked=persister is not None,
        states_confirmed=persister.confirmed if persister else target.states,
        states_persisted=persister.persisted if persister else 0,
        state_errors=tuple(persister.errors) if persister else (),
        state_unstored=persister.unstored if persister else None,
    )
    return _Loaded(
        outcome,
        tap.child.metrics.to_dict(),
        target.child.metrics.to_dict(),
        target.child.metrics.lines_processed,
        persister,
    )


def _start(
    run: _Run, stopper: stopping.Stopper, persister: state.Persister | None
) -> tuple[Target, Tap]:
    """The target first (it must be reading before the tap writes), then the tap."""
    target = stopper.start_target(
        run.target_name,
        run.prepared.target_argv,
        runenv.child_environ(
            run.prepared.target_env or run.env,
            runenv.phase_env(
                run.identity, phase="load", kind="load", phase_run_id=run.phase_ids["load"]
            ),
        ),
        on_state=persister.offer if persister is not None else (lambda _value: None),
    )
    _phase_started(run, "load", run.target_name, target.child.started_at)
    tap = stopper.start_tap(
        run.tap_name,
        run.prepared.tap_argv,
        runenv.child_environ(
            run.prepared.tap_env or run.env,
            runenv.phase_env(
                run.identity, phase="extract", kind="extract", phase_run_id=run.phase_ids["extract"]
            ),
        ),
    )
    _phase_started(run, "extract", run.tap_name, tap.child.started_at)

    def on_target_exit(_child: object) -> None:
        if target.stdin is not None:  # mid-stream: it failed or stopped reading
            stopper.target_gone()

    target.child.on_exit(on_target_exit)
    return target, tap


def _injection(run: _Run) -> Injection | None:
    conf, identity = run.conf, run.identity
    if not (conf.inject_state or conf.record_column_streams):
        return None
    return Injection(
        correlation_id=identity.correlation_id,
        state_context=(
            {"correlation_id": identity.correlation_id, "run_id": identity.run_id}
            if conf.inject_state
            else None
        ),
        record_column_streams=conf.record_column_streams,
    )


def _relay(
    run: _Run,
    stopper: stopping.Stopper,
    tap: Tap,
    target: Target,
    keys: KeyCollector | None,
    recent: RecentBytes,
    progress: Callable[[RelayProgress], None] | None,
) -> tuple[RelayStats | None, StrictModeError | None]:
    """Relay on a thread of its own while this one keeps the clock (deadline, timeout)."""
    sink = target.stdin
    assert sink is not None  # noqa: S101 - just started
    found: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            found["stats"] = relay(
                tap.stdout,
                sink,
                digest=True,
                strict=run.conf.strict,
                injection=_injection(run),
                progress=progress,
                close_sink=False,
                keys=keys.keys if keys is not None else None,  # the compiled scanner when built
                on_sent=recent.feed,
            )
        except StrictModeError as exc:
            found["stats"], found["error"] = exc.stats, exc
        except BaseException as exc:  # noqa: BLE001 - handed to the run loop, raised there
            found["crash"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="relay", daemon=True).start()
    if not stopper.wait(done, give_up=True):
        log.error("relay_abandoned", reason="the tap's pipe is still open after every kill")
        target.forget_input()  # never closed under the relay thread: its number could be reused
        return None, None
    os.close(tap.stdout)
    if "crash" in found:
        raise found["crash"]
    return found.get("stats"), found.get("error")


def _delivery(
    target: Target, stats: RelayStats | None, recent: RecentBytes, conf: Settings
) -> Delivery:
    """How much of what was written the target read: FIONREAD's count, RECORDs among it."""
    written = stats.bytes_out if stats is not None else 0
    unread = target.unread
    records = recent.records_in_last(unread) if unread else 0
    # Exact when the tail kept is the bytes as written (no injection rewrote them) and no write
    # was cut short by the target's exit (its bytes are in the pipe but not in `bytes_out`).
    exact = (
        records is not None
        and stats is not None
        and not stats.sink_closed_early
        and not (conf.inject_state or conf.record_column_streams)
    )
    if records is None and unread and stats is not None and written:
        records = round(stats.records() * min(unread, written) / written)
    return Delivery(
        bytes_written=max(written, unread or 0),
        bytes_unread=unread,
        records_unread=records,
        records_exact=exact,
        input_closed_first=target.input_closed_first,
    )


# --- what the run records -----------------------------------------------------------------


def _phase_started(run: _Run, phase: str, plugin: str, at: float) -> None:
    run.recorder.record(
        "phase_started",
        {
            "phase": phase,
            "plugin": plugin,
            "phase_run_id": run.phase_ids[phase],
            "started_at": state.iso(at),
        },
    )


def _el_phases(run: _Run, el: _Loaded, verdict: Verdict) -> tuple[PhaseResult, PhaseResult]:
    tap, target = el.outcome.tap, el.outcome.target
    target_metrics: dict[str, Any] = {k: dict(v) for k, v in el.target_metrics.items()}
    if el.target_lines is not None:
        target_metrics["lines_processed"] = el.target_lines
    delivery = el.outcome.delivery  # what reached the target, as measured (issue 10)
    target_metrics["bytes_written"] = delivery.bytes_written
    target_metrics["bytes_unread"] = delivery.bytes_unread
    target_metrics["end_of_input_first"] = delivery.input_closed_first
    extract = _phase(run, "extract", run.tap_name, verdict.extract, tap, dict(el.tap_metrics))
    load = _phase(run, "load", run.target_name, verdict.load, target, target_metrics)
    return extract, load


def _phase(
    run: _Run, phase: str, plugin: str, status: str, exit_: Exit, metrics: Mapping[str, Any]
) -> PhaseResult:
    return PhaseResult(
        phase,
        plugin,
        run.phase_ids[phase],
        status,
        exit_.started_at,
        exit_.ended_at,
        exit_.returncode,
        exit_.stderr_tail,
        metrics,
    )


def _record_el(run: _Run, el: _Loaded, verdict: Verdict) -> tuple[CrossCheck, ...]:
    """phase_completed for tap and target, stream_stats, cross_checks, anomalies."""
    for phase in _el_phases(run, el, verdict):
        run.recorder.record("phase_completed", phase.event_data())
    stats = el.outcome.stats
    if stats is None:
        return ()
    warehouse = _warehouse(run)
    datasets = dbt.stream_datasets(warehouse, stats.streams)
    for stream in stats.streams.values():
        run.recorder.record(
            "stream_stats",
            {
                **stream.event_data(),
                "tap_metrics": _for_stream(el.tap_metrics, stream.name),
                "target_metrics": _for_stream(el.target_metrics, stream.name),
                **datasets.get(stream.name, {}),  # dataset names as dbt-ol gives them
            },
        )
    checks = cross_checks(el, verdict)
    if checks:
        run.recorder.record("cross_checks", {"checks": [c.to_dict() for c in checks]})
    _record_anomalies(run, stats, [c for c in checks if c.status != "ok"])
    return checks


def _for_stream(metrics: Mapping[str, Mapping[str, float]], stream: str) -> dict[str, float]:
    return {name: per[stream] for name, per in metrics.items() if stream in per}


def cross_checks(el: _Loaded, verdict: Verdict) -> tuple[CrossCheck, ...]:
    """The plugins' own counts against the relay's (issue 10), where they can be compared.

    The SDK target's "completed processing N lines" counts every message it read: only a target
    that read the whole stream and exited 0 can match. The tap's `record_count` counters are
    increments: summed per stream, and only for a tap that ended on its own with 0.
    """
    stats, outcome = el.outcome.stats, el.outcome
    if stats is None or stats.counting_error is not None:
        return ()
    checks: list[CrossCheck] = []
    if el.target_lines is not None and verdict.load == "success":
        messages = sum(stats.counts.values())
        checks.append(CrossCheck("target_lines", None, messages, el.target_lines))
    if outcome.tap.returncode == 0 and outcome.tap.signalled_by_us is None:
        counted = el.tap_metrics.get("record_count", {})
        for stream in sorted(name for name in counted if name):
            relayed = stats.streams[stream].records if stream in stats.streams else 0
            checks.append(CrossCheck("tap_record_count", stream, relayed, int(counted[stream])))
    return tuple(checks)


def _record_anomalies(run: _Run, stats: RelayStats, mismatches: Sequence[CrossCheck]) -> None:
    count = stats.anomaly_count + len(mismatches)
    if not count:
        return
    first = [
        {
            "kind": a.kind,
            "line": a.line,
            "offset": a.offset,
            "excerpt": a.excerpt,
            "stream": a.stream,
        }
        for a in stats.anomalies[:20]
    ]
    first += [
        {
            "kind": "count_mismatch",
            "line": None,
            "offset": None,
            "excerpt": f"{c.kind}: relayed {c.expected}, reported {c.reported}",
            "stream": c.stream,
        }
        for c in mismatches
    ]
    run.recorder.record("anomalies", {"count": count, "first": first})


def _warehouse(run: _Run) -> dbt.Warehouse | None:
    prepared = run.prepared
    meltano = prepared.meltano if prepared.transform_argvs else None
    return dbt.target_warehouse(run.target_name, prepared.target_argv, meltano)


# --- what landed (issue 7): the two call sites the landing check owns ----------------------


def _landing_check(run: _Run) -> tuple[landing.Check | None, KeyCollector | None]:
    """The landing check prepared before the target starts, and its key collector (issue 10)."""
    spec, conf = run.spec, run.conf
    if not conf.landing:
        return None, None
    return landing.for_run(
        target=spec.target if not spec.standalone else run.target_name,
        argv=run.prepared.target_argv,
        target_config=spec.target_config,
        meltano=run.prepared.meltano,
        column_streams=conf.record_column_streams,
        cwd=run.prepared.cwd,
        workdir=run.prepared.workdir,
        environ=run.env,
    )


def _finish_landing(
    run: _Run, check: landing.Check, keys: KeyCollector | None, stats: RelayStats
) -> landing.Landing:
    """Ask the destination what landed after a good load (`not checked` if counts are cut)."""
    found = check.finish(
        {name: s.records for name, s in stats.streams.items() if s.records},
        keys.keys if keys is not None else None,
        {name: s.key_properties for name, s in stats.streams.items()},
        run.conf.record_column_streams,
        run.identity.correlation_id,
        counting_error=stats.counting_error,
    )
    run.recorder.record("landing", found.event_data())
    return found


# --- transformer blocks -------------------------------------------------------------------


def _run_blocks(
    run: _Run, stopper: stopping.Stopper, el: _Loaded, verdict: Verdict
) -> tuple[list[PhaseResult], FlextContextError | None]:
    """Each block after a good load, in order; skipped (and recorded) once anything failed."""
    phases: list[PhaseResult] = []
    error: FlextContextError | None = None
    stats = el.outcome.stats
    dbt_phase = dbt.DbtPhase(
        run.conf.lineage_path.parent / "dbt",
        run_id=run.identity.run_id,
        correlation_id=run.identity.correlation_id,
        warehouse=_warehouse(run),
        streams=stats.streams if stats is not None else (),
        dbt_path=run.env.get("DBT_DUCKDB_PATH"),
    )
    for block, argv in run.prepared.transform_argvs:
        if verdict.error is not None or error is not None or stopper.stopping:
            result = PhaseResult(block, block.split(":", 1)[0], run.phase_ids[block], "skipped")
        else:
            result, error = _run_block(run, stopper, block, argv, dbt_phase)
        phases.append(result)
        run.recorder.record("phase_completed", result.event_data())
    return phases, error


def _run_block(
    run: _Run, stopper: stopping.Stopper, block: str, argv: Sequence[str], dbt_phase: dbt.DbtPhase
) -> tuple[PhaseResult, FlextContextError | None]:
    """Run one transformer block with the run's context; its stdout goes to our stderr."""
    phase_run_id = run.phase_ids[block]
    child_env = runenv.child_environ(
        run.env,
        runenv.phase_env(run.identity, phase=block, kind="transform", phase_run_id=phase_run_id),
    )
    # Its own artifact directory, read back after it exits (issue 6).
    argv, overlay, artifacts = dbt_phase.prepare(block, argv)
    child_env.update(overlay)
    plugin = block.split(":", 1)[0]
    child = stopper.start_block(
        block, argv, child_env, stdin=None, stdout=sys.stderr.fileno(), cwd=run.prepared.cwd
    )
    _phase_started(run, block, plugin, child.started_at)
    stopper.reap(child)
    stopper.block = None
    exit_ = child.wait()
    failed = exit_.returncode != 0
    status = "aborted" if stopper.stopping else "failed" if failed else "success"
    found = None
    if artifacts is not None:
        found = dbt_phase.finish(block, artifacts, exit_.returncode, run.recorder)
    metrics = {**child.metrics.to_dict(), **(dbt.DbtPhase.metrics(found) if found else {})}
    result = _phase(run, block, plugin, status, exit_, metrics)
    error = _block_error(block, exit_, found) if failed and not stopper.stopping else None
    return result, error


def _block_error(block: str, exit_: Exit, found: dbt.BlockResults | None) -> FlextContextError:
    if found is not None and found.failed_nodes:
        return dbt.DbtFailedError(block, exit_.returncode, exit_.stderr_tail, found.failed_nodes)
    return StepError(block, exit_.returncode, exit_.stderr_tail)


# --- the result ---------------------------------------------------------------------------


def _result(
    run: _Run,
    el: _Loaded,
    el_verdict: Verdict,
    outcome: Outcome,
    blocks: Sequence[PhaseResult],
    checks: tuple[CrossCheck, ...],
    found: landing.Landing | None,
) -> RunResult:
    """The final judgement, persisted state on record, `run_completed` written, the result."""
    persister, stats = el.persister, outcome.stats
    if persister is not None and persister.persisted:
        run.recorder.record(
            "state_persisted",
            {
                "state_id": run.prepared.state_id,
                "confirmed_states": persister.confirmed,
                "written_at": persister.last_written_at,
            },
        )
    if persister is not None and persister.ignored_empty:
        # Empty states are never stored (issue 10), as Meltano's BookmarkWriter skips them.
        run.recorder.record(
            "state_ignored",
            {
                "state_id": run.prepared.state_id,
                "count": persister.ignored_empty,
                "reason": "the target confirmed an empty state; the stored state was kept",
            },
        )
    verdict = judge(replace(outcome, lineage_error=run.recorder.error))
    ended = time.time()
    error_text = str(verdict.error) if verdict.error is not None else None
    run.recorder.record(
        "run_completed", _completed(run, verdict.status, stats, error_text, ended), fsync=True
    )
    if run.recorder.error is not None and verdict.error is None:
        verdict = judge(replace(outcome, lineage_error=run.recorder.error))
    mismatches = sum(1 for c in checks if c.status != "ok")
    return RunResult(
        run_id=run.identity.run_id,
        correlation_id=run.identity.correlation_id,
        status=verdict.status,
        mode=run.prepared.mode,
        started_at=run.started,
        ended_at=ended,
        streams={name: s.records for name, s in stats.streams.items()} if stats else {},
        bytes=stats.bytes if stats else 0,
        phases=(*_el_phases(run, el, el_verdict), *blocks),
        state_id=run.prepared.state_id,
        state_loaded_from=run.prepared.loaded.written_by_run_id if run.prepared.loaded else None,
        confirmed_states=outcome.states_confirmed,
        state_persisted=bool(persister and persister.persisted),
        lineage_path=run.conf.lineage_path,
        digest=stats.digest if stats else None,
        anomaly_count=(stats.anomaly_count if stats else 0) + mismatches,
        error=verdict.error,
        landing=found,
        cross_checks=checks,
        counting_error=stats.counting_error if stats else None,
        timed_out_after=outcome.timed_out_after,
        lineage_error=run.recorder.error,
    )
