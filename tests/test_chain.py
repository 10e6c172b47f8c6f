"""The tap side of a mapped pipeline: tap | relay | mappers, counted, exit codes propagated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flext_meltano_context import chain
from tests.conftest import FAKES

TAP = [sys.executable, str(FAKES / "tap_counter.py"), "--records", "9"]
HALF = [sys.executable, str(FAKES / "mapper_filter.py"), "--keep-every", "3"]
CRASH = [sys.executable, str(FAKES / "mapper_filter.py"), "--keep-every", "0"]


def run_chain(tmp_path: Path, *commands: list[str]) -> tuple[int, bytes, Path]:
    stats = tmp_path / "tap-side.json"
    done = subprocess.run(
        [sys.executable, "-m", "flext_meltano_context.chain", "--stats", str(stats),
         "--commands", json.dumps(list(commands))],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout, stats


def records(out: bytes) -> list[int]:
    decoded = [json.loads(line) for line in out.splitlines()]
    return [m["record"]["id"] for m in decoded if m["type"] == "RECORD"]


def test_the_chain_counts_what_leaves_the_tap_and_outputs_what_the_mappers_keep(
    tmp_path: Path,
) -> None:
    code, out, stats = run_chain(tmp_path, TAP, HALF, HALF)
    assert code == 0
    assert records(out) == [9]  # every third of every third
    assert chain.side_counts(stats) == {"users": 9}
    assert json.loads(stats.read_text())["mapper_exits"] == [0, 0]


@pytest.mark.parametrize(
    ("commands", "code"),
    [
        ([[*TAP, "--fail-after", "4"], HALF], 3),  # the tap's own exit code
        ([TAP, CRASH], 1),  # the mapper's
        ([TAP, HALF], 0),
    ],
    ids=["tap-fails", "mapper-fails", "both-succeed"],
)
def test_the_chain_exits_with_the_first_failure(
    tmp_path: Path, commands: list[list[str]], code: int
) -> None:
    got, _out, stats = run_chain(tmp_path, *commands)
    assert got == code
    assert stats.exists()  # the tap side's counts are written either way


def test_a_chain_needs_a_tap_and_a_mapper(tmp_path: Path) -> None:
    got, _out, _stats = run_chain(tmp_path, TAP)
    assert got == 2
    assert chain.side_counts(tmp_path / "nothing.json") is None
