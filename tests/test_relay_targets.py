"""Real targets from PyPI fed directly and through `flext-context relay` must end up the same.

The streams are singer-sdk's own target test streams (unicode, odd stream names, schema changes,
several STATEs, negative cases). Each target lives in a venv of its own, as Meltano gives it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import singer_sdk

from flext_meltano_context import scanner
from tests.conftest import install_tool

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True, scope="module", params=["python", "c"], ids=["python", "compiled"])
def scanner_impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs against both relay scanners (FLEXT_CONTEXT_SCANNER, children too)."""
    if request.param == "c" and scanner.compiled()[0] is None:
        pytest.skip(f"compiled scanner: {scanner.compiled()[1]}")
    old = os.environ.get(scanner.ENV)
    os.environ[scanner.ENV] = request.param
    yield request.param
    if old is None:
        del os.environ[scanner.ENV]
    else:
        os.environ[scanner.ENV] = old


STREAMS = Path(singer_sdk.__file__).parent / "testing" / "target_test_streams"
FILES = sorted(STREAMS.glob("*.singer"))
CID = "0190b4a0-7c3e-7d2a-9f1e-3b5c7d9e1f20"


@dataclass(frozen=True)
class Target:
    requirements: tuple[str, ...]
    executable: str
    config_key: str  # where the target writes, given as a directory or a database file

    def config(self, out: Path) -> dict[str, Any]:
        if self.executable == "target-jsonl":
            return {"destination_path": str(out), "do_timestamp_file": False}
        if self.executable == "target-csv":
            return {"output_path": str(out)}
        return {"filepath": str(out / "warehouse.duckdb"), "default_target_schema": "raw"}


TARGETS = {
    "jsonl": Target(("target-jsonl==0.1.4",), "target-jsonl", "destination_path"),
    "csv": Target(("meltanolabs-target-csv==0.5.0",), "target-csv", "output_path"),
    "duckdb": Target(("target-duckdb==0.8.0", "duckdb==1.2.2"), "target-duckdb", "filepath"),
}


@dataclass(frozen=True)
class Outcome:
    returncode: int
    files: dict[str, bytes]
    states: list[Any]
    stats: dict[str, Any] | None


def start(target: Target, stream: Path, work: Path, relay_args: list[str] | None) -> Any:
    """Start the target fed from `stream`, directly or through the relay CLI (real pipes)."""
    bin_dir = install_tool(*target.requirements)
    out = work / "out"
    out.mkdir(parents=True)
    config = work / "config.json"
    config.write_text(json.dumps(target.config(out)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXT_", "MELTANO_"))}
    env["FLEXT_CORRELATION_ID"] = CID
    command = [str(bin_dir / target.executable), "--config", str(config)]
    with stream.open("rb") as source:
        if relay_args is None:
            target_proc = subprocess.Popen(
                command,
                stdin=source,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=work,
            )
            return None, target_proc, work
        relay_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flext_meltano_context",
                "relay",
                "--stats",
                str(work / "s.json"),
                *relay_args,
            ],
            stdin=source,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    target_proc = subprocess.Popen(
        command,
        stdin=relay_proc.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=work,
    )
    assert relay_proc.stdout is not None
    relay_proc.stdout.close()
    return relay_proc, target_proc, work


def finish(started: Any) -> Outcome:
    relay_proc, target_proc, work = started
    stdout, stderr = target_proc.communicate(timeout=120)
    stats = None
    if relay_proc is not None:
        _, relay_err = relay_proc.communicate(timeout=120)
        assert relay_proc.returncode == 0, relay_err.decode()
        stats = json.loads((work / "s.json").read_text())
    states = []
    for line in stdout.decode().splitlines():
        try:
            states.append(json.loads(line))
        except ValueError:
            continue  # targets may print other things; a state is a JSON line
    out = work / "out"
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    if target_proc.returncode != 0 and stderr:
        files["<stderr-tail>"] = b"exit %d" % target_proc.returncode
    return Outcome(target_proc.returncode, files, states, stats)


def without_flext(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_flext(v) for k, v in value.items() if k != "flext_context"}
    return value


def reference_counts(stream: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in stream.read_bytes().splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and isinstance(message.get("type"), str):
            counts[message["type"]] += 1
    return dict(counts)


CASES = [(t, f) for t in ("jsonl", "csv") for f in FILES]


@pytest.mark.parametrize(("target_name", "stream"), CASES, ids=[f"{t}-{f.stem}" for t, f in CASES])
def test_target_gets_the_same_through_the_relay_as_directly(
    tmp_path: Path, target_name: str, stream: Path
) -> None:
    target = TARGETS[target_name]
    direct = start(target, stream, tmp_path / "direct", None)
    relayed = start(target, stream, tmp_path / "relayed", [])
    a, b = finish(direct), finish(relayed)
    assert b.returncode == a.returncode
    assert b.files == a.files
    assert [without_flext(s) for s in b.states] == [without_flext(s) for s in a.states]
    assert b.stats is not None
    assert b.stats["counts"] == reference_counts(stream)
    assert b.stats["bytes"] == stream.stat().st_size


INJECTED = ["array_data", "encoded_string_data", "user_location_data"]
INJECTION_CASES = [(t, f) for t in TARGETS for f in INJECTED]


def loaded_rows(target_name: str, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows per stream/table as the target stored them."""
    if target_name == "jsonl":
        return {
            p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in out.glob("*.jsonl")
        }
    if target_name == "csv":
        import csv

        rows = {}
        for p in out.glob("*.csv"):
            with p.open(newline="", encoding="utf-8") as f:
                rows[p.stem] = list(csv.DictReader(f))
        return rows
    import duckdb

    con = duckdb.connect(str(out / "warehouse.duckdb"), read_only=True)
    try:
        tables = [
            t
            for (t,) in con.execute(
                "select table_name from information_schema.tables where table_schema = 'raw'"
            ).fetchall()
        ]
        result = {}
        for table in tables:
            cursor = con.execute(f'select * from raw."{table}"')  # noqa: S608 - our own names
            names = [d[0] for d in cursor.description or []]
            result[table] = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        return result
    finally:
        con.close()


def expected_rows(stream: Path, upsert: bool) -> int:
    """RECORDs in the file; distinct keys per stream when the target upserts by key."""
    keys: dict[str, list[str]] = {}
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for line in stream.read_bytes().splitlines():
        message = json.loads(line)
        if message["type"] == "SCHEMA":
            keys[message["stream"]] = message.get("key_properties") or []
        elif message["type"] == "RECORD":
            key = keys.get(message["stream"]) or []
            if upsert and key:
                seen.add((message["stream"], *(json.dumps(message["record"].get(k)) for k in key)))
            else:
                total += 1
    return total + len(seen)


@pytest.mark.parametrize(
    ("target_name", "name"), INJECTION_CASES, ids=[f"{t}-{f}" for t, f in INJECTION_CASES]
)
def test_injection_keeps_every_record_adds_the_column_and_carries_context_in_state(
    tmp_path: Path, target_name: str, name: str
) -> None:
    stream = STREAMS / f"{name}.singer"
    outcome = finish(
        start(
            TARGETS[target_name],
            stream,
            tmp_path,
            ["--inject-state-correlation", "--record-column", "*"],
        )
    )
    assert outcome.returncode == 0, outcome.files
    rows = loaded_rows(target_name, tmp_path / "out")
    assert sum(len(r) for r in rows.values()) == expected_rows(stream, target_name == "duckdb")
    for table, table_rows in rows.items():
        assert all(row["_sdc_correlation_id"] == CID for row in table_rows), table
    assert outcome.states, "the target emitted no state"
    assert outcome.states[-1]["flext_context"]["correlation_id"] == CID
    assert outcome.stats is not None
    assert outcome.stats["counts"] == reference_counts(stream)
