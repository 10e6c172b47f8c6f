"""The `run` command's input turned into what an invocation runs: flags, settings, steps.

Options become `FLEXT_CONTEXT_*` variables (an option wins over its variable), `meltano run`'s
flags become RunFlags (checked as Meltano checks them), and the blocks become one step per
pipeline or command block, each pipeline with its PipelineSpec; nothing starts here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flext_meltano_context import blocks
from flext_meltano_context.errors import UsageError
from flext_meltano_context.invocation import RunFlags

if TYPE_CHECKING:
    from flext_meltano_context.pipeline import PipelineSpec

STRATEGIES = ("auto", "merge", "overwrite")
INSTALL_MODES = ("install", "no_install", "only_install")


def spec_for(pipeline: blocks.Pipeline, flags: RunFlags, plan: blocks.Plan) -> PipelineSpec:
    """The PipelineSpec execute() runs for one pipeline of a Meltano invocation."""
    from flext_meltano_context.pipeline import PipelineSpec

    return PipelineSpec(
        tap=pipeline.tap,
        target=pipeline.target,
        transformers=pipeline.commands,
        full_refresh=flags.full_refresh,
        state_id_suffix=flags.state_id_suffix or plan.state_id_suffix,
        force=flags.force,
    )


_TRUE_FALSE = {True: "true", False: "false"}


def setting_overrides(
    *,
    strict: bool | None = None,
    record_column: str | None = None,
    inject_state: bool | None = None,
    landing: bool | None = None,
    grace_seconds: float | None = None,
    log_path: str | None = None,
    timeout: float | None = None,
) -> dict[str, str]:
    """The `FLEXT_CONTEXT_*` variables the run options set: an option wins over its variable."""
    out: dict[str, str] = {}
    if strict is not None:
        out["FLEXT_CONTEXT_STRICT"] = _TRUE_FALSE[strict]
    if record_column is not None:
        out["FLEXT_CONTEXT_RECORD_COLUMN_STREAMS"] = record_column
    if inject_state is not None:
        out["FLEXT_CONTEXT_INJECT_STATE"] = _TRUE_FALSE[inject_state]
    if landing is not None:
        out["FLEXT_CONTEXT_LANDING"] = _TRUE_FALSE[landing]
    if grace_seconds is not None:
        out["FLEXT_CONTEXT_GRACE_SECONDS"] = repr(float(grace_seconds))
    if log_path is not None:  # a store URL or `systemdb` as given, a file made absolute
        store = "://" in log_path or log_path == "systemdb"
        out["FLEXT_CONTEXT_LINEAGE_PATH"] = log_path if store else str(Path(log_path).absolute())
    if timeout is not None:
        out["FLEXT_CONTEXT_TIMEOUT"] = f"{timeout:g}"
    return out


def flags(
    *,
    full_refresh: bool = False,
    refresh_catalog: bool = False,
    no_state_update: bool = False,
    force: bool = False,
    state_id_suffix: str | None = None,
    state_strategy: str = "auto",
    run_id: str | None = None,
    timeout: float | None = None,
    install: str | None = None,
) -> RunFlags:
    """RunFlags checked as `meltano run` checks them (a run id must be a UUID)."""
    from flext_meltano_context import ids

    if run_id is not None and not ids.is_uuid(run_id):
        raise UsageError(f"--run-id / MELTANO_RUN_ID must be a UUID, got {run_id[:40]!r}")
    if state_strategy not in STRATEGIES:
        raise UsageError(f"--state-strategy must be one of {', '.join(STRATEGIES)}")
    if install is not None and install not in INSTALL_MODES:
        raise UsageError(f"the install mode must be one of {', '.join(INSTALL_MODES)}")
    return RunFlags(
        full_refresh=full_refresh,
        refresh_catalog=refresh_catalog,
        no_state_update=no_state_update,
        force=force,
        state_id_suffix=state_id_suffix or None,
        state_strategy=state_strategy,
        run_id=run_id.lower() if run_id else None,
        timeout=timeout,
        install=install,
    )


Steps = list[tuple[blocks.Pipeline | blocks.Command, "PipelineSpec | None"]]


def standalone_steps(
    tap_cmd: str | None,
    target_cmd: str | None,
    transform_cmds: Sequence[str],
    state_in: Path | None,
    state_out: Path | None,
    run: RunFlags,
    target_config: Path | None,
) -> Steps:
    """The one pipeline of standalone mode; Meltano-only flags are errors here, not ignored."""
    import shlex

    from flext_meltano_context.pipeline import PipelineSpec, step_name

    if tap_cmd is None or target_cmd is None:
        raise UsageError("standalone mode needs both --tap-cmd and --target-cmd")
    meltano_only = {
        "--state-id-suffix": run.state_id_suffix is not None,
        "--refresh-catalog": run.refresh_catalog,
        "--state-strategy": run.state_strategy != "auto",
        "--install": run.install == "install",
        "--only-install": run.install == "only_install",
    }
    for option, given in meltano_only.items():
        if given:
            raise UsageError(
                f"{option} is for Meltano mode (plugin names); standalone runs keep state in "
                "the files of --state/--state-out"
            )
    if run.no_state_update and (state_in is not None or state_out is not None):
        raise UsageError("--no-state-update contradicts --state/--state-out; give one or the other")
    try:
        tap_argv, target_argv = shlex.split(tap_cmd), shlex.split(target_cmd)
        transforms = tuple(tuple(shlex.split(cmd)) for cmd in transform_cmds)
    except ValueError as exc:
        raise UsageError(f"cannot split a command line: {exc}") from exc
    if not tap_argv or not target_argv:
        raise UsageError("--tap-cmd and --target-cmd must not be empty")
    spec = PipelineSpec(
        tap=step_name(tap_argv),
        target=step_name(target_argv),
        tap_cmd=tuple(tap_argv),
        target_cmd=tuple(target_argv),
        transform_cmds=transforms,
        state_in=state_in,
        state_out=state_out,
        full_refresh=run.full_refresh,
        force=run.force,
        target_config=target_config,
    )
    return [(blocks.Pipeline(spec.tap, spec.target), spec)]


def meltano_steps(
    words: Sequence[str], env: Mapping[str, str], run: RunFlags, target_config: Path | None
) -> tuple[blocks.Plan, Steps]:
    """Resolve the words with Meltano's own lookups; a spec per pipeline, nothing started."""
    from dataclasses import replace

    if not env.get("MELTANO_PROJECT_ROOT"):
        raise UsageError(
            "plugin names need Meltano: run 'meltano invoke flext-context run TAP TARGET', "
            "or give commands with --tap-cmd and --target-cmd"
        )
    plan = blocks.resolve(words, env)
    steps: Steps = []
    for block in plan.blocks:
        if isinstance(block, blocks.Pipeline):
            spec = spec_for(block, run, plan)
            steps.append((block, replace(spec, target_config=target_config)))
        else:
            steps.append((block, None))
    return plan, steps


def install_argv(plan: blocks.Plan, env: Mapping[str, str], mode: str) -> list[str] | None:
    """The `meltano run` that installs the plugins the blocks name, as `meltano run` would.

    Meltano's own code path, so the same plugins and the same rules: `--install` installs what
    is missing or whose pip_url changed (Meltano's AUTO reason) and then only prints the plan
    (`--dry-run`: no block starts); `--only-install` (re)installs them all and exits. None for
    `--no-install`, or when no install option was given: the plugins must be installed already.
    """
    from flext_meltano_context.meltano import find_meltano

    if mode not in {"install", "only_install"}:
        return None
    head = [find_meltano(env), "--log-level=info"]
    if plan.environment:
        head.append(f"--environment={plan.environment}")
    action = ["--dry-run", "--install"] if mode == "install" else ["--only-install"]
    return [*head, "run", *action, *plan.words]


def install(plan: blocks.Plan, env: Mapping[str, str], mode: str) -> None:
    """Install the plugins before anything runs, through `meltano run` itself.

    As in `meltano run`, a plugin that fails to install is reported and the blocks still run
    (Meltano goes on; the block then fails on it); only Meltano failing outright stops here.
    """
    import subprocess
    import sys

    from flext_meltano_context.errors import FlextContextError

    argv = install_argv(plan, env, mode)
    if argv is None:
        return
    done = subprocess.run(
        argv,
        env=dict(env),
        cwd=env["MELTANO_PROJECT_ROOT"],
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr.fileno(),  # stdout is data: Meltano's messages go to stderr, live
        check=False,
    )
    if done.returncode != 0:
        raise FlextContextError(
            f"installing the plugins failed: 'meltano {' '.join(argv[2:6])} ...' exited with "
            f"{done.returncode}; Meltano's messages above say why (or run with --no-install)"
        )
