"""One run's lineage report, built from its events in the log, and the list of recent runs.

The report is plain JSON, described by `report.schema.json` beside this module. Lineage is a
graph of `nodes` and `edges`: each stream feeds the target's table; `lineage_edges` events
(dbt sources and models, issue 6) add their own edges to the same graph.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import msgspec

from flext_meltano_context.errors import FlextContextError, UsageError
from flext_meltano_context.lineage.store import Source, open_log

REPORT_VERSION = 1
_RUN_STARTED = b'"event":"run_started"'
_RUN_COMPLETED = b'"event":"run_completed"'


class RunNotFoundError(FlextContextError):
    """No run in the lineage log matches what was asked for."""


def report_schema() -> dict[str, Any]:
    """The JSON Schema of the report, as shipped in the package."""
    text = resources.files(__package__).joinpath("report.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One line of `flext-context runs`."""

    run_id: str
    correlation_id: str
    pipeline: str
    status: str
    started_at: str | None
    ended_at: str | None
    duration_s: float | None
    records: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _decode(line: bytes) -> dict[str, Any]:
    record: dict[str, Any] = msgspec.json.decode(line)
    return record


def _pipeline_name(data: Mapping[str, Any]) -> str:
    pipeline = data.get("pipeline") or {}
    name = pipeline.get("name")
    if name:
        return str(name)
    return f"{pipeline.get('tap', '?')}-to-{pipeline.get('target', '?')}"


def list_runs(path: Source, *, pipeline: str | None = None) -> list[RunSummary]:
    """Every run in the log, oldest first; only start and end lines are decoded."""
    started: dict[str, dict[str, Any]] = {}
    completed: dict[str, dict[str, Any]] = {}
    for line in open_log(path).lines(events=("run_started", "run_completed")):
        if _RUN_STARTED in line:
            record = _decode(line)
            started[record["run_id"]] = record
        elif _RUN_COMPLETED in line:
            record = _decode(line)
            completed[record["run_id"]] = record
    runs = []
    for run_id, start in started.items():
        name = _pipeline_name(start["data"])
        if pipeline is not None and name != pipeline:
            continue
        end = completed.get(run_id, {}).get("data")
        runs.append(
            RunSummary(
                run_id=run_id,
                correlation_id=start["correlation_id"],
                pipeline=name,
                status=str(end.get("status", "unknown")) if end else "incomplete",
                started_at=(end or {}).get("started_at") or start["ts"],
                ended_at=end.get("ended_at") if end else None,
                duration_s=end.get("duration_s") if end else None,
                records=end.get("records") if end else None,
            )
        )
    return runs


def resolve_run_id(path: Source, run_id: str | None) -> str:
    """`run_id` itself if the log has it, or the last run's id when `run_id` is None."""
    runs = list_runs(path)
    if not runs:
        raise RunNotFoundError(f"the lineage log {path} has no runs yet; run a pipeline first")
    if run_id is None:
        return runs[-1].run_id
    matches = [run.run_id for run in runs if run.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFoundError(
            f"no run {run_id!r} in {path}; 'flext-context runs' lists the runs it has"
        )
    raise UsageError(f"{run_id!r} matches {len(matches)} runs; give more of the run id")


def run_records(path: Source, run_id: str) -> list[dict[str, Any]]:
    """The records of one run, in log order."""
    needle = b'"run_id":' + json.dumps(run_id).encode()
    decoded = (_decode(line) for line in open_log(path).lines(run_id=run_id) if needle in line)
    # The needle also matches a parent run's `run_completed`, which names its children's run ids.
    return [record for record in decoded if record.get("run_id") == run_id]


def _by_event(records: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for record in records:
        yield record["event"], dict(record.get("data") or {})


def build_report(
    records: Sequence[Mapping[str, Any]],
    children: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The lineage report of one run from its records (as `run_records` returns them).

    For an invocation's parent run, `children` maps each child run id to that run's records
    (`child_records` reads them): the report then lists each child pipeline's outcome.
    """
    if not records:
        raise RunNotFoundError("no events for this run")
    first, last = records[0], records[-1]
    started: dict[str, Any] = {}
    completed: dict[str, Any] | None = None
    phases: dict[str, dict[str, Any]] = {}
    streams: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {"loaded": None, "persisted": None}
    anomalies: dict[str, Any] = {"count": 0, "first": []}
    extra_edges: list[dict[str, Any]] = []
    dbt_blocks: list[dict[str, Any]] = []
    landed: dict[str, dict[str, Any]] = {}
    cross_checks: list[dict[str, Any]] = []
    mapped: dict[str, Any] | None = None
    for event, data in _by_event(records):
        if event == "run_started":
            started = data
        elif event == "run_completed":
            completed = data
        elif event in {"phase_started", "phase_completed"}:
            name = str(data.get("phase", "?"))
            phase = phases.setdefault(name, {"phase": name, "status": "running"})
            phase.update({key: value for key, value in data.items() if value is not None})
        elif event == "stream_stats":
            streams[str(data.get("stream", "?"))] = data
        elif event == "state_loaded":
            state["loaded"] = data
        elif event == "state_persisted":
            state["persisted"] = data
        elif event == "anomalies":
            anomalies = {"count": int(data.get("count", 0)), "first": list(data.get("first", []))}
        elif event == "lineage_edges":
            extra_edges.extend(data.get("edges", []))
        elif event == "dbt_results":  # issue 6: per-node results of a dbt block
            dbt_blocks.append(_dbt_block(data))
        elif event == "landing":  # issue 7: what landed per stream
            for row in data.get("streams") or []:
                landed[str(row.get("stream", "?"))] = {"family": data.get("family"), **row}
        elif event == "cross_checks":  # issue 10: the target's and tap's own counts
            cross_checks.extend(_cross_check(item) for item in data.get("checks") or [])
        elif event == "mapped_streams":  # issue 12: a mapped pair, counted on both sides
            mapped = _mapped(data)
    pipeline = dict(started.get("pipeline") or {})
    pipeline.setdefault("name", _pipeline_name(started))
    end = completed or {}
    stream_rows = [_stream_row(stats, pipeline) for stats in streams.values()]
    for row in stream_rows:
        if row["stream"] in landed:
            row["landing"] = _landing_row(landed[row["stream"]])
    nodes, edges = _graph(stream_rows, pipeline, extra_edges)
    return {
        "report_version": REPORT_VERSION,
        "run_id": first["run_id"],
        "correlation_id": first["correlation_id"],
        "status": str(end.get("status", "incomplete")) if completed is not None else "incomplete",
        "pipeline": pipeline,
        "started_at": end.get("started_at") or started.get("started_at") or first["ts"],
        "ended_at": end.get("ended_at"),
        "duration_s": end.get("duration_s"),
        "records": end.get("records", sum(row["records"] for row in stream_rows)),
        "bytes": end.get("bytes", sum(row["bytes"] for row in stream_rows)),
        "digest": end.get("digest"),
        "error": end.get("error"),
        "counting_error": end.get("counting_error"),
        "cross_checks": cross_checks,
        "parent_correlation_id": started.get("parent_correlation_id"),
        "inherited_correlation_from": started.get("inherited_correlation_from"),
        "openlineage_parent": started.get("openlineage_parent"),
        "ci": started.get("ci") or {},
        "flext_context_version": started.get("flext_context_version"),
        "phases": [_phase_row(phase) for phase in phases.values()],
        "streams": stream_rows,
        "state": state,
        "anomalies": anomalies,
        "nodes": nodes,
        "edges": edges,
        "dbt": dbt_blocks,
        "mapped": mapped,
        "invocation": _invocation(started, end, children or {}),
        "log": {
            "events": len(records),
            "first_seq": first["seq"],
            "last_seq": last["seq"],
            "last_hash": last["hash"],
        },
    }


def _phase_row(phase: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "phase": phase["phase"],
        "plugin": phase.get("plugin"),
        "phase_run_id": phase.get("phase_run_id"),
        "status": phase.get("status", "running"),
        "started_at": phase.get("started_at"),
        "ended_at": phase.get("ended_at"),
        "duration_s": phase.get("duration_s"),
        "exit_code": phase.get("exit_code"),
        "stderr_tail": list(phase.get("stderr_tail") or []),
        "metrics": dict(phase.get("metrics") or {}),
    }


def _stream_row(stats: Mapping[str, Any], pipeline: Mapping[str, Any]) -> dict[str, Any]:
    counts = {str(key): int(value) for key, value in (stats.get("counts") or {}).items()}
    stream = str(stats.get("stream", "?"))
    output = stats.get("output_dataset") or {}
    return {
        "stream": stream,
        "records": int(stats.get("records", counts.get("RECORD", 0))),
        "counts": counts,
        "bytes": int(stats.get("bytes") or 0),
        "first_record_at": stats.get("first_record_at"),
        "last_record_at": stats.get("last_record_at"),
        "schema": stats.get("schema"),
        "tap_metrics": dict(stats.get("tap_metrics") or {}),
        "target_metrics": dict(stats.get("target_metrics") or {}),
        "input_dataset": stats.get("input_dataset")
        or {"namespace": f"singer://{pipeline.get('tap', 'tap')}", "name": stream},
        "output_dataset": output
        or {"namespace": f"singer://{pipeline.get('target', 'target')}", "name": stream},
        "target_table": str(stats.get("target_table") or output.get("name") or stream),
    }


def _landing_row(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("family", "relayed", "basis", "landed", "status", "label", "difference", "level")
    out = {key: row.get(key) for key in keys}
    out["bound"] = row.get("bound")
    out["reason"] = row.get("reason")
    out["samples"] = [dict(s) for s in row.get("samples") or [] if isinstance(s, Mapping)]
    out["key_columns"] = [str(c) for c in row.get("key_columns") or []]
    return out


def _cross_check(item: Mapping[str, Any]) -> dict[str, Any]:
    """One independent count (the target's lines read, the tap's record_count) against ours."""
    return {
        "kind": str(item.get("kind", "?")),
        "stream": item.get("stream"),
        "expected": item.get("expected"),
        "reported": item.get("reported"),
        "status": str(item.get("status", "?")),
    }


def _dbt_block(data: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("unique_id", "resource_type", "status", "execution_time", "compile_s", "execute_s")
    more = ("relation", "materialized", "rows", "rows_from", "message", "failures")
    return {
        "phase": str(data.get("phase", "?")),
        "invocation_id": data.get("invocation_id"),
        "dbt_version": data.get("dbt_version"),
        "exit_code": data.get("exit_code"),
        "missing": data.get("missing"),
        "nodes": [
            {key: node.get(key) for key in (*keys, *more)}
            for node in data.get("nodes") or []
            if isinstance(node, Mapping)
        ],
    }


def _node_id(end: Any) -> tuple[str, dict[str, Any]]:
    """An edge end (`"kind:name"` or `{"kind", "name", ...}`) as a node id and node."""
    if isinstance(end, Mapping):
        kind, name = str(end.get("kind", "dataset")), str(end.get("name", "?"))
        node = {"id": f"{kind}:{name}", "kind": kind, "name": name}
        if end.get("namespace"):
            node["namespace"] = str(end["namespace"])
        return node["id"], node
    kind, _, name = str(end).partition(":")
    if not name:
        kind, name = "dataset", kind
    return f"{kind}:{name}", {"id": f"{kind}:{name}", "kind": kind, "name": name}


def _graph(
    streams: Sequence[Mapping[str, Any]],
    pipeline: Mapping[str, Any],
    extra: Iterable[Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []
    for row in streams:
        source = {"kind": "stream", "name": row["stream"], "namespace": pipeline.get("tap")}
        target = {
            "kind": "table",
            "name": row["target_table"],
            "namespace": row["output_dataset"].get("namespace"),
        }
        edges.append({"source": source, "target": target, "via": pipeline.get("target")})
    edges.extend(dict(edge) for edge in extra if isinstance(edge, Mapping))
    out = []
    for edge in edges:
        source_id, source = _node_id(edge.get("source"))
        target_id, target = _node_id(edge.get("target"))
        nodes.setdefault(source_id, source)
        nodes.setdefault(target_id, target)
        row = {"source": source_id, "target": target_id}
        if edge.get("via"):
            row["via"] = str(edge["via"])
        if row not in out:
            out.append(row)
    return list(nodes.values()), out


def _mapped(data: Mapping[str, Any]) -> dict[str, Any]:
    """Records per stream leaving the tap and entering the target of a mapped pair."""
    tap_side = data.get("tap_side")
    target_side = dict(data.get("target_side") or {})
    names = sorted({*(tap_side or {}), *target_side})
    rows = []
    for name in names:
        left = None if tap_side is None else int(tap_side.get(name, 0))
        entered = int(target_side.get(name, 0))
        if left is None:
            change = "not counted at the tap"
        elif name not in target_side:
            change = "dropped by the mapper"
        elif tap_side is not None and name not in tap_side:
            change = "made by the mapper"
        elif entered < left:
            change = f"filtered: {left - entered:,} fewer"
        elif entered > left:
            change = f"split: {entered - left:,} more"
        else:
            change = "unchanged"
        rows.append(
            {"stream": name, "tap_records": left, "target_records": entered, "change": change}
        )
    return {"mappings": [str(m) for m in data.get("mappings") or []], "streams": rows}


def child_records(
    path: Source, records: Sequence[Mapping[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Each child run's records when `records` are an invocation's parent run (else none)."""
    for record in reversed(records):
        if record.get("event") == "run_completed":
            ids = (record.get("data") or {}).get("child_run_ids") or []
            return {str(run_id): run_records(path, str(run_id)) for run_id in ids}
    return {}


def _invocation(
    started: Mapping[str, Any],
    end: Mapping[str, Any],
    children: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, Any] | None:
    """The invocation a parent run stands for: its blocks and each child block's outcome."""
    if "invocation" not in started and "children" not in end:
        return None
    rows = []
    for child in end.get("children") or []:
        run_id = child.get("run_id")
        row: dict[str, Any] = {
            "name": str(child.get("name", "?")),
            "kind": str(child.get("kind", "pipeline")),
            "run_id": run_id,
            "status": str(child.get("status", "unknown")),
            "error": child.get("error"),
            "records": None,
            "duration_s": None,
            "landing": [],
        }
        found = children.get(str(run_id)) if run_id else None
        if found:
            report = build_report(found)
            row["records"] = report["records"]
            row["duration_s"] = report["duration_s"]
            row["status"] = report["status"] if report["status"] != "incomplete" else row["status"]
            row["landing"] = [
                {"stream": s["stream"], "status": s["landing"].get("status"),
                 "label": s["landing"].get("label")}
                for s in report["streams"]
                if s.get("landing")
            ]  # fmt: skip
        rows.append(row)
    invocation = started.get("invocation") or {}
    return {"blocks": [str(word) for word in invocation.get("blocks") or []], "children": rows}
