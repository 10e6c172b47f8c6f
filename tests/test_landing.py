"""Landing reconciliation (issue 7): what was relayed against what landed, per stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fake, install_tool

DUCKDB_OLD = ("target-duckdb==0.8.0", "duckdb==1.2.2")
DUCKDB_NEW = ("target-duckdb==0.8.0", "duckdb==2.0.0")


def run(
    tmp_path: Path,
    tap: list[str],
    target: list[str],
    *extra: str,
    column: str = "*",
    cwd: Path | None = None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`flext-context run` standalone; the process and its landing event."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXT_", "MELTANO_"))}
    env["FLEXT_CONTEXT_LINEAGE_PATH"] = str(tmp_path / "lineage.jsonl")
    env["FLEXT_CONTEXT_LOG_FORMAT"] = "console"
    if column:
        env["FLEXT_CONTEXT_RECORD_COLUMN_STREAMS"] = column
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flext_meltano_context",
            "run",
            "--tap-cmd",
            subprocess.list2cmdline(tap),
            "--target-cmd",
            subprocess.list2cmdline(target),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or tmp_path,
        timeout=300,
        check=False,
    )
    events = [json.loads(line) for line in (tmp_path / "lineage.jsonl").read_text().splitlines()]
    landing = [e["data"] for e in events if e["event"] == "landing"]
    return done, landing[-1] if landing else {}


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXT_", "MELTANO_"))}
    env["FLEXT_CONTEXT_LINEAGE_PATH"] = str(tmp_path / "lineage.jsonl")
    return subprocess.run(
        [sys.executable, "-m", "flext_meltano_context", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def only(landing: Mapping[str, Any]) -> dict[str, Any]:
    (row,) = landing["streams"]
    return dict(row)


def test_an_unknown_target_is_reported_not_checked_with_the_reason(tmp_path: Path) -> None:
    done, landing = run(
        tmp_path, fake("tap_landing.py", "5", "5"), fake("target_collect.py", str(tmp_path / "o"))
    )
    assert done.returncode == 0, done.stderr
    row = only(landing)
    assert (row["status"], row["landed"], row["relayed"]) == ("not checked", None, 5)
    assert "no landing probe for target" in row["reason"]
    assert "users: not checked" in done.stderr
    gate = cli(tmp_path, "check", "--require-landed")
    assert gate.returncode == 0, gate.stderr  # not checked is no proof of loss


def test_landing_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXT_CONTEXT_LANDING", "off")
    env_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "flext_meltano_context",
            "run",
            "--tap-cmd",
            subprocess.list2cmdline(fake("tap_landing.py", "3", "3")),
            "--target-cmd",
            subprocess.list2cmdline(fake("target_collect.py", str(tmp_path / "o"))),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "l.jsonl")},
    )
    assert env_run.returncode == 0, env_run.stderr
    assert '"event":"landing"' not in (tmp_path / "l.jsonl").read_text()


def duckdb_config(tmp_path: Path) -> Path:
    config = tmp_path / "target.json"
    config.write_text(
        json.dumps({"path": str(tmp_path / "w.duckdb"), "default_target_schema": "raw"})
    )
    return config


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("requirements", "label", "landed", "exit_code"),
    [(DUCKDB_NEW, "missing 1", 6, 1), (DUCKDB_OLD, "ok", 7, 0)],
    ids=["duckdb-2.0-loses-a-row", "duckdb-1.2.2-keeps-every-row"],
)
def test_target_duckdb_row_loss_is_caught_and_fails_the_gate(
    tmp_path: Path, requirements: tuple[str, ...], label: str, landed: int, exit_code: int
) -> None:
    bin_dir = install_tool(*requirements)
    config = duckdb_config(tmp_path)
    # 20 records over 7 keys: target-duckdb upserts, so 7 rows should land (exact level).
    done, landing = run(
        tmp_path,
        fake("tap_landing.py", "20", "7"),
        [str(bin_dir / "target-duckdb"), "--config", str(config)],
    )
    assert done.returncode == 0, done.stderr  # the target says it succeeded either way
    row = only(landing)
    assert (row["label"], row["landed"], row["relayed"]) == (label, landed, 7)
    assert (row["level"], row["basis"], landing["family"]) == ("exact", "distinct_keys", "duckdb")
    assert row["dataset"]["name"] == "w.raw.users"
    assert f"landed users: {label}" in done.stderr
    gate = cli(tmp_path, "check", "--require-landed")
    assert gate.returncode == exit_code, gate.stderr
    if exit_code:
        assert "missing 1 in the destination" in gate.stderr
    report = cli(tmp_path, "report", "--format", "markdown")
    assert f"{label} (exact, {landed} of 7)" in report.stdout


@pytest.mark.e2e
def test_approximate_level_is_exact_for_a_new_table_then_an_upper_bound(tmp_path: Path) -> None:
    bin_dir = install_tool(*DUCKDB_OLD)
    config = duckdb_config(tmp_path)
    target = [str(bin_dir / "target-duckdb"), "--config", str(config)]
    done, landing = run(tmp_path, fake("tap_landing.py", "10", "4"), target, column="")
    assert done.returncode == 0, done.stderr
    row = only(landing)
    # Without the record column no keys are collected: 10 records is an upper bound for 4 rows.
    assert (row["status"], row["level"], row["bound"], row["landed"], row["relayed"]) == (
        "ok",
        "approximate",
        "upper_bound",
        4,
        10,
    )
    # Again: the same keys are updated, no row is added; the figure is an upper bound only.
    done, landing = run(tmp_path, fake("tap_landing.py", "10", "6"), target, column="")
    row = only(landing)
    assert (row["status"], row["bound"], row["landed"], row["relayed"]) == (
        "ok",
        "upper_bound",
        2,
        10,
    )


@pytest.mark.e2e
def test_file_targets_exact_and_approximate(tmp_path: Path) -> None:
    jsonl = install_tool("target-jsonl==0.1.4")
    out = tmp_path / "out"
    config = tmp_path / "jsonl.json"
    config.write_text(json.dumps({"destination_path": str(out)}))
    target = [str(jsonl / "target-jsonl"), "--config", str(config)]
    done, landing = run(tmp_path, fake("tap_landing.py", "9", "3"), target)
    assert done.returncode == 0, done.stderr
    row = only(landing)  # an appending target: every record is a row
    assert (row["label"], row["level"], row["basis"], row["landed"]) == (
        "ok",
        "exact",
        "records",
        9,
    )
    time.sleep(1.1)  # target-jsonl names its file to the second
    done, landing = run(tmp_path, fake("tap_landing.py", "4", "3"), target, column="")
    row = only(landing)
    assert (row["label"], row["level"], row["landed"]) == ("ok", "approximate", 4)

    csv_bin = install_tool("meltanolabs-target-csv==0.5.0")
    config = tmp_path / "csv.json"
    config.write_text(json.dumps({"output_path": str(tmp_path / "csv")}))
    target = [str(csv_bin / "target-csv"), "--config", str(config)]
    done, landing = run(tmp_path, fake("tap_landing.py", "5", "5"), target)
    assert done.returncode == 0, done.stderr
    assert (only(landing)["label"], only(landing)["landed"]) == ("ok", 5)


def test_sqlite_probe_counts_this_runs_rows_read_only(tmp_path: Path) -> None:
    # target-sqlite 0.2.0 (the only SQLite target on PyPI here) pins an SQLAlchemy that no longer
    # imports on Python 3.10+, so the table is written as it would write it: `users`, `<db>.db`.
    import sqlite3

    from flext_meltano_context import landing

    db = tmp_path / "w.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, _sdc_correlation_id TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?)", [(1, "old"), (2, "run"), (3, "run")])
    check = landing.prepare(
        names=["target-sqlite"],
        argv=["target-sqlite"],
        config={"database": str(tmp_path / "w")},
        config_source="test",
        approximate=False,
    )
    result = check.finish({"Users": 5}, {"Users": 3}, {"Users": True}, frozenset({"*"}), "run")
    (row,) = result.streams
    assert (row.label, row.landed, row.relayed, row.level) == ("missing 1", 2, 3, "exact")
    assert row.dataset == {"namespace": f"sqlite://{db}", "name": "users"}
