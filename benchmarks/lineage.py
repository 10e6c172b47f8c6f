"""Lineage costs: one run's writes, and runs/report/verify on a log of many runs.

Run: .venv/bin/python benchmarks/lineage.py [RUNS]   (default 10,000 runs, 13 events each)
Baseline: the same number of lines appended with a plain write (no lock, hash or tail read).

With Debian's PostgreSQL server binaries installed (and psycopg), the same is measured on a
PostgreSQL store in a throw-away cluster started like the tests' (tests/pg.py): a run's writes
against the JSONL file's, eight concurrent writer processes (1,000 runs in all), and verify, runs
and check --max-drop-pct on a store of RUNS runs (imported from the file with `lineage push`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/pg.py: the cluster

from flext_meltano_context.lineage.example import record_example_run
from flext_meltano_context.lineage.log import verify
from flext_meltano_context.lineage.openlineage import run_events
from flext_meltano_context.lineage.render import to_html, to_markdown
from flext_meltano_context.lineage.report import (
    build_report,
    list_runs,
    resolve_run_id,
    run_records,
)


def _timed(label: str, func: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = func(*args)
    elapsed = time.perf_counter() - start
    print(f"{label:<52} {elapsed * 1000:10.1f} ms")
    return result, elapsed


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    os.environ.pop("OPENLINEAGE_URL", None)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)

        # One run as the pipeline writes it: 13 events, fsync at phase ends and run end.
        single = base / "single.jsonl"
        record_example_run(single, start=t0)  # warm up imports and the directory
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            record_example_run(single, start=t0, fsync=True)
            samples.append(time.perf_counter() - start)
        samples.sort()
        fsynced = samples[10]
        print(f"{'one run, 13 events, 5 fsyncs (median of 20)':<52} {fsynced * 1000:10.1f} ms")
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            record_example_run(single, start=t0, fsync=False)
            samples.append(time.perf_counter() - start)
        samples.sort()
        per_run = samples[10]
        print(f"{'one run, 13 events, no fsync (median of 20)':<52} {per_run * 1000:10.1f} ms")

        # Baseline: the same lines appended with plain writes.
        lines = single.read_bytes().splitlines(keepends=True)[:13]
        plain = base / "plain.jsonl"
        start = time.perf_counter()
        for _ in range(20):
            with plain.open("ab") as handle:
                for line in lines:
                    handle.write(line)
        baseline = (time.perf_counter() - start) / 20
        print(f"{'baseline: 13 plain appends of the same lines':<52} {baseline * 1000:10.1f} ms")
        print(f"{'  ratio (hash chain, lock, redaction / plain)':<52} {per_run / baseline:10.1f} x")

        # A log of `runs` runs.
        log = base / "lineage.jsonl"
        start = time.perf_counter()
        first = None
        for index in range(runs):
            run = record_example_run(
                log,
                start=t0 + dt.timedelta(minutes=index),
                pipeline="tap-a-to-target-b" if index % 2 else "tap-c-to-target-d",
            )
            first = first or run
        built = time.perf_counter() - start
        size = log.stat().st_size
        line_count = sum(1 for _ in log.open("rb"))
        print(
            f"{'built log: runs / lines / MiB':<52} {runs:>8} {line_count:>8} {size / 2**20:8.1f}"
        )
        print(f"{'  time to write it (per line)':<52} {built * 1e6 / line_count:10.1f} us")

        result, _ = _timed(f"verify ({line_count} lines)", verify, log)
        assert result.ok, result.describe()
        listed, _ = _timed("runs (list_runs of all runs)", list_runs, log)
        assert len(listed) == runs
        last = resolve_run_id(log, None)
        records, _ = _timed("report --last: select the run's records", run_records, log, last)
        report, _ = _timed("report --last: build the JSON report", build_report, records)
        _timed("report --last: render markdown", to_markdown, report)
        _timed("report --last: render html", to_html, report)
        _timed("report --last: openlineage events", run_events, records)
        _timed("report of the first run: select records", run_records, log, first)
        _timed("json.dumps of the report", json.dumps, report)
        _postgres(base, log, runs, fsynced, t0)


_WRITER = """
import datetime as dt, sys
from flext_meltano_context.lineage.example import record_example_run
t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
for index in range(int(sys.argv[2])):
    record_example_run(sys.argv[1], start=t0 + dt.timedelta(minutes=index), fsync=True)
"""


def _check(store: Any) -> list[str]:
    """What `flext-context check --last --max-drop-pct 20` does."""
    from flext_meltano_context.lineage import gate

    data = build_report(run_records(store, resolve_run_id(store, None)))
    previous = gate.previous_success(store, data)
    assert previous is not None
    return gate.violations(data, max_drop_pct=20.0, previous=previous)


def _postgres(base: Path, log: Path, runs: int, file_per_run: float, t0: dt.datetime) -> None:
    """The same on a PostgreSQL store, when a server can be started here."""
    try:
        from flext_meltano_context.lineage.pg import PgStore
        from flext_meltano_context.lineage.push import push
        from tests.pg import NoServerError, cluster
    except ImportError as exc:
        print(f"PostgreSQL store: skipped ({exc}; install the postgres extra)")
        return
    try:
        running = cluster(durable=True)  # fsync on, as a real server
        pg = running.__enter__()
    except NoServerError as exc:
        print(f"PostgreSQL store: skipped ({exc})")
        return
    try:
        url = pg.server.url(table="bench_single")
        os.environ["FLEXT_CONTEXT_LINEAGE_PATH"] = url  # the recorder writes to the store too
        spool = base / "spool.jsonl"
        record_example_run(spool, start=t0)  # creates the table, warms the connection path
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            record_example_run(spool, start=t0, fsync=True)
            samples.append(time.perf_counter() - start)
        samples.sort()
        print(
            f"{'PG: one run, 13 events, 5 fsyncs, file + store':<52} {samples[10] * 1000:10.1f} ms"
        )
        print(
            f"{'  ratio (file + store / file alone, both fsynced)':<52} "
            f"{samples[10] / file_per_run:10.1f} x"
        )

        os.environ["FLEXT_CONTEXT_LINEAGE_PATH"] = pg.server.url(table="bench_writers")
        start = time.perf_counter()
        procs = []
        for n in range(8):
            work = base / f"writer{n}"
            work.mkdir()
            procs.append(
                subprocess.Popen([sys.executable, "-c", _WRITER, str(work / "l.jsonl"), "125"])
            )
        assert [proc.wait() for proc in procs] == [0] * 8
        elapsed = time.perf_counter() - start
        with PgStore(pg.server.url(table="bench_writers")) as store:
            result = store.verify()
        print(
            f"{'PG: 8 writer processes, 1,000 runs: events/s':<52} {result.lines / elapsed:10.0f}"
        )
        print(
            f"{'  events / runs / chain valid':<52} {result.lines:>8} {result.runs:>8} "
            f"{result.ok!s:>8}"
        )
        os.environ.pop("FLEXT_CONTEXT_LINEAGE_PATH")

        with PgStore(pg.server.url(table="bench_many")) as store:
            pushed, _ = _timed(
                f"PG: import {runs} runs (lineage push --from)",
                lambda: push(log, store, use_cursor=False),
            )
            assert pushed.inserted == pushed.read
            result, _ = _timed("PG: verify (in process)", store.verify)
            assert result.ok, result.describe()
            assert result.runs == runs
            listed, _ = _timed("PG: list_runs (in process)", list_runs, store)
            assert len(listed) == runs
            _timed("PG: check --last --max-drop-pct 20 (in process)", _check, store)
        # What a person waits for: the commands, Python start-up included.
        url = pg.server.url(table="bench_many")
        worst = 0.0
        for args in (
            ("verify",),
            ("runs",),
            ("runs", "--format", "html"),
            ("check", "--last", "--max-drop-pct", "20"),
        ):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "flext_meltano_context", *args, "--log", url],
                capture_output=True,
                check=False,
            )
            took = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            assert done.returncode == 0, done.stderr[-2000:]
            worst = max(worst, took)
            print(
                f"{'PG: flext-context ' + ' '.join(args):<52} {took * 1000:10.1f} ms"
                f"  (its CPU {cpu * 1000:.0f} ms)"
            )
        print(
            f"{'  slowest command on ' + str(runs) + ' runs (goal < 2 s)':<52} "
            f"{worst * 1000:10.1f} ms"
        )
    finally:
        running.__exit__(None, None, None)


if __name__ == "__main__":
    main()
