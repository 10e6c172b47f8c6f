"""The identity of a run and the environment every child process (tap, target, dbt) receives.

A run has its own run id (a new UUIDv7). Its correlation id is inherited when a caller gives one,
first found wins: `FLEXT_CORRELATION_ID`, the trace id of `TRACEPARENT`, the root run id of
`OPENLINEAGE_CONTEXT` (a CI system or Airflow sets one for many runs); otherwise it is the run id.
Each phase (extract, load, a transformer block) gets its own OpenLineage run id and trace span, so
the children of one run share the correlation id and trace id but stay distinguishable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flext_meltano_context import ids

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")
DEFAULT_NAMESPACE = "flext-context"

# Variables a run sets for its children; inherited values of these never leak through unchanged.
CHILD_VARIABLES = (
    "FLEXT_CORRELATION_ID",
    "FLEXT_RUN_ID",
    "FLEXT_PARENT_CORRELATION_ID",
    "FLEXT_PHASE",
    "MELTANO_RUN_ID",
    "TRACEPARENT",
    "OPENLINEAGE_CONTEXT",
    "OPENLINEAGE_PARENT_ID",
    "OPENLINEAGE_ROOT_PARENT_ID",
    "DBT_ENV_CUSTOM_ENV_FLEXT_CORRELATION_ID",
)


@dataclass(frozen=True, slots=True)
class LineageRun:
    """An OpenLineage run: its id and the job it ran."""

    run_id: str
    namespace: str
    name: str

    def parent_id(self) -> str:
        """The legacy `OPENLINEAGE_PARENT_ID` form: namespace/job/runId."""
        return f"{self.namespace}/{self.name}/{self.run_id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": {"runId": self.run_id},
            "job": {"namespace": self.namespace, "name": self.name},
        }


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """Who a run is and whom it descends from; the same for every phase of the run."""

    run_id: str
    correlation_id: str
    parent_correlation_id: str | None
    inherited_from: str | None  # the variable the correlation id came from, None when new
    trace_id: str
    job: LineageRun  # this pipeline run
    lineage_parent: LineageRun | None  # the caller's run (Airflow task...), when one was given
    lineage_root: LineageRun  # the caller's root, else this run

    def phase_job(self, phase: str, phase_run_id: str) -> LineageRun:
        return LineageRun(phase_run_id, self.job.namespace, f"{self.job.name}.{phase}")

    def openlineage_parent(self) -> dict[str, Any] | None:
        """The inherited parent as recorded in `run_started`, None when there is none."""
        if self.lineage_parent is None:
            return None
        return {**self.lineage_parent.to_dict(), "root": self.lineage_root.to_dict()}


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def _run_of(node: Any) -> LineageRun | None:
    """A LineageRun from `{"run": {"runId"}, "job": {"namespace", "name"}}`, None if malformed."""
    if not isinstance(node, Mapping):
        return None
    run, job = node.get("run"), node.get("job")
    if not isinstance(run, Mapping) or not isinstance(job, Mapping):
        return None
    run_id, namespace, name = run.get("runId"), job.get("namespace"), job.get("name")
    if not (isinstance(run_id, str) and ids.is_uuid(run_id)):
        return None
    if not (isinstance(namespace, str) and namespace and isinstance(name, str) and name):
        return None
    return LineageRun(run_id.lower(), namespace, name)


def _run_of_parent_id(value: str | None) -> LineageRun | None:
    """A LineageRun from the legacy `namespace/job/runId` form."""
    if not value:
        return None
    namespace, _, rest = value.partition("/")
    name, _, run_id = rest.rpartition("/")
    if not (namespace and name and ids.is_uuid(run_id)):
        return None
    return LineageRun(run_id.lower(), namespace, name)


def inherited_lineage(environ: Mapping[str, str]) -> tuple[LineageRun, LineageRun] | None:
    """(parent, root) the caller passed in `OPENLINEAGE_CONTEXT` or the legacy variables."""
    raw = environ.get("OPENLINEAGE_CONTEXT")
    if raw:
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        node = decoded.get("parent") if isinstance(decoded, Mapping) else None
        parent = _run_of(node)
        if parent is not None and isinstance(node, Mapping):
            return parent, _run_of(node.get("root")) or parent
    parent = _run_of_parent_id(environ.get("OPENLINEAGE_PARENT_ID"))
    if parent is not None:
        return parent, _run_of_parent_id(environ.get("OPENLINEAGE_ROOT_PARENT_ID")) or parent
    return None


def identity_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    job_name: str,
    run_id: str | None = None,
) -> RunIdentity:
    """A new run's identity, inheriting correlation and lineage parents from `environ`."""
    env = os.environ if environ is None else environ
    run = run_id or ids.uuid7()
    namespace = env.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE
    lineage = inherited_lineage(env)
    correlation: str | None = None
    inherited_from: str | None = None
    trace_id: str | None = None
    given = env.get("FLEXT_CORRELATION_ID")
    if given and _valid_id(given):
        correlation, inherited_from = given, "FLEXT_CORRELATION_ID"
    if correlation is None and (parsed := ids.parse_traceparent(env.get("TRACEPARENT", ""))):
        trace_id = parsed[0]
        correlation, inherited_from = ids.uuid_of_trace_id(trace_id), "TRACEPARENT"
    if correlation is None and lineage is not None:
        correlation, inherited_from = lineage[1].run_id, "OPENLINEAGE_CONTEXT"
    if correlation is None:
        correlation = run
    if trace_id is None:
        trace_id = ids.trace_id_of(correlation) or ids.trace_id_of(run) or run.replace("-", "")
    parent_cid = env.get("FLEXT_PARENT_CORRELATION_ID")
    job = LineageRun(run, namespace, job_name)
    return RunIdentity(
        run_id=run,
        correlation_id=correlation,
        parent_correlation_id=parent_cid if _valid_id(parent_cid) else None,
        inherited_from=inherited_from,
        trace_id=trace_id,
        job=job,
        lineage_parent=lineage[0] if lineage else None,
        lineage_root=lineage[1] if lineage else job,
    )


def phase_env(identity: RunIdentity, *, phase: str, kind: str, phase_run_id: str) -> dict[str, str]:
    """The variables a child of `phase` gets; `kind` is extract, load or transform."""
    phase_run = identity.phase_job(phase, phase_run_id)
    context = {"parent": {**phase_run.to_dict(), "root": identity.lineage_root.to_dict()}}
    env = {
        "FLEXT_CORRELATION_ID": identity.correlation_id,
        "FLEXT_RUN_ID": identity.run_id,
        "FLEXT_PHASE": kind,
        "MELTANO_RUN_ID": identity.run_id,
        "TRACEPARENT": ids.traceparent(identity.trace_id, ids.new_span_id()),
        "OPENLINEAGE_CONTEXT": json.dumps(context, separators=(",", ":")),
        "OPENLINEAGE_PARENT_ID": phase_run.parent_id(),
        "OPENLINEAGE_ROOT_PARENT_ID": identity.lineage_root.parent_id(),
        "DBT_ENV_CUSTOM_ENV_FLEXT_CORRELATION_ID": identity.correlation_id,
    }
    if identity.parent_correlation_id is not None:
        env["FLEXT_PARENT_CORRELATION_ID"] = identity.parent_correlation_id
    return env


def child_environ(base: Mapping[str, str], overlay: Mapping[str, str]) -> dict[str, str]:
    """`base` without inherited run variables, plus `overlay` (a phase_env)."""
    env = {k: v for k, v in base.items() if k not in CHILD_VARIABLES}
    env.update(overlay)
    return env
