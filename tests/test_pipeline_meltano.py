"""The run command under real Meltano: a tiny project whose plugins are the fakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKES

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_env")]

BIN = Path(sys.executable).parent


def wrapper(path: Path, script: str, *args: str) -> str:
    """An executable that runs a fake with this interpreter (Meltano wants one file to exec)."""
    quoted = " ".join(f'"{a}"' for a in args)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKES / script}" {quoted} "$@"\n')
    path.chmod(0o755)
    return str(path)


def project(tmp_path: Path, *, tap_capabilities: str = "[catalog, discover, state]") -> Path:
    root = tmp_path / "project"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "out.jsonl"
    tap = wrapper(bin_dir / "tap-counter", "tap_counter.py", "--env-out", str(tmp_path / "tap.env"))
    target = wrapper(bin_dir / "target-collect", "target_collect.py", str(out))
    failing = wrapper(bin_dir / "target-broken", "target_collect.py", str(out), "--exit-after", "2")
    probe = wrapper(bin_dir / "probe", "probe_env.py")
    pids = tmp_path / "pids"
    pids.mkdir()
    hang = wrapper(
        bin_dir / "tap-hang", "tap_counter.py", "--records", "8", "--hang", "--pid-dir", str(pids)
    )
    (root / "meltano.yml").write_text(
        f"""
default_environment: dev
project_id: 2b0e6d3a-5c47-4f0e-9d2b-1a6c3e7f9b41
send_anonymous_usage_stats: false
environments:
- name: dev
plugins:
  extractors:
  - name: tap-counter
    namespace: tap_counter
    executable: {tap}
    capabilities: {tap_capabilities}
    config:
      records: 10
  - name: tap-hang
    namespace: tap_hang
    executable: {hang}
    capabilities: {tap_capabilities}
  loaders:
  - name: target-collect
    namespace: target_collect
    executable: {target}
  - name: target-broken
    namespace: target_broken
    executable: {failing}
  utilities:
  - name: probe
    namespace: probe
    executable: {probe}
    commands:
      run:
        args: {tmp_path / "probe.json"}
  - name: flext-context
    namespace: flext_context
    executable: {BIN / "flext-context"}
    settings:
    - name: lineage_path
      env: FLEXT_CONTEXT_LINEAGE_PATH
      value: {tmp_path / "lineage.jsonl"}
"""
    )
    return root


def meltano(root: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    return subprocess.run(
        [str(BIN / "meltano"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def stored_state(root: Path, state_id: str) -> dict[str, Any]:
    done = meltano(root, "--environment=dev", "state", "get", state_id)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def events(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    lines = (tmp_path / "lineage.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def test_two_runs_under_meltano_resume_from_stored_state_and_say_which_run_wrote_it(
    tmp_path: Path,
) -> None:
    root = project(tmp_path)
    first = meltano(
        root, "invoke", "flext-context", "run", "tap-counter", "target-collect", "probe:run"
    )
    assert first.returncode == 0, first.stderr
    state = stored_state(root, "dev:tap-counter-to-target-collect")["singer_state"]
    assert state["bookmarks"] == {"users": {"id": 10}}
    first_run = events(tmp_path, "run_started")[0]["run_id"]
    assert state["flext_context"]["run_id"] == first_run
    second = meltano(root, "invoke", "flext-context", "run", "tap-counter", "target-collect")
    assert second.returncode == 0, second.stderr
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == list(range(1, 21))
    loaded = events(tmp_path, "state_loaded")
    assert loaded[0]["data"]["written_by_run_id"] == first_run
    assert loaded[0]["data"]["state_id"] == "dev:tap-counter-to-target-collect"
    # Every child of the first run saw the same correlation id (tap and the probe block).
    tap_env = json.loads((tmp_path / "tap.env").read_text())["env"]
    probe_env = json.loads((tmp_path / "probe.json").read_text())["env"]
    started = events(tmp_path, "run_started")
    assert probe_env["FLEXT_CORRELATION_ID"] == started[0]["correlation_id"]
    assert tap_env["FLEXT_CORRELATION_ID"] == started[1]["correlation_id"]
    assert tap_env["MELTANO_RUN_ID"] == started[1]["run_id"]
    argv = json.loads((tmp_path / "tap.env").read_text())["argv"]
    assert "--catalog" in argv
    assert "--state" in argv  # the second run resumed


def test_a_failing_target_under_meltano_leaves_the_stored_state_untouched(tmp_path: Path) -> None:
    root = project(tmp_path)
    before = stored_state(root, "dev:tap-counter-to-target-broken")
    done = meltano(root, "invoke", "flext-context", "run", "tap-counter", "target-broken")
    assert done.returncode == 1
    assert "target-broken" in done.stderr
    assert stored_state(root, "dev:tap-counter-to-target-broken") == before == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Meltano's own block parser reads the blocks (issue 12), in its own words.
        (("tap-nope", "target-collect"), "Block tap-nope not found"),
        (("target-collect", "tap-counter"), "bad block sequence at index 1"),
    ],
    ids=["unknown-plugin", "swapped-order"],
)
def test_bad_plugin_names_exit_2_and_start_nothing(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    root = project(tmp_path)
    done = meltano(root, "invoke", "flext-context", "run", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_stored_state_for_a_tap_without_the_state_capability_exits_2(tmp_path: Path) -> None:
    root = project(tmp_path, tap_capabilities="[catalog, discover]")
    stored = json.dumps({"singer_state": {"bookmarks": {"users": {"id": 3}}}})
    assert (
        meltano(
            root,
            "--environment=dev",
            "state",
            "set",
            "--force",
            "dev:tap-counter-to-target-collect",
            stored,
        ).returncode
        == 0
    )
    done = meltano(root, "invoke", "flext-context", "run", "tap-counter", "target-collect")
    assert done.returncode == 2, done.stderr
    assert "'state' capability" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_without_the_state_server_meltano_commands_do_the_same_job(tmp_path: Path) -> None:
    root = project(tmp_path)
    for _ in range(2):
        done = meltano(
            root,
            "invoke",
            "flext-context",
            "run",
            "tap-counter",
            "target-collect",
            FLEXT_CONTEXT_MELTANO_SERVER="false",
        )
        assert done.returncode == 0, done.stderr
    state = stored_state(root, "dev:tap-counter-to-target-collect")["singer_state"]
    assert state["bookmarks"] == {"users": {"id": 20}}
    assert events(tmp_path, "state_loaded")[0]["data"]["written_by_run_id"] is not None


def test_sigterm_under_meltano_stops_gracefully_keeps_state_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    from tests.test_pipeline import assert_no_orphans, wait_for

    root = project(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(BIN / "meltano"), "invoke", "flext-context", "run", "tap-hang", "target-collect"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(tmp_path / "out.jsonl", 8)
    proc.send_signal(signal.SIGTERM)
    _out, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    state = stored_state(root, "dev:tap-hang-to-target-collect")["singer_state"]
    assert state["bookmarks"] == {"users": {"id": 8}}
    assert events(tmp_path, "run_completed")[-1]["data"]["status"] == "aborted"
    assert_no_orphans(tmp_path / "pids")


def test_state_id_suffix_and_full_refresh_follow_meltano_run(tmp_path: Path) -> None:
    root = project(tmp_path)
    args = ("invoke", "flext-context", "run", "tap-counter", "target-collect")
    first = meltano(root, *args, "--state-id-suffix", "nightly")
    assert first.returncode == 0, first.stderr
    suffixed = stored_state(root, "dev:tap-counter-to-target-collect:nightly")["singer_state"]
    assert suffixed["bookmarks"] == {"users": {"id": 10}}
    assert stored_state(root, "dev:tap-counter-to-target-collect") == {}
    # --full-refresh ignores the stored bookmark: the tap starts again from id 1.
    again = meltano(root, *args, "--state-id-suffix", "nightly", "--full-refresh")
    assert again.returncode == 0, again.stderr
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == [*range(1, 11), *range(1, 11)]
    assert "--state" not in json.loads((tmp_path / "tap.env").read_text())["argv"]


def test_without_an_environment_the_run_is_stateless_with_a_warning(tmp_path: Path) -> None:
    root = project(tmp_path)
    for _ in range(2):
        done = meltano(
            root,
            "--no-environment",
            "invoke",
            "flext-context",
            "run",
            "tap-counter",
            "target-collect",
        )
        assert done.returncode == 0, done.stderr
        assert "no Meltano environment" in done.stderr
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == [*range(1, 11), *range(1, 11)]  # nothing resumed: no state was kept
    assert events(tmp_path, "state_persisted") == []
