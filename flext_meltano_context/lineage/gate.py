"""CI gates on a run's report: success required, minimum records per stream, no sudden drop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flext_meltano_context.lineage.report import build_report, list_runs, run_records
from flext_meltano_context.lineage.store import Source


def stream_records(report: Mapping[str, Any]) -> dict[str, int]:
    """Records per stream in a report."""
    return {row["stream"]: int(row["records"]) for row in report["streams"]}


def previous_success(path: Source, report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report of the last successful run of the same pipeline before `report`'s run."""
    earlier = None
    for run in list_runs(path, pipeline=report["pipeline"]["name"]):
        if run.run_id == report["run_id"]:
            break
        if run.status == "success":
            earlier = run.run_id
    return build_report(run_records(path, earlier)) if earlier else None


def violations(
    report: Mapping[str, Any],
    *,
    require_success: bool = False,
    min_records: Mapping[str, int] | None = None,
    max_drop_pct: float | None = None,
    previous: Mapping[str, Any] | None = None,
    require_landed: bool = False,
    allow_unchecked: bool = False,
) -> list[str]:
    """One line per violated rule; empty when the run passes."""
    out: list[str] = []
    run = report["run_id"]
    if require_success and report["status"] != "success":
        why = f": {report['error']}" if report.get("error") else ""
        out.append(f"run {run} status is {report['status']}, not success{why}")
    counts = stream_records(report)
    for stream, minimum in (min_records or {}).items():
        got = counts.get(stream)
        if got is None:
            out.append(f"stream {stream!r} is missing from run {run} (expected >= {minimum})")
        elif got < minimum:
            out.append(f"stream {stream!r} has {got} records, fewer than the minimum {minimum}")
    if max_drop_pct is not None and previous is not None:
        before = stream_records(previous)
        for stream, old in sorted(before.items()):
            new = counts.get(stream, 0)
            if old > 0 and (old - new) * 100.0 / old > max_drop_pct:
                drop = (old - new) * 100.0 / old
                out.append(
                    f"stream {stream!r} dropped {drop:.1f}% ({old} -> {new} records) against "
                    f"run {previous['run_id']}, more than {max_drop_pct:g}%"
                )
    if require_landed:
        out += landing_violations(report, allow_unchecked=allow_unchecked)
    return out


def landing_violations(report: Mapping[str, Any], *, allow_unchecked: bool = False) -> list[str]:
    """One line per stream not proven landed: missing rows, a count mismatch, or not checked.

    `not checked` fails too unless `allow_unchecked`: no proof of landing is no proof (issue 10).
    """
    out = []
    run = report["run_id"]
    incomplete = report.get("counting_error")
    if incomplete and not allow_unchecked:
        out.append(f"run {run}: the relay's counts are incomplete ({incomplete})")
    for row in report["streams"]:
        landing = row.get("landing")
        stream = row["stream"]
        if not landing:
            if row["records"] and not allow_unchecked:  # no records: nothing had to land
                out.append(f"stream {stream!r} of run {run}: not checked (no landing check ran)")
            continue
        level = landing.get("level") or "no level"
        if landing.get("status") == "missing":
            shown = ", ".join(_sample(s) for s in landing.get("samples") or [])
            out.append(
                f"stream {stream!r} of run {run}: {landing['label']} in the destination, "
                f"{level} (relayed {landing['relayed']}, landed {landing['landed']})"
                + (f"; e.g. {shown}" if shown else "")
            )
        elif landing.get("status") == "not checked" and not allow_unchecked:
            why = landing.get("reason") or "no reason given"
            out.append(
                f"stream {stream!r} of run {run}: not checked ({why}); "
                "pass --allow-unchecked to accept it"
            )
    for item in report.get("cross_checks") or []:
        if item.get("status") == "count_mismatch":
            where = f"stream {item['stream']!r}" if item.get("stream") else "all streams"
            out.append(
                f"{where} of run {run}: count_mismatch, {_KINDS.get(item['kind'], item['kind'])} "
                f"{item.get('reported')} against {item.get('expected')} relayed"
            )
    return out


_KINDS = {
    "target_lines": "the target reported reading",
    "tap_record_count": "the tap's record_count metrics sum to",
}


def _sample(sample: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in sample.items())
