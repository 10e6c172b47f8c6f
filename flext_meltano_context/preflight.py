"""Everything a run checks and prepares before any child starts; bad input fails here.

Standalone: read `--state`, build the commands. Meltano: find Meltano, compute the state id as
`meltano run` does, take the lock, then look the plugins and the stored state up and prepare tap
and target. Through the state server (Meltano's own invoker, in one process that imports Meltano
once) that costs about a second; without it, `meltano` commands run in parallel, then
`meltano invoke` per plugin.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context import runenv, state
from flext_meltano_context.errors import FlextContextError, UsageError
from flext_meltano_context.meltano import Meltano, find_meltano, in_parallel, plugin_infos
from flext_meltano_context.spec import PipelineSpec
from taps_wrapper.tap import standalone_command

if TYPE_CHECKING:
    from flext_meltano_context.meltano import PluginInfo, StateServer

log = structlog.get_logger("flext_meltano_context.preflight")


@dataclass
class Prepared:
    """What preflight found: commands, state, where things go."""

    mode: str
    tap_argv: list[str]
    target_argv: list[str]
    transform_argvs: list[tuple[str, list[str]]]
    state_id: str | None
    loaded: state.LoadedState | None
    write_state: Callable[[dict[str, Any]], None] | None
    lock: state.StateLock | None = None
    workdir: Path | None = None
    meltano: Meltano | None = None
    cwd: str | None = None
    server: StateServer | None = None
    tap_env: Mapping[str, str] | None = None  # Meltano's env for the prepared tap
    target_env: Mapping[str, str] | None = None


def prepare_standalone(spec: PipelineSpec) -> Prepared:
    """Standalone: read `--state`, build the commands."""
    if spec.tap_cmd is None or spec.target_cmd is None:
        raise UsageError("standalone mode needs both --tap-cmd and --target-cmd")

    loaded = None
    if spec.state_in is not None and not spec.full_refresh:
        loaded = state.read_state_file(spec.state_in)
    out = spec.state_out
    write = (lambda value: state.write_json_atomic(out, value)) if out is not None else None
    if spec.meltano_state is not None:  # a mapped pair: commands, but Meltano's state
        kept = spec.meltano_state
        return Prepared(
            mode="meltano",
            tap_argv=list(spec.tap_cmd),
            target_argv=list(spec.target_cmd),
            transform_argvs=[(" ".join(cmd), list(cmd)) for cmd in spec.transform_cmds],
            state_id=kept.state_id,
            loaded=kept.loaded,
            write_state=kept.write,
        )
    return Prepared(
        mode="standalone",
        tap_argv=standalone_command(spec.tap_cmd, spec.state_in if loaded else None),
        target_argv=list(spec.target_cmd),
        transform_argvs=[(" ".join(cmd), list(cmd)) for cmd in spec.transform_cmds],
        state_id=str(out) if out is not None else None,
        loaded=loaded,
        write_state=write,
    )


def prepare_meltano(
    spec: PipelineSpec,
    env: Mapping[str, str],
    identity: runenv.RunIdentity,
    *,
    use_server: bool = True,
) -> Prepared:
    """Meltano: state id, lock, then plugins, stored state and prepared commands."""
    root = Path(env["MELTANO_PROJECT_ROOT"])
    environment = env.get("MELTANO_ENVIRONMENT") or None
    meltano = Meltano(find_meltano(env), root, environment, env)
    suffix = spec.state_id_suffix or env.get("MELTANO_RUN_STATE_ID_SUFFIX") or None
    if environment is None:
        if spec.state_id_suffix:
            raise UsageError(
                "--state-id-suffix needs a Meltano environment; pass --environment to meltano "
                "or set default_environment in meltano.yml"
            )
        log.warning(
            "stateless_run",
            reason="no Meltano environment is active, so no state is loaded or stored "
            "(as under meltano run); set default_environment in meltano.yml to keep state",
        )
        sid = None
    else:
        sid = state.state_id(environment, spec.tap, spec.target, suffix)
    sys_dir = Path(env.get("MELTANO_SYS_DIR_ROOT") or root / ".meltano")
    workdir = sys_dir / "flext-context" / "runs" / identity.run_id
    lock = None
    if sid is not None:
        lock = state.StateLock(sys_dir / "flext-context" / "locks", sid)
        lock.acquire(
            run_id=identity.run_id, correlation_id=identity.correlation_id, force=spec.force
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        return _preflight_meltano(spec, meltano, sid, workdir, lock, use_server)
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _preflight_meltano(
    spec: PipelineSpec,
    meltano: Meltano,
    sid: str | None,
    workdir: Path,
    lock: state.StateLock | None,
    use_server: bool,
) -> Prepared:
    """Look plugins and state up, prepare tap and target, all before anything runs.

    Through the state server (Meltano's own invoker, in one process that imports Meltano once):
    about a second. Without it, `meltano` commands in parallel, then `meltano invoke` per plugin.
    """
    names = [spec.tap, spec.target, *(block.split(":", 1)[0] for block in spec.transformers)]
    wants_state = sid is not None and not spec.full_refresh
    server = meltano.state_server() if use_server else None
    if server is not None:
        try:
            plugins = plugin_infos(server.call(op="plugins", names=names), names)
            stored = server.call(op="state_get", id=sid) if wants_state else None
        except FlextContextError as exc:
            log.info("meltano_state_server_failed", reason=str(exc))
            server.close()
            server = None
    if server is not None:
        try:
            value = stored.get("singer_state") if isinstance(stored, dict) else None
            _caps, loaded = _check_plugins(spec, plugins, value, sid, names)
            tap = server.call(op="prepare", name=spec.tap)
            target = server.call(op="prepare", name=spec.target)
            tap_argv = list(tap["argv"])
            if loaded is not None:
                tap_argv += ["--state", str(_state_file(workdir, loaded))]
            return Prepared(
                mode="meltano",
                tap_argv=tap_argv,
                target_argv=list(target["argv"]),
                transform_argvs=[(b, meltano.invoke_argv(b)) for b in spec.transformers],
                state_id=sid,
                loaded=loaded,
                write_state=_state_writer(meltano, sid, server) if sid is not None else None,
                lock=lock,
                workdir=workdir,
                meltano=meltano,
                cwd=str(meltano.project_root),
                server=server,
                tap_env=tap["env"],
                target_env=target["env"],
            )
        except BaseException:
            server.close()
            raise
    return _preflight_cli(spec, meltano, sid, workdir, lock, names, wants_state)


def _preflight_cli(
    spec: PipelineSpec,
    meltano: Meltano,
    sid: str | None,
    workdir: Path,
    lock: state.StateLock | None,
    names: list[str],
    wants_state: bool,
) -> Prepared:
    catalog = workdir / "catalog.json"

    def capture(call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            try:
                return call()
            except FlextContextError as exc:
                return exc

        return run

    info, stored, dumped = in_parallel(
        capture(lambda: meltano.plugin_info(names)),
        capture(lambda: meltano.state_get(sid) if wants_state and sid else None),
        capture(lambda: meltano.dump_catalog(spec.tap, catalog)),
    )
    if isinstance(stored, FlextContextError):
        raise stored
    caps, loaded = _check_plugins(spec, info if isinstance(info, dict) else {}, stored, sid, names)
    tap_args: list[str] = []
    if "catalog" in caps or "properties" in caps:
        if isinstance(dumped, FlextContextError):
            raise dumped
        tap_args += ["--catalog" if "catalog" in caps else "--properties", str(catalog)]
    if loaded is not None:
        tap_args += ["--state", str(_state_file(workdir, loaded))]
    return Prepared(
        mode="meltano",
        tap_argv=meltano.invoke_argv(spec.tap, *tap_args),
        target_argv=meltano.invoke_argv(spec.target),
        transform_argvs=[(block, meltano.invoke_argv(block)) for block in spec.transformers],
        state_id=sid,
        loaded=loaded,
        write_state=_state_writer(meltano, sid, None) if sid is not None else None,
        lock=lock,
        workdir=workdir,
        meltano=meltano,
        cwd=str(meltano.project_root),
    )


def _state_file(workdir: Path, loaded: state.LoadedState) -> Path:
    path = workdir / "state.json"
    state.write_json_atomic(path, loaded.value)
    return path


def _state_writer(
    meltano: Meltano, sid: str, server: StateServer | None
) -> Callable[[dict[str, Any]], None]:
    def write(value: dict[str, Any]) -> None:
        if server is not None:
            try:
                server.call(op="state_set", id=sid, state=json.dumps({"singer_state": value}))
                return
            except FlextContextError as exc:
                log.warning(
                    "meltano_state_server_failed", reason=str(exc), fallback="meltano state set"
                )
        meltano.state_set(sid, value)

    return write


def _check_plugins(
    spec: PipelineSpec,
    plugins: Mapping[str, PluginInfo | None],
    stored: Any,
    sid: str | None,
    names: Sequence[str],
) -> tuple[frozenset[str], state.LoadedState | None]:
    """The tap's capabilities and the state to resume from; UsageError for what cannot run."""
    kinds = {spec.tap: "extractors", spec.target: "loaders"}
    for name in names:
        if name in plugins and plugins[name] is None:
            raise UsageError(
                f"no plugin named {name!r} in this Meltano project; check the name in "
                f"meltano.yml, or add it with 'meltano add'"
            )
        found = plugins.get(name)
        if found is not None and name in kinds and found.type != kinds[name]:
            raise UsageError(
                f"{name!r} is one of the project's {found.type}, not {kinds[name]}; "
                f"the order is: run TAP TARGET [TRANSFORMER:COMMAND ...]"
            )
    tap_info = plugins.get(spec.tap)
    caps = tap_info.capabilities if tap_info is not None else frozenset({"catalog", "state"})
    loaded = state.loaded(stored) if isinstance(stored, dict) else None
    if loaded is not None and "state" not in caps:
        raise UsageError(
            f"{spec.tap!r} does not declare the 'state' capability, so it cannot resume from the "
            f"state stored under {sid!r}; add 'state' to its capabilities in meltano.yml, or pass "
            "--full-refresh to extract everything"
        )
    return caps, loaded
