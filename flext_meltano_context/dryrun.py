"""The `run --dry-run` text: per block its command, state id, where catalog and state come from."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING

from flext_meltano_context import blocks, state

if TYPE_CHECKING:
    from flext_meltano_context.invocation import RunFlags
    from flext_meltano_context.options import Steps


def describe(plan: blocks.Plan, flags: RunFlags, env: Mapping[str, str]) -> str:
    """The `--dry-run` text: per block its command, state id, where catalog and state come from."""
    lines = [f"flext-context run: {len(plan.blocks)} block(s), nothing started (--dry-run)"]
    for job, tasks in plan.jobs.items():
        lines.append(f"job {job}: {' '.join(tasks)}")
    environment = plan.environment
    meltano = "meltano" + (f" --environment={environment}" if environment else "")
    lines.append(_install_line(plan, flags, meltano))
    for number, block in enumerate(plan.blocks, 1):
        if isinstance(block, blocks.Command):
            lines.append(f"{number}. command {block.block}")
            lines.append(f"   runs: {meltano} invoke {block.block}")
            continue
        lines.append(f"{number}. pipeline {block.name}")
        for mapping in block.mappings:
            mapper = plan.plugins.get(mapping, {}).get("plugin", mapping)
            lines.append(f"   mapping {mapping} (mapper {mapper}), between tap and target")
        lines.append(f"   tap: {meltano} invoke {block.tap} --catalog <catalog> [--state <state>]")
        for mapping in block.mappings:
            lines.append(f"   mapper: {meltano} invoke {mapping} (its own process, piped)")
        if block.mappings:
            lines.append("   counted: as it leaves the tap, and again as it enters the target")
        lines.append(f"   target: {meltano} invoke {block.target}  (fed by the counting relay)")
        caps = set(plan.plugins.get(block.tap, {}).get("capabilities") or ())
        refresh = flags.refresh_catalog or flags.full_refresh
        lines.append(
            "   catalog: discovery by "
            + block.tap
            + (
                " (cache dropped: --refresh-catalog)"
                if refresh
                else " unless .meltano/run/" + block.tap + "/tap.properties.json is current"
            )
            + ", then the project's select and metadata rules"
            if caps & {"catalog", "properties"} or not caps
            else "   catalog: none (the tap declares neither 'catalog' nor 'properties')"
        )
        suffix = flags.state_id_suffix or plan.state_id_suffix
        sid = state.state_id(environment, block.tap, block.target, suffix) if environment else None
        if sid is None:
            lines.append("   state id: none (no Meltano environment: a stateless run)")
        else:
            lines.append(f"   state id: {sid}")
        if sid is None or flags.no_state_update:
            lines.append("   state: neither loaded nor stored (--no-state-update)" if sid else "")
        else:
            source = (
                "not loaded (--full-refresh)"
                if flags.full_refresh
                else f"loaded from the Meltano state backend ({meltano} state get {sid})"
                + ("" if not caps or "state" in caps else "; the tap lacks 'state': not passed")
            )
            lines.append(f"   state: {source}; each state the target confirms is stored")
            if flags.state_strategy != "auto" or flags.full_refresh:
                lines.append(f"   state strategy: {flags.state_strategy}")
        for command in block.commands:
            lines.append(f"   then: {meltano} invoke {command} (after a successful load)")
    return "\n".join(line for line in lines if line)


def _install_line(plan: blocks.Plan, flags: RunFlags, meltano: str) -> str:
    """What is installed before the blocks run (--install, --no-install, --only-install)."""
    words = " ".join(plan.words)
    if flags.install == "install":
        return (
            f"install: first {meltano} run --dry-run --install {words} (installs what is missing "
            "or changed, starts no block)"
        )
    if flags.install == "only_install":
        return f"install: {meltano} run --only-install {words}, then exit 0 (no block runs)"
    why = "--no-install" if flags.install == "no_install" else "no --install given"
    return f"install: nothing ({why}): the plugins must be installed"


def describe_standalone(steps: Steps) -> str:
    """The `--dry-run` text of a standalone run."""
    lines = ["flext-context run: 1 pipeline, nothing started (--dry-run)"]
    for _block, spec in steps:
        if spec is None or spec.tap_cmd is None or spec.target_cmd is None:
            continue

        lines.append(f"1. pipeline {spec.tap}-to-{spec.target} (standalone)")
        lines.append(f"   tap: {shlex.join(spec.tap_cmd)}")
        lines.append(f"   target: {shlex.join(spec.target_cmd)}  (fed by the counting relay)")
        lines.append("   catalog: whatever the tap command passes (none added)")
        loaded = "none" if spec.state_in is None or spec.full_refresh else str(spec.state_in)
        lines.append(f"   state: loaded from {loaded}; stored to {spec.state_out or 'nowhere'}")
        for cmd in spec.transform_cmds:
            lines.append(f"   then: {shlex.join(cmd)} (after a successful load)")
    return "\n".join(lines)
