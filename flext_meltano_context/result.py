"""The `--result-json` file: an invocation's outcome for orchestrators (schema: result.schema.json).

Correlation id, invocation id, and per block its run id, status and error; per pipeline the
records per stream and what landed. Written through a temp file and `os.replace`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flext_meltano_context import state
from flext_meltano_context.blocks import Pipeline
from flext_meltano_context.errors import FlextContextError

if TYPE_CHECKING:
    from flext_meltano_context.invocation import InvocationResult, Outcome

RESULT_VERSION = 1


def result_schema() -> dict[str, Any]:
    """The JSON Schema of the result file, as shipped in the package."""
    text = (
        resources.files("flext_meltano_context.lineage")
        .joinpath("result.schema.json")
        .read_text("utf-8")
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


def to_dict(result: InvocationResult) -> dict[str, Any]:
    """The result as the schema describes it."""
    return {
        "result_version": RESULT_VERSION,
        "invocation_id": result.invocation_id,
        "correlation_id": result.correlation_id,
        "status": result.status,
        "exit_code": result.exit_code,
        "started_at": state.iso(result.started_at),
        "ended_at": state.iso(result.ended_at),
        "duration_s": round(result.ended_at - result.started_at, 3),
        "blocks": list(result.words),
        "recorded_as_parent": result.recorded,
        "pipelines": [_block(o) for o in result.outcomes],
    }


def _block(outcome: Outcome) -> dict[str, Any]:
    run = outcome.result
    out: dict[str, Any] = {
        "name": outcome.name,
        "kind": outcome.kind,
        "run_id": outcome.run_id,
        "status": outcome.status,
        "error": outcome.error[:2000] if outcome.error else None,
        "exit_code": outcome.exit_code if outcome.status not in {"success", "skipped"} else 0,
        "correlation_id": run.correlation_id if run is not None else None,
        "state_id": run.state_id if run is not None else None,
        "state_persisted": run.state_persisted if run is not None else False,
        "records": run.records if run is not None else 0,
        "bytes": run.bytes if run is not None else 0,
        "duration_s": run.duration_s if run is not None else None,
        "streams": {},
        "phases": [],
    }
    if run is None:
        return out
    landed = {row.stream: row for row in (run.landing.streams if run.landing else ())}
    tap_side = outcome.tap_streams
    if isinstance(outcome.block, Pipeline) and outcome.block.mappings:
        out["mappings"] = list(outcome.block.mappings)
    for name in sorted(set(run.streams) | set(landed) | set(tap_side or ())):
        row = landed.get(name)
        out["streams"][name] = {
            "records": run.streams.get(name, 0),
            "landed": row.landed if row is not None else None,
            "landing": row.label if row is not None else None,
        }
        if tap_side is not None:  # a mapped pipeline: what left the tap, before the mappers
            out["streams"][name]["tap_records"] = tap_side.get(name, 0)
    out["phases"] = [
        {
            "phase": p.phase,
            "plugin": p.plugin,
            "run_id": p.phase_run_id,
            "status": p.status,
            "exit_code": p.exit_code,
            "duration_s": p.duration_s,
        }
        for p in run.phases
    ]
    return out


def write(result: InvocationResult, path: Path) -> None:
    """Write the result file atomically."""
    text = json.dumps(to_dict(result), indent=2, ensure_ascii=False) + "\n"
    try:
        state.write_text_atomic(path, text)
    except OSError as exc:
        raise FlextContextError(f"cannot write the result file {path}: {exc.strerror}") from exc
