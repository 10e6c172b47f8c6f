"""The runs overview: recent runs of a lineage log or store as rows, and as one HTML page.

A row per run: pipeline, status, host, CI job, records, the landing result, duration. The page
has inline CSS only, no script, and a Content-Security-Policy that forbids any fetch.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

import msgspec

from flext_meltano_context.lineage.store import Source, open_log

_WANTED = (b'"event":"run_started"', b'"event":"run_completed"', b'"event":"landing"')
_COLOUR = {
    "success": "#2e7d32",
    "failed": "#c62828",
    "aborted": "#6a1b9a",
    "incomplete": "#f9a825",
}


@dataclass(frozen=True, slots=True)
class RunRow:
    """One run in the overview."""

    run_id: str
    correlation_id: str
    pipeline: str
    status: str
    host: str
    ci_job: str
    records: int | None
    landed: str
    started_at: str | None
    duration_s: float | None


def _ci_job(ci: Mapping[str, Any]) -> str:
    """The CI job a run belongs to, as people name it: `github: workflow / job #12`."""
    if not ci:
        return ""
    provider = str(ci.get("provider", "ci"))
    parts = [
        str(ci[key])
        for key in ("workflow", "job", "job_name", "build_tag", "project")
        if ci.get(key)
    ]
    number = next(
        (ci[k] for k in ("run_number", "job_id", "build_number", "run_id") if ci.get(k)), None
    )
    text = f"{provider}: {' / '.join(parts)}" if parts else provider
    return f"{text} #{number}" if number is not None else text


def _landed(data: Mapping[str, Any]) -> str:
    """The landing verdict of a run over its streams: `ok`, `missing 3 (users)`, ..."""
    rows = [row for row in data.get("streams") or [] if isinstance(row, Mapping)]
    if not rows:
        return "-"
    missing = [row for row in rows if row.get("status") == "missing"]
    if missing:
        total = sum(int(row.get("difference") or 0) for row in missing)
        names = ", ".join(str(row.get("stream")) for row in missing)
        return f"missing {abs(total)} ({names})" if total else f"missing ({names})"
    unchecked = [row for row in rows if row.get("status") not in {"ok", "missing"}]
    if unchecked:
        statuses = sorted({str(row.get("status")) for row in unchecked})
        return f"{'/'.join(statuses)} ({', '.join(str(r.get('stream')) for r in unchecked)})"
    return f"ok ({len(rows)} stream{'s' if len(rows) != 1 else ''})"


def hosts(source: Source, run_ids: Set[str]) -> dict[str, str]:
    """The host each of `run_ids` ran on (from its `run_started` event)."""
    found = {}
    # The same question list_runs asks, so a store answers both from one read.
    for line in open_log(source).lines(events=("run_started", "run_completed")):
        if _WANTED[0] in line:
            record: dict[str, Any] = msgspec.json.decode(line)
            if record["run_id"] in run_ids:
                found[record["run_id"]] = str(record["data"].get("host") or "")
    return found


def overview(
    source: Source,
    *,
    limit: int | None = None,
    pipeline: str | None = None,
    run_ids: Set[str] | None = None,
) -> list[RunRow]:
    """The newest `limit` runs (of `pipeline`, or with these `run_ids`), newest first."""
    started: dict[str, dict[str, Any]] = {}
    completed: dict[str, dict[str, Any]] = {}
    landing: dict[str, str] = {}
    events = ("run_started", "run_completed", "landing")
    for line in open_log(source).lines(events=events):
        if not any(needle in line for needle in _WANTED):
            continue
        record: dict[str, Any] = msgspec.json.decode(line)
        run_id, event = record["run_id"], record["event"]
        if run_ids is not None and run_id not in run_ids:
            continue
        if event == "run_started":
            started[run_id] = record
        elif event == "run_completed":
            completed[run_id] = record["data"]
        elif event == "landing":
            landing[run_id] = _landed(record["data"])
    rows = []
    for run_id, start in started.items():
        data = start["data"]
        info = data.get("pipeline") or {}
        name = str(info.get("name") or f"{info.get('tap', '?')}-to-{info.get('target', '?')}")
        if pipeline is not None and name != pipeline:
            continue
        end = completed.get(run_id)
        rows.append(
            RunRow(
                run_id=run_id,
                correlation_id=start["correlation_id"],
                pipeline=name,
                status=str(end.get("status", "unknown")) if end else "incomplete",
                host=str(data.get("host") or ""),
                ci_job=_ci_job(data.get("ci") or {}),
                records=end.get("records") if end else None,
                landed=landing.get(run_id, "-"),
                started_at=(end or {}).get("started_at") or start["ts"],
                duration_s=end.get("duration_s") if end else None,
            )
        )
    rows.reverse()
    return rows[:limit] if limit is not None else rows


_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#212121;background:#fff}"
    "h1{font-size:20px;margin:0 0 4px}p.sub{color:#616161;margin:0 0 16px}"
    "table{border-collapse:collapse;width:100%}th,td{padding:6px 10px;text-align:left;"
    "border-bottom:1px solid #e0e0e0;vertical-align:top}th{background:#f5f5f5;font-weight:600}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".badge{color:#fff;border-radius:10px;padding:1px 8px;font-size:12px;white-space:nowrap}"
    "code{font-size:12px;color:#455a64}.bad{color:#c62828;font-weight:600}"
    "dl.counts{display:flex;gap:24px;margin:0 0 16px}dl.counts dt{color:#616161}"
    "dl.counts dd{margin:0;font-size:18px;font-weight:600}"
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def to_html(rows: list[RunRow], source: str) -> str:
    """One self-contained page listing `rows` (as `overview` returns them)."""
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row.status] = statuses.get(row.status, 0) + 1
    counts = "".join(
        f"<div><dt>{_e(status)}</dt><dd>{count}</dd></div>"
        for status, count in sorted(statuses.items())
    )
    body = "".join(
        "<tr>"
        f"<td>{_e((row.started_at or '')[:19].replace('T', ' '))}</td>"
        f"<td>{_e(row.pipeline)}</td>"
        f'<td><span class=badge style="background:{_COLOUR.get(row.status, "#607d8b")}">'
        f"{_e(row.status)}</span></td>"
        f"<td>{_e(row.host or '-')}</td><td>{_e(row.ci_job or '-')}</td>"
        f"<td class=n>{'-' if row.records is None else f'{row.records:,}'}</td>"
        f"<td{' class=bad' if row.landed.startswith('missing') else ''}>{_e(row.landed)}</td>"
        f"<td class=n>{'-' if row.duration_s is None else f'{row.duration_s:,.1f} s'}</td>"
        f"<td><code>{_e(row.run_id)}</code></td>"
        "</tr>"
        for row in rows
    )
    empty = "" if rows else "<p>No runs yet.</p>"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        "<title>flext-context runs</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Recent runs</h1><p class=sub>{len(rows)} run(s) from {_e(source)}</p>"
        f"<dl class=counts>{counts}</dl>"
        "<table><tr><th>Started (UTC)</th><th>Pipeline</th><th>Status</th><th>Host</th>"
        "<th>CI job</th><th>Records</th><th>Landed</th><th>Duration</th><th>Run id</th></tr>"
        f"{body}</table>{empty}</body></html>\n"
    )
