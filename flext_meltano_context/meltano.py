"""The few Meltano CLI calls a run makes: plugin lookup, catalog, state get/set, invoke.

Each plugin runs through `meltano invoke` so its config, `env:`, inheritance and settings stay
Meltano's. Every Meltano start costs about a second, so independent calls run in parallel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flext_meltano_context.errors import FlextContextError, UsageError

T = TypeVar("T")

# Run with Meltano's own interpreter: looks plugins up without starting any of them.
_PLUGIN_INFO = """
import json, sys
from meltano.core.project import Project
from meltano.core.plugin.error import PluginNotFoundError
project = Project.find()
out = {}
for name in sys.argv[1:]:
    try:
        plugin = project.plugins.find_plugin(name)
    except PluginNotFoundError:
        out[name] = None
        continue
    out[name] = {"type": str(plugin.type), "capabilities": sorted(plugin.capabilities)}
print("\\n" + json.dumps(out))
"""


# A small server on Meltano's own interpreter: plugin lookups and state reads/writes in one
# process that imports Meltano once, so storing each confirmed state costs milliseconds, not the
# second a `meltano state set` process costs. Replies are marked: Meltano may print on stdout.
_SERVER = """
import asyncio, contextlib, json, sys
out, sys.stdout = sys.stdout, sys.stderr
def reply(obj):
    out.write("FLEXT-REPLY " + json.dumps(obj, default=str) + "\\n")
    out.flush()
try:
    from meltano.core.project import Project
    from meltano.core.plugin.error import PluginNotFoundError
    project = Project.find()
    if sys.argv[1]:
        project.activate_environment(sys.argv[1])
except Exception as exc:
    reply({"error": type(exc).__name__ + ": " + str(exc)})
    sys.exit(1)
reply({"ok": "ready"})
service = None
session = None
held = {}

def state_service():
    global service, session
    if service is None:
        from meltano.core.db import project_engine
        from meltano.core.state_service import StateService
        _, sessionmaker = project_engine(project)
        session = sessionmaker(future=True)
        service = StateService(project, session)
    return service

async def prepare(request):
    # What `meltano invoke NAME` runs, without starting it: config written, discovery and
    # catalog rules applied, hooks run; held until "release" (the config file lives until then).
    from meltano.core.plugin_invoker import invoker_factory
    state_service()
    plugin = project.plugins.find_plugin(request["name"])
    invoker = invoker_factory(project, plugin)
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(invoker.prepared(session))
    argv, options, env = await stack.enter_async_context(
        invoker._invoke(command=request.get("command"))
    )
    held[request["name"]] = stack
    return {"argv": [str(a) for a in argv], "env": {k: str(v) for k, v in env.items()},
            "cwd": str(options["cwd"]) if options.get("cwd") else None}

async def main():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        request = json.loads(line)
        try:
            op = request["op"]
            if op == "plugins":
                found = {}
                for name in request["names"]:
                    try:
                        plugin = project.plugins.find_plugin(name)
                    except PluginNotFoundError:
                        found[name] = None
                        continue
                    caps = sorted(plugin.capabilities)
                    found[name] = {"type": str(plugin.type), "capabilities": caps}
                reply({"ok": found})
            elif op == "state_get":
                reply({"ok": state_service().get_state(request["id"])})
            elif op == "state_set":
                state_service().set_state(request["id"], request["state"])
                reply({"ok": True})
            elif op == "prepare":
                reply({"ok": await prepare(request)})
            elif op == "release":
                stack = held.pop(request["name"], None)
                if stack is not None:
                    await stack.aclose()
                reply({"ok": True})
            else:
                reply({"error": "unknown op " + op})
        except Exception as exc:
            reply({"error": type(exc).__name__ + ": " + str(exc)})
    for stack in held.values():
        await stack.aclose()

asyncio.run(main())
"""


class StateServer:
    """Meltano's state service and plugin lookup in one long-lived child process."""

    def __init__(self, python: str, meltano: Meltano) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [python, "-c", _SERVER, meltano.environment or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(meltano.env),
            cwd=meltano.project_root,
            text=True,
            start_new_session=True,
        )
        self._call_reply()  # "ready", or the reason it is not

    def _call_reply(self) -> Any:
        assert self._proc.stdout is not None  # noqa: S101 - stdout=PIPE above
        for line in self._proc.stdout:
            if line.startswith("FLEXT-REPLY "):
                reply = json.loads(line[12:])
                if "error" in reply:
                    raise FlextContextError(f"Meltano state service: {reply['error']}")
                return reply["ok"]
        raise FlextContextError("Meltano state service exited unexpectedly")

    def call(self, **request: Any) -> Any:
        with self._lock:
            assert self._proc.stdin is not None  # noqa: S101 - stdin=PIPE above
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except OSError as exc:
                raise FlextContextError("Meltano state service is gone") from exc
            return self._call_reply()

    def close(self) -> None:
        with self._lock:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    type: str  # extractors, loaders, transformers, utilities...
    capabilities: frozenset[str]


@dataclass(frozen=True, slots=True)
class Meltano:
    """How to call the Meltano that runs us, in which project and environment."""

    executable: str
    project_root: Path
    environment: str | None
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, *args: str, quiet: bool = False) -> list[str]:
        head = [self.executable]
        if quiet:
            head.append("--log-level=warning")
        if self.environment:
            head.append(f"--environment={self.environment}")
        return [*head, *args]

    def invoke_argv(self, plugin: str, *args: str) -> list[str]:
        """`meltano invoke PLUGIN ARGS...`; `dbt-x:run` style names invoke that command."""
        return self.argv("invoke", plugin, *args)

    def _run(self, args: Sequence[str], what: str, timeout: float = 600) -> str:
        try:
            done = subprocess.run(
                list(args),
                capture_output=True,
                env=dict(self.env),
                cwd=self.project_root,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise UsageError(
                f"cannot run Meltano ({self.executable!r}) for {what}: {exc.strerror}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise FlextContextError(f"meltano {what} did not finish in {timeout:.0f} s") from exc
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-8:]
            shown = "\n  ".join(tail) or "(nothing on stderr)"
            raise FlextContextError(
                f"meltano {what} exited with {done.returncode}; last stderr lines:\n  {shown}"
            )
        return done.stdout.decode("utf-8", "replace")

    def python(self) -> str | None:
        """The interpreter Meltano runs on (from its script's shebang), None when unknown."""
        try:
            with Path(self.executable).resolve().open("rb") as script:
                first = script.readline(512)
        except OSError:
            return None
        if not first.startswith(b"#!"):
            return None
        parts = first[2:].decode("utf-8", "replace").split()
        return parts[0] if len(parts) == 1 and Path(parts[0]).exists() else None

    def plugin_info(self, names: Sequence[str]) -> dict[str, PluginInfo | None] | None:
        """Look plugins up in the project; None when Meltano's interpreter is not usable."""
        python = self.python()
        if python is None:
            return None
        try:
            text = self._run([python, "-c", _PLUGIN_INFO, *names], "plugin lookup")
            decoded = json.loads(text.strip().splitlines()[-1])
        except (FlextContextError, ValueError, IndexError):
            return None
        return plugin_infos(decoded, names)

    def state_server(self) -> StateServer | None:
        """A StateServer on Meltano's interpreter, None when that is not usable here."""
        python = self.python()
        if python is None:
            return None
        try:
            return StateServer(python, self)
        except (OSError, FlextContextError, ValueError) as exc:
            import structlog

            structlog.get_logger().info("meltano_state_server_unavailable", reason=str(exc))
            return None

    def dump_catalog(self, tap: str, dest: Path) -> None:
        """The tap's catalog with the project's select/metadata rules applied, written to `dest`."""
        text = self._run(
            self.argv("invoke", "--dump=catalog", tap, quiet=True), f"invoke --dump=catalog {tap}"
        )
        dest.write_text(text, encoding="utf-8")

    def dump_config(self, plugin: str, *, timeout: float = 600) -> dict[str, Any]:
        """The plugin's resolved config (`meltano invoke --dump=config`); it holds secrets."""
        text = self._run(
            self.argv("invoke", "--dump=config", plugin, quiet=True),
            f"invoke --dump=config {plugin}",
            timeout,
        )
        try:
            decoded = json.loads(text)
        except ValueError as exc:
            raise FlextContextError(
                f"meltano invoke --dump=config {plugin} printed no JSON object"
            ) from exc
        if not isinstance(decoded, dict):
            raise FlextContextError(f"meltano invoke --dump=config {plugin} printed no object")
        return decoded

    def state_get(self, state_id: str) -> dict[str, Any] | None:
        """The stored Singer state value for `state_id`, None when there is none."""
        text = self._run(self.argv("state", "get", state_id, quiet=True), f"state get {state_id}")
        lines = [line for line in text.splitlines() if line.strip().startswith("{")]
        if not lines:
            return None
        try:
            stored = json.loads(lines[-1])
        except ValueError as exc:
            raise FlextContextError(
                f"meltano state get {state_id} printed no JSON state: {lines[-1][:80]!r}"
            ) from exc
        value = stored.get("singer_state") if isinstance(stored, dict) else None
        return value if isinstance(value, dict) else None

    def state_set(self, state_id: str, value: Mapping[str, Any]) -> None:
        """Store `value` as the complete state of `state_id` (`meltano state set --force`)."""
        payload = json.dumps({"singer_state": value}, separators=(",", ":"))
        self._run(
            self.argv("state", "set", "--force", state_id, payload, quiet=True),
            f"state set {state_id}",
        )


def plugin_infos(decoded: Any, names: Sequence[str]) -> dict[str, PluginInfo | None]:
    """PluginInfo per name from a lookup's JSON reply; None for names the project lacks."""
    found: dict[str, PluginInfo | None] = {}
    for name in names:
        item = decoded.get(name) if isinstance(decoded, dict) else None
        found[name] = (
            PluginInfo(name, str(item["type"]), frozenset(item["capabilities"]))
            if isinstance(item, dict)
            else None
        )
    return found


def find_meltano(environ: Mapping[str, str]) -> str:
    """The `meltano` that runs us: `$MELTANO_SYS_DIR_ROOT/run/bin`, else `meltano` on PATH."""
    sys_dir = environ.get("MELTANO_SYS_DIR_ROOT")
    if sys_dir:
        candidate = Path(sys_dir) / "run" / "bin"
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("meltano", path=environ.get("PATH"))
    if found is None:
        raise UsageError(
            "Meltano was not found (no $MELTANO_SYS_DIR_ROOT/run/bin and no 'meltano' on PATH); "
            "run through 'meltano invoke flext-context run ...', or use --tap-cmd/--target-cmd"
        )
    return found


def in_parallel(*calls: Callable[[], T]) -> list[T]:
    """Run `calls` on threads at once; results in order; the first error is raised."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int, call: Callable[[], T]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results
