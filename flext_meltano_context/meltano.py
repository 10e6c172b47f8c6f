"""The few Meltano CLI calls a run makes: plugin lookup, catalog, state get/set, invoke.

Each plugin runs through `meltano invoke` so its config, `env:`, inheritance and settings stay
Meltano's. Every Meltano start costs about a second, so independent calls run in parallel, and
`StateServer` asks one long-lived helper (`meltano_server.py`) instead. Every answer, of the helper
or of a `meltano` command, is bounded by `meltano_timeout` (issue 11): a locked or unreachable
system database gives an error naming it, never a run that waits forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import structlog

from flext_meltano_context.children import Watchdog, die_with_parent
from flext_meltano_context.errors import FlextContextError, UsageError
from flext_meltano_context.lineage.redact import redact_text
from flext_meltano_context.meltano_server import REPLY

T = TypeVar("T")

TIMEOUT_ENV = "FLEXT_CONTEXT_MELTANO_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
# `meltano invoke --dump=catalog|config` runs the tap's discovery: the tap's own work, which can
# take minutes on a large source, so those commands get at least this long.
DISCOVERY_TIMEOUT = 600.0
_SERVER_SCRIPT = Path(__file__).with_name("meltano_server.py")
# Runs the helper file by path with `-c`, so the helper's own folder (this package, whose module
# names could shadow what Meltano imports) is not put first on Meltano's sys.path.
_BOOTSTRAP = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
_STDERR_LINES = 20


def meltano_timeout(environ: Mapping[str, str]) -> float:
    """The `meltano_timeout` setting: seconds to wait for each answer about Meltano's database."""
    text = environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UsageError(
            f"{TIMEOUT_ENV} must be a number of seconds above 0, not {text!r}; "
            f"unset it for the default of {DEFAULT_TIMEOUT:.0f} s"
        )
    return seconds


def _database(meltano: Meltano, reported: str | None = None) -> str:
    """Meltano's system database as shown in errors: its URI without a password."""
    sys_dir = meltano.env.get("MELTANO_SYS_DIR_ROOT") or str(meltano.project_root / ".meltano")
    uri = (
        reported
        or meltano.env.get("MELTANO_DATABASE_URI")
        or f"sqlite:///{Path(sys_dir) / 'meltano.db'}"  # Meltano's default
    )
    return redact_text(uri)


def _tail(lines: Iterable[str]) -> str:
    shown = [redact_text(line.rstrip())[:300] for line in lines if line.strip()]
    return "\n  ".join(shown[-8:]) or "(nothing on stderr)"


# Helpers started ahead of their use (Meltano.prestart_state_server), by what makes them alike.
_EARLY: dict[tuple[str, str, frozenset[tuple[str, str]]], StateServer] = {}
# The run identity an invocation gives its pipelines: every plugin gets these anew from the run.
_IDENTITY_VARIABLES = frozenset(
    {
        "FLEXT_CORRELATION_ID",
        "OPENLINEAGE_CONTEXT",
        "OPENLINEAGE_PARENT_ID",
        "OPENLINEAGE_ROOT_PARENT_ID",
    }
)


def _discard(server: StateServer | None) -> None:
    if server is not None:
        server.close()


def discard_prestarted() -> None:
    """End helpers started ahead that no pipeline took (an invocation that failed early)."""
    while _EARLY:
        _discard(_EARLY.popitem()[1])


class StateServer:
    """Meltano's state service and plugin lookup in one long-lived helper process.

    Every answer, `prepare` (which runs a tap's discovery) included, is awaited at most `timeout`
    seconds; a helper that does not answer in time is killed with its process group and named in
    the error with its stderr tail, and every later call fails at once, so callers fall back to
    `meltano` commands. `prepare` falls back by itself: it then answers with the `meltano invoke`
    command line a run without the helper uses (discovery then runs in `--dump=catalog`, which
    gets DISCOVERY_TIMEOUT).

    Like tap and target, it never outlives flext-context (issue 11): it gets SIGKILL when the
    thread that started it ends (PR_SET_PDEATHSIG), and its process group (Meltano's own
    children, a tap's discovery) is guarded by a watchdog that kills it when we are killed.
    """

    def __init__(
        self,
        meltano: Meltano,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        wait: bool = True,
    ) -> None:
        self._meltano = meltano
        self.timeout = meltano.timeout if timeout is None else timeout
        self._lock = threading.Lock()
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._failed: str | None = None
        self._plugins: dict[str, PluginInfo | None] = {}
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.database = _database(meltano)
        self._watchdog = Watchdog()
        try:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(meltano.env),
                cwd=meltano.project_root,
                text=True,
                errors="replace",
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except BaseException:
            self._watchdog.close()
            raise
        self._watchdog.guard(self._proc.pid)
        self._readers = [
            threading.Thread(target=self._read_replies, name="meltano-helper-out", daemon=True),
            threading.Thread(target=self._read_stderr, name="meltano-helper-err", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._started = False
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait (bounded, once) for the helper to have imported Meltano and found the project."""
        if self._started:
            return
        self._started = True
        try:
            ready = self._await("start", self.timeout)
        except FlextContextError:
            self.close()
            raise
        if isinstance(ready, dict) and ready.get("database_uri"):
            self.database = _database(self._meltano, str(ready["database_uri"]))

    def _read_replies(self) -> None:
        assert self._proc.stdout is not None  # noqa: S101 - stdout=PIPE above
        with contextlib.suppress(ValueError, OSError):  # closed by close() while reading
            for line in self._proc.stdout:
                if line.startswith(REPLY):
                    self._replies.put(line[len(REPLY) :])
        self._replies.put(None)

    def _read_stderr(self) -> None:
        # Drained all the time: a chatty helper must never block on a full pipe.
        assert self._proc.stderr is not None  # noqa: S101 - stderr=PIPE above
        with contextlib.suppress(ValueError, OSError):
            for line in self._proc.stderr:
                self._stderr.append(line)

    def stderr_tail(self) -> str:
        """The helper's last stderr lines, passwords in URIs redacted."""
        return _tail(list(self._stderr))

    def _await(self, op: str, bound: float) -> Any:
        try:
            item = self._replies.get(timeout=bound)
        except queue.Empty:
            if op == "start":
                self._break(f"the Meltano helper did not start within {bound:.0f} s")
            what = "the tap's discovery or " if op == "prepare" else ""
            self._break(
                f"the Meltano helper did not answer {op!r} within {bound:.0f} s; {what}Meltano's "
                f"system database ({self.database}) may be locked or unreachable (raise "
                f"{TIMEOUT_ENV} if it is only slow)"
            )
        if item is None:
            code = self._proc.poll()
            if code is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self._proc.wait(timeout=2)
            self._break(f"the Meltano helper exited (code {code}) before answering {op!r}")
        try:
            answer = json.loads(item)
        except ValueError:
            self._break(f"the Meltano helper answered {op!r} with no JSON: {item[:80]!r}")
        if not isinstance(answer, dict) or ("ok" not in answer and "error" not in answer):
            self._break(f"the Meltano helper answered {op!r} with no result: {item[:80]!r}")
        if "error" in answer:
            error = redact_text(str(answer["error"]))[:500]
            if op == "start":
                self._break(f"the Meltano helper could not start: {error}")
            raise FlextContextError(f"the Meltano helper failed at {op!r}: {error}")
        return answer["ok"]

    def _break(self, reason: str) -> NoReturn:
        """Stop a helper that cannot be trusted any more and raise `reason` with its stderr."""
        self._kill()
        for reader in self._readers:
            reader.join(timeout=2)  # its last stderr lines are the clue
        self._failed = reason
        raise FlextContextError(f"{reason}; its last stderr lines:\n  {self.stderr_tail()}")

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: Meltano's children too
        self._proc.wait()

    def call(self, **request: Any) -> Any:
        """Send one request and wait for its answer, bounded; FlextContextError when it fails.

        `prepare` never fails for the helper's sake: it falls back to `meltano invoke`.
        """
        if request.get("op") == "prepare":
            return self._prepare(str(request["name"]), request.get("command"))
        return self._call(request)

    def _call(self, request: dict[str, Any]) -> Any:
        op = str(request.get("op"))
        with self._lock:
            if self._failed is not None:
                raise FlextContextError(f"the Meltano helper is not usable: {self._failed}")
            assert self._proc.stdin is not None  # noqa: S101 - stdin=PIPE above
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except OSError:
                self._break(f"the Meltano helper is gone (asked for {op!r})")
            answer = self._await(op, self.timeout)
        if op == "plugins":
            self._plugins.update(plugin_infos(answer, request["names"]))
        return answer

    def _prepare(self, name: str, command: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"op": "prepare", "name": name}
        if command is not None:
            request["command"] = command
        try:
            answer = self._call(request)
            if isinstance(answer, dict) and isinstance(answer.get("argv"), list):
                return answer
            raise FlextContextError(f"the Meltano helper prepared {name!r} without a command")
        except FlextContextError as exc:
            structlog.get_logger("flext_meltano_context.meltano").warning(
                "meltano_helper_failed", op="prepare", reason=str(exc), fallback="meltano invoke"
            )
        return self._invoke_instead(name, None if command is None else str(command))

    def _invoke_instead(self, name: str, command: str | None) -> dict[str, Any]:
        """`prepare`'s answer without the helper: `meltano invoke` with a dumped catalog for a tap.

        `meltano invoke TAP ARGS` skips discovery and catalog rules when given any argument (and
        a resumed tap gets `--state`), so a tap gets the catalog `--dump=catalog` gives.
        """
        meltano = self._meltano
        if name not in self._plugins:
            self._plugins.update(meltano.plugin_info([name]) or {name: None})
        info = self._plugins[name]
        if info is None:
            raise FlextContextError(
                f"cannot prepare {name!r}: the Meltano helper failed and the plugin lookup "
                "without it did not find it; see the warning above"
            )
        args: list[str] = []
        caps = info.capabilities
        if info.type == "extractors" and command is None and caps & {"catalog", "properties"}:
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="flext-context-catalog-")
            catalog = Path(self._scratch.name) / f"{name}.catalog.json"
            meltano.dump_catalog(name, catalog)
            args = ["--catalog" if "catalog" in caps else "--properties", str(catalog)]
        plugin = name if command is None else f"{name}:{command}"
        return {
            "argv": meltano.invoke_argv(plugin, *args),
            "env": dict(meltano.env),
            "cwd": str(meltano.project_root),
        }

    def close(self) -> None:
        """End the helper (it releases what it prepared), bounded; then its scratch files.

        A request still waiting on another thread (the state persister, given up at the stop
        deadline) has nobody waiting for its answer any more: the helper is killed at once
        instead of waited for, so the run's exit keeps its deadline.
        """
        held = self._lock.acquire(blocking=False)
        if not held:
            self._kill()  # the waiting call sees the helper's end and fails at once
            held = self._lock.acquire(timeout=5)  # it only joins the helper's readers
        else:
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
            try:
                self._proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        try:
            for reader in self._readers:
                reader.join(timeout=2)
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
            if self._scratch is not None:
                self._scratch.cleanup()
                self._scratch = None
        finally:
            if held:
                self._lock.release()
            self._watchdog.release(self._proc.pid)
            self._watchdog.close()


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

    def __post_init__(self) -> None:
        meltano_timeout(self.env)  # a bad setting fails here, before any child starts

    @property
    def timeout(self) -> float:
        """Seconds to wait for each answer about Meltano's system database (`meltano_timeout`)."""
        return meltano_timeout(self.env)

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

    def _run(
        self, args: Sequence[str], what: str, timeout: float | None = None, *, hint: str = ""
    ) -> str:
        """Run one Meltano command, bounded by `timeout` (the setting when None); its stdout.

        The command gets a session of its own, so a timeout ends Meltano's children as well and
        nothing keeps the output pipes open after it.
        """
        bound = self.timeout if timeout is None else timeout
        watchdog = Watchdog()  # it dies with us, its children (a tap's discovery) too
        try:
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(self.env),
                cwd=self.project_root,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except OSError as exc:
            watchdog.close()
            raise UsageError(
                f"cannot run Meltano ({self.executable!r}) for {what}: {exc.strerror}"
            ) from exc
        watchdog.guard(proc.pid)
        try:
            return _finished(proc, what, bound, hint)
        finally:
            watchdog.release(proc.pid)
            watchdog.close()

    def _database_hint(self) -> str:
        return f"; Meltano's system database ({_database(self)}) may be locked or unreachable"

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

    def helper_argv(self, *args: str) -> list[str] | None:
        """The helper (`meltano_server.py`) on Meltano's interpreter; None when that is unknown.

        `FLEXT_CONTEXT_MELTANO_HELPER` names another helper file: the seam tests use to put a
        fault into a real run.
        """
        python = self.python()
        if python is None:
            return None
        script = self.env.get("FLEXT_CONTEXT_MELTANO_HELPER") or str(_SERVER_SCRIPT)
        return [python, "-c", _BOOTSTRAP, script, *args]

    def plugin_info(self, names: Sequence[str]) -> dict[str, PluginInfo | None] | None:
        """Look plugins up in the project; None when Meltano's interpreter is not usable."""
        argv = self.helper_argv("plugins", *names)
        if argv is None:
            return None
        try:
            text = self._run(argv, "plugin lookup")
            marked = [line for line in text.splitlines() if line.startswith(REPLY)]
            decoded = json.loads(marked[-1][len(REPLY) :])["ok"]
        except (FlextContextError, ValueError, IndexError, KeyError, TypeError) as exc:
            structlog.get_logger("flext_meltano_context.meltano").info(
                "meltano_plugin_lookup_failed", reason=str(exc)[:500]
            )
            return None
        return plugin_infos(decoded, names)

    def prestart_state_server(self) -> None:
        """Start the helper now without waiting for it, for the first `state_server()` to take.

        An invocation reads its blocks with Meltano's own parser first, a Meltano start-up of
        its own: the helper's start-up runs beside it instead of after it (about a second).
        """
        argv = self.helper_argv("serve", self.environment or "")
        if argv is None:
            return
        try:
            server = StateServer(self, argv, wait=False)
        except (OSError, FlextContextError, ValueError):
            return  # state_server() tries again, and says why if it fails again
        _discard(_EARLY.pop(self._helper_key(), None))
        _EARLY[self._helper_key()] = server

    def _helper_key(self) -> tuple[str, str, frozenset[tuple[str, str]]]:
        """What makes two helpers alike: the project, the environment and the variables (but
        the run identity, which every plugin's environment gets anew from the run)."""
        env = frozenset((k, v) for k, v in self.env.items() if k not in _IDENTITY_VARIABLES)
        return str(self.project_root), self.environment or "", env

    def state_server(self) -> StateServer | None:
        """A StateServer on Meltano's interpreter, None when that is not usable here."""
        early = _EARLY.pop(self._helper_key(), None)
        if early is not None:
            try:
                early.ready()
            except FlextContextError as exc:
                structlog.get_logger("flext_meltano_context.meltano").warning(
                    "meltano_state_server_unavailable", reason=str(exc), fallback="meltano commands"
                )
                return None
            return early
        argv = self.helper_argv("serve", self.environment or "")
        if argv is None:
            return None
        try:
            return StateServer(self, argv)
        except (OSError, FlextContextError, ValueError) as exc:
            structlog.get_logger("flext_meltano_context.meltano").warning(
                "meltano_state_server_unavailable", reason=str(exc), fallback="meltano commands"
            )
            return None

    def dump_catalog(self, tap: str, dest: Path) -> None:
        """The tap's catalog with the project's select/metadata rules applied, written to `dest`."""
        text = self._run(
            self.argv("invoke", "--dump=catalog", tap, quiet=True),
            f"invoke --dump=catalog {tap}",
            max(DISCOVERY_TIMEOUT, self.timeout),
        )
        dest.write_text(text, encoding="utf-8")

    def dump_config(self, plugin: str, *, timeout: float = DISCOVERY_TIMEOUT) -> dict[str, Any]:
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
        text = self._run(
            self.argv("state", "get", state_id, quiet=True),
            f"state get {state_id}",
            hint=self._database_hint(),
        )
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
            hint=self._database_hint(),
        )


def _finished(proc: subprocess.Popen[bytes], what: str, bound: float, hint: str) -> str:
    """Wait for a `meltano` command, bounded; its stdout, or an error with its stderr."""
    try:
        out, err = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        shown = _tail(err.decode("utf-8", "replace").splitlines())
        raise FlextContextError(
            f"meltano {what} did not finish within {bound:.0f} s{hint} (raise {TIMEOUT_ENV} "
            f"if it is only slow); last stderr lines:\n  {shown}"
        ) from None
    if proc.returncode != 0:
        shown = _tail(err.decode("utf-8", "replace").splitlines())
        raise FlextContextError(
            f"meltano {what} exited with {proc.returncode}; last stderr lines:\n  {shown}"
        )
    return out.decode("utf-8", "replace")


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
