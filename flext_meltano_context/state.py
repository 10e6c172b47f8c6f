"""Singer state as `meltano run` keeps it, plus who wrote it, and a lock per state id.

The state id is Meltano's (`{environment}:{tap}-to-{target}[:{suffix}]`). Every state that
flext-context persists carries `"flext_context": {"correlation_id", "run_id", "written_at"}`
(strings only: singer-sdk targets crash on floats in state), attached again on every persist
because singer-sdk taps keep only `bookmarks`. The lock is an `flock` on a file whose content
names the holder: the kernel releases it when the holder dies, and a holder that died without
cleaning up leaves its name behind, which is how a stale lock is recognised and reported.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import structlog

from flext_meltano_context import clock
from flext_meltano_context.errors import LockedError, UsageError

if TYPE_CHECKING:
    from flext_meltano_context.runenv import RunIdentity

CONTEXT_KEY = "flext_context"

log = structlog.get_logger("flext_meltano_context.state")


def state_id(environment: str, tap: str, target: str, suffix: str | None = None) -> str:
    """The id `meltano run` stores this pipeline's state under."""
    base = f"{environment}:{tap}-to-{target}"
    return f"{base}:{suffix}" if suffix else base


# Kept importable here for callers of the old names; the format lives in `clock`.
utc_now = clock.utc_now
iso = clock.epoch_iso


def attach_context(
    value: Mapping[str, Any], *, correlation_id: str, run_id: str, written_at: str
) -> dict[str, Any]:
    """A copy of the state `value` naming the run that persists it."""
    return {
        **value,
        CONTEXT_KEY: {"correlation_id": correlation_id, "run_id": run_id, "written_at": written_at},
    }


@dataclass(frozen=True, slots=True)
class LoadedState:
    """A state read before the run, and what it says about the run that wrote it."""

    value: dict[str, Any]
    written_by_run_id: str | None
    written_by_correlation_id: str | None
    written_at: str | None

    @property
    def streams(self) -> list[str]:
        bookmarks = self.value.get("bookmarks")
        return sorted(bookmarks) if isinstance(bookmarks, Mapping) else []

    def event_data(self, state_id: str | None) -> dict[str, Any]:
        """The `state_loaded` lineage event's data."""
        return {
            "state_id": state_id,
            "written_by_run_id": self.written_by_run_id,
            "written_by_correlation_id": self.written_by_correlation_id,
            "written_at": self.written_at,
            "streams": self.streams,
        }


def loaded(value: Mapping[str, Any]) -> LoadedState:
    """Describe a stored state value (the bare value, `flext_context` possibly inside)."""
    ctx = value.get(CONTEXT_KEY)
    ctx = ctx if isinstance(ctx, Mapping) else {}

    def text(key: str) -> str | None:
        item = ctx.get(key)
        return item if isinstance(item, str) else None

    return LoadedState(
        value=dict(value),
        written_by_run_id=text("run_id"),
        written_by_correlation_id=text("correlation_id"),
        written_at=text("written_at"),
    )


def read_state_file(path: Path) -> LoadedState | None:
    """The state in `path` (a bare state value, as `--state-out` writes it); None when empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UsageError(
            f"state file {str(path)!r} does not exist; drop --state for a full run"
        ) from exc
    except OSError as exc:
        raise UsageError(f"cannot read state file {str(path)!r}: {exc.strerror}") from exc
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"state file {str(path)!r} is not JSON ({exc}); pass a file written by --state-out"
        ) from exc
    if not isinstance(value, dict):
        raise UsageError(f"state file {str(path)!r} holds {type(value).__name__}, not an object")
    if set(value) == {"singer_state"} and isinstance(value["singer_state"], dict):
        value = value["singer_state"]  # `meltano state get` output works too
    return loaded(value)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` through a temp file and os.replace: never half-written."""
    write_text_atomic(path, json.dumps(value, separators=(",", ":")) + "\n")


# The process umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and os.replace: never half-written.

    The file gets the mode a plain `open(path, "w")` would give it (an existing file's, else
    0666 less the umask), not the temp file's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StateLock:
    """An exclusive lock on one state id, held for the whole run."""

    def __init__(self, directory: Path, state_id: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", state_id)
        self.path = directory / f"{safe}.lock"
        self.state_id = state_id
        self._file: IO[str] | None = None

    def acquire(self, *, run_id: str, correlation_id: str, force: bool = False) -> None:
        """Take the lock or raise LockedError naming the holder; `force` runs anyway."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = _describe(_read_holder(handle))
            if not force:
                handle.close()
                raise LockedError(
                    f"state id {self.state_id!r} is locked by {holder}; wait for that run to "
                    f"finish, or pass --force if it is gone ({self.path})"
                ) from exc
            log.warning("state_lock_forced", state_id=self.state_id, holder=holder)
            handle.close()
            return
        previous = _read_holder(handle)
        if previous:
            # The holder died without releasing: the kernel dropped its flock, its note remains.
            pid = previous.get("pid")
            same_host = previous.get("host") == socket.gethostname()
            if same_host and isinstance(pid, int) and _pid_alive(pid):
                log.warning("state_lock_note_ignored", state_id=self.state_id, holder=previous)
            else:
                log.warning(
                    "stale_state_lock_taken_over",
                    state_id=self.state_id,
                    holder=_describe(previous),
                )
        handle.seek(0)
        handle.truncate()
        holder_note = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": run_id,
            "correlation_id": correlation_id,
            "state_id": self.state_id,
            "started_at": utc_now(),
        }
        handle.write(json.dumps(holder_note))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Clear the holder note and drop the lock."""
        if self._file is None:
            return
        with contextlib.closing(self._file) as handle:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
        self._file = None


def _read_holder(handle: IO[str]) -> dict[str, Any]:
    handle.seek(0)
    text = handle.read()
    if not text.strip():
        return {}
    try:
        note = json.loads(text)
    except ValueError:
        return {"note": text[:80]}
    return note if isinstance(note, dict) else {}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another run (no holder note)"
    since = holder.get("started_at", "?")
    return (
        f"run {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {since})"
    )


def is_empty_state(value: Mapping[str, Any]) -> bool:
    """True for a state that must never replace a stored one: nothing but our own stamp.

    Meltano 4.4's BookmarkWriter (`core/plugin/singer/target.py`) skips a target state that is
    falsy after `json.loads` ("Received empty state"): for the objects a target confirms, that is
    exactly `{}`. `{"bookmarks": {}}` is not falsy and Meltano stores it, so we do too. Our own
    `flext_context` key is no content of the tap's: a state holding only it (a target echoing an
    injected stamp on an empty state) is empty as well, or its persisting would drop the bookmarks.
    """
    return not any(key != CONTEXT_KEY for key in value)


class Persister:
    """Persists each state the target confirms, coalescing: the latest always wins and lands.

    Runs on its own thread so a slow store (`meltano state set` costs a second) never stalls the
    target's stdout reader; `finish()` waits until the last confirmed state is stored. An empty
    state (`is_empty_state`) is never stored, in Meltano mode and with `--state-out` alike: it is
    counted in `ignored_empty` for the lineage log. After a stop request the wait for the store
    counts against the run's deadline (issue 11): `finish(wait)` may give up, and then says so in
    `unstored`; no state is stored after that, and none ever past what the target confirmed.
    """

    def __init__(self, write: Callable[[dict[str, Any]], None], identity: RunIdentity):
        self._write = write
        self._identity = identity
        self._pending: dict[str, Any] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self.confirmed = 0
        self.persisted = 0
        self.ignored_empty = 0  # empty states the target printed, never persisted (issue 10)
        self.last_written_at: str | None = None
        self.errors: list[str] = []
        self.unstored: str | None = None  # why the last confirmed state is not stored, if so
        self._done = threading.Event()
        self._gave_up = threading.Event()  # finish() stopped waiting: store nothing more
        self._writing_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="state-persister", daemon=True)
        self._thread.start()

    def offer(self, value: dict[str, Any]) -> None:
        """Take a state the target printed; an empty one is counted in `ignored_empty`, not kept."""
        if is_empty_state(value):
            with self._cond:
                self.ignored_empty += 1
            log.warning(
                "state_ignored",
                reason="the target confirmed an empty state; storing it would replace the "
                "stored bookmarks (Meltano's BookmarkWriter skips it too)",
            )
            return
        with self._cond:
            self.confirmed += 1
            self._pending = value
            self._cond.notify()

    def _loop(self) -> None:
        try:
            self._store_each()
        finally:
            self._done.set()

    def _store_each(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                value, self._pending = self._pending, None
                if value is None or self._gave_up.is_set():
                    return
                self._writing_since = time.monotonic()
            written_at = utc_now()
            stamped = attach_context(
                value,
                correlation_id=self._identity.correlation_id,
                run_id=self._identity.run_id,
                written_at=written_at,
            )
            try:
                self._write(stamped)
            except Exception as exc:  # noqa: BLE001 - reported as the run's error at the end
                with self._cond:
                    if not self._gave_up.is_set():
                        self.errors.append(str(exc))
                        self.unstored = f"the last confirmed state could not be stored: {exc}"
                log.error("state_persist_failed", error=str(exc)[:500])
                continue
            with self._cond:
                if self._gave_up.is_set():
                    return  # too late to count: the run's outcome is already written
                self.persisted += 1
                self.last_written_at = written_at
                self.unstored = None
                self._writing_since = None

    def finish(self, wait: Callable[[threading.Event], bool] | None = None) -> bool:
        """Wait until the last confirmed state is stored; False when `wait` gave up first.

        `wait(done)` is the run's clock (`Stopper.wait_store`): unbounded until a stop request,
        then bounded by the deadline. Giving up leaves the store's call to end on its own (the
        Meltano helper is killed when the run releases it) and stores nothing more.
        """
        with self._cond:
            self._closed = True
            self._cond.notify()
        if wait is None or wait(self._done):
            self._thread.join()
            return True
        with self._cond:
            self._gave_up.set()
            busy = time.monotonic() - (self._writing_since or time.monotonic())
            confirmed, persisted = self.confirmed, self.persisted
        kept = (
            f"the stored state is the last of the {persisted} stored before"
            if persisted
            else "the stored state is untouched"
        )
        self.unstored = (
            "the last confirmed state could not be stored before the deadline: the state store "
            f"had not answered after {busy:.1f} s (Meltano's system database may be locked or "
            f"unreachable); {kept} ({confirmed} confirmed by the target)"
        )
        self.errors.append(self.unstored)
        log.error("state_persist_given_up", reason=self.unstored)
        return False
