"""Landing checks against a real PostgreSQL server and meltanolabs-target-postgres (issue 7).

The session starts a throw-away cluster with Debian's server binaries on a free loopback port and
removes it at the end; `.ci/run` installs the `postgresql` package.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fake, install_tool
from tests.pg import Server
from tests.test_landing import cli, only, run
from tests.test_landing_secrets import assert_nowhere, outputs

pytestmark = pytest.mark.e2e

TARGET_POSTGRES = "meltanolabs-target-postgres==0.8.1"


def config_file(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(config))
    return path


def target(config: Path) -> list[str]:
    return [str(install_tool(TARGET_POSTGRES) / "target-postgres"), "--config", str(config)]


def test_exact_level_counts_this_runs_rows_by_distinct_key(
    postgres: Server, tmp_path: Path
) -> None:
    config = config_file(
        tmp_path / "target.json", postgres.config(default_target_schema="exact_raw")
    )
    # 20 records over 7 keys: target-postgres merges by primary key, so 7 rows land.
    done, landing = run(
        tmp_path,
        fake("tap_landing.py", "20", "7"),
        target(config),
        "--target-config",
        str(config),
    )
    assert done.returncode == 0, done.stderr
    row = only(landing)
    assert (row["label"], row["landed"], row["relayed"]) == ("ok", 7, 7)
    assert (row["level"], row["basis"], landing["family"]) == ("exact", "distinct_keys", "postgres")
    assert row["dataset"] == {
        "namespace": f"postgres://127.0.0.1:{postgres.port}",
        "name": "postgres.exact_raw.users",
    }
    assert "landed users: ok" in done.stderr
    assert cli(tmp_path, "check", "--require-landed").returncode == 0
    assert_nowhere(postgres.password, outputs(tmp_path, done))


def test_approximate_level_flags_upserts_as_an_upper_bound(
    postgres: Server, tmp_path: Path
) -> None:
    config = config_file(
        tmp_path / "target.json", postgres.config(default_target_schema="approx_raw")
    )
    # No record column, so no keys collected: 10 records are an upper bound for the 4 new rows.
    done, landing = run(
        tmp_path,
        fake("tap_landing.py", "10", "4"),
        target(config),
        "--target-config",
        str(config),
        column="",
    )
    assert done.returncode == 0, done.stderr
    row = only(landing)
    assert (row["status"], row["level"], row["bound"], row["basis"]) == (
        "ok",
        "approximate",
        "upper_bound",
        "records",
    )
    assert (row["landed"], row["relayed"]) == (4, 10)
    assert "upper bound" in row["reason"]
    # Again over keys 1-6: four rows are updated and add nothing, two are new.
    done, landing = run(
        tmp_path,
        fake("tap_landing.py", "10", "6"),
        target(config),
        "--target-config",
        str(config),
        column="",
    )
    assert done.returncode == 0, done.stderr
    row = only(landing)
    assert (row["status"], row["bound"], row["landed"], row["relayed"]) == (
        "ok",
        "upper_bound",
        2,
        10,
    )


@pytest.mark.parametrize("form", ["fields", "sqlalchemy_url"], ids=["fields", "sqlalchemy-url"])
def test_refused_credentials_are_not_checked_with_the_drivers_reason_and_never_shown(
    postgres: Server, tmp_path: Path, form: str
) -> None:
    # The target loads with the right password; the probe gets a wrong one (--target-config).
    right = config_file(tmp_path / "target.json", postgres.config(default_target_schema="raw"))
    wrong_password = f"wrong-{secrets.token_hex(8)}"
    if form == "fields":
        wrong = postgres.config(password=wrong_password, default_target_schema="raw")
    else:
        url = f"postgresql+psycopg://postgres:{wrong_password}@127.0.0.1:{postgres.port}/postgres"
        wrong = {"sqlalchemy_url": url, "default_target_schema": "raw"}
    probe_config = config_file(tmp_path / "probe.json", wrong)
    done, landing = run(
        tmp_path,
        fake("tap_landing.py", "5", "5"),
        target(right),
        "--target-config",
        str(probe_config),
    )
    assert done.returncode == 0, done.stderr  # a refused probe is reported, not a failed run
    row = only(landing)
    assert (row["status"], row["landed"], row["relayed"]) == ("not checked", None, 5)
    assert 'password authentication failed for user "postgres"' in row["reason"]
    assert "landed users: not checked" in done.stderr
    gate = cli(tmp_path, "check", "--require-landed")
    assert gate.returncode == 0, gate.stderr
    shown = outputs(tmp_path, done)
    assert_nowhere(wrong_password, shown)
    assert_nowhere(postgres.password, shown)
