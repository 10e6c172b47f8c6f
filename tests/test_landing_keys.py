"""Landing by key at default settings (issue 10): real targets, real destinations, keyed streams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKES, fake, install_tool
from tests.test_landing import DUCKDB_NEW, DUCKDB_OLD, cli, run

pytestmark = pytest.mark.e2e


def rows(landing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["stream"]: row for row in landing["streams"]}


def duckdb_target(tmp_path: Path, requirements: tuple[str, ...]) -> list[str]:
    config = tmp_path / "target.json"
    config.write_text(
        json.dumps({"path": str(tmp_path / "w.duckdb"), "default_target_schema": "raw"})
    )
    return [str(install_tool(*requirements) / "target-duckdb"), "--config", str(config)]


def test_duckdb_2_0_1_drops_one_row_per_new_table_and_the_check_by_key_names_it(
    tmp_path: Path,
) -> None:
    target = duckdb_target(tmp_path, DUCKDB_NEW)
    done, landing = run(tmp_path, fake("tap_keyed.py", "1-1500", "--tag", "run1"), target)
    assert done.returncode == 0, done.stderr  # target-duckdb says it loaded everything
    found = rows(landing)
    assert set(found) == {"orders", "users"}
    for stream, row in found.items():
        assert (row["label"], row["level"], row["relayed"], row["landed"]) == (
            "missing 1",
            "by key",
            1500,
            1499,
        ), stream
        assert row["samples"] == [{"id": 1}]  # the first row, read as a CSV header
        assert row["key_columns"] == ["id"]
        summary = f"landed {stream}: missing 1, by key (relayed 1,500, landed 1,499); e.g. id=1"
        assert summary in done.stderr
    gate = cli(tmp_path, "check", "--require-landed")
    assert gate.returncode == 1
    assert "stream 'orders'" in gate.stderr
    assert "stream 'users'" in gate.stderr
    assert "missing 1 in the destination, by key" in gate.stderr
    assert "e.g. id=1" in gate.stderr
    report = cli(tmp_path, "report", "--format", "markdown")
    assert "missing 1 (by key, 1,499 of 1,500; e.g. id=1)" in report.stdout

    # Second run: 500 new keys first, then updates of 501-1500. The load's first row is lost
    # again: a new key, so it is missing.
    done, landing = run(
        tmp_path, fake("tap_keyed.py", "1501-2000", "501-1500", "--tag", "run2"), target
    )
    assert done.returncode == 0, done.stderr
    for row in rows(landing).values():
        assert (row["label"], row["relayed"], row["samples"]) == ("missing 1", 1500, [{"id": 1501}])
    assert cli(tmp_path, "check", "--require-landed").returncode == 1


def test_duckdb_2_0_1_a_lost_update_is_caught_by_column_not_by_key(tmp_path: Path) -> None:
    # What a key check cannot see: the lost first row is an update of a key that is there.
    target = duckdb_target(tmp_path, DUCKDB_NEW)
    run(tmp_path, fake("tap_keyed.py", "1-1000", "--tag", "run1"), target)
    done, landing = run(tmp_path, fake("tap_keyed.py", "501-1500", "--tag", "run2"), target)
    assert {row["label"] for row in rows(landing).values()} == {"ok"}  # key 501 is there (old)
    done, landing = run(
        tmp_path, fake("tap_keyed.py", "601-1600", "--tag", "run3"), target, column="*"
    )
    assert done.returncode == 0, done.stderr
    for row in rows(landing).values():
        assert (row["label"], row["level"]) == ("missing 1", "by column")


def test_duckdb_1_2_2_keeps_every_row_and_the_check_by_key_says_ok(tmp_path: Path) -> None:
    target = duckdb_target(tmp_path, DUCKDB_OLD)
    for ranges in (["1-1500"], ["1501-2000", "501-1500"]):
        done, landing = run(tmp_path, fake("tap_keyed.py", *ranges), target)
        assert done.returncode == 0, done.stderr
        for row in rows(landing).values():
            assert (row["label"], row["level"], row["relayed"], row["landed"]) == (
                "ok",
                "by key",
                1500,
                1500,
            )
            assert row["samples"] == []
        gate = cli(tmp_path, "check", "--require-landed")
        assert gate.returncode == 0, gate.stderr


def test_an_upsert_stream_with_repeated_keys_is_ok_by_distinct_key(tmp_path: Path) -> None:
    target = duckdb_target(tmp_path, DUCKDB_OLD)
    done, landing = run(tmp_path, fake("tap_keyed.py", "1-1000", "--repeat", "3"), target)
    assert done.returncode == 0, done.stderr
    for row in rows(landing).values():
        assert (row["label"], row["basis"], row["relayed"], row["landed"]) == (
            "ok",
            "distinct_keys",
            1000,
            1000,
        )


def test_string_keys_compare_as_text_and_a_tiny_budget_spills_to_disk(tmp_path: Path) -> None:
    target = duckdb_target(tmp_path, DUCKDB_NEW)
    done, landing = run(
        tmp_path,
        fake("tap_keyed.py", "1-3000", "--text-keys", "--streams", "users"),
        target,
        env_extra={"FLEXT_CONTEXT_LANDING_KEY_BUDGET_MB": "0.05"},  # ~600 keys, then disk
    )
    assert done.returncode == 0, done.stderr
    row = rows(landing)["users"]
    assert (row["label"], row["relayed"], row["samples"]) == ("missing 1", 3000, [{"id": "k-1"}])


def test_sample_keys_can_be_hidden(tmp_path: Path) -> None:
    target = duckdb_target(tmp_path, DUCKDB_NEW)
    _done, landing = run(
        tmp_path,
        fake("tap_keyed.py", "1-50", "--streams", "users"),
        target,
        env_extra={"FLEXT_CONTEXT_LANDING_SAMPLE_KEYS": "0"},
    )
    row = rows(landing)["users"]
    assert (row["label"], row["samples"]) == ("missing 1", [])


def test_a_bad_sample_keys_setting_is_a_usage_error_before_anything_starts(tmp_path: Path) -> None:
    target = duckdb_target(tmp_path, DUCKDB_OLD)
    done, _landing = run(
        tmp_path,
        fake("tap_keyed.py", "1-5"),
        target,
        env_extra={"FLEXT_CONTEXT_LANDING_SAMPLE_KEYS": "many"},
    )
    assert done.returncode == 2
    assert "FLEXT_CONTEXT_LANDING_SAMPLE_KEYS='many' is not a whole number" in done.stderr
    assert not (tmp_path / "w.duckdb").exists()


def delete_wrapper(config: Path, python: Path, where: str) -> list[str]:
    target = str(python.parent / "target-postgres")
    return [
        str(python),
        str(FAKES / "target_postgres_delete_one.py"),
        target,
        "--config",
        str(config),
        "--delete",
        where,
    ]
