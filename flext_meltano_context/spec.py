"""What a run is asked to do (PipelineSpec, Settings) and what it did (PhaseResult, RunResult).

These types live apart from `pipeline` so that `preflight`, `progress` and the CLI can import them
without importing the run loop (the `pipeline` <-> `preflight` circle, issue 11).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flext_meltano_context import state
from flext_meltano_context.errors import FlextContextError, UsageError
from flext_meltano_context.lineage import default_log_path

if TYPE_CHECKING:
    from flext_meltano_context.landing import Landing

DEFAULT_GRACE_SECONDS = 20.0  # with the 5 s kill step the stop fits Kubernetes' 30 s grace
_TRUE = frozenset({"1", "true", "yes", "on", "enabled"})
_FALSE = frozenset({"0", "false", "no", "off", "disabled"})


def flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean setting: true/false, on/off, yes/no, 1/0, enabled/disabled; unset = `default`.

    One parser for every boolean `FLEXT_CONTEXT_*` setting: before, `STRICT=enabled` meant off
    while `LANDING=disabled` meant on (issue 11). Anything else is refused, naming the variable.
    """
    raw = env.get(name, "").strip()
    if not raw:
        return default
    word = raw.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise UsageError(
        f"{name}={raw[:20]!r} is not a boolean; use one of true/false, on/off, yes/no, 1/0, "
        "enabled/disabled"
    )


def seconds(env: Mapping[str, str], name: str) -> float | None:
    """A number of seconds (> 0) from `name`, None when unset."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{name}={raw[:20]!r} is not a positive number of seconds")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """The plugin's settings, read from `FLEXT_CONTEXT_*` in this one place."""

    lineage_path: Path
    inject_state: bool = False  # merge flext_context into the STATE messages the target sees
    record_column_streams: frozenset[str] = frozenset()  # streams given _sdc_correlation_id
    strict: bool = False
    grace_seconds: float = DEFAULT_GRACE_SECONDS  # how long a stop may take before kills
    meltano_server: bool = True  # prepare plugins and store state in one Meltano process
    landing: bool = True  # count what landed in the destination after the load (issue 7)
    timeout_seconds: float | None = None  # stop the run gracefully after this long (exit 1)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        streams = env.get("FLEXT_CONTEXT_RECORD_COLUMN_STREAMS", "")
        grace = env.get("FLEXT_CONTEXT_GRACE_SECONDS", "").strip()
        grace_seconds = DEFAULT_GRACE_SECONDS
        if grace:
            try:
                grace_seconds = float(grace)
            except ValueError:
                grace_seconds = -1.0
            if not 0 <= grace_seconds < float("inf"):
                raise UsageError(
                    f"FLEXT_CONTEXT_GRACE_SECONDS={grace[:20]!r} is not a number of seconds"
                )
        return cls(
            lineage_path=default_log_path(env),
            inject_state=flag(env, "FLEXT_CONTEXT_INJECT_STATE", False),
            record_column_streams=frozenset(s.strip() for s in streams.split(",") if s.strip()),
            strict=flag(env, "FLEXT_CONTEXT_STRICT", False),
            grace_seconds=grace_seconds,
            meltano_server=flag(env, "FLEXT_CONTEXT_MELTANO_SERVER", True),
            landing=flag(env, "FLEXT_CONTEXT_LANDING", True),
            # `meltano run` reads MELTANO_RUN_TIMEOUT; ours wins when both are set.
            timeout_seconds=seconds(env, "FLEXT_CONTEXT_TIMEOUT")
            or seconds(env, "MELTANO_RUN_TIMEOUT"),
        )


@dataclass(frozen=True, slots=True)
class MeltanoState:
    """Meltano's state for a pipeline given as commands: its id, the stored value, its writer.

    No id and no writer: a stateless run (no environment, or --no-state-update).
    """

    state_id: str | None
    loaded: state.LoadedState | None  # what the tap resumes from
    write: Callable[[dict[str, Any]], None] | None  # stores each state the target confirms


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
    # A mapped pair (mapped.py) runs its commands like standalone mode but keeps Meltano's state.
    meltano_state: MeltanoState | None = None

    @property
    def standalone(self) -> bool:
        return self.tap_cmd is not None


def step_name(argv: Sequence[str]) -> str:
    """A readable name for a standalone command: `tap_x.py`, not `python3`."""
    first = Path(argv[0]).name
    if first.startswith("python") and len(argv) > 1:
        return Path(argv[1]).name if argv[1] != "-m" or len(argv) < 3 else argv[2]
    return first


@dataclass(frozen=True, slots=True)
class PhaseResult:
    phase: str
    plugin: str
    phase_run_id: str
    status: str  # success, failed, skipped, aborted
    started_at: float | None = None
    ended_at: float | None = None  # when the child exited (not when it was reaped)
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
class CrossCheck:
    """One independent count against what the relay counted (issue 10 section 1)."""

    kind: str  # target_lines (SDK "Reader ... completed processing N lines") or tap_record_count
    stream: str | None
    expected: int  # what the relay counted
    reported: int  # what the plugin said

    @property
    def status(self) -> str:
        return "ok" if self.expected == self.reported else "count_mismatch"

    @property
    def label(self) -> str:
        """`target lines` or `tap record_count users`, for a person."""
        what = "target lines" if self.kind == "target_lines" else "tap record_count"
        return f"{what} {self.stream}" if self.stream else what

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stream": self.stream,
            "expected": self.expected,
            "reported": self.reported,
            "status": self.status,
        }


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
    state_loaded_from: str | None  # run id that wrote the state this run resumes from
    confirmed_states: int
    state_persisted: bool
    lineage_path: Path
    digest: str | None = None
    anomaly_count: int = 0
    error: FlextContextError | None = None
    landing: Landing | None = None  # what landed per stream (issue 7)
    cross_checks: tuple[CrossCheck, ...] = ()
    counting_error: str | None = None  # the relay's counts are incomplete (issue 10)
    timed_out_after: float | None = None  # --timeout stopped the run
    lineage_error: str | None = None  # a lineage write failed; the run went on

    @property
    def records(self) -> int:
        return sum(self.streams.values())

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else self.error.exit_code

    @property
    def duration_s(self) -> float:
        return round(self.ended_at - self.started_at, 3)

    def notes(self) -> list[str]:
        """Summary lines beyond progress.summary: cross-checks, incomplete counts, timeouts."""
        lines = []
        if self.timed_out_after is not None:
            lines.append(f"  timed out after {self.timed_out_after:g} s")
        if self.counting_error is not None:
            lines.append(f"  counts incomplete: the relay stopped counting: {self.counting_error}")
        ok = [check.label for check in self.cross_checks if check.status == "ok"]
        if ok:
            lines.append(f"  cross-checks ok: {', '.join(ok)}")
        for check in self.cross_checks:
            if check.status != "ok":
                lines.append(
                    f"  cross-check {check.label}: count_mismatch (relayed {check.expected:,}, "
                    f"reported {check.reported:,})"
                )
        if self.lineage_error is not None:
            lines.append(f"  lineage log incomplete: {self.lineage_error}")
        return lines
