"""Landing reconciliation (issues 7, 10): what was relayed against what landed, per stream."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flext_meltano_context.keys import KeySet, canonical
from tests.conftest import fake, install_tool

DUCKDB_OLD = ("target-duckdb==0.8.0", "duckdb==1.2.2")
DUCKDB_NEW = ("target-duckdb==0.8.0", "duckdb==2.0.1")


def run(
    tmp_path: Path,
    tap: list[str],
    target: list[str],
    *extra: str,
    column: str = "",
    cwd: Path | None = None,
    env_extra: Mapping[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`flext-context run` standalone; the process and its landing event."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXT_", "MELTANO_"))}
    env["FLEXT_CONTEXT_LINEAGE_PATH"] = str(tmp_path / "lineage.jsonl")
    env["FLEXT_CONTEXT_LOG_FORMAT"] = "console"
    if column:
        env["FLEXT_CONTEXT_RECORD_COLUMN_STREAMS"] = column
    env.update(env_extra or {})
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
    assert gate.returncode == 1  # no proof of landing is no proof
    assert "stream 'users'" in gate.stderr
    assert "not checked (no landing probe for target 'target_collect.py')" in gate.stderr
    allowed = cli(tmp_path, "check", "--require-landed", "--allow-unchecked")
    assert allowed.returncode == 0, allowed.stderr


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
    ids=["duckdb-2.0.1-loses-a-row", "duckdb-1.2.2-keeps-every-row"],
)
def test_record_column_level_catches_target_duckdb_row_loss(
    tmp_path: Path, requirements: tuple[str, ...], label: str, landed: int, exit_code: int
) -> None:
    bin_dir = install_tool(*requirements)
    config = duckdb_config(tmp_path)
    # 20 records over 7 keys: target-duckdb upserts, so 7 rows should carry this run's id.
    done, landing = run(
        tmp_path,
        fake("tap_landing.py", "20", "7"),
        [str(bin_dir / "target-duckdb"), "--config", str(config)],
        column="*",
    )
    assert done.returncode == 0, done.stderr  # the target says it succeeded either way
    row = only(landing)
    assert (row["label"], row["landed"], row["relayed"]) == (label, landed, 7)
    assert (row["level"], row["basis"], landing["family"]) == (
        "by column",
        "distinct_keys",
        "duckdb",
    )
    assert row["dataset"]["name"] == "w.raw.users"
    assert f"landed users: {label}" in done.stderr
    gate = cli(tmp_path, "check", "--require-landed")
    assert gate.returncode == exit_code, gate.stderr
    if exit_code:
        assert "missing 1 in the destination" in gate.stderr
    report = cli(tmp_path, "report", "--format", "markdown")
    assert f"{label} (by column, {landed} of 7)" in report.stdout


@pytest.mark.e2e
def test_a_stream_without_keys_is_checked_by_count_exactly_on_every_run(tmp_path: Path) -> None:
    # target-duckdb refuses a stream without key properties; target-jsonl appends it.
    config = tmp_path / "jsonl.json"
    config.write_text(json.dumps({"destination_path": str(tmp_path / "out")}))
    target = [str(install_tool("target-jsonl==0.1.4") / "target-jsonl"), "--config", str(config)]
    tap = fake("tap_keyed.py", "1-10", "--streams", "events", "--no-keys")
    done, landing = run(tmp_path, tap, target)
    assert done.returncode == 0, done.stderr
    row = only(landing)
    # No key properties: every record is a row, so rows after minus rows before is exact.
    assert (row["status"], row["level"], row["bound"], row["landed"], row["relayed"]) == (
        "ok",
        "by count",
        "exact",
        10,
        10,
    )
    done, landing = run(
        tmp_path, fake("tap_keyed.py", "1-6", "--streams", "events", "--no-keys"), target
    )
    row = only(landing)
    assert (row["status"], row["level"], row["bound"], row["landed"], row["relayed"]) == (
        "ok",
        "by count",
        "exact",
        6,
        6,
    )


@pytest.mark.e2e
def test_file_targets_by_column_and_by_key(tmp_path: Path) -> None:
    jsonl = install_tool("target-jsonl==0.1.4")
    out = tmp_path / "out"
    config = tmp_path / "jsonl.json"
    config.write_text(json.dumps({"destination_path": str(out)}))
    target = [str(jsonl / "target-jsonl"), "--config", str(config)]
    done, landing = run(tmp_path, fake("tap_landing.py", "9", "3"), target, column="*")
    assert done.returncode == 0, done.stderr
    row = only(landing)  # an appending target: every record is a row
    assert (row["label"], row["level"], row["basis"], row["landed"]) == (
        "ok",
        "by column",
        "records",
        9,
    )
    time.sleep(1.1)  # target-jsonl names its file to the second
    done, landing = run(tmp_path, fake("tap_landing.py", "4", "3"), target)
    row = only(landing)  # by key at default settings: keys 1-3 are in the files
    assert (row["label"], row["level"], row["landed"], row["relayed"]) == ("ok", "by key", 3, 3)

    csv_bin = install_tool("meltanolabs-target-csv==0.5.0")
    config = tmp_path / "csv.json"
    config.write_text(json.dumps({"output_path": str(tmp_path / "csv")}))
    target = [str(csv_bin / "target-csv"), "--config", str(config)]
    done, landing = run(tmp_path, fake("tap_landing.py", "5", "5"), target)
    assert done.returncode == 0, done.stderr
    assert (only(landing)["label"], only(landing)["level"], only(landing)["landed"]) == (
        "ok",
        "by key",
        5,
    )


def sqlite_check(tmp_path: Path) -> Any:
    from flext_meltano_context import landing

    return landing.prepare(
        names=["target-sqlite"],
        argv=["target-sqlite"],
        config={"database": str(tmp_path / "w")},
        config_source="test",
        approximate=False,
    )


def keyset(stream: str, *values: bytes) -> KeySet:
    keys = KeySet()
    keys.add_many(stream, [canonical([v]) for v in values])
    return keys


def test_sqlite_probe_counts_this_runs_rows_read_only(tmp_path: Path) -> None:
    # target-sqlite 0.2.0 (the only SQLite target on PyPI here) pins an SQLAlchemy that no longer
    # imports on Python 3.10+, so the table is written as it would write it: `users`, `<db>.db`.
    db = tmp_path / "w.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, _sdc_correlation_id TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?)", [(1, "old"), (2, "run"), (3, "run")])
    keys = keyset("Users", b"1", b"2", b"4")
    result = sqlite_check(tmp_path).finish(
        {"Users": 5}, keys, {"Users": ["id"]}, frozenset({"*"}), "run"
    )
    (row,) = result.streams
    assert (row.label, row.landed, row.relayed, row.level) == ("missing 1", 2, 3, "by column")
    assert row.dataset == {"namespace": f"sqlite://{db}", "name": "users"}


@pytest.mark.parametrize(
    ("values", "label", "samples"),
    [
        ((b"1", b"2", b"3.0"), "ok", []),
        ((b"1", b"2", b"4", b"5"), "missing 2", [{"id": 4}, {"id": 5}]),
    ],
    ids=["every-key-there", "two-keys-missing"],
)
def test_sqlite_by_key_names_the_missing_keys_and_writes_nothing(
    tmp_path: Path, values: tuple[bytes, ...], label: str, samples: list[dict[str, Any]]
) -> None:
    db = tmp_path / "w.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?)", [(1, "a"), (2, "b"), (3, "c")])
    before = db.read_bytes()
    result = sqlite_check(tmp_path).finish(
        {"users": 9}, keyset("users", *values), {"users": ["id"]}, frozenset(), "run"
    )
    (row,) = result.streams
    shown = sorted(row.samples, key=lambda sample: sample["id"])  # in no particular order
    assert (row.label, row.level, row.relayed, shown) == (label, "by key", len(values), samples)
    assert db.read_bytes() == before  # read-only: not a byte changed


@pytest.mark.parametrize(
    ("column_type", "value", "reason"),
    [
        ("TEXT", b"1.5", "a non-integral number key on a text column"),
        ("INTEGER", b'{"a": 1}', "a key value that is no scalar"),
        ("INTEGER", b"null", "a null key property"),
        ("INTEGER", b'"7"', "a string key on a integer column"),
    ],
    ids=["float-on-text", "object", "null", "string-on-integer"],
)
def test_a_key_that_cannot_be_compared_is_not_checked_never_ok(
    tmp_path: Path, column_type: str, value: bytes, reason: str
) -> None:
    with sqlite3.connect(tmp_path / "w.db") as conn:
        conn.execute(f"CREATE TABLE users (id {column_type})")
        conn.execute("INSERT INTO users VALUES (1)")
    result = sqlite_check(tmp_path).finish(
        {"users": 2}, keyset("users", b"1", value), {"users": ["id"]}, frozenset(), "run"
    )
    (row,) = result.streams
    assert (row.status, row.level, row.landed) == ("not checked", "by key", None)
    assert reason in (row.reason or "")


def test_a_relay_counting_error_leaves_every_stream_not_checked(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "w.db") as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    result = sqlite_check(tmp_path).finish(
        {"users": 2},
        keyset("users", b"1"),
        {"users": ["id"]},
        frozenset(),
        "run",
        counting_error="ValueError: boom",
    )
    (row,) = result.streams
    assert row.status == "not checked"
    assert "counts are incomplete: ValueError: boom" in (row.reason or "")


def test_sample_keys_are_redacted_when_the_key_column_looks_secret(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "w.db") as conn:
        conn.execute("CREATE TABLE users (api_key TEXT)")
    result = sqlite_check(tmp_path).finish(
        {"users": 1}, keyset("users", b'"sk-live-123"'), {"users": ["api_key"]}, frozenset(), "r"
    )
    (row,) = result.streams
    assert (row.label, list(row.samples)) == ("missing 1", [{"api_key": "[REDACTED]"}])


def test_a_key_property_finds_the_column_the_target_renamed(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "w.db") as conn:
        conn.execute("CREATE TABLE users (user_id INTEGER, other TEXT)")
        conn.execute("INSERT INTO users VALUES (7, 'x')")
    keys = KeySet()
    keys.add_many("users", [canonical([b"7"]), canonical([b"8"])])
    result = sqlite_check(tmp_path).finish(
        {"users": 2}, keys, {"users": ["userId"]}, frozenset(), "run"
    )
    (row,) = result.streams
    assert (row.label, list(row.samples)) == ("missing 1", [{"userId": 8}])
    keys = KeySet()
    keys.add_many("users", [canonical([b"7"])])
    result = sqlite_check(tmp_path).finish(
        {"users": 1}, keys, {"users": ["nope"]}, frozenset(), "run"
    )
    (row,) = result.streams
    assert (row.status, row.reason) == (
        "not checked",
        "no column for key property 'nope' in table 'users'",
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["integer", "text", "float", "other"]), st.integers() | st.text()
        ),
        min_size=1,
        max_size=3,
    )
)
def test_the_fast_wire_path_writes_what_the_slow_one_does(parts: list[tuple[str, Any]]) -> None:
    from flext_meltano_context.keyprobe import _fast_wire, _slow_wire

    classes = [klass for klass, _value in parts]
    key = canonical([json.dumps(value).encode() for _klass, value in parts])
    fast = _fast_wire(key, classes)
    slow = _slow_wire(key, [f"c{i}" for i in range(len(parts))], classes)
    if fast is not None:
        assert fast == slow
    else:  # only what the fast path leaves to the slow one: other kinds, or not comparable
        assert any(
            (isinstance(v, int) and k not in {"integer", "float"})
            or (isinstance(v, str) and k not in {"text", "other"})
            for k, v in parts
        )


@pytest.mark.parametrize(
    ("new_rows", "status"), [(2, "ok"), (7, "extra")], ids=["within-bound", "over-bound"]
)
def test_without_keys_an_upserting_count_is_only_an_upper_bound_and_says_so(
    tmp_path: Path, new_rows: int, status: str
) -> None:
    from flext_meltano_context import landing

    db = tmp_path / "w.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO users VALUES (?)", [(n,) for n in range(100, 104)])
    check = landing.prepare(
        names=["target-sqlite"],
        argv=["target-sqlite"],
        config={"database": str(tmp_path / "w")},
        config_source="test",
        approximate=True,
    )
    with sqlite3.connect(db) as conn:  # the load: some keys updated (no new row), some new
        conn.executemany("INSERT INTO users VALUES (?)", [(n,) for n in range(new_rows)])
    # No key set (keys were not collected): 5 upserted records are at most 5 new rows.
    result = check.finish({"users": 5}, None, {"users": ["id"]}, frozenset(), "run")
    (row,) = result.streams
    assert (row.status, row.level, row.bound, row.landed, row.relayed) == (
        status,
        "by count",
        "upper_bound",
        new_rows,
        5,
    )
    assert "upper bound" in (row.reason or "")
