"""Run a resolved invocation left to right, as `meltano run` runs its blocks.

Each pipeline (tap/target pair with the command blocks right after it) is one `pipeline.execute()`
with its own run id; a failure skips the rest. The invocation has one correlation id, handed to
every pipeline through `FLEXT_CORRELATION_ID`, and, when it has more than one block, a run of its
own in the lineage log (`run_started`/`run_completed` with `invocation` and the child runs' ids),
so `runs`, reports and OpenLineage show it; each pipeline names it as its OpenLineage parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context import blocks, runenv, state, strategy
from flext_meltano_context.errors import FlextContextError, StepError, UsageError

if TYPE_CHECKING:
    from flext_meltano_context.options import Steps
    from flext_meltano_context.pipeline import PipelineSpec, RunResult, Settings
    from flext_meltano_context.relay import RelayProgress

log = structlog.get_logger("flext_meltano_context.invocation")


@dataclass(frozen=True, slots=True)
class RunFlags:
    """`meltano run`'s flags, applied to every pipeline of the invocation."""

    full_refresh: bool = False
    refresh_catalog: bool = False
    no_state_update: bool = False
    force: bool = False
    state_id_suffix: str | None = None
    state_strategy: str = "auto"
    run_id: str | None = None  # becomes the invocation's correlation id
    timeout: float | None = None  # seconds for the whole invocation, as `meltano run --timeout`
    # --install / --no-install / --only-install; None when none was given (see options.install)
    install: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One block of the invocation: a pipeline's RunResult, or a command block's exit."""

    name: str
    kind: str  # pipeline or command
    status: str  # success, failed, aborted, skipped
    run_id: str | None = None
    error: str | None = None
    exit_code: int = 0
    result: RunResult | None = None
    block: blocks.Pipeline | blocks.Command | None = None
    tap_streams: Mapping[str, int] | None = None  # a mapped pipeline: records that left the tap


@dataclass(frozen=True, slots=True)
class InvocationResult:
    """What the invocation did; its exit code is the first failed block's."""

    invocation_id: str
    correlation_id: str
    started_at: float
    ended_at: float
    outcomes: tuple[Outcome, ...] = ()
    words: tuple[str, ...] = ()
    flags: RunFlags = field(default_factory=RunFlags)
    recorded: bool = False  # the invocation has its own record in the lineage log
    stopped_by: int | None = None  # the signal that stopped it (SIGTERM also for a timeout)
    timed_out: bool = False

    @property
    def status(self) -> str:
        if self.stopped_by is not None:
            return "aborted"
        for outcome in self.outcomes:
            if outcome.status in {"failed", "aborted"}:
                return outcome.status
        return "success"

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return 1  # as `meltano run --timeout`
        if self.stopped_by is not None:
            return 128 + self.stopped_by
        for outcome in self.outcomes:
            if outcome.status in {"failed", "aborted"}:
                return outcome.exit_code or 1
        return 0

    @property
    def error(self) -> FlextContextError | None:
        if self.timed_out:
            return FlextContextError(
                f"the invocation timed out after {self.flags.timeout:g} s (--timeout); the running "
                "pipeline was stopped gracefully (its confirmed state kept), the rest skipped"
            )
        if self.stopped_by is not None and not any(o.result for o in self.outcomes):
            from flext_meltano_context.errors import AbortedError

            return AbortedError(self.stopped_by, "stopped before any pipeline ran")
        for outcome in self.outcomes:
            if outcome.result is not None and outcome.result.error is not None:
                return outcome.result.error
            if outcome.status in {"failed", "aborted"}:
                return FlextContextError(outcome.error or f"{outcome.name} failed")
        return None


def execute_plan(
    steps: Sequence[tuple[blocks.Pipeline | blocks.Command, PipelineSpec | None]],
    *,
    env: Mapping[str, str],
    settings: Settings,
    flags: RunFlags,
    words: Sequence[str] = (),
    progress: Callable[[str], Callable[[RelayProgress], None] | None] | None = None,
    finished: Callable[[RunResult], None] | None = None,
) -> InvocationResult:
    """Run the steps left to right; the first failure skips the rest, as in `meltano run`."""
    from flext_meltano_context import ids

    invocation_id = ids.uuid7()
    base = dict(env)
    if flags.run_id is not None:
        base["FLEXT_CORRELATION_ID"] = flags.run_id
    name = " ".join(words) or "+".join(step.name for step, _spec in steps if hasattr(step, "name"))
    identity = runenv.identity_from_env(base, job_name=name or "invocation", run_id=invocation_id)
    started = time.time()
    recorder = None
    if len(steps) > 1:
        from flext_meltano_context.lineage.recorder import Recorder

        recorder = Recorder(
            settings.lineage_path, run_id=invocation_id, correlation_id=identity.correlation_id
        )
        recorder.record("run_started", _started_data(identity, name, words, flags, env), fsync=True)
    child_env = _child_env(base, identity, recorder is not None, flags)
    outcomes: list[Outcome] = []
    failed = False
    stop = _Stop(flags.timeout)
    try:
        stop.install()
        for step, spec in steps:
            left = stop.remaining()
            if failed or stop.signum is not None or stop.timed_out:
                outcomes.append(Outcome(_name(step), _kind(step), "skipped", block=step))
                continue
            # To a tenth of a second: the summary says "timed out after 1.5 s", not 1.49995 s.
            budget = None if left is None else max(round(left, 1), 0.1)
            step_settings = replace(settings, timeout_seconds=budget) if budget else settings
            outcome = _run_step(
                step, spec, child_env, step_settings, flags, identity, progress, stop
            )
            if outcome.result is not None and outcome.result.timed_out_after is not None:
                stop.timed_out = True
            if outcome.result is not None and finished is not None:
                finished(outcome.result)
            outcomes.append(outcome)
            failed = outcome.status in {"failed", "aborted"}
    finally:
        stop.restore()
        scratch = child_env.get("MELTANO_STATE_BACKEND_URI", "")
        if flags.no_state_update and scratch.startswith("file://") and identity.run_id in scratch:
            import shutil
            from urllib.parse import urlparse

            shutil.rmtree(urlparse(scratch).path, ignore_errors=True)  # never read again
        result = InvocationResult(
            invocation_id, identity.correlation_id, started, time.time(), tuple(outcomes),
            tuple(words), flags, recorded=recorder is not None, stopped_by=stop.signum,
            timed_out=stop.timed_out,
        )  # fmt: skip
        if recorder is not None:
            recorder.record("run_completed", _completed_data(result, len(steps)), fsync=True)
            recorder.close()
    return result


class _Stop:
    """SIGTERM/SIGINT between pipelines skip the rest; `timeout` is one deadline for them all.

    While a pipeline runs, execute() installs its own handlers (a graceful stop of that
    pipeline) and puts these back afterwards. The timeout reaches each pipeline as what is left
    of it (`Settings.timeout_seconds`), so the run loop stops it gracefully and records it as
    timed out, as `meltano run --timeout` does; no step starts after the deadline.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.signum: int | None = None
        self.timed_out = False
        self._previous: dict[int, Any] = {}
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no timeout); marks the invocation timed out
        once none are left."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            self.timed_out = True
        return max(left, 0.0)

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _name(step: blocks.Pipeline | blocks.Command) -> str:
    return step.name if isinstance(step, blocks.Pipeline) else step.block


def _kind(step: blocks.Pipeline | blocks.Command) -> str:
    return "pipeline" if isinstance(step, blocks.Pipeline) else "command"


def _flags_data(flags: RunFlags) -> dict[str, Any]:
    return {
        "full_refresh": flags.full_refresh,
        "refresh_catalog": flags.refresh_catalog,
        "no_state_update": flags.no_state_update,
        "force": flags.force,
        "state_id_suffix": flags.state_id_suffix,
        "state_strategy": flags.state_strategy,
        "install": flags.install,
    }


def _started_data(
    identity: runenv.RunIdentity,
    name: str,
    words: Sequence[str],
    flags: RunFlags,
    env: Mapping[str, str],
) -> dict[str, Any]:
    """The parent run's `run_started`: `runs`, reports and OpenLineage show it like any run."""
    from flext_meltano_context.__about__ import __version__
    from flext_meltano_context.lineage.ci import ci_context

    return {
        "pipeline": {
            "name": name,
            "mode": "meltano" if env.get("MELTANO_PROJECT_ROOT") else "standalone",
            "transformers": [],
            "state_id": None,
        },
        "invocation": {"blocks": list(words), "flags": _flags_data(flags)},
        "parent_correlation_id": identity.parent_correlation_id,
        "inherited_correlation_from": identity.inherited_from,
        "openlineage_parent": identity.openlineage_parent(),
        "ci": ci_context(env),
        "flext_context_version": __version__,
        "phase_run_ids": {},
    }


def _completed_data(result: InvocationResult, planned: int) -> dict[str, Any]:
    """The parent run's `run_completed`: its status, totals and each child run."""
    runs = [o.result for o in result.outcomes if o.result is not None]
    error = result.error
    return {
        "status": result.status if len(result.outcomes) == planned else "aborted",
        "started_at": state.iso(result.started_at),
        "ended_at": state.iso(result.ended_at),
        "duration_s": round(result.ended_at - result.started_at, 3),
        "records": sum(run.records for run in runs),
        "bytes": sum(run.bytes for run in runs),
        "digest": None,
        "error": str(error)[:2000] if error is not None else None,
        "children": [
            {
                "name": o.name,
                "kind": o.kind,
                "status": o.status,
                "run_id": o.run_id,
                "error": o.error[:2000] if o.error else None,
            }
            for o in result.outcomes
        ],
        "child_run_ids": [o.run_id for o in result.outcomes if o.run_id],
    }


def _child_env(
    base: Mapping[str, str], identity: runenv.RunIdentity, parent: bool, flags: RunFlags
) -> dict[str, str]:
    """What each block's run inherits: the correlation id and, with a record, its parent run."""
    env = dict(base)
    env["FLEXT_CORRELATION_ID"] = identity.correlation_id
    if parent:
        context = {"parent": {**identity.job.to_dict(), "root": identity.lineage_root.to_dict()}}
        env["OPENLINEAGE_CONTEXT"] = json.dumps(context, separators=(",", ":"))
        env["OPENLINEAGE_PARENT_ID"] = identity.job.parent_id()
        env["OPENLINEAGE_ROOT_PARENT_ID"] = identity.lineage_root.parent_id()
    if flags.no_state_update and env.get("MELTANO_PROJECT_ROOT"):
        # As `meltano run --no-state-update`: no state loaded, none stored. The pipelines use a
        # state backend of their own for this invocation, which starts empty and is thrown away.
        sys_dir = Path(
            env.get("MELTANO_SYS_DIR_ROOT") or Path(env["MELTANO_PROJECT_ROOT"]) / ".meltano"
        )
        scratch = sys_dir / "flext-context" / "no-state-update" / identity.run_id
        scratch.mkdir(parents=True, exist_ok=True)
        env["MELTANO_STATE_BACKEND_URI"] = scratch.as_uri()
    return env


def _run_step(
    step: blocks.Pipeline | blocks.Command,
    spec: PipelineSpec | None,
    env: Mapping[str, str],
    settings: Settings,
    flags: RunFlags,
    identity: runenv.RunIdentity,
    progress: Callable[[str], Callable[[RelayProgress], None] | None] | None,
    stop: _Stop,
) -> Outcome:
    if isinstance(step, blocks.Command) or spec is None:
        assert isinstance(step, blocks.Command)  # noqa: S101 - a pipeline always has a spec
        return _run_command(step, env, identity, stop, settings)
    from flext_meltano_context.pipeline import execute

    if step.mappings and not spec.standalone:
        from flext_meltano_context import mapped

        return mapped.run(step, spec, env, settings, flags, progress)
    if (flags.refresh_catalog or spec.full_refresh) and not spec.standalone:  # as Meltano
        drop_catalog_cache(env, spec.tap)
    previous = strategy.stored_before(spec, env, flags)
    result = execute(
        spec, environ=env, settings=settings, progress=progress(step.name) if progress else None
    )
    if previous is not None and result.state_persisted and result.state_id:
        strategy.merge_state(env, result.state_id, previous)
    return pipeline_outcome(step, result)


def pipeline_outcome(
    step: blocks.Pipeline, result: RunResult, tap_streams: Mapping[str, int] | None = None
) -> Outcome:
    """A pipeline block's Outcome from its RunResult (plain or mapped: one shape for both)."""
    return Outcome(
        step.name,
        "pipeline",
        result.status,
        run_id=result.run_id,
        error=str(result.error) if result.error is not None else None,
        exit_code=result.exit_code,
        result=result,
        block=step,
        tap_streams=tap_streams,
    )


def drop_catalog_cache(env: Mapping[str, str], tap: str) -> None:
    """`--refresh-catalog`: drop Meltano's catalog cache key so the tap's discovery runs."""
    root = Path(env["MELTANO_PROJECT_ROOT"])
    sys_dir = Path(env.get("MELTANO_SYS_DIR_ROOT") or root / ".meltano")
    for name in ("tap.properties.cache_key", "tap.properties.json"):
        (sys_dir / "run" / tap / name).unlink(missing_ok=True)


def _run_command(
    step: blocks.Command,
    env: Mapping[str, str],
    identity: runenv.RunIdentity,
    stop: _Stop,
    settings: Settings,
) -> Outcome:
    """A command block of its own: `meltano invoke PLUGIN:COMMAND`, its stdout to our stderr.

    A signal or the deadline stops it as the run loop stops a block: SIGTERM to its process
    group, SIGKILL `grace_seconds` + 5 s later (issue 11).
    """
    from flext_meltano_context import ids
    from flext_meltano_context.meltano import Meltano, find_meltano

    if not env.get("MELTANO_PROJECT_ROOT"):
        raise UsageError(f"the command block {step.block!r} needs Meltano")
    root = Path(env["MELTANO_PROJECT_ROOT"])
    meltano = Meltano(find_meltano(env), root, env.get("MELTANO_ENVIRONMENT") or None, env)
    run_id = ids.uuid7()
    child = runenv.child_environ(
        env, runenv.phase_env(identity, phase=step.block, kind="transform", phase_run_id=run_id)
    )
    log.info("block_started", block=step.block, run_id=run_id)
    try:
        proc = subprocess.Popen(
            meltano.invoke_argv(step.block),
            env=child,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return Outcome(step.block, "command", "failed", run_id, str(exc), 1, block=step)
    stderr, stopped = _wait_block(proc, stop, settings.grace_seconds)
    tail = stderr.decode("utf-8", "replace").splitlines()[-20:]
    os.write(sys.stderr.fileno(), stderr[-65536:])
    if stopped is not None:
        return Outcome(step.block, "command", "aborted", run_id, stopped, 1, block=step)
    if proc.returncode != 0:
        error = StepError(step.block, proc.returncode, tail)
        return Outcome(step.block, "command", "failed", run_id, str(error), 1, block=step)
    return Outcome(step.block, "command", "success", run_id, block=step)


def _wait_block(
    proc: subprocess.Popen[bytes], stop: _Stop, grace: float
) -> tuple[bytes, str | None]:
    """Its stderr once it exits, and why it was stopped (a signal or the deadline), if it was."""
    import signal

    chunks: list[bytes] = []
    why: str | None = None
    kill_at: float | None = None
    while True:
        try:
            out = proc.communicate(timeout=0.2)[1]
            chunks.append(out or b"")
            return b"".join(chunks), why
        except subprocess.TimeoutExpired:
            pass
        left = stop.remaining()
        if why is None and (stop.signum is not None or stop.timed_out):
            why = "timed out" if stop.timed_out and left == 0 else "stopped by a signal"
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            kill_at = time.monotonic() + grace + 5
        if kill_at is not None and time.monotonic() >= kill_at:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def run_steps(
    steps: Steps, *, env: Mapping[str, str], flags: RunFlags, words: Sequence[str]
) -> InvocationResult:
    """Run with the live progress and a summary per pipeline on stderr (the CLI's run)."""
    from flext_meltano_context.pipeline import Settings
    from flext_meltano_context.progress import for_pipeline, summary

    settings = Settings.from_env(env)
    current: list[Any] = []
    pipelines = sum(1 for _block, spec in steps if spec is not None)

    def progress_for(name: str) -> Callable[[RelayProgress], None]:
        position = f"[{len(current) + 1}/{pipelines}] " if pipelines > 1 else ""
        bar = for_pipeline(name, position=position)
        current.append(bar)
        return bar  # type: ignore[no-any-return]  # a Progress or a LiveProgress

    def finished(result: RunResult) -> None:
        for bar in current:
            bar.finish()
        sys.stderr.write("\n".join([summary(result), *result.notes()]) + "\n")
        sys.stderr.flush()

    try:
        result = execute_plan(
            steps,
            env=env,
            settings=settings,
            flags=flags,
            words=words,
            progress=progress_for,
            finished=finished,
        )
    finally:
        for bar in current:
            bar.finish()  # also when the run ended by an exception: no panel left on the screen
    if len(steps) > 1:
        sys.stderr.write(_invocation_summary(result) + "\n")
    return result


def _invocation_summary(result: InvocationResult) -> str:
    lines = [
        f"flext-context invocation {result.status}: {len(result.outcomes)} block(s), "
        f"correlation id {result.correlation_id}, invocation {result.invocation_id}"
    ]
    for outcome in result.outcomes:
        run = f", run id {outcome.run_id}" if outcome.run_id else ""
        lines.append(f"  {outcome.kind} {outcome.name}: {outcome.status}{run}")
    return "\n".join(lines)
