"""The live progress as a person sees it: a run under a pseudo-terminal, its screen read back."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAKES
from tests.test_pipeline_meltano import BIN

pytestmark = pytest.mark.usefixtures("clean_env")


def under_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run `argv` with stderr (and stdin) on a pseudo-terminal; its exit code and what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=subprocess.DEVNULL, stderr=slave, env=env, close_fds=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other side closed: EIO on Linux
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_a_run_on_a_terminal_shows_a_live_panel_and_clears_it_before_the_summary(
    tmp_path: Path,
) -> None:
    tap = f"{sys.executable} {FAKES / 'tap_counter.py'} --records 20000"
    target = f"{sys.executable} {FAKES / 'target_collect.py'} {tmp_path / 'o.jsonl'} --slow 0.0002"
    env = {"PATH": os.environ["PATH"], "TERM": "xterm", "COLUMNS": "100", "LINES": "40"}
    env["FLEXT_CONTEXT_LINEAGE_PATH"] = str(tmp_path / "l.jsonl")
    code, screen = under_pty(
        [str(BIN / "flext-context"), "run", "--tap-cmd", tap, "--target-cmd", target], env
    )
    assert code == 0, screen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "tap_counter.py-to-target_collect.py" in plain  # the panel's title
    assert "records/s" in plain
    assert re.search(r"users\s+[\d,]+\s+[\d,]+", plain)  # a stream row with its count and rate
    assert "MB/s" in plain
    # The panel is cleared (cursor up + erase line), then the summary is drawn below it.
    last_panel = screen.rfind("records/s")
    summary_at = screen.find("flext-context run success")
    assert 0 <= last_panel < summary_at
    assert "\x1b[2K" in screen[last_panel:summary_at]
    assert "20,000 records" in plain[plain.find("flext-context run success") :]


def test_off_a_terminal_the_progress_stays_the_structured_log(tmp_path: Path) -> None:
    code = (
        "from flext_meltano_context.progress import for_pipeline\n"
        "print(type(for_pipeline('p')).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["Progress"]  # stderr is a pipe here: no live panel


def test_help_does_not_import_rich() -> None:
    code = (
        "import sys\n"
        "from flext_meltano_context.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('rich' in sys.modules, 'structlog' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "False False"
