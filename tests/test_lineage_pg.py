"""The lineage log in PostgreSQL (issue 13): one chain many machines append to, verified, pushed.

Everything runs against the throw-away cluster of tests/pg.py: real `flext-context run`
processes with fake taps and targets, real concurrent writers, a server stopped mid-run, and
tampering with plain SQL.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flext_meltano_context.errors import UsageError
from flext_meltano_context.lineage import default_log_path
from flext_meltano_context.lineage.log import LineageLog
from flext_meltano_context.lineage.pg import PgStore
from flext_meltano_context.lineage.push import push
from flext_meltano_context.lineage.store import open_log, store_url
from tests.conftest import fake
from tests.pg import Server, cluster

pytestmark = pytest.mark.e2e


def _env(location: str, host: str = "machine-a", **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLEXT_", "MELTANO_", "PGPASS"))
    }
    env.update(
        FLEXT_CONTEXT_LINEAGE_PATH=location,
        FLEXT_CONTEXT_HOSTNAME=host,
        FLEXT_CONTEXT_LOG_FORMAT="console",
        **extra,
    )
    return env


def flext(
    cwd: Path, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flext_meltano_context", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pipeline(
    cwd: Path, env: dict[str, str], records: int, *target_args: str
) -> subprocess.CompletedProcess[str]:
    """`flext-context run` of the fake tap (`records` users) into the fake target, in `cwd`."""
    cwd.mkdir(parents=True, exist_ok=True)
    tap = subprocess.list2cmdline(fake("tap_counter.py", "--records", str(records)))
    target = subprocess.list2cmdline(
        fake("target_collect.py", str(cwd / "out.jsonl"), *target_args)
    )
    return flext(cwd, env, "run", "--tap-cmd", tap, "--target-cmd", target)


def sql(server: Server, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        cursor = conn.execute(query, params or None)
        return cursor.fetchall() if cursor.description else []


def test_two_machines_share_one_store_that_runs_and_check_read(
    postgres: Server, tmp_path: Path
) -> None:
    url = postgres.url(table="two_machines")
    first = pipeline(tmp_path / "a", _env(url, "machine-a"), 50)
    assert first.returncode == 0, first.stderr
    second = pipeline(tmp_path / "b", _env(url, "machine-b"), 20)
    assert second.returncode == 0, second.stderr
    # Each machine keeps its own local log (the spool), in its own work directory.
    for name in ("a", "b"):
        assert LineageLog(tmp_path / name / ".flext-context" / "lineage.jsonl").verify().ok

    listed = flext(tmp_path, _env(url), "runs", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert [run["records"] for run in runs] == [20, 50]  # newest first, both machines
    assert [run["host"] for run in runs] == ["machine-b", "machine-a"]
    table = flext(tmp_path, _env(url), "runs")
    assert "machine-a" in table.stdout
    assert "machine-b" in table.stdout

    # machine-b's run dropped 60% against machine-a's: the gate compares across machines.
    gate = flext(tmp_path / "b", _env(url, "machine-b"), "check", "--max-drop-pct", "50")
    assert gate.returncode == 1, gate.stderr
    assert f"against run {runs[1]['run_id']}" in gate.stderr
    assert "dropped 60.0% (50 -> 20 records)" in gate.stderr
    # The control: a drop within the limit passes, compared with the same run.
    passed = flext(tmp_path / "b", _env(url, "machine-b"), "check", "--max-drop-pct", "70")
    assert passed.returncode == 0, passed.stderr
    assert f"compared with run {runs[1]['run_id']}" in passed.stderr

    verified = flext(tmp_path, _env(url), "verify")
    assert verified.returncode == 0, verified.stderr
    assert "intact" in verified.stdout
    for fmt in ("json", "markdown", "html", "openlineage"):
        shown = flext(tmp_path, _env(url), "report", "--last", "--format", fmt)
        assert shown.returncode == 0, shown.stderr
        assert runs[0]["run_id"] in shown.stdout


_WRITER = """
import sys
from flext_meltano_context.lineage import Recorder
from flext_meltano_context.ids import uuid7
for run in range(int(sys.argv[1])):
    recorder = Recorder(sys.argv[2], run_id=uuid7(), correlation_id="c")
    recorder.record("run_started", {"pipeline": {"name": "p"}}, fsync=True)
    for index in range(3):
        recorder.record("stream_stats", {"stream": f"s{index}", "records": index})
    recorder.record("run_completed", {"status": "success", "records": 3}, fsync=True)
    recorder.close()
"""


def test_eight_concurrent_writers_keep_one_valid_chain_and_lose_nothing(
    postgres: Server, tmp_path: Path
) -> None:
    url = postgres.url(table="eight_writers")
    writers = []
    for n in range(8):
        work = tmp_path / f"w{n}"
        work.mkdir()
        writers.append(
            subprocess.Popen(
                [sys.executable, "-c", _WRITER, "10", str(work / "lineage.jsonl")],
                env=_env(url, f"host-{n}"),
                cwd=work,
            )
        )
    assert [writer.wait(timeout=300) for writer in writers] == [0] * 8
    with PgStore(url) as store:
        result = store.verify()
        stored = {(record["run_id"], record["run_seq"]) for record in store.read()}
    assert (result.ok, result.lines, result.runs) == (True, 400, 80), result.describe()
    (dupes,) = sql(
        postgres,
        "SELECT count(*) - count(DISTINCT (run_id, run_seq)) FROM flext_context.eight_writers",
    )
    assert dupes == (0,)
    # Every event each writer's local log holds is in the store, exactly once.
    local = {
        (record["run_id"], record["run_seq"])
        for n in range(8)
        for record in LineageLog(tmp_path / f"w{n}" / "lineage.jsonl").read()
    }
    assert local == stored
    assert len(local) == 400


_SLOW_RECORDS = 60


def test_a_store_stopped_mid_run_never_fails_it_and_gets_every_event_once_later(
    tmp_path: Path,
) -> None:
    with cluster() as running:
        url = running.server.url(table="outage")
        work = tmp_path / "machine"
        work.mkdir()
        tap = subprocess.list2cmdline(fake("tap_counter.py", "--records", str(_SLOW_RECORDS)))
        target = subprocess.list2cmdline(
            fake("target_collect.py", str(work / "out.jsonl"), "--slow", "0.05")
        )
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "flext_meltano_context", "run", "--tap-cmd", tap),
                *("--target-cmd", target),
            ],
            cwd=work,
            env=_env(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the run's first event is in the store
            try:
                if sql(running.server, "SELECT 1 FROM flext_context.outage LIMIT 1"):
                    break
            except psycopg.Error:
                pass
            time.sleep(0.05)
        running.stop()
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "lineage_store_unavailable" in err
        spool = work / ".flext-context" / "lineage.jsonl"
        local = [(r["run_id"], r["run_seq"], r["event"]) for r in LineageLog(spool).read()]
        assert local[-1][2] == "run_completed"

        assert running.start().returncode == 0
        before = sql(running.server, "SELECT count(*) FROM flext_context.outage")[0][0]
        assert 0 < before < len(local)  # some events went in before the stop, not all
        pushed = flext(work, _env(url), "lineage", "push")
        assert pushed.returncode == 0, pushed.stderr
        assert f"pushed {len(local) - before} event(s)" in pushed.stderr
        again = flext(work, _env(url), "lineage", "push")
        assert "pushed 0 event(s)" in again.stderr  # nothing doubled

        with PgStore(url) as store:
            stored = [(r["run_id"], r["run_seq"], r["event"]) for r in store.read()]
            assert stored == local  # in order, exactly once
            assert store.verify().ok


def test_the_next_run_pushes_what_an_earlier_run_could_not(
    postgres: Server, tmp_path: Path
) -> None:
    url = postgres.url(table="next_run")
    down = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres?table=next_run"
    work = tmp_path / "m"
    offline = pipeline(work, _env(down), 5)
    assert offline.returncode == 0, offline.stderr
    assert "lineage_store_unavailable" in offline.stderr
    online = pipeline(work, _env(url), 7)
    assert online.returncode == 0, online.stderr
    runs = json.loads(flext(work, _env(url), "runs", "--format", "json").stdout)
    assert [run["records"] for run in runs] == [7, 5]
    with PgStore(url) as store:
        assert store.verify().ok


def _closed_port() -> int:
    from tests.pg import free_port

    return free_port()  # nothing listens there: connection refused at once


def _tamper_store(server: Server, table: str) -> PgStore:
    url = server.url(table=table)
    store = PgStore(url)
    for run in ("r1", "r2"):
        for seq, event in enumerate(("run_started", "stream_stats", "run_completed"), start=1):
            store.append(
                event, run_id=run, correlation_id="c", data={"records": 10 * seq}, run_seq=seq
            )
    assert store.verify().ok
    return store


@pytest.mark.parametrize(
    ("change", "seq", "kind"),
    [
        (
            "UPDATE {t} SET data = '{{\"records\":999}}' WHERE seq = 2",
            2,
            "edited",
        ),
        ("DELETE FROM {t} WHERE seq = 3", 4, "deleted"),
        (
            "UPDATE {t} SET seq = -1 WHERE seq = 4; UPDATE {t} SET seq = 4 WHERE seq = 5;"
            " UPDATE {t} SET seq = 5 WHERE seq = -1",
            4,
            "reordered",
        ),
        (
            "UPDATE {t} SET run_seq = -1 WHERE seq = 5; UPDATE {t} SET run_seq = 2 WHERE seq = 6;"
            " UPDATE {t} SET run_seq = 3 WHERE seq = 5",
            5,
            "reordered",
        ),
    ],
    ids=["update-count", "delete-row", "swap-seq", "swap-run-seq"],
)
def test_verify_names_each_sql_change(
    postgres: Server, tmp_path: Path, change: str, seq: int, kind: str
) -> None:
    table = f"tamper_{kind}_{seq}"
    store = _tamper_store(postgres, table)
    for statement in change.format(t=f"flext_context.{table}").split(";"):
        sql(postgres, statement)
    result = store.verify()
    assert (result.ok, result.line, result.kind) == (False, seq, kind), result.describe()
    shown = flext(tmp_path, _env(postgres.url(table=table)), "verify")
    assert shown.returncode == 1
    assert f"row seq {seq}: {kind}" in shown.stderr
    store.close()


def test_a_rehashed_edit_is_named_by_the_next_rows_prev(postgres: Server) -> None:
    store = _tamper_store(postgres, "tamper_rehash")
    # Someone with UPDATE rights changes a count and recomputes that row's hash.
    row = next(r for r in store.read() if r["seq"] == 2)
    row["data"] = {"records": 999}
    del row["hash"]
    from flext_meltano_context.lineage.log import seal_record

    _, digest = seal_record(row)
    sql(
        postgres,
        "UPDATE flext_context.tamper_rehash SET data = %s, hash = %s WHERE seq = 2",
        '{"records":999}',
        digest,
    )
    result = store.verify()
    assert (result.line, result.kind) == (2, "edited"), result.describe()
    store.close()


def test_least_privilege_roles_write_and_read_and_verify_sees_an_owners_edit(
    postgres: Server, tmp_path: Path
) -> None:
    writer, reader = f"w-{secrets.token_hex(6)}", f"r-{secrets.token_hex(6)}"
    admin = PgStore(postgres.url(table="granted"))
    admin.append("run_started", run_id="r0", correlation_id="c", data={}, run_seq=1)
    admin.close()
    for statement in (
        "DROP ROLE IF EXISTS lineage_writer",
        "DROP ROLE IF EXISTS lineage_reader",
        f"CREATE ROLE lineage_writer LOGIN PASSWORD '{writer}'",
        f"CREATE ROLE lineage_reader LOGIN PASSWORD '{reader}'",
        "GRANT USAGE ON SCHEMA flext_context TO lineage_writer, lineage_reader",
        "GRANT SELECT, INSERT ON flext_context.granted TO lineage_writer",
        "GRANT SELECT ON flext_context.granted TO lineage_reader",
    ):
        sql(postgres, statement)
    writer_url = postgres.url(user="lineage_writer", password=writer, table="granted")
    reader_url = postgres.url(user="lineage_reader", password=reader, table="granted")
    done = pipeline(tmp_path / "w", _env(writer_url), 3)
    assert done.returncode == 0, done.stderr
    assert "lineage_store_unavailable" not in done.stderr
    read = flext(tmp_path, _env(reader_url), "verify")
    assert read.returncode == 0, read.stderr
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with psycopg.connect(writer_url.split("?")[0]) as conn:
            conn.execute("UPDATE flext_context.granted SET event = 'x' WHERE seq = 1")
    sql(postgres, "UPDATE flext_context.granted SET event = 'x' WHERE seq = 1")
    caught = flext(tmp_path, _env(reader_url), "verify")
    assert caught.returncode == 1
    assert "row seq 1: edited" in caught.stderr


def test_push_from_imports_an_old_log_once_and_refuses_a_broken_one(
    postgres: Server, tmp_path: Path
) -> None:
    old = tmp_path / "old.jsonl"
    log = LineageLog(old)
    for run in ("a", "b"):  # written before run_seq existed
        log.append("run_started", run_id=run, correlation_id="c", data={"pipeline": {}})
        log.append("run_completed", run_id=run, correlation_id="c", data={"status": "success"})
    url = postgres.url(table="imported")
    first = flext(tmp_path, _env(url), "lineage", "push", "--from", str(old))
    assert first.returncode == 0, first.stderr
    assert "pushed 4 event(s)" in first.stderr
    again = flext(tmp_path, _env(url), "lineage", "push", "--from", str(old))
    assert "pushed 0 event(s)" in again.stderr
    assert "4 were there already" in again.stderr
    with PgStore(url) as store:
        assert [(r["run_id"], r["run_seq"]) for r in store.read()] == [
            ("a", 1),
            ("a", 2),
            ("b", 1),
            ("b", 2),
        ]
        assert store.verify().ok
    lines = old.read_bytes().splitlines(keepends=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(lines[0] + lines[1].replace(b"success", b"failure"))
    refused = flext(
        tmp_path, _env(postgres.url(table="refused")), "lineage", "push", "--from", str(broken)
    )
    assert refused.returncode == 1
    assert "edited line" in refused.stderr


def test_no_password_from_the_url_appears_anywhere(postgres: Server, tmp_path: Path) -> None:
    url = postgres.url(table="secrets")
    work = tmp_path / "m"
    outputs = []
    done = pipeline(work, _env(url), 4)
    assert done.returncode == 0, done.stderr
    outputs += [done.stdout, done.stderr]
    for args in (
        ("runs",),
        ("runs", "--format", "json"),
        ("verify",),
        ("lineage", "push"),
        *(("report", "--format", fmt) for fmt in ("json", "markdown", "html", "openlineage")),
    ):
        shown = flext(work, _env(url), *args)
        assert shown.returncode == 0, shown.stderr
        outputs += [shown.stdout, shown.stderr]
    # A store that refuses the password, and one that is down, name the store without it.
    wrong_secret = f"wrong-{secrets.token_hex(6)}"
    wrong = postgres.url(password=wrong_secret, table="secrets")
    for location in (wrong, wrong.replace(str(postgres.port), str(_closed_port()))):
        failed = flext(work, _env(location), "runs")
        assert failed.returncode == 1
        assert "postgresql://postgres@127.0.0.1" in failed.stderr
        outputs += [failed.stdout, failed.stderr]
    files = [p.read_text("utf-8", "replace") for p in work.rglob("*") if p.is_file()]
    rows = sql(postgres, "SELECT data::text, run_id, correlation_id FROM flext_context.secrets")
    everything = "\n".join([*outputs, *files, *(str(row) for row in rows)])
    assert postgres.password not in everything
    assert wrong_secret not in everything
    assert "machine-a" in everything  # the control: the scan sees what the runs wrote


def test_store_locations_and_systemdb(tmp_path: Path) -> None:
    env = {
        "FLEXT_CONTEXT_LINEAGE_PATH": "postgresql://u@h/db?table=t",
        "MELTANO_PROJECT_ROOT": "/p",
    }
    assert default_log_path(env) == Path("/p/.meltano/flext-context/lineage.jsonl")
    assert str(open_log("postgresql://u:pw@h:5/db?schema=s&table=t")) == (
        "postgresql://u@h:5/db (s.t)"
    )
    meltano = {"MELTANO_DATABASE_URI": "postgresql+psycopg://m:pw@db:5432/meltano"}
    assert store_url("systemdb", meltano) == "postgresql://m:pw@db:5432/meltano"
    for uri in ("sqlite:////p/.meltano/meltano.db", ""):
        with pytest.raises(UsageError, match="needs Meltano's system database to be PostgreSQL"):
            default_log_path(
                {"FLEXT_CONTEXT_LINEAGE_PATH": "systemdb", "MELTANO_DATABASE_URI": uri}
            )
    assert isinstance(open_log(tmp_path / "l.jsonl"), LineageLog)


def test_push_of_a_spool_resumes_from_its_cursor(postgres: Server, tmp_path: Path) -> None:
    spool = tmp_path / "lineage.jsonl"
    store = PgStore(postgres.url(table="cursor"))
    log = LineageLog(spool)
    log.append("run_started", run_id="r", correlation_id="c", data={}, run_seq=1)
    assert push(spool, store).inserted == 1
    log.append("run_completed", run_id="r", correlation_id="c", data={}, run_seq=2)
    result = push(spool, store)
    assert (result.read, result.inserted, result.already) == (1, 1, 0)  # only the new event read
    spool.write_bytes(spool.read_bytes())  # same bytes: the cursor still holds
    assert push(spool, store).read == 0
    store.close()


def test_runs_overview_page_of_a_store_lists_every_machines_runs(
    postgres: Server, tmp_path: Path
) -> None:
    from tests.test_lineage_html import CHROMIUM, _non_white, _png_pixels, _render

    url = postgres.url(table="overview")
    for host, records, extra in (("ci-runner-7", 12, ()), ("laptop", 30, ("--exit-after", "3"))):
        env = _env(url, host, GITHUB_ACTIONS="true", GITHUB_WORKFLOW="nightly", GITHUB_JOB="load")
        env["GITHUB_RUN_NUMBER"] = "41"
        pipeline(tmp_path / host, env, records, *extra)
    page = tmp_path / "runs.html"
    made = flext(tmp_path, _env(url), "runs", "--format", "html", "-o", str(page))
    assert made.returncode == 0, made.stderr
    text = page.read_text("utf-8")
    for expected in ("ci-runner-7", "laptop", "github: nightly / load #41", "success", "failed"):
        assert expected in text
    assert "<script" not in text
    assert "default-src 'none'" in text
    assert postgres.password not in text
    if CHROMIUM is None:
        pytest.skip("Debian 'chromium' is not installed (.ci/run installs it)")
    shot, console = _render(page, tmp_path)
    assert console == []
    width, height, _ = _png_pixels(shot)
    assert _non_white(shot) > 0.01 * width * height


def test_runs_overview_of_an_empty_file_says_so(tmp_path: Path) -> None:
    from flext_meltano_context.lineage.runs_html import overview, to_html

    page = to_html(overview(tmp_path / "none.jsonl"), "none.jsonl")
    assert "No runs yet." in page


def test_store_rows_hash_the_same_canonical_json_as_a_file_line(postgres: Server) -> None:
    import hashlib

    from flext_meltano_context.lineage.log import canonical

    odd = 'q"\\ \n\t\x01 é 日本 \u2028 😀 </script>'
    with PgStore(postgres.url(table="canonical")) as store:
        store.append(f"ev{odd}", run_id=f"r{odd}", correlation_id=odd, data={}, run_seq=1)
        store.append("e", run_id="r", correlation_id="c", data={odd: [odd, 1.5, None]}, run_seq=1)
        store.insert(  # the batch path (a push) hashes on the client
            [{**record, "run_id": f"{record['run_id']}-pushed"} for record in store.read()]
        )
        records = list(store.read())
        assert len(records) == 4
        for record in records:
            claimed = record.pop("hash")
            assert hashlib.sha256(canonical(record)).hexdigest() == claimed
        assert [r["data"] for r in records[:2]] == [{}, {odd: [odd, 1.5, None]}]
        assert store.verify().ok


def test_systemdb_writes_to_meltanos_postgresql_system_database(
    postgres: Server, tmp_path: Path
) -> None:
    uri = postgres.url().replace("postgresql://", "postgresql+psycopg://", 1)
    env = _env("systemdb", MELTANO_DATABASE_URI=uri)
    done = pipeline(tmp_path / "m", env, 6)
    assert done.returncode == 0, done.stderr
    assert "lineage_store_unavailable" not in done.stderr
    rows = sql(
        postgres,
        "SELECT data->>'records' FROM flext_context.lineage_events WHERE event = 'run_completed'",
    )
    assert ("6",) in rows
    shown = flext(tmp_path, env, "runs", "--format", "json")
    assert json.loads(shown.stdout)[0]["records"] == 6
    assert postgres.password not in done.stderr + shown.stdout + shown.stderr
    # The control: a SQLite system database is refused before anything starts.
    refused = pipeline(tmp_path / "s", _env("systemdb", MELTANO_DATABASE_URI="sqlite:///m.db"), 1)
    assert refused.returncode == 2
    assert "needs Meltano's system database to be PostgreSQL" in refused.stderr
    assert not (tmp_path / "s" / "out.jsonl").exists()


def test_the_password_can_come_from_pgpassword_or_a_pgpass_file(
    postgres: Server, tmp_path: Path
) -> None:
    url = postgres.url(password="", table="pgpass")
    assert ":" not in url.split("@")[0].removeprefix("postgresql://")
    with_env = pipeline(tmp_path / "env", _env(url, PGPASSWORD=postgres.password), 2)
    assert with_env.returncode == 0, with_env.stderr
    assert "lineage_store_unavailable" not in with_env.stderr
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres.port}:postgres:postgres:{postgres.password}\n")
    pgpass.chmod(0o600)
    listed = flext(tmp_path, _env(url, PGPASSFILE=str(pgpass)), "runs", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert [run["records"] for run in json.loads(listed.stdout)] == [2]
    # The control: without either, the store refuses, and the error names it without secrets.
    refused = flext(tmp_path, _env(url, PGPASSFILE=str(tmp_path / "none")), "runs")
    assert refused.returncode == 1
    assert "cannot connect to the lineage store postgresql://postgres@127.0.0.1" in refused.stderr


def test_a_store_answers_a_repeated_question_once_and_anew_after_a_write(
    postgres: Server,
) -> None:
    from flext_meltano_context.lineage.report import list_runs

    with PgStore(postgres.url(table="answers")) as store:
        store.append("run_started", run_id="r1", correlation_id="c", data={}, run_seq=1)
        assert [run.run_id for run in list_runs(store)] == ["r1"]
        sql(postgres, "DELETE FROM flext_context.answers")  # not seen: the answer is kept
        assert [run.run_id for run in list_runs(store)] == ["r1"]
        store.append("run_started", run_id="r2", correlation_id="c", data={}, run_seq=1)
        assert [run.run_id for run in list_runs(store)] == ["r2"]  # asked anew after a write
