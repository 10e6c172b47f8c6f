"""A password in the target config never reaches any output of a run with a landing check (issue 7).

Fast: a fake target under a real target's name, so the landing probe reads the config and counts
the destination the way it would for target-jsonl or target-duckdb.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import pytest

from flext_meltano_context import landing
from tests.conftest import FAKES, fake
from tests.test_landing import cli, only, run

REPORT_FORMATS = ("json", "markdown", "html", "openlineage")
PASSWORD = f"pw-{secrets.token_hex(8)}"  # unique: found only where it leaked
TOKEN = f"tok-{secrets.token_hex(8)}"


def outputs(tmp_path: Path, done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Everything a run showed: stdout, stderr, the lineage log, every report, the gate."""
    shown = {
        "stdout": done.stdout,
        "stderr": done.stderr,
        "lineage": (tmp_path / "lineage.jsonl").read_text(),
    }
    for fmt in REPORT_FORMATS:
        report = cli(tmp_path, "report", "--format", fmt)
        assert report.returncode == 0, report.stderr
        shown[f"report {fmt}"] = report.stdout + report.stderr
    gate = cli(tmp_path, "check", "--require-landed")
    shown["check --require-landed"] = gate.stdout + gate.stderr
    return shown


def assert_nowhere(secret: str, shown: Mapping[str, str]) -> None:
    leaks = [name for name, text in shown.items() if secret in text]
    assert not leaks, f"the secret appears in: {', '.join(leaks)}"


def fake_target(tmp_path: Path, name: str, out: Path, config: Mapping[str, Any]) -> list[str]:
    """target_collect.py under a real target's name, given `config` with --config."""
    script = tmp_path / name
    shutil.copy(FAKES / "target_collect.py", script)
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(config))
    return [sys.executable, str(script), str(out), "--config", str(config_path)]


def test_a_password_in_a_jsonl_target_config_reaches_no_output(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    config = {"destination_path": str(folder), "password": PASSWORD, "auth": {"token": TOKEN}}
    target = fake_target(tmp_path, "target-jsonl", folder / "users.jsonl", config)
    done, result = run(tmp_path, fake("tap_landing.py", "5", "5"), target)
    assert done.returncode == 0, done.stderr
    row = only(result)
    assert (result["family"], row["label"], row["level"], row["landed"]) == (
        "jsonl",
        "ok",
        "by key",
        5,
    )
    shown = outputs(tmp_path, done)
    assert_nowhere(PASSWORD, shown)
    assert_nowhere(TOKEN, shown)


def test_a_password_in_a_duckdb_target_config_reaches_no_output(tmp_path: Path) -> None:
    database = tmp_path / "w.duckdb"
    with duckdb.connect(str(database)) as conn:
        conn.execute("CREATE SCHEMA raw")
        conn.execute("CREATE TABLE raw.users (id INTEGER, _sdc_correlation_id VARCHAR)")
    config = {"path": str(database), "default_target_schema": "raw", "password": PASSWORD}
    # The fake writes elsewhere: the probe counts the table and finds none of this run's rows.
    target = fake_target(tmp_path, "target-duckdb", tmp_path / "rows.jsonl", config)
    done, result = run(tmp_path, fake("tap_landing.py", "5", "5"), target)
    assert done.returncode == 0, done.stderr
    row = only(result)
    assert (result["family"], row["label"], row["landed"]) == ("duckdb", "missing 5", 0)
    shown = outputs(tmp_path, done)
    assert "missing 5 in the destination" in shown["check --require-landed"]
    assert_nowhere(PASSWORD, shown)


@pytest.mark.parametrize(
    "config",
    [
        {"password": PASSWORD, "host": "db.example"},
        {"sqlalchemy_url": f"postgresql+psycopg://loader:{PASSWORD}@db.example/warehouse"},
        {"credentials": {"db_password": PASSWORD}},
    ],
    ids=["password", "url", "nested"],
)
def test_a_drivers_message_that_echoes_the_password_is_scrubbed(config: dict[str, Any]) -> None:
    check = landing.prepare(
        names=["target-postgres"],
        argv=["target-postgres"],
        config=config,
        config_source="test",
        approximate=False,
    )
    message = f'connection to "loader:{PASSWORD}@db.example" failed: password {PASSWORD!r}'
    assert PASSWORD not in check.scrub(message)
    assert "connection to" in check.scrub(message)


def test_a_motherduck_token_in_the_duckdb_path_is_not_in_the_dataset_name() -> None:
    check = landing.prepare(
        names=["target-duckdb"],
        argv=["target-duckdb"],
        config={"path": "md:my_db?motherduck_token=SECRET-TOKEN", "default_target_schema": "raw"},
        config_source="test",
        approximate=False,
    )
    schema, table, dataset = landing._destination(check, "users")
    assert (schema, table) == ("raw", "users")
    assert dataset == {"namespace": "duckdb://md:my_db", "name": "my_db.raw.users"}
