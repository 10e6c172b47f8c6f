"""Landing checks against a real PostgreSQL server and meltanolabs-target-postgres (issue 7).

The session starts a throw-away cluster with Debian's server binaries on a free loopback port and
removes it at the end; `.ci/run` installs the `postgresql` package.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fake, install_tool
from tests.pg import Server
from tests.test_landing import cli, only, run
from tests.test_landing_keys import delete_wrapper
from tests.test_landing_secrets import assert_nowhere, outputs

pytestmark = pytest.mark.e2e

TARGET_POSTGRES = "meltanolabs-target-postgres==0.8.1"


def config_file(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(config))
    return path


def target(config: Path) -> list[str]:
    return [str(install_tool(TARGET_POSTGRES) / "target-postgres"), "--config", str(config)]


def test_record_column_level_counts_this_runs_rows_by_distinct_key(
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
        column="*",
    )
    assert done.returncode == 0, done.stderr
    row = only(landing)
    assert (row["label"], row["landed"], row["relayed"]) == ("ok", 7, 7)
    assert (row["level"], row["basis"], landing["family"]) == (
        "by column",
        "distinct_keys",
        "postgres",
    )
    assert row["dataset"] == {
        "namespace": f"postgres://127.0.0.1:{postgres.port}",
        "name": "postgres.exact_raw.users",
    }
    assert "landed users: ok" in done.stderr
    assert cli(tmp_path, "check", "--require-landed").returncode == 0
    assert_nowhere(postgres.password, outputs(tmp_path, done))


def test_a_stream_without_keys_is_checked_by_count_exactly(
    postgres: Server, tmp_path: Path
) -> None:
    config = config_file(tmp_path / "target.json", postgres.config(default_target_schema="count"))
    for ranges, new_rows in ((["1-10"], 10), (["1-6"], 6)):  # appended: every record is a row
        done, landing = run(
            tmp_path,
            fake("tap_keyed.py", *ranges, "--streams", "events", "--no-keys"),
            target(config),
        )
        assert done.returncode == 0, done.stderr
        row = only(landing)
        assert (row["status"], row["level"], row["bound"], row["basis"]) == (
            "ok",
            "by count",
            "exact",
            "records",
        )
        assert (row["landed"], row["relayed"]) == (new_rows, new_rows)


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
    assert gate.returncode == 1
    assert "password authentication failed" in gate.stderr
    assert cli(tmp_path, "check", "--require-landed", "--allow-unchecked").returncode == 0
    shown = outputs(tmp_path, done)
    assert_nowhere(wrong_password, shown)
    assert_nowhere(postgres.password, shown)


def test_by_key_every_key_present_is_ok(postgres: Server, tmp_path: Path) -> None:
    config = config_file(tmp_path / "target.json", postgres.config(default_target_schema="key_ok"))
    done, landing = run(tmp_path, fake("tap_keyed.py", "1-1200", "--repeat", "2"), target(config))
    assert done.returncode == 0, done.stderr
    for row in landing["streams"]:
        assert (row["label"], row["level"], row["relayed"], row["landed"]) == (
            "ok",
            "by key",
            1200,
            1200,
        )
    assert cli(tmp_path, "check", "--require-landed").returncode == 0
    assert_nowhere(postgres.password, outputs(tmp_path, done))


def test_by_key_a_row_deleted_after_the_load_is_missing_and_named(
    postgres: Server, tmp_path: Path
) -> None:
    config = config_file(tmp_path / "target.json", postgres.config(default_target_schema="key_del"))
    python = install_tool(TARGET_POSTGRES) / "python"
    wrapper = delete_wrapper(config, python, "key_del.users:777")
    done, landing = run(tmp_path, fake("tap_keyed.py", "1-1200"), wrapper)
    assert done.returncode == 0, done.stderr  # the wrapper exits 0 as the target did
    found = {row["stream"]: row for row in landing["streams"]}
    assert (found["orders"]["label"], found["orders"]["level"]) == ("ok", "by key")
    users = found["users"]
    assert (users["label"], users["level"], users["landed"], users["samples"]) == (
        "missing 1",
        "by key",
        1199,
        [{"id": 777}],
    )
    gate = cli(tmp_path, "check", "--require-landed")
    assert gate.returncode == 1
    assert "stream 'users'" in gate.stderr
    assert "e.g. id=777" in gate.stderr
    assert "stream 'orders'" not in gate.stderr


PROBE_SESSION = """
import json, sys, psycopg
conf = json.loads(sys.argv[1])
out = {}
with psycopg.connect(host=conf["host"], port=conf["port"], user=conf["user"],
                     password=conf["password"], dbname=conf["database"]) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS public.probe_guard (id int)")
    conn.commit()
    conn.execute("SET TRANSACTION READ ONLY")
    try:
        conn.execute("CREATE TEMP TABLE k (c text)")
    except psycopg.Error as exc:
        out["create_in_read_only"] = type(exc).__name__
    conn.rollback()
    conn.execute("CREATE TEMP TABLE k (c text) ON COMMIT DROP")
    conn.execute("SET TRANSACTION READ ONLY")
    with conn.cursor().copy("COPY k FROM STDIN") as copy:
        copy.write(b"1\\n2\\n")
    out["copied"] = conn.execute("SELECT count(*) FROM k").fetchone()[0]
    try:
        conn.execute("INSERT INTO public.probe_guard VALUES (1)")
    except psycopg.Error as exc:
        out["write_after"] = type(exc).__name__
    conn.rollback()
print(json.dumps(out))
"""


def test_the_probe_session_is_read_only_once_its_temporary_table_exists(
    postgres: Server,
) -> None:
    # Why the probe creates its table first: CREATE is refused in a read-only transaction, while
    # COPY into a temporary table is allowed there and a write to any other table is not.
    python = install_tool(TARGET_POSTGRES) / "python"
    done = subprocess.run(
        [str(python), "-c", PROBE_SESSION, json.dumps(postgres.config())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "create_in_read_only": "ReadOnlySqlTransaction",
        "copied": 2,
        "write_after": "ReadOnlySqlTransaction",
    }
