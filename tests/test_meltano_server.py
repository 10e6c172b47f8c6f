"""The Meltano helper process: bounded answers, its stderr in errors, `meltano` commands instead.

The helper is the real `meltano_server.py` on a real Meltano; faults come from
`tests/fakes/meltano_helper.py`, which loads the real helper and hangs or crashes around chosen
requests, and from a system database that another process holds locked.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from flext_meltano_context.errors import FlextContextError, UsageError
from flext_meltano_context.meltano import Meltano, StateServer, meltano_timeout
from tests.conftest import FAKES
from tests.test_pipeline_meltano import BIN, events, meltano, stored_state

pytestmark = pytest.mark.usefixtures("clean_env")
real_meltano = pytest.mark.e2e  # starts Meltano (seconds each), as tests/test_pipeline_meltano.py

FAKE_HELPER = str(FAKES / "meltano_helper.py")
STATE = json.dumps({"singer_state": {"bookmarks": {"users": {"id": 7}}}})


def wrapper(path: Path, script: str, *args: str) -> str:
    """An executable that runs a fake with this interpreter (Meltano wants one file to exec)."""
    quoted = " ".join(shlex.quote(arg) for arg in (sys.executable, str(FAKES / script), *args))
    path.write_text(f'#!/bin/sh\nexec {quoted} "$@"\n')
    path.chmod(0o755)
    return str(path)


def make_project(tmp_path: Path, *, say: str | None = None) -> Path:
    """A Meltano project with a fake tap, target and the flext-context utility; database ready."""
    root = tmp_path / "project"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "out.jsonl"
    tap = wrapper(bin_dir / "tap-counter", "tap_counter.py", "--env-out", str(tmp_path / "tap.env"))
    target = wrapper(bin_dir / "target-collect", "target_collect.py", str(out))
    says = wrapper(bin_dir / "target-says", "target_says.py", str(out), "--say", say or "{}")
    (tmp_path / "block-pids").mkdir()
    stubborn = wrapper(bin_dir / "stubborn", "block_stubborn.py", str(tmp_path / "block-pids"))
    (root / "meltano.yml").write_text(
        f"""
default_environment: dev
project_id: 3c0e6d3a-5c47-4f0e-9d2b-1a6c3e7f9b42
send_anonymous_usage_stats: false
environments:
- name: dev
plugins:
  extractors:
  - name: tap-counter
    namespace: tap_counter
    executable: {tap}
    capabilities: [catalog, discover, state]
    config:
      records: 10
  loaders:
  - name: target-collect
    namespace: target_collect
    executable: {target}
  - name: target-says
    namespace: target_says
    executable: {says}
  utilities:
  - name: stubborn
    namespace: stubborn
    executable: {stubborn}
    commands:
      run:
        args: ""
  - name: flext-context
    namespace: flext_context
    executable: {BIN / "flext-context"}
    settings:
    - name: lineage_path
      env: FLEXT_CONTEXT_LINEAGE_PATH
      value: {tmp_path / "lineage.jsonl"}
"""
    )
    done = meltano(root, "--environment=dev", "state", "list")  # creates the system database
    assert done.returncode == 0, done.stderr
    return root


def melt(root: Path, **env: str) -> Meltano:
    environ = {**os.environ, "MELTANO_PROJECT_ROOT": str(root), **env}
    return Meltano(str(BIN / "meltano"), root, "dev", environ)


def helper(m: Meltano) -> list[str]:
    argv = m.helper_argv("serve", "dev")
    assert argv is not None
    return argv


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_project(tmp_path)


@pytest.fixture
def locked_database(root: Path) -> Iterator[None]:
    """Meltano's system database held under an exclusive lock by another connection."""
    conn = sqlite3.connect(root / ".meltano" / "meltano.db", timeout=1, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_the_timeout_setting_is_read_and_bad_values_are_refused_naming_the_variable() -> None:
    assert meltano_timeout({}) == 30
    assert meltano_timeout({"FLEXT_CONTEXT_MELTANO_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(UsageError, match="FLEXT_CONTEXT_MELTANO_TIMEOUT"):
            meltano_timeout({"FLEXT_CONTEXT_MELTANO_TIMEOUT": bad})
    with pytest.raises(UsageError, match="not 'soon'"):
        Meltano("meltano", Path(), "dev", {"FLEXT_CONTEXT_MELTANO_TIMEOUT": "soon"})


def test_the_helper_imports_only_the_standard_library_and_meltano() -> None:
    # It runs on Meltano's interpreter, whose venv has no flext-context and none of our deps.
    import ast

    import flext_meltano_context.meltano_server as server

    tree = ast.parse(Path(server.__file__).read_text())
    roots = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    roots = {name.split(".")[0] for name in roots}
    assert roots - sys.stdlib_module_names <= {"meltano", "sqlalchemy"}
    assert "meltano" in roots


@real_meltano
def test_the_helper_stores_and_reads_state_with_meltano(root: Path) -> None:
    m = melt(root)
    server = StateServer(m, helper(m))
    try:
        assert server.call(op="state_set", id="dev:a-to-b", state=STATE) is True
        got = server.call(op="state_get", id="dev:a-to-b")
        plugins = server.call(op="plugins", names=["tap-counter", "nope"])
    finally:
        server.close()
    assert got["singer_state"] == {"bookmarks": {"users": {"id": 7}}}
    assert plugins["nope"] is None
    assert plugins["tap-counter"]["type"] == "extractors"
    assert server.database == f"sqlite:///{root}/.meltano/meltano.db"
    assert m.state_get("dev:a-to-b") == {"bookmarks": {"users": {"id": 7}}}


@real_meltano
def test_a_hung_helper_is_named_with_its_database_and_stderr_within_the_timeout(
    root: Path,
) -> None:
    m = melt(root, FLEXT_CONTEXT_MELTANO_TIMEOUT="3", FAKE_HELPER_HANG="state_set")
    server = StateServer(m, [*helper(m)[:3], FAKE_HELPER, "serve", "dev"])
    started = time.monotonic()
    with pytest.raises(FlextContextError) as caught:
        server.call(op="state_set", id="dev:a-to-b", state=STATE)
    took = time.monotonic() - started
    message = str(caught.value)
    assert 3 <= took < 6
    assert "did not answer 'state_set' within 3 s" in message
    assert f"system database (sqlite:///{root}/.meltano/meltano.db)" in message
    assert "database is locked" in message  # the helper's stderr, shown
    assert "s3cret" not in message
    assert "[REDACTED]" in message
    assert "FLEXT_CONTEXT_MELTANO_TIMEOUT" in message
    with pytest.raises(FlextContextError, match="not usable"):  # at once, not another timeout
        server.call(op="state_get", id="dev:a-to-b")
    assert time.monotonic() - started < 7
    server.close()
    with pytest.raises(ProcessLookupError):  # the helper and its process group are gone
        os.killpg(server._proc.pid, 0)
    # The fallback the state writer takes: a plain `meltano state set` (given the default
    # timeout: Meltano's own start-up takes seconds on a busy machine).
    m = melt(root)
    m.state_set("dev:a-to-b", {"bookmarks": {"users": {"id": 8}}})
    assert m.state_get("dev:a-to-b") == {"bookmarks": {"users": {"id": 8}}}


@real_meltano
def test_a_helper_that_dies_shows_its_stderr_and_exit_code(root: Path) -> None:
    m = melt(root, FAKE_HELPER_CRASH="state_get")
    server = StateServer(m, [*helper(m)[:3], FAKE_HELPER, "serve", "dev"])
    with pytest.raises(FlextContextError) as caught:
        server.call(op="state_get", id="dev:a-to-b")
    server.close()
    assert "exited (code 3) before answering 'state_get'" in str(caught.value)
    assert "Traceback: sqlite3.OperationalError: database is locked" in str(caught.value)


@real_meltano
@pytest.mark.parametrize(
    ("hang", "timeout", "reason"),
    [("start", 1, "did not start within 1 s"), ("", 10, None)],
    ids=["hangs-at-start", "starts"],
)
def test_a_helper_that_hangs_at_start_is_given_up_within_the_timeout(
    root: Path, hang: str, timeout: int, reason: str | None
) -> None:
    m = melt(
        root,
        FLEXT_CONTEXT_MELTANO_TIMEOUT=str(timeout),
        FLEXT_CONTEXT_MELTANO_HELPER=FAKE_HELPER,
        FAKE_HELPER_HANG=hang,
    )
    started = time.monotonic()
    with capture_logs() as logs:
        server = m.state_server()
    assert time.monotonic() - started < timeout + 3
    if reason is None:
        assert server is not None
        server.close()
        return
    assert server is None  # the caller then uses `meltano` commands
    assert logs[0]["event"] == "meltano_state_server_unavailable"
    assert reason in logs[0]["reason"]
    assert "database is locked" in logs[0]["reason"]


@real_meltano
def test_a_helper_in_an_unknown_environment_says_why_it_could_not_start(root: Path) -> None:
    m = Meltano(str(BIN / "meltano"), root, "nope", {**os.environ})
    with capture_logs() as logs:
        assert m.state_server() is None
    assert "could not start" in logs[0]["reason"]
    assert "nope" in logs[0]["reason"]


@real_meltano
@pytest.mark.parametrize("fault", ["FAKE_HELPER_HANG", "FAKE_HELPER_CRASH", None])
def test_prepare_falls_back_to_meltano_invoke_with_the_dumped_catalog(
    root: Path, tmp_path: Path, fault: str | None
) -> None:
    env = {"FLEXT_CONTEXT_MELTANO_TIMEOUT": "5"}
    if fault is not None:
        env[fault] = "prepare"
    m = melt(root, **env)
    server = StateServer(m, [*helper(m)[:3], FAKE_HELPER, "serve", "dev"])
    try:
        server.call(op="plugins", names=["tap-counter", "target-collect"])
        with capture_logs() as logs:
            tap = server.call(op="prepare", name="tap-counter")
            target = server.call(op="prepare", name="target-collect")
        catalog = Path(tap["argv"][-1])
        if fault is None:
            assert logs == []
            assert tap["argv"][0].endswith("tap-counter")  # the plugin itself, prepared
            assert "invoke" not in target["argv"]
        else:
            assert logs[0]["event"] == "meltano_helper_failed"
            assert "'prepare'" in logs[0]["reason"]
            assert tap["argv"] == [*m.invoke_argv("tap-counter"), "--catalog", str(catalog)]
            assert target["argv"] == m.invoke_argv("target-collect")
        streams = json.loads(catalog.read_text())["streams"]
        assert [s["stream"] for s in streams] == ["users"]
        # The command runs: the tap writes its ten records.
        done = subprocess.run(
            tap["argv"],
            cwd=tap["cwd"] or root,
            env={**os.environ, **tap["env"]},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert sum('"RECORD"' in line for line in done.stdout.splitlines()) == 10
    finally:
        server.close()
    if fault is not None:
        assert not catalog.exists()  # the fallback's scratch catalog goes with the helper


@real_meltano
@pytest.mark.usefixtures("locked_database")
def test_a_locked_system_database_bounds_helper_and_meltano_state_set(root: Path) -> None:
    # SQLite waits for a lock (5 s per statement, retried): with 4 s to answer, the helper and
    # `meltano state set` each give up, naming the database.
    m = melt(root, FLEXT_CONTEXT_MELTANO_TIMEOUT="4")
    server = StateServer(m, helper(m))
    started = time.monotonic()
    with pytest.raises(FlextContextError, match="did not answer 'state_set' within 4 s"):
        server.call(op="state_set", id="dev:a-to-b", state=STATE)
    server.close()
    with pytest.raises(FlextContextError) as caught:
        m.state_set("dev:a-to-b", {"bookmarks": {}})
    assert "meltano state set dev:a-to-b did not finish within 4 s" in str(caught.value)
    assert f"system database (sqlite:///{root}/.meltano/meltano.db)" in str(caught.value)
    assert time.monotonic() - started < 4 + 3 + 4 + 3


@real_meltano
@pytest.mark.parametrize("op", ["state_set", "prepare"])
def test_a_run_whose_helper_hangs_succeeds_through_meltano_commands(
    tmp_path: Path, root: Path, op: str
) -> None:
    done = meltano(
        root,
        "invoke",
        "flext-context",
        "run",
        "tap-counter",
        "target-collect",
        FLEXT_CONTEXT_MELTANO_HELPER=FAKE_HELPER,
        FLEXT_CONTEXT_MELTANO_TIMEOUT="5",
        FAKE_HELPER_HANG=op,
    )
    assert done.returncode == 0, done.stderr
    assert f"did not answer '{op}' within 5 s" in done.stderr
    assert "s3cret" not in done.stderr
    state: dict[str, Any] = stored_state(root, "dev:tap-counter-to-target-collect")
    assert state["singer_state"]["bookmarks"] == {"users": {"id": 10}}
    assert events(tmp_path, "run_completed")[-1]["data"]["status"] == "success"
    argv = json.loads((tmp_path / "tap.env").read_text())["argv"]
    assert "--catalog" in argv


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone, only not yet reaped


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _start_run(root: Path, tmp_path: Path, **extra: str) -> subprocess.Popen[str]:
    """`meltano invoke flext-context run tap-counter target-collect`, not waited for."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    argv = [str(BIN / "meltano"), "invoke", "flext-context", "run", "tap-counter", "target-collect"]
    return subprocess.Popen(
        argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _hung_helper(pids: Path) -> tuple[int, int]:
    """The hung helper's pid and its own child's, once the hang began."""
    deadline = time.monotonic() + 120
    while not (pids / "helper.pid").exists():
        assert time.monotonic() < deadline, "the helper never hung"
        time.sleep(0.05)
    return int((pids / "helper.pid").read_text()), int((pids / "helper-child.pid").read_text())


@real_meltano
@pytest.mark.parametrize("op", ["prepare", "state_set"])
def test_sigkill_to_flext_context_while_its_helper_hangs_leaves_no_helper_2_s_later(
    tmp_path: Path, root: Path, op: str
) -> None:
    # `prepare` hangs in preflight, before the run's children; `state_set` in the persister,
    # after the target confirmed a state. The helper's child stands for a tap's discovery.
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _start_run(
        root,
        tmp_path,
        FLEXT_CONTEXT_MELTANO_HELPER=FAKE_HELPER,
        FLEXT_CONTEXT_MELTANO_TIMEOUT="120",
        FAKE_HELPER_HANG=op,
        FAKE_HELPER_PID_DIR=str(pids),
    )
    try:
        helper_pid, child_pid = _hung_helper(pids)
        flext_context = _parent(helper_pid)
        assert _alive(helper_pid)
        assert _alive(child_pid)  # the control: both live while flext-context does
        time.sleep(0.5)
        assert _alive(helper_pid)
        assert _alive(child_pid)
        os.kill(flext_context, 9)
        killed = time.monotonic()
        while (_alive(helper_pid) or _alive(child_pid)) and time.monotonic() - killed < 2:
            time.sleep(0.05)
        assert not _alive(helper_pid), "the helper outlived flext-context"
        assert not _alive(child_pid), "the helper's child outlived flext-context"
    finally:
        proc.kill()
        proc.communicate(timeout=60)


GRACE = 2.0
MARGIN = 4.0  # scheduling slack on a loaded 2-core machine


@real_meltano
@pytest.mark.parametrize("stop", ["sigterm", "none"])
def test_a_store_hung_at_a_sigterm_is_given_up_at_the_deadline_and_said_so(
    tmp_path: Path, root: Path, stop: str
) -> None:
    # The target confirmed its state; the helper hangs storing it. After a SIGTERM the wait for
    # the store counts against the deadline: exit 143 within grace + 5 s, saying the state could
    # not be stored. The control without a signal waits for the store's own timeout and then
    # stores the state through `meltano state set`.
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _start_run(
        root,
        tmp_path,
        FLEXT_CONTEXT_MELTANO_HELPER=FAKE_HELPER,
        FLEXT_CONTEXT_MELTANO_TIMEOUT="120" if stop == "sigterm" else "4",
        FLEXT_CONTEXT_GRACE_SECONDS=str(GRACE),
        FAKE_HELPER_HANG="state_set",
        FAKE_HELPER_PID_DIR=str(pids),
    )
    try:
        helper_pid, _child = _hung_helper(pids)
        hung_at = time.monotonic()
        if stop == "sigterm":
            os.kill(_parent(helper_pid), signal.SIGTERM)
        _out, stderr = proc.communicate(timeout=180)
        took = time.monotonic() - hung_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    state = stored_state(root, "dev:tap-counter-to-target-collect")
    completed = events(tmp_path, "run_completed")[-1]["data"]
    if stop == "none":
        assert proc.returncode == 0, stderr
        assert took >= 4  # the store's own timeout, not cut short
        assert "did not answer 'state_set' within 4 s" in stderr
        assert state["singer_state"]["bookmarks"] == {"users": {"id": 10}}
        assert completed["status"] == "success"
        return
    assert proc.returncode == 143, stderr
    assert took < GRACE + 5 + MARGIN, took
    assert "the last confirmed state could not be stored before the deadline" in stderr
    assert "the stored state is untouched" in stderr
    assert "the last of" not in stderr  # no claim that the state is stored
    assert "confirmed by the target, none stored; dev:tap-counter-to-target-collect" in stderr
    assert completed["status"] == "aborted"
    assert "could not be stored before the deadline" in completed["error"]
    # Never past what the target confirmed: untouched, or at most the confirmed bookmark.
    assert state.get("singer_state", {}).get("bookmarks") in (None, {"users": {"id": 10}})
    assert not _alive(helper_pid)


@real_meltano
def test_sigkill_during_a_meltano_mode_block_leaves_no_meltano_invoke_behind(
    tmp_path: Path, root: Path
) -> None:
    # `stubborn:run` after the pair runs through `meltano invoke` (a process group of its own
    # below flext-context) and ignores SIGTERM, as a dbt-like block may. The control: both the
    # block and its `meltano invoke` are alive until flext-context is killed.
    pids = tmp_path / "block-pids"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    argv = [str(BIN / "meltano"), "invoke", "flext-context", "run"]
    proc = subprocess.Popen(
        [*argv, "tap-counter", "target-collect", "stubborn:run"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(pids.glob("block-*.pid")):
            assert time.monotonic() < deadline, "the block never started"
            time.sleep(0.05)
        time.sleep(0.2)  # the pid file is written before the block's first line
        block = int(next(pids.glob("block-*.pid")).read_text())
        invoke = _parent(block)  # `meltano invoke stubborn:run`
        flext_context = _parent(invoke)
        assert "meltano" in Path(f"/proc/{invoke}/cmdline").read_text()
        assert _alive(block)
        assert _alive(invoke)
        os.kill(flext_context, signal.SIGKILL)
        killed = time.monotonic()
        while (_alive(block) or _alive(invoke)) and time.monotonic() - killed < 2:
            time.sleep(0.05)
        assert not _alive(block), "the block outlived flext-context"
        assert not _alive(invoke), "meltano invoke outlived flext-context"
    finally:
        proc.kill()
        proc.communicate(timeout=60)


@real_meltano
def test_a_helper_started_ahead_serves_only_a_run_with_the_same_project_and_variables(
    root: Path,
) -> None:
    from flext_meltano_context import meltano as module
    from flext_meltano_context.meltano import discard_prestarted

    ahead = melt(root)
    ahead.prestart_state_server()
    [started] = module._EARLY.values()
    other = melt(root, MELTANO_STATE_BACKEND_URI=(root / "scratch").as_uri())
    fresh = other.state_server()  # other variables: a helper of its own
    # The run identity each pipeline gets anew does not make a helper unlike.
    same = melt(root, FLEXT_CORRELATION_ID="01a2282c-488d-7688-860a-82a7532023d2")
    taken = same.state_server()
    again = same.state_server()  # taken once: the next caller starts its own
    try:
        assert fresh is not None
        assert taken is started
        assert again is not None
        assert again is not taken
        assert fresh is not started
        assert not module._EARLY
        assert taken.call(op="plugins", names=["tap-counter"])["tap-counter"] is not None
    finally:
        for server in (fresh, taken, again):
            if server is not None:
                server.close()
        discard_prestarted()
