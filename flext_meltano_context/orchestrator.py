"""The seed's Python API: run a pipeline from Python and get a result object, never an exception.

    result = FlextMeltanoETLOrchestrator().execute_pipeline(
        {"tap": "tap-x --config c.json", "target": "target-y", "state_out": "state.json"}
    )
    if result.is_success:
        print(result.value["records_processed"], result.value["pipeline_correlation"])

`config` keys: `tap`, `target` (command lines, or plugin names under Meltano when `meltano` is
true), `transformers` (Meltano blocks), `state`, `state_out`, `full_refresh`,
`state_id_suffix`, `force`, `environ` (the environment to run in; default os.environ).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flext_meltano_context.errors import FlextContextError, UsageError


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """Success with a value, or failure with an error message (and the partial value)."""

    is_success: bool
    value: Mapping[str, Any] | None
    error: str | None = None
    exit_code: int = 0

    @property
    def is_failure(self) -> bool:
        return not self.is_success


def _argv(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"config[{key!r}] must be a command line string or a list of strings")


class FlextMeltanoETLOrchestrator:
    """Runs tap -> target (-> transformer blocks) with one correlation id, like `run`."""

    def execute_pipeline(self, config: Mapping[str, Any]) -> PipelineResult:
        """Run the pipeline `config` describes; failures come back in the result, not raised."""
        from flext_meltano_context.pipeline import PipelineSpec, execute, step_name

        try:
            environ = dict(config.get("environ") or os.environ)
            if "tap" not in config or "target" not in config:
                raise UsageError("config needs 'tap' and 'target'")
            meltano = bool(config.get("meltano", False))
            state_in = config.get("state")
            state_out = config.get("state_out")
            if meltano:
                spec = PipelineSpec(
                    tap=str(config["tap"]),
                    target=str(config["target"]),
                    transformers=tuple(config.get("transformers", ())),
                    full_refresh=bool(config.get("full_refresh", False)),
                    state_id_suffix=config.get("state_id_suffix"),
                    force=bool(config.get("force", False)),
                )
            else:
                tap, target = _argv(config["tap"], "tap"), _argv(config["target"], "target")
                if not tap or not target:
                    raise UsageError("config['tap'] and config['target'] must not be empty")
                spec = PipelineSpec(
                    tap=step_name(tap),
                    target=step_name(target),
                    tap_cmd=tap,
                    target_cmd=target,
                    transform_cmds=tuple(
                        _argv(cmd, "transformers") for cmd in config.get("transformers", ())
                    ),
                    state_in=Path(state_in) if state_in else None,
                    state_out=Path(state_out) if state_out else None,
                    full_refresh=bool(config.get("full_refresh", False)),
                    force=bool(config.get("force", False)),
                )
            result = execute(spec, environ=environ)
        except FlextContextError as exc:
            return PipelineResult(False, None, str(exc), exc.exit_code)
        value = {
            "pipeline_correlation": result.correlation_id,
            "run_id": result.run_id,
            "records_processed": result.records,
            "streams": dict(result.streams),
            "status": result.status,
            "duration_s": result.duration_s,
            "state_persisted": result.state_persisted,
            "lineage_path": str(result.lineage_path),
            "context": {
                "correlation_id": result.correlation_id,
                "run_id": result.run_id,
                "phases": {p.phase: p.status for p in result.phases},
            },
        }
        if result.error is not None:
            return PipelineResult(False, value, str(result.error), result.exit_code)
        return PipelineResult(True, value)
