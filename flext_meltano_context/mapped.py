"""A pipeline with mappings (`tap-x my-mapping target-y`) run through `pipeline.execute()`.

The run loop knows a tap and a target. Here the tap side is `chain` (tap | relay | mappers, one
process per mapping as `meltano run`), the target is `meltano invoke TARGET`; both are given to
execute() as commands, through small wrapper scripts named after the plugins so the run is
recorded under their names. What Meltano mode does in preflight is done here for this case: the
state lock, the catalog (discovery with the project's rules), the stored state (the tap gets
`--state` when it declares the capability); the run loop's Persister stores each state the target
confirms as it confirms it under `meltano run`'s state id (mapping names are not part of it, as in
Meltano), and the lineage log records the run in mode `meltano` with that id. Records
are counted on both sides: leaving the tap (the chain's relay) and entering the target.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context import blocks, chain, state
from flext_meltano_context.errors import UsageError

if TYPE_CHECKING:
    from flext_meltano_context.invocation import Outcome, RunFlags
    from flext_meltano_context.meltano import Meltano
    from flext_meltano_context.pipeline import PipelineSpec, RunResult, Settings
    from flext_meltano_context.relay import RelayProgress

log = structlog.get_logger("flext_meltano_context.mapped")


def _script(path: Path, argv: list[str]) -> str:
    """An executable named like the plugin that runs `argv` (the run records it by that name)."""
    path.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n', encoding="utf-8")
    path.chmod(0o700)
    return str(path)


def run(
    step: blocks.Pipeline,
    spec: PipelineSpec,
    env: Mapping[str, str],
    settings: Settings,
    flags: RunFlags,
    progress: Callable[[str], Callable[[RelayProgress], None] | None] | None,
) -> Outcome:
    """Run the mapped pipeline; its Outcome carries the records per stream on both sides."""
    from flext_meltano_context import ids
    from flext_meltano_context.invocation import pipeline_outcome
    from flext_meltano_context.meltano import Meltano, find_meltano

    root = Path(env["MELTANO_PROJECT_ROOT"])
    environment = env.get("MELTANO_ENVIRONMENT") or None
    meltano = Meltano(find_meltano(env), root, environment, env)
    sys_dir = Path(env.get("MELTANO_SYS_DIR_ROOT") or root / ".meltano")
    work = sys_dir / "flext-context" / "mapped" / ids.uuid7()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o700)  # the target's config may be written here for the landing check
    suffix = spec.state_id_suffix or env.get("MELTANO_RUN_STATE_ID_SUFFIX") or None
    sid = state.state_id(environment, spec.tap, spec.target, suffix) if environment else None
    keep_state = sid is not None and not flags.no_state_update
    lock = None
    try:
        if keep_state and sid is not None:
            lock = state.StateLock(sys_dir / "flext-context" / "locks", sid)
            lock.acquire(
                run_id=work.name,
                correlation_id=env.get("FLEXT_CORRELATION_ID", work.name),
                force=spec.force,
            )
        result = _execute(
            step, spec, env, settings, flags, progress, meltano, work, sid if keep_state else None
        )
        tap_side = chain.side_counts(work / "tap-side.json")
        _record_both_sides(settings, result, step, tap_side, sid if keep_state else None)
        if tap_side is not None:
            sent = ", ".join(f"{k} {v:,}" for k, v in sorted(tap_side.items())) or "nothing"
            sys.stderr.write(f"  mapped by {', '.join(step.mappings)}: the tap sent {sent}\n")
    finally:
        if lock is not None:
            lock.release()
        shutil.rmtree(work, ignore_errors=True)
    return pipeline_outcome(step, result, tap_side)


def _execute(
    step: blocks.Pipeline,
    spec: PipelineSpec,
    env: Mapping[str, str],
    settings: Settings,
    flags: RunFlags,
    progress: Callable[[str], Callable[[RelayProgress], None] | None] | None,
    meltano: Meltano,
    work: Path,
    sid: str | None,
) -> RunResult:
    from dataclasses import replace

    from flext_meltano_context.invocation import drop_catalog_cache
    from flext_meltano_context.meltano import plugin_infos
    from flext_meltano_context.pipeline import execute
    from flext_meltano_context.spec import MeltanoState
    from flext_meltano_context.strategy import merge_wanted

    info = meltano.plugin_info([spec.tap]) or plugin_infos({}, [spec.tap])
    found = info.get(spec.tap)
    caps = found.capabilities if found is not None else frozenset({"catalog", "state"})
    if flags.refresh_catalog or flags.full_refresh:
        drop_catalog_cache(env, spec.tap)
    tap_args: list[str] = []
    if caps & {"catalog", "properties"}:
        catalog = work / "catalog.json"
        meltano.dump_catalog(spec.tap, catalog)
        tap_args += ["--catalog" if "catalog" in caps else "--properties", str(catalog)]
    stored = meltano.state_get(sid) if sid is not None else None
    if stored and not spec.full_refresh:
        if "state" not in caps:
            raise UsageError(
                f"{spec.tap!r} does not declare the 'state' capability, so it cannot resume from "
                f"the state stored under {sid!r}; add 'state' to its capabilities in meltano.yml, "
                "or pass --full-refresh"
            )
        state.write_json_atomic(work / "state_in.json", stored)
        tap_args += ["--state", str(work / "state_in.json")]
    commands = [meltano.invoke_argv(spec.tap, *tap_args)]
    commands += [meltano.invoke_argv(mapping) for mapping in step.mappings]
    tap_cmd = [
        sys.executable, "-m", "flext_meltano_context.chain",
        "--stats", str(work / "tap-side.json"), "--commands", json.dumps(commands),
    ]  # fmt: skip
    target_config = spec.target_config
    if target_config is None and settings.landing:
        target_config = work / "target-config.json"
        fd = os.open(target_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(meltano.dump_config(spec.target), out)
    kept = MeltanoState(None, None, None)  # the run is recorded in mode meltano, stateless
    if sid is not None:
        previous = (stored or {}) if merge_wanted(spec, flags) else None
        resumed = state.loaded(stored) if stored and not spec.full_refresh else None
        kept = MeltanoState(sid, resumed, _state_writer(meltano, sid, previous))
    mapped_spec = replace(
        spec,
        tap_cmd=(_script(work / spec.tap, tap_cmd),),
        target_cmd=(_script(work / spec.target, meltano.invoke_argv(spec.target)),),
        transformers=(),
        transform_cmds=tuple(tuple(meltano.invoke_argv(block)) for block in spec.transformers),
        state_out=None,
        state_in=None,
        state_id_suffix=None,
        target_config=target_config,
        meltano_state=kept,
    )
    return execute(
        mapped_spec,
        environ=env,
        settings=settings,
        progress=progress(step.name) if progress else None,
    )


def _state_writer(
    meltano: Meltano, sid: str, previous: Mapping[str, Any] | None
) -> Callable[[dict[str, Any]], None]:
    """Stores each state the target confirms under `sid`, as the run loop's Persister offers it
    (empty ones never reach it), merged into the earlier one when the strategy merges."""
    from flext_meltano_context.strategy import deep_merge

    def write(value: dict[str, Any]) -> None:
        meltano.state_set(sid, deep_merge(previous, value) if previous is not None else value)

    return write


def _record_both_sides(
    settings: Settings,
    result: RunResult,
    step: blocks.Pipeline,
    tap_side: Mapping[str, int] | None,
    sid: str | None,
) -> None:
    """A `mapped_streams` event in the pipeline's run: records per stream on both sides."""
    from flext_meltano_context.lineage.recorder import Recorder

    recorder = Recorder(
        settings.lineage_path, run_id=result.run_id, correlation_id=result.correlation_id
    )
    try:
        recorder.record(
            "mapped_streams",
            {
                "mappings": list(step.mappings),
                "tap_side": dict(tap_side) if tap_side is not None else None,
                "target_side": dict(result.streams),
                "state_id": sid,
            },
            fsync=True,
        )
    finally:
        recorder.close()
