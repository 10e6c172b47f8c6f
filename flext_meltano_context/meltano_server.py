"""Meltano's helper: plugin lookups, state reads/writes and plugin preparation in one process.

It runs on Meltano's own interpreter, whose venv has Meltano but not flext-context, so it imports
only the standard library and Meltano; `meltano.py` starts it by file path. Importing Meltano once
makes storing each confirmed state cost milliseconds instead of the second a `meltano state set`
costs.

Protocol: `serve ENVIRONMENT` reads one JSON request per stdin line and answers each with one
`FLEXT-REPLY {"ok": ...}` or `FLEXT-REPLY {"error": "..."}` line on stdout, after a first
`{"ok": {"ready": ..., "database_uri": ...}}`. Meltano may print on stdout itself, so stdout is
swapped for stderr and replies are marked. `plugins NAME...` answers one lookup and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from meltano.core.project import Project
    from meltano.core.state_service import StateService
    from sqlalchemy.orm import Session

REPLY = "FLEXT-REPLY "

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def reply(out: TextIO, message: dict[str, Any]) -> None:
    """Write one marked reply line and flush it: the caller waits for it."""
    out.write(REPLY + json.dumps(message, default=str) + "\n")
    out.flush()


def lookup(project: Project, names: Sequence[str]) -> dict[str, Any]:
    """Type and capabilities per plugin name; None for names the project lacks."""
    from meltano.core.plugin.error import PluginNotFoundError

    found: dict[str, Any] = {}
    for name in names:
        try:
            plugin = project.plugins.find_plugin(name)
        except PluginNotFoundError:
            found[name] = None
            continue
        found[name] = {"type": str(plugin.type), "capabilities": sorted(plugin.capabilities)}
    return found


class Helper:
    """The requests one helper process answers, with the state service opened on first use."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self._service: StateService | None = None
        self._session: Session | None = None
        self._held: dict[str, contextlib.AsyncExitStack] = {}

    def _state_service(self) -> tuple[StateService, Session]:
        if self._service is None or self._session is None:
            from meltano.core.db import project_engine
            from meltano.core.state_service import StateService

            _engine, sessionmaker = project_engine(self.project)
            self._session = sessionmaker()
            self._service = StateService(self.project, self._session)
        return self._service, self._session

    async def handle(self, request: dict[str, Any]) -> Any:
        """The answer to one request; an exception becomes an error reply."""
        op = request["op"]
        if op == "plugins":
            return lookup(self.project, request["names"])
        if op == "state_get":
            return self._state_service()[0].get_state(request["id"])
        if op == "state_set":
            self._state_service()[0].set_state(request["id"], request["state"])
            return True
        if op == "prepare":
            return await self._prepare(request["name"], request.get("command"))
        if op == "release":
            stack = self._held.pop(request["name"], None)
            if stack is not None:
                await stack.aclose()
            return True
        raise ValueError(f"unknown op {op!r}")

    async def _prepare(self, name: str, command: str | None) -> dict[str, Any]:
        """What `meltano invoke NAME` runs, without starting it.

        Config written, discovery and catalog rules applied, hooks run; held until "release" or
        the end of input, because the config file lives only that long.
        """
        from meltano.core.plugin_invoker import invoker_factory

        _service, session = self._state_service()
        plugin = self.project.plugins.find_plugin(name)
        invoker = invoker_factory(self.project, plugin)
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(invoker.prepared(session))
        # `_invoke` is Meltano's own way from a prepared invoker to argv and env (no public one).
        argv, options, env = await stack.enter_async_context(invoker._invoke(command=command))
        self._held[name] = stack
        cwd = options.get("cwd")
        return {
            "argv": [str(arg) for arg in argv],
            "env": {key: str(value) for key, value in env.items()},
            "cwd": str(cwd) if cwd else None,
        }

    async def close(self) -> None:
        """Release every prepared plugin (their config files go) and the database session."""
        for stack in self._held.values():
            await stack.aclose()
        self._held.clear()
        if self._session is not None:
            self._session.close()


async def serve(handle: Handler, requests: TextIO, out: TextIO) -> None:
    """Answer each request line in order until end of input."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, requests.readline):
        try:
            reply(out, {"ok": await handle(json.loads(line))})
        except Exception as exc:  # noqa: BLE001 - every failure is the caller's to handle
            reply(out, {"error": f"{type(exc).__name__}: {exc}"})


def main(argv: Sequence[str], wrap: Callable[[Handler], Handler] | None = None) -> int:
    """Run the helper; `wrap` lets a test put a fault around the handler (a seam, not a patch)."""
    out, sys.stdout = sys.stdout, sys.stderr  # Meltano's own prints must not look like replies
    try:
        from meltano.core.project import Project

        project = Project.find()
        if argv[1:2] == ["plugins"]:
            reply(out, {"ok": lookup(project, argv[2:])})
            return 0
        if argv[2:3] and argv[2]:
            project.activate_environment(argv[2])
        database_uri = project.settings.get("database_uri")
    except Exception as exc:  # noqa: BLE001 - the caller falls back to `meltano` commands
        reply(out, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    reply(out, {"ok": {"ready": True, "database_uri": str(database_uri)}})
    helper = Helper(project)
    handle = wrap(helper.handle) if wrap is not None else helper.handle

    async def run() -> None:
        try:
            await serve(handle, sys.stdin, out)
        finally:
            await helper.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
