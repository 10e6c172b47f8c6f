"""An example run recorded with the pipeline's event vocabulary, for tests, benchmarks and docs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flext_meltano_context.__about__ import __version__
from flext_meltano_context.ids import uuid7
from flext_meltano_context.lineage.log import iso
from flext_meltano_context.lineage.recorder import Recorder


def record_example_run(
    path: Path,
    *,
    streams: Mapping[str, int] | None = None,
    status: str = "success",
    pipeline: str = "tap-example-to-target-duckdb",
    transformers: Sequence[str] = ("dbt-duckdb:run",),
    start: dt.datetime | None = None,
    run_id: str | None = None,
    correlation_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
    fsync: bool = False,
) -> str:
    """Record one complete run (streams -> record counts) in the log at `path`; return its id."""
    streams = dict(streams if streams is not None else {"users": 1200, "orders": 5000})
    run_id = run_id or uuid7()
    recorder = Recorder(path, run_id=run_id, correlation_id=correlation_id or uuid7())
    t0 = start or dt.datetime.now(dt.timezone.utc)

    def at(seconds: float) -> str:
        return iso(t0 + dt.timedelta(seconds=seconds))

    phases = ["extract", "load", *transformers]
    phase_ids = {phase: uuid7() for phase in phases}
    recorder.record(
        "run_started",
        {
            "pipeline": {
                "name": pipeline,
                "tap": "tap-example",
                "target": "target-duckdb",
                "transformers": list(transformers),
                "state_id": f"dev:{pipeline}",
                "mode": "standalone",
            },
            "parent_correlation_id": None,
            "inherited_correlation_from": None,
            "openlineage_parent": None,
            "ci": {},
            "flext_context_version": __version__,
            "phase_run_ids": phase_ids,
            **(extra or {}),
        },
        fsync=fsync,
    )
    recorder.record(
        "state_loaded",
        {
            "state_id": f"dev:{pipeline}",
            "written_by_run_id": None,
            "written_by_correlation_id": None,
            "written_at": None,
            "streams": sorted(streams),
        },
    )
    for phase, plugin, begin in (("extract", "tap-example", 0.0), ("load", "target-duckdb", 0.1)):
        recorder.record(
            "phase_started",
            {
                "phase": phase,
                "plugin": plugin,
                "phase_run_id": phase_ids[phase],
                "started_at": at(begin),
            },
        )
    total = sum(streams.values())
    failed = status != "success"
    for phase, plugin, begin, end in (
        ("extract", "tap-example", 0.0, 2.0),
        ("load", "target-duckdb", 0.1, 2.5),
    ):
        bad = failed and phase == "load"
        recorder.record(
            "phase_completed",
            {
                "phase": phase,
                "plugin": plugin,
                "phase_run_id": phase_ids[phase],
                "started_at": at(begin),
                "ended_at": at(end),
                "duration_s": end - begin,
                "exit_code": 1 if bad else 0,
                "status": "failed" if bad else "success",
                "stderr_tail": ["duckdb.IOException: disk full"] if bad else [],
                "metrics": {"record_count": total},
            },
            fsync=fsync,
        )
    for offset, (stream, records) in enumerate(streams.items()):
        recorder.record(
            "stream_stats",
            {
                "stream": stream,
                "counts": {"SCHEMA": 1, "RECORD": records, "STATE": 2},
                "bytes": records * 120,
                "first_record_at": at(0.2 + offset * 0.01),
                "last_record_at": at(1.9),
                "schema": {
                    "properties": {"id": "integer", "name": "string", "password": "string"},
                    "key_properties": ["id"],
                },
                "tap_metrics": {"record_count": records},
                "target_metrics": {"record_count": records},
            },
        )
    recorder.record("anomalies", {"count": 0, "first": []})
    clock = 2.5
    for transformer in transformers:
        bad = failed
        recorder.record(
            "phase_started",
            {
                "phase": transformer,
                "plugin": transformer.split(":")[0],
                "phase_run_id": phase_ids[transformer],
                "started_at": at(clock),
            },
        )
        recorder.record(
            "phase_completed",
            {
                "phase": transformer,
                "plugin": transformer.split(":")[0],
                "phase_run_id": phase_ids[transformer],
                "started_at": at(clock),
                "ended_at": at(clock + 3.0),
                "duration_s": 3.0,
                "exit_code": None if bad else 0,
                "status": "skipped" if bad else "success",
                "metrics": {},
            },
            fsync=fsync,
        )
        clock += 3.0
    if not failed:
        recorder.record(
            "state_persisted",
            {"state_id": f"dev:{pipeline}", "confirmed_states": 1, "written_at": at(clock)},
        )
    recorder.record(
        "run_completed",
        {
            "status": status,
            "started_at": at(0),
            "ended_at": at(clock),
            "duration_s": clock,
            "records": total,
            "bytes": total * 120,
            "digest": "ab" * 32,
            "error": "step 'load' exited with 1" if failed else None,
        },
        fsync=fsync,
    )
    recorder.close()
    return run_id
