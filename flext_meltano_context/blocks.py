"""Parse a `run` invocation as `meltano run` does: jobs, tap/target pairs, mappings, commands.

Meltano's own code does the lookups: a short script on Meltano's interpreter expands job names
(`TaskSetsService`), finds each plugin (mapping names included) and runs Meltano's `BlockParser`
on the same words. `split()` below is the same block rule in pure Python (tested side by side with
Meltano's); it decides when Meltano's parser is not importable (another Meltano version).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flext_meltano_context.errors import FlextContextError, UsageError

# Run with Meltano's interpreter: jobs expanded, plugins found and Meltano's own BlockParser
# applied, without starting any plugin. `no_state_update=True`: parsing then creates no job and
# no log folder. Meltano may print on stdout: the reply is the marked line.
_PARSE = """
import json, sys
out, sys.stdout = sys.stdout, sys.stderr
reply = {}
try:
    import structlog
    from meltano.core.project import Project
    from meltano.core.plugin.error import PluginNotFoundError
    from meltano.core.task_sets_service import TaskSetsService
    project = Project.find()
    if sys.argv[1]:
        project.activate_environment(sys.argv[1])
    words = sys.argv[2:]
    env = project.environment
    reply["environment"] = env.name if env else None
    reply["state_id_suffix"] = getattr(env, "state_id_suffix", None) if env else None
    jobs = TaskSetsService(project)
    expanded, found_jobs = [], {}
    for word in words:
        if jobs.exists(word):
            found_jobs[word] = list(jobs.get(word).flat_args)
            expanded.extend(found_jobs[word])
        else:
            expanded.append(word)
    reply["jobs"] = found_jobs
    reply["words"] = expanded
    plugins = {}
    for word in expanded:
        name = word.split(":", 1)[0]
        try:
            plugin = project.plugins.find_plugin(name)
        except PluginNotFoundError:
            plugins[name] = None
            continue
        plugins[name] = {
            "type": str(plugin.type),
            "plugin": plugin.name,
            "mapping": plugin.extra_config.get("_mapping_name"),
            "capabilities": sorted(plugin.capabilities),
            "commands": sorted(plugin.all_commands),
        }
    reply["plugins"] = plugins
    try:
        from meltano.core.block.block_parser import BlockParser
        from meltano.core.block.extract_load import ExtractLoadBlocks
        parser = BlockParser(structlog.get_logger(), project, words, no_state_update=True)
        blocks = []
        for blk in parser.find_blocks(0):
            if isinstance(blk, ExtractLoadBlocks):
                blocks.append({"kind": "pipeline",
                               "plugins": [b.string_id for b in blk.blocks]})
            else:
                blocks.append({"kind": "command", "plugin": blk.string_id,
                               "command": blk.command})
        reply["meltano_blocks"] = blocks
    except Exception as exc:
        import click
        from meltano.core.block.blockset import BlockSetValidationError
        if isinstance(exc, (click.ClickException, BlockSetValidationError)):
            reply["meltano_error"] = str(getattr(exc, "message", "") or exc)
        else:  # not a verdict on the words (no system database yet, another Meltano)
            reply["meltano_parser"] = "unavailable: " + type(exc).__name__
except Exception as exc:
    reply["error"] = type(exc).__name__ + ": " + str(exc)
out.write("\\nFLEXT-PLAN " + json.dumps(reply) + "\\n")
"""

_SINGER = {"extractors", "loaders", "mappers"}
_INVALID = "block violates set requirements"  # Meltano's BlockSetValidationError wording


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A tap/target pair with the mappings between them; one state id from head and tail."""

    tap: str
    target: str
    mappings: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()  # command blocks that follow it, run by the same execute()

    @property
    def name(self) -> str:
        return f"{self.tap}-to-{self.target}"

    @property
    def words(self) -> tuple[str, ...]:
        return (self.tap, *self.mappings, self.target)


@dataclass(frozen=True, slots=True)
class Command:
    """A `plugin[:command]` block (dbt, a utility) that is not part of a pipeline."""

    block: str

    @property
    def plugin(self) -> str:
        return self.block.split(":", 1)[0]


Block = Pipeline | Command


@dataclass(frozen=True, slots=True)
class Plan:
    """An invocation resolved: its blocks in order, and what the words expanded from."""

    blocks: tuple[Block, ...]
    words: tuple[str, ...]  # after job expansion
    jobs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    environment: str | None = None
    state_id_suffix: str | None = None  # the environment's, when it sets one
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def pipelines(self) -> tuple[Pipeline, ...]:
        return tuple(b for b in self.blocks if isinstance(b, Pipeline))


def split(
    words: Sequence[str], kinds: Mapping[str, str], mapper_of: Mapping[str, str] | None = None
) -> list[Pipeline | Command]:
    """Blocks as Meltano's BlockParser.find_blocks forms them, with its error messages.

    `kinds` maps a plugin or mapping name to its plugin type; `mapper_of` maps a mapping name to
    its mapper plugin. An extractor opens a pipeline, mappings may follow, a loader closes it; any
    plugin that is not an extractor, loader or mapper is a command block.
    """
    mapper_of = mapper_of or {}
    for word in words:
        if kinds.get(word.split(":", 1)[0]) is None:
            raise UsageError(f"Block {word} not found")
    names = [word.split(":", 1)[0] for word in words]

    def bad(index: int, message: str) -> UsageError:
        return UsageError(f"{_INVALID}: {message}")

    out: list[Pipeline | Command] = []
    at = 0
    while at < len(words):
        kind = kinds[names[at]]
        if kind == "extractors":
            end = at + 1
            while end < len(words) and kinds[names[end]] == "mappers":
                if mapper_of.get(names[end], names[end]) == names[end]:
                    raise bad(
                        end,
                        f"Expected unique mappings name not the mapper plugin name: {names[end]}.",
                    )
                end += 1
            if end >= len(words):
                raise bad(at, "Loader missing in block set!")
            if kinds[names[end]] != "loaders":
                raise bad(
                    at,
                    f"Unknown command type or bad block sequence at index {at + 1}, "
                    f"starting block '{names[at]}'",
                )
            out.append(Pipeline(names[at], names[end], tuple(names[at + 1 : end])))
            at = end + 1
        elif kind in _SINGER:  # Meltano names a mapping by its mapper plugin here
            raise bad(
                at,
                f"Unknown command type or bad block sequence at index {at + 1}, "
                f"starting block '{mapper_of.get(names[at], names[at])}'",
            )
        else:
            out.append(Command(words[at]))
            at += 1
    return out


def attach_commands(blocks: Sequence[Pipeline | Command]) -> tuple[Block, ...]:
    """Command blocks right after a pipeline join it (one run record, dbt lineage included).

    They still run only after the load succeeded and a failure still skips the rest, as under
    `meltano run`; commands before the first pipeline stay blocks of their own.
    """
    out: list[Block] = []
    for block in blocks:
        if isinstance(block, Command) and out and isinstance(out[-1], Pipeline):
            last = out[-1]
            out[-1] = Pipeline(last.tap, last.target, last.mappings, (*last.commands, block.block))
        else:
            out.append(block)
    return tuple(out)


def from_reply(reply: Mapping[str, Any], words: Sequence[str]) -> Plan:
    """A Plan from the lookup script's reply; Meltano's own parse wins when it ran."""
    if "error" in reply:
        raise FlextContextError(f"Meltano could not read the project: {reply['error']}")
    plugins = {k: v for k, v in (reply.get("plugins") or {}).items() if isinstance(v, dict)}
    for name, found in (reply.get("plugins") or {}).items():
        if found is None:
            raise UsageError(
                f"Block {name} not found: no plugin, mapping or job of that name in this "
                "Meltano project; check meltano.yml"
            )
    expanded = [str(w) for w in reply.get("words") or words]
    kinds = {name: str(found["type"]) for name, found in plugins.items()}
    mapper_of = {
        name: str(found["plugin"]) for name, found in plugins.items() if found.get("mapping")
    }
    if "meltano_error" in reply:  # Meltano's own verdict on the words
        raise UsageError(str(reply["meltano_error"]))
    ours = split(expanded, kinds, mapper_of)
    if "meltano_blocks" in reply and _shape(reply["meltano_blocks"]) != shape(ours, mapper_of):
        raise FlextContextError(
            "flext-context and Meltano read this invocation differently: "
            f"{reply['meltano_blocks']!r}; please report it"
        )
    return Plan(
        blocks=attach_commands(ours),
        words=tuple(expanded),
        jobs={k: tuple(v) for k, v in (reply.get("jobs") or {}).items()},
        environment=reply.get("environment"),
        state_id_suffix=reply.get("state_id_suffix") or None,
        plugins=plugins,
    )


def _shape(blocks: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Meltano's blocks as comparable tuples (mappings named by their mapper plugin)."""
    return [
        ("pipeline", tuple(b["plugins"]))
        if b["kind"] == "pipeline"
        else ("command", b["plugin"], b.get("command"))
        for b in blocks
    ]


def shape(blocks: Sequence[Pipeline | Command], mapper_of: Mapping[str, str]) -> list[Any]:
    """Our blocks in the form of `_shape` (Meltano names a mapping by its mapper plugin)."""
    return [
        ("pipeline", (b.tap, *(mapper_of.get(m, m) for m in b.mappings), b.target))
        if isinstance(b, Pipeline)
        else ("command", b.plugin, b.block.partition(":")[2] or None)
        for b in blocks
    ]


def parse_reply(python: str, words: Sequence[str], environment: str | None, **run: Any) -> Any:
    """Run the lookup script on Meltano's interpreter; its decoded reply."""
    try:
        done = subprocess.run(
            [python, "-c", _PARSE, environment or "", *words],
            capture_output=True,
            check=False,
            timeout=300,
            stdin=subprocess.DEVNULL,
            **run,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FlextContextError(f"cannot run Meltano's interpreter {python!r}: {exc}") from exc
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("FLEXT-PLAN "):
            return json.loads(line[11:])
    tail = "\n  ".join(done.stderr.decode("utf-8", "replace").splitlines()[-8:])
    raise FlextContextError(f"Meltano's block lookup printed no answer; stderr:\n  {tail}")


def resolve(words: Sequence[str], env: Mapping[str, str]) -> Plan:
    """The Plan of `meltano run WORDS` in the project `env` names (MELTANO_PROJECT_ROOT)."""
    from pathlib import Path

    from flext_meltano_context.meltano import Meltano, find_meltano

    root = Path(env["MELTANO_PROJECT_ROOT"])
    meltano = Meltano(find_meltano(env), root, env.get("MELTANO_ENVIRONMENT") or None, env)
    python = meltano.python()
    if python is None:
        raise UsageError(
            f"cannot find the Python that runs Meltano ({meltano.executable}); blocks, jobs and "
            "mappings are looked up with Meltano's own code"
        )
    meltano.prestart_state_server()  # its start-up runs beside the parse below
    reply = parse_reply(python, words, meltano.environment, env=dict(env), cwd=root)
    return from_reply(reply, words)
