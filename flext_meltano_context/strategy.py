"""`--state-strategy` with the semantics of Meltano's state service (`should_merge_states`).

`merge` (or `auto` under `--full-refresh`) makes Meltano store the new state as a partial state
that reads back merged onto the stored one; `overwrite` (and `auto` otherwise) replaces it. The
run loop stores what the target confirms; for a merging strategy the stored state from before the
run is merged under it afterwards, so `meltano state get` reads what it reads after `meltano run`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flext_meltano_context import state

if TYPE_CHECKING:
    from flext_meltano_context.invocation import RunFlags
    from flext_meltano_context.pipeline import PipelineSpec


def merge_wanted(spec: PipelineSpec, flags: RunFlags) -> bool:
    """Meltano's `should_merge_states`: merge, or auto with a full refresh."""
    return flags.state_strategy == "merge" or (flags.state_strategy == "auto" and spec.full_refresh)


def stored_before(
    spec: PipelineSpec, env: Mapping[str, str], flags: RunFlags
) -> dict[str, Any] | None:
    """The stored state to merge the run's state into, when the strategy merges."""
    if spec.standalone or flags.no_state_update or not merge_wanted(spec, flags):
        return None
    meltano, sid = _meltano_and_sid(spec, env)
    if meltano is None or sid is None:
        return None
    return meltano.state_get(sid) or {}


def _meltano_and_sid(spec: PipelineSpec, env: Mapping[str, str]) -> tuple[Any, str | None]:
    from flext_meltano_context.meltano import Meltano, find_meltano

    environment = env.get("MELTANO_ENVIRONMENT") or None
    if environment is None:
        return None, None
    root = Path(env["MELTANO_PROJECT_ROOT"])
    meltano = Meltano(find_meltano(env), root, environment, env)
    suffix = spec.state_id_suffix or env.get("MELTANO_RUN_STATE_ID_SUFFIX") or None
    return meltano, state.state_id(environment, spec.tap, spec.target, suffix)


def deep_merge(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Meltano's state merge (`meltano.core.utils.merge`): dicts merged, the rest replaced."""
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_state(env: Mapping[str, str], sid: str, previous: Mapping[str, Any]) -> None:
    """Store previous-merged-with-new, which is what Meltano's state service then returns."""
    from flext_meltano_context.meltano import Meltano, find_meltano

    root = Path(env["MELTANO_PROJECT_ROOT"])
    meltano = Meltano(find_meltano(env), root, env.get("MELTANO_ENVIRONMENT") or None, env)
    current = meltano.state_get(sid) or {}
    meltano.state_set(sid, deep_merge(previous, current))
