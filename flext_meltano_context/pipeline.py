"""One run of tap -> relay -> target (then transformer blocks): processes, state, lineage.

Meltano mode (under `meltano invoke`, `MELTANO_PROJECT_ROOT` set) launches every plugin as
`meltano invoke` would (see `preflight`) and keeps state exactly as `meltano run` does; standalone
mode runs any Singer commands with `--state`/`--state-out` files. Both share the relay, the child
environment, timing, failure semantics and the lineage record. `execute()` returns a RunResult
and raises only for bad input found before any child starts; `run_pipeline()` raises the run's
error as well. How a run stops on a signal lives in `stopping`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context import preflight, runenv, state, stopping
from flext_meltano_context.__about__ import __version__
from flext_meltano_context.errors import (
    AbortedError,
    FlextContextError,
    StepError,
    StrictModeError,
    UsageError,
)

if TYPE_CHECKING:
    from flext_meltano_context.children import Exit
    from flext_meltano_context.dbt import DbtPhase
    from flext_meltano_context.keys import KeyCollector
    from flext_meltano_context.landing import Check, Landing
    from flext_meltano_context.lineage.recorder import Recorder
    from flext_meltano_context.relay import RelayProgress, RelayStats
    from taps_wrapper.tap import Tap
    from targets_wrapper.target import Target

log = structlog.get_logger("flext_meltano_context.pipeline")

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True)
class Settings:
    """The plugin's settings, read from `FLEXT_CONTEXT_*` in this one place."""

    lineage_path: Path
    inject_state: bool = False  # merge flext_context into the STATE messages the target sees
    record_column_streams: frozenset[str] = frozenset()  # streams given _sdc_correlation_id
    strict: bool = False
    grace_seconds: float = 30.0  # how long a stopped child may take to finish cleanly
    meltano_server: bool = True  # prepare plugins and store state in one Meltano process
    landing: bool = True  # count what landed in the destination after the load (issue 7)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        from flext_meltano_context.lineage import default_log_path

        env = os.environ if environ is None else environ
        streams = env.get("FLEXT_CONTEXT_RECORD_COLUMN_STREAMS", "")
        grace = env.get("FLEXT_CONTEXT_GRACE_SECONDS", "")
        try:
            grace_seconds = float(grace) if grace else 30.0
        except ValueError as exc:
            raise UsageError(
                f"FLEXT_CONTEXT_GRACE_SECONDS={grace[:20]!r} is not a number of seconds"
            ) from exc
        return cls(
            lineage_path=default_log_path(env),
            inject_state=env.get("FLEXT_CONTEXT_INJECT_STATE", "").lower() in _TRUE,
            record_column_streams=frozenset(s.strip() for s in streams.split(",") if s.strip()),
            strict=env.get("FLEXT_CONTEXT_STRICT", "").lower() in _TRUE,
            grace_seconds=grace_seconds,
            meltano_server=env.get("FLEXT_CONTEXT_MELTANO_SERVER", "").lower()
            not in {"0", "false", "no", "off"},
            landing=env.get("FLEXT_CONTEXT_LANDING", "").lower() not in {"0", "false", "no", "off"},
        )


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """What to run. Meltano mode names plugins; standalone mode gives their commands."""

    tap: str
    target: str
    transformers: tuple[str, ...] = ()  # Meltano `dbt-x:run` blocks
    tap_cmd: tuple[str, ...] | None = None  # standalone
    target_cmd: tuple[str, ...] | None = None
    transform_cmds: tuple[tuple[str, ...], ...] = ()  # standalone commands run after the load
    state_in: Path | None = None  # standalone --state
    state_out: Path | None = None  # standalone --state-out
    full_refresh: bool = False
    state_id_suffix: str | None = None
    force: bool = False
    target_config: Path | None = None  # standalone: the target's config, for landing checks

    @property
    def standalone(self) -> bool:
        return self.tap_cmd is not None


@dataclass(frozen=True, slots=True)
class PhaseResult:
    phase: str
    plugin: str
    phase_run_id: str
    status: str  # success, failed, skipped, aborted
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    stderr_tail: tuple[str, ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return round(self.ended_at - self.started_at, 3)

    def event_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "phase": self.phase,
            "plugin": self.plugin,
            "phase_run_id": self.phase_run_id,
            "started_at": state.iso(self.started_at),
            "ended_at": state.iso(self.ended_at),
            "duration_s": self.duration_s,
            "exit_code": self.exit_code,
            "status": self.status,
            "metrics": dict(self.metrics),
        }
        if self.status == "failed":
            data["stderr_tail"] = list(self.stderr_tail)
        return data


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run did; `error` is set when it did not succeed."""

    run_id: str
    correlation_id: str
    status: str  # success, failed, aborted
    mode: str
    started_at: float
    ended_at: float
    streams: Mapping[str, int]  # records per stream, as relayed
    bytes: int
    phases: tuple[PhaseResult, ...]
    state_id: str | None
    state_loaded_from: str | None  # run id that wrote the state this run resumed from
    confirmed_states: int
    state_persisted: bool
    lineage_path: Path
    digest: str | None = None
    anomaly_count: int = 0
    error: FlextContextError | None = None
    landing: Landing | None = None  # what landed per stream (issue 7)

    @property
    def records(self) -> int:
        return sum(self.streams.values())

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else self.error.exit_code

    @property
    def duration_s(self) -> float:
        return round(self.ended_at - self.started_at, 3)


def run_pipeline(spec: PipelineSpec, **kwargs: Any) -> RunResult:
    """Run the pipeline; raise its error (StepError, AbortedError...) when it did not succeed."""
    result = execute(spec, **kwargs)
    if result.error is not None:
        raise result.error
    return result


def step_name(argv: Sequence[str]) -> str:
    """A readable name for a standalone command: `tap_x.py`, not `python3`."""
    first = Path(argv[0]).name
    if first.startswith("python") and len(argv) > 1:
        return Path(argv[1]).name if argv[1] != "-m" or len(argv) < 3 else argv[2]
    return first


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
    recorder, phase_ids = _open_record(spec, prepared, env, conf, identity)
    try:
        return _run(spec, prepared, env, conf, identity, started, progress, recorder, phase_ids)
    except BaseException as exc:
        # A run that ends by an exception (a signal before the tap started, a child that could
        # not be started) still gets its end in the log, so no run is left open there.
        status = "aborted" if isinstance(exc, (AbortedError, KeyboardInterrupt)) else "failed"
        _record_completed(recorder, status, started, time.time(), None, str(exc) or repr(exc))
        raise
    finally:
        recorder.close()
        if prepared.server is not None:
            prepared.server.close()
        if prepared.lock is not None:
            prepared.lock.release()
        if prepared.workdir is not None:
            shutil.rmtree(prepared.workdir, ignore_errors=True)


def _names(spec: PipelineSpec, prepared: preflight.Prepared) -> tuple[str, str]:
    """How the run names its tap and target: plugin names, or the standalone commands' scripts."""
    if not spec.standalone:
        return spec.tap, spec.target
    return step_name(prepared.tap_argv), step_name(prepared.target_argv)


def _open_record(
    spec: PipelineSpec,
    prepared: preflight.Prepared,
    env: Mapping[str, str],
    conf: Settings,
    identity: runenv.RunIdentity,
) -> tuple[Recorder, dict[str, str]]:
    """The run's recorder, its `run_started` event written, and a run id per phase."""
    from flext_meltano_context import ids
    from flext_meltano_context.lineage.ci import ci_context
    from flext_meltano_context.lineage.recorder import Recorder

    tap_name, target_name = _names(spec, prepared)
    phase_ids = {"extract": ids.uuid7(), "load": ids.uuid7()}
    phase_ids.update({block: ids.uuid7() for block, _argv in prepared.transform_argvs})
    recorder = Recorder(
        conf.lineage_path, run_id=identity.run_id, correlation_id=identity.correlation_id
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
    return recorder, phase_ids


def _record_completed(
    recorder: Recorder,
    status: str,
    started: float,
    ended: float,
    stats: RelayStats | None,
    error: str | None,
) -> None:
    recorder.record(
        "run_completed",
        {
            "status": status,
            "started_at": state.iso(started),
            "ended_at": state.iso(ended),
            "duration_s": round(ended - started, 3),
            "records": sum(s.records for s in stats.streams.values()) if stats else 0,
            "bytes": stats.bytes if stats else 0,
            "digest": stats.digest if stats else None,
            "error": error[:2000] if error is not None else None,
        },
        fsync=True,
    )


def _run(
    spec: PipelineSpec,
    prepared: preflight.Prepared,
    env: Mapping[str, str],
    conf: Settings,
    identity: runenv.RunIdentity,
    started: float,
    progress: Callable[[RelayProgress], None] | None,
    recorder: Recorder,
    phase_ids: Mapping[str, str],
) -> RunResult:
    from flext_meltano_context.relay import Injection, relay
    from taps_wrapper.tap import Tap
    from targets_wrapper.target import Target

    tap_name, target_name = _names(spec, prepared)
    if prepared.loaded is not None:
        recorder.record("state_loaded", prepared.loaded.event_data(prepared.state_id))

    persister = (
        state.Persister(prepared.write_state, identity)
        if prepared.write_state is not None
        else None
    )
    stopper = stopping.Stopper(conf.grace_seconds)
    tap: Tap | None = None
    target: Target | None = None
    stats: RelayStats | None = None
    error: FlextContextError | None = None
    relay_done = threading.Event()
    phases: list[PhaseResult] = []
    tap_exit: Exit | None = None
    target_exit: Exit | None = None
    check, keys = _landing_check(spec, prepared, conf, target_name)
    stopper.install()
    try:
        target = Target(
            target_name,
            prepared.target_argv,
            runenv.child_environ(
                prepared.target_env or env,
                runenv.phase_env(
                    identity, phase="load", kind="load", phase_run_id=phase_ids["load"]
                ),
            ),
            on_state=persister.offer if persister is not None else (lambda _value: None),
        )
        stopper.target = target
        _phase_started(recorder, "load", target_name, phase_ids["load"], target.child.started_at)
        tap = Tap(
            tap_name,
            prepared.tap_argv,
            runenv.child_environ(
                prepared.tap_env or env,
                runenv.phase_env(
                    identity, phase="extract", kind="extract", phase_run_id=phase_ids["extract"]
                ),
            ),
        )
        stopper.tap = tap
        _phase_started(recorder, "extract", tap_name, phase_ids["extract"], tap.child.started_at)
        stopping.watch_target(target, tap, relay_done, conf.grace_seconds)
        injection = None
        if conf.inject_state or conf.record_column_streams:
            injection = Injection(
                correlation_id=identity.correlation_id,
                state_context=(
                    {"correlation_id": identity.correlation_id, "run_id": identity.run_id}
                    if conf.inject_state
                    else None
                ),
                record_column_streams=conf.record_column_streams,
            )
        assert target.stdin is not None  # noqa: S101 - just started
        try:
            stats = relay(
                tap.stdout,
                target.stdin,
                digest=True,
                strict=conf.strict,
                injection=injection,
                progress=progress,
                close_sink=False,
                keys=keys.keys if keys is not None else None,  # compiled scanner when built
            )
        except StrictModeError as exc:
            stats = getattr(exc, "stats", None)
            error = exc
            tap.child.stop(conf.grace_seconds)
        finally:
            relay_done.set()
            os.close(tap.stdout)
            target.close_input()
        if stats is not None and stats.sink_closed_early:
            tap.child.stop(conf.grace_seconds)
        tap_exit = tap.child.wait()
        target_exit = stopping.wait_target(target, stopper, conf.grace_seconds)
        target.join_output()
    finally:
        stopper.restore()
        for started_child in (tap, target):
            if started_child is not None and started_child.child.poll() is None:
                started_child.child.signal(signal.SIGKILL)
                started_child.child.wait()
        if target is not None:
            target.close_input()
        if persister is not None:
            persister.finish()

    aborted = stopper.signum is not None
    tap_failed = tap_exit.returncode != 0 and tap_exit.signalled_by_us is None
    closed_early = stats is not None and stats.sink_closed_early
    target_failed = target_exit.returncode != 0 or closed_early
    if error is None and target_failed and not aborted:
        if target_exit.returncode != 0:
            error = StepError(target_name, target_exit.returncode, target_exit.stderr_tail)
        else:
            error = FlextContextError(
                f"target {target_name!r} exited before the end of its input; the tap was stopped"
            )
    if error is None and tap_failed and not aborted:
        error = StepError(tap_name, tap_exit.returncode, tap_exit.stderr_tail)
    if error is None and persister is not None and persister.errors:
        error = FlextContextError(
            f"the state confirmed by {target_name!r} could not be stored: {persister.errors[-1]}"
        )

    def status_of(failed: bool) -> str:
        return "aborted" if aborted else "failed" if failed else "success"

    phases.append(
        PhaseResult(
            "extract",
            tap_name,
            phase_ids["extract"],
            status_of(tap_failed or (error is not None and isinstance(error, StrictModeError))),
            tap_exit.started_at,
            tap_exit.ended_at,
            tap_exit.returncode,
            tap_exit.stderr_tail,
            tap.child.metrics.to_dict(),
        )
    )
    target_metrics: dict[str, Any] = target.child.metrics.to_dict()
    if target.child.metrics.lines_processed is not None:
        target_metrics["lines_processed"] = target.child.metrics.lines_processed
    phases.append(
        PhaseResult(
            "load",
            target_name,
            phase_ids["load"],
            status_of(target_failed),
            target_exit.started_at,
            target_exit.ended_at,
            target_exit.returncode,
            target_exit.stderr_tail,
            target_metrics,
        )
    )
    for phase in phases:
        recorder.record("phase_completed", phase.event_data())
    from flext_meltano_context import dbt

    warehouse = dbt.target_warehouse(
        target_name, prepared.target_argv, prepared.meltano if prepared.transform_argvs else None
    )
    datasets = dbt.stream_datasets(warehouse, stats.streams if stats is not None else ())
    if stats is not None:
        for stream in stats.streams.values():
            recorder.record(
                "stream_stats",
                {
                    "stream": stream.name,
                    "counts": dict(stream.counts),
                    "bytes": stream.bytes,
                    "first_record_at": state.iso(stream.first_record_at),
                    "last_record_at": state.iso(stream.last_record_at),
                    "schema": _schema_summary(stream.schema, getattr(stream, "key_properties", ())),
                    "tap_metrics": tap.child.metrics.for_stream(stream.name),
                    "target_metrics": target.child.metrics.for_stream(stream.name),
                    **datasets.get(stream.name, {}),  # dataset names as dbt-ol gives them
                },
            )
        if stats.anomaly_count:
            recorder.record(
                "anomalies",
                {
                    "count": stats.anomaly_count,
                    "first": [
                        {
                            "kind": a.kind,
                            "line": a.line,
                            "offset": a.offset,
                            "excerpt": a.excerpt,
                            "stream": a.stream,
                        }
                        for a in stats.anomalies[:20]
                    ],
                },
            )
    landing = None
    if check is not None and stats is not None and error is None and not aborted:
        landing = check.finish(
            {name: s.records for name, s in stats.streams.items() if s.records},
            keys.distinct() if keys is not None else {},
            {name: bool(s.key_properties) for name, s in stats.streams.items()},
            conf.record_column_streams,
            identity.correlation_id,
        )
        recorder.record("landing", landing.event_data())
    if persister is not None and persister.persisted:
        recorder.record(
            "state_persisted",
            {
                "state_id": prepared.state_id,
                "confirmed_states": persister.confirmed,
                "written_at": persister.last_written_at,
            },
        )

    el_ok = error is None and not aborted
    dbt_phase = dbt.DbtPhase(
        conf.lineage_path.parent / "dbt",
        run_id=identity.run_id,
        correlation_id=identity.correlation_id,
        warehouse=warehouse,
        streams=stats.streams if stats is not None else (),
        dbt_path=env.get("DBT_DUCKDB_PATH"),
    )
    for block, argv in prepared.transform_argvs:
        if not el_ok:
            skipped = PhaseResult(block, block.split(":", 1)[0], phase_ids[block], "skipped")
            phases.append(skipped)
            recorder.record("phase_completed", skipped.event_data())
            continue
        result, block_error = _run_block(
            block, argv, env, identity, phase_ids[block], prepared.cwd, recorder, stopper, dbt_phase
        )
        phases.append(result)
        recorder.record("phase_completed", result.event_data())
        if block_error is not None:
            error, el_ok = block_error, False
        if stopper.signum is not None:
            aborted, el_ok = True, False

    if aborted and stopper.signum is not None:
        if persister is not None and persister.persisted:
            kept = f"the last of {persister.confirmed} confirmed state(s) is stored"
        elif persister is not None:
            kept = "the target confirmed no state; the stored state is untouched"
        else:
            kept = "no state is kept for this run"
        error = AbortedError(
            stopper.signum, f"stopped by {signal.Signals(stopper.signum).name}; {kept}"
        )
    ended = time.time()
    status = "aborted" if aborted else ("failed" if error is not None else "success")
    streams = {name: s.records for name, s in stats.streams.items()} if stats else {}
    _record_completed(
        recorder, status, started, ended, stats, str(error) if error is not None else None
    )
    return RunResult(
        run_id=identity.run_id,
        correlation_id=identity.correlation_id,
        status=status,
        mode=prepared.mode,
        started_at=started,
        ended_at=ended,
        streams=streams,
        bytes=stats.bytes if stats else 0,
        phases=tuple(phases),
        state_id=prepared.state_id,
        state_loaded_from=prepared.loaded.written_by_run_id if prepared.loaded else None,
        confirmed_states=persister.confirmed if persister else target.states,
        state_persisted=bool(persister and persister.persisted),
        lineage_path=conf.lineage_path,
        digest=stats.digest if stats else None,
        anomaly_count=stats.anomaly_count if stats else 0,
        error=error,
        landing=landing,
    )


def _phase_started(recorder: Recorder, phase: str, plugin: str, run_id: str, at: float) -> None:
    recorder.record(
        "phase_started",
        {"phase": phase, "plugin": plugin, "phase_run_id": run_id, "started_at": state.iso(at)},
    )


def _run_block(
    block: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    identity: runenv.RunIdentity,
    phase_run_id: str,
    cwd: str | None,
    recorder: Recorder,
    stopper: stopping.Stopper,
    dbt_phase: DbtPhase | None = None,
) -> tuple[PhaseResult, FlextContextError | None]:
    """Run one transformer block with the run's context; its stdout goes to our stderr."""
    from flext_meltano_context.children import Child
    from flext_meltano_context.dbt import DbtFailedError, DbtPhase

    child_env = runenv.child_environ(
        env, runenv.phase_env(identity, phase=block, kind="transform", phase_run_id=phase_run_id)
    )
    artifacts = None
    if dbt_phase is not None:  # its own artifact directory, read back after it exits (issue 6)
        argv, overlay, artifacts = dbt_phase.prepare(block, argv)
        child_env.update(overlay)
    plugin = block.split(":", 1)[0]
    child = Child(block, argv, child_env, stdin=None, stdout=sys.stderr.fileno(), cwd=cwd)
    _phase_started(recorder, block, plugin, phase_run_id, child.started_at)
    previous: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):  # not in the main thread: no handler to swap
        for stop_on in (signal.SIGINT, signal.SIGTERM):
            previous[stop_on] = signal.signal(
                stop_on, lambda s, _f: stopping.stop_block(child, stopper, s)
            )
    try:
        exit_ = child.wait()
    finally:
        for stop_on, handler in previous.items():  # the handlers as they were, SIGTERM's too
            signal.signal(stop_on, handler)
    failed = exit_.returncode != 0
    status = "aborted" if stopper.signum is not None else "failed" if failed else "success"
    found = None
    if dbt_phase is not None and artifacts is not None:
        found = dbt_phase.finish(block, artifacts, exit_.returncode, recorder)
    result = PhaseResult(
        block,
        plugin,
        phase_run_id,
        status,
        exit_.started_at,
        exit_.ended_at,
        exit_.returncode,
        exit_.stderr_tail,
        {**child.metrics.to_dict(), **(DbtPhase.metrics(found) if found else {})},
    )
    error = StepError(block, exit_.returncode, exit_.stderr_tail) if failed else None
    if failed and found is not None and found.failed_nodes:
        error = DbtFailedError(block, exit_.returncode, exit_.stderr_tail, found.failed_nodes)
    return result, error


def _schema_summary(schema: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, Any]:
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    columns: dict[str, Any] = {}
    if isinstance(properties, Mapping):
        for name, spec in properties.items():
            kind = spec.get("type") if isinstance(spec, Mapping) else None
            columns[str(name)] = kind if isinstance(kind, (str, list)) else None
    return {"properties": columns, "key_properties": list(keys)}


def _landing_check(
    spec: PipelineSpec, prepared: preflight.Prepared, conf: Settings, target_name: str
) -> tuple[Check | None, KeyCollector | None]:
    """The landing check prepared before the target starts (counts before the load), issue 7."""
    if not conf.landing:
        return None, None
    from flext_meltano_context import landing
    from flext_meltano_context.keys import KeyCollector

    check = landing.prepare_run(
        target=spec.target if not spec.standalone else target_name,
        argv=prepared.target_argv,
        target_config=spec.target_config,
        meltano=prepared.meltano,
        approximate="*" not in conf.record_column_streams,
        cwd=prepared.cwd,
    )
    # Distinct keys cost about 3.5 us per message in the relay: only for the exact level.
    collect = check.reason is None and bool(conf.record_column_streams)
    return check, (KeyCollector() if collect else None)
