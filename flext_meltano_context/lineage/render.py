"""Views of a run report for people: Markdown with a Mermaid graph, and a self-contained HTML page.

The Markdown fits `$GITHUB_STEP_SUMMARY`. The HTML page has inline CSS and SVG only, no script
and a Content-Security-Policy that forbids any fetch, so it reads the same offline.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from typing import Any

_STATUS_MARK = {
    "success": "✅",
    "failed": "❌",
    "aborted": "⛔",
    "skipped": "⏭️",
    "running": "⏳",
    "incomplete": "⏳",
}
_STATUS_COLOUR = {
    "success": "#2e7d32",
    "failed": "#c62828",
    "aborted": "#6a1b9a",
    "skipped": "#9e9e9e",
    "running": "#f9a825",
    "incomplete": "#f9a825",
}


def _moment(text: Any) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.2f} s"


def _size(value: Any) -> str:
    amount = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:,.0f} {unit}" if unit == "B" else f"{amount:,.1f} {unit}"
        amount /= 1024
    return f"{amount:,.1f} GiB"  # pragma: no cover  # the loop always returns


def _timeline(
    report: Mapping[str, Any],
) -> tuple[dt.datetime | None, float, list[tuple[Any, float, float]]]:
    """Run start, total span in seconds, and (phase, offset, duration) for each phase."""
    starts = [_moment(p.get("started_at")) for p in report["phases"]]
    origin = _moment(report.get("started_at"))
    known = [moment for moment in starts if moment is not None]
    if origin is None or (known and min(known) < origin):
        origin = min(known) if known else None
    rows = []
    span = float(report.get("duration_s") or 0.0)
    for phase, start in zip(report["phases"], starts, strict=True):
        offset = (start - origin).total_seconds() if start and origin else 0.0
        length = float(phase.get("duration_s") or 0.0)
        rows.append((phase, offset, length))
        span = max(span, offset + length)
    return origin, span, rows


def _landed(row: Mapping[str, Any]) -> str:
    """A stream's landing verdict and its level: `missing 1 (by key, 999 of 1,000; e.g. id=1)`."""
    landing = row.get("landing")
    if not landing:
        return "-"
    level = landing.get("level")
    if landing.get("status") == "not checked":
        at = f" ({level})" if level else ""
        return f"not checked{at}: {landing.get('reason') or 'no reason given'}"
    landed = landing.get("landed")
    shown = "-" if landed is None else f"{landed:,}"
    samples = "; ".join(
        ", ".join(f"{name}={value!r}" for name, value in sample.items())
        for sample in landing.get("samples") or []
    )
    example = f"; e.g. {samples}" if samples else ""
    return f"{landing['label']} ({level}, {shown} of {landing['relayed']:,}{example})"


def _records(report: Mapping[str, Any]) -> str:
    """The run's record count, marked incomplete when the relay stopped counting."""
    shown = f"{report['records']:,}"
    if report.get("counting_error"):
        return f"{shown} (incomplete: counting stopped: {report['counting_error']})"
    return shown


def _cross_check_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per independent count: `users: target_lines 20 against 20 relayed, ok`."""
    return [
        f"{item.get('stream') or 'all streams'}: {item['kind']} {item.get('reported')} against "
        f"{item.get('expected')} relayed, {item['status']}"
        for item in report.get("cross_checks") or []
    ]


def _pipeline_line(pipeline: Mapping[str, Any]) -> str:
    steps = [pipeline.get("tap"), pipeline.get("target"), *(pipeline.get("transformers") or [])]
    return " → ".join(str(step) for step in steps if step)


# --- Markdown -------------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _mermaid_label(text: str) -> str:
    return text.replace('"', "#quot;")


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown with a Mermaid lineage graph."""
    status = report["status"]
    pipeline = report["pipeline"]
    lines = [
        f"## {_STATUS_MARK.get(status, '')} {_md(pipeline['name'])}: {status}",
        "",
        "| | |",
        "|---|---|",
        f"| Pipeline | {_md(_pipeline_line(pipeline))} |",
        f"| Run id | `{report['run_id']}` |",
        f"| Correlation id | `{report['correlation_id']}` |",
        f"| Started | {report['started_at']} |",
        f"| Duration | {_seconds(report['duration_s'])} |",
        f"| Records | {_md(_records(report))} |",
        f"| Bytes | {_size(report['bytes'])} |",
    ]
    if report.get("digest"):
        lines.append(f"| Digest (sha256) | `{report['digest']}` |")
    if report.get("error"):
        lines.append(f"| Error | {_md(report['error'])} |")
    ci = report.get("ci") or {}
    if ci:
        where = ci.get("run_url") or ci.get("pipeline_url") or ci.get("build_url") or ""
        lines.append(f"| CI | {_md(ci.get('provider', ''))} {_md(where)} |")
    lines += _invocation_markdown(report.get("invocation"))
    lines += _mapped_markdown(report.get("mapped"))
    lines += ["", "### Streams", ""]
    if report["streams"]:
        lines += [
            "| Stream | Records | Bytes | Messages | First record | Last record | Table | Landed |",
            "|---|--:|--:|---|---|---|---|---|",
        ]
        for row in report["streams"]:
            messages = ", ".join(f"{k} {v:,}" for k, v in sorted(row["counts"].items()))
            lines.append(
                f"| {_md(row['stream'])} | {row['records']:,} | {_size(row['bytes'])} | "
                f"{_md(messages)} | {row['first_record_at'] or '-'} | "
                f"{row['last_record_at'] or '-'} | {_md(row['target_table'])} | "
                f"{_md(_landed(row))} |"
            )
    else:
        lines.append("No stream statistics were recorded.")
    _, span, rows = _timeline(report)
    lines += [
        "",
        "### Phases",
        "",
        "| Phase | Plugin | Status | Start | Duration | Exit | Timeline |",
    ]
    lines.append("|---|---|---|--:|--:|--:|---|")
    for phase, offset, length in rows:
        width = 20
        lead = round(offset / span * width) if span else 0
        bar = "·" * lead + "█" * max(1, round(length / span * width) if span else 1)
        lines.append(
            f"| {_md(phase['phase'])} | {_md(phase.get('plugin') or '')} | "
            f"{_STATUS_MARK.get(phase['status'], '')} {phase['status']} | +{offset:.2f} s | "
            f"{_seconds(phase['duration_s'])} | "
            f"{'' if phase['exit_code'] is None else phase['exit_code']} | `{bar}` |"
        )
    failed = [p for p in report["phases"] if p["stderr_tail"]]
    for phase in failed:
        lines += ["", f"<details><summary>stderr of {_md(phase['phase'])}</summary>", "", "```"]
        lines += [str(line) for line in phase["stderr_tail"]]
        lines += ["```", "", "</details>"]
    lines += ["", "### Lineage", "", "```mermaid", "flowchart LR"]
    ids = {node["id"]: f"n{index}" for index, node in enumerate(report["nodes"])}
    for node in report["nodes"]:
        label = _mermaid_label(f"{node['kind']}: {node['name']}")
        shape = f'[("{label}")]' if node["kind"] in {"table", "model", "source"} else f'["{label}"]'
        lines.append(f"  {ids[node['id']]}{shape}")
    for edge in report["edges"]:
        via = f'|"{_mermaid_label(edge["via"])}"|' if edge.get("via") else ""
        lines.append(f"  {ids[edge['source']]} -->{via} {ids[edge['target']]}")
    lines += ["```", ""]
    lines += _dbt_markdown(report.get("dbt") or [])
    state = report["state"]
    if state["loaded"] or state["persisted"]:
        lines += ["### State", ""]
        if state["loaded"]:
            loaded = state["loaded"]
            who = loaded.get("written_by_run_id") or "no earlier run"
            lines.append(f"- loaded `{_md(loaded.get('state_id'))}` (written by {who})")
        if state["persisted"]:
            kept = state["persisted"]
            lines.append(
                f"- persisted `{_md(kept.get('state_id'))}`: "
                f"{kept.get('confirmed_states', 0)} confirmed state message(s)"
            )
        lines.append("")
    checks = _cross_check_lines(report)
    if checks:
        lines += ["### Cross-checks", ""]
        lines += [f"- {'❌' if 'count_mismatch' in line else '✅'} {_md(line)}" for line in checks]
        lines.append("")
    anomalies = report["anomalies"]
    if anomalies["count"]:
        lines += ["### Anomalies", "", f"{anomalies['count']} anomalies; first ones:", ""]
        for item in anomalies["first"][:20]:
            lines.append(
                f"- line {item.get('line')}: {_md(item.get('kind'))} "
                f"`{_md(str(item.get('excerpt', ''))[:120])}`"
            )
        lines.append("")
    return "\n".join(lines)


def _rows(node: Mapping[str, Any]) -> str:
    rows = node.get("rows")
    return (
        "-"
        if rows is None
        else f"{rows:,}" + (" (dbt)" if node.get("rows_from") == "adapter" else "")
    )


def _child_landing(child: Mapping[str, Any]) -> str:
    """A child pipeline's landing result: `users ok, orders missing 1`, or `-`."""
    rows = child.get("landing") or []
    return (
        ", ".join(f"{row['stream']} {row.get('label') or row.get('status')}" for row in rows) or "-"
    )


def _child_cells(child: Mapping[str, Any]) -> list[str]:
    records = child.get("records")
    return [
        str(child["name"]),
        str(child.get("run_id") or "-"),
        f"{_STATUS_MARK.get(child['status'], '')} {child['status']}".strip(),
        "-" if records is None else f"{records:,}",
        _child_landing(child),
        _seconds(child.get("duration_s")),
    ]


_CHILD_HEADERS = ("Pipeline", "Run id", "Status", "Records", "Landed", "Duration")


def _invocation_markdown(invocation: Mapping[str, Any] | None) -> list[str]:
    """An invocation's parent run: its blocks and a row per child pipeline or command block."""
    if not invocation:
        return []
    lines = ["", "### Invocation", "", f"Blocks: `{_md(' '.join(invocation['blocks']))}`", ""]
    lines += ["| " + " | ".join(_CHILD_HEADERS) + " |", "|---|---|---|--:|---|--:|"]
    for child in invocation["children"]:
        cells = [_md(cell) for cell in _child_cells(child)]
        cells[1] = f"`{cells[1]}`" if child.get("run_id") else cells[1]
        lines.append("| " + " | ".join(cells) + " |")
    for child in invocation["children"]:
        if child.get("error"):
            lines.append(f"- {_md(child['name'])}: {_md(child['error'])[:500]}")
    return lines


def _mapped_change(row: Mapping[str, Any]) -> list[str]:
    tap = row.get("tap_records")
    return [
        str(row["stream"]),
        "-" if tap is None else f"{tap:,}",
        f"{row['target_records']:,}",
        str(row["change"]),
    ]


def _mapped_markdown(mapped: Mapping[str, Any] | None) -> list[str]:
    """A mapped pair: records per stream leaving the tap and entering the target."""
    if not mapped:
        return []
    lines = ["", f"### Mapped by {_md(', '.join(mapped['mappings']))}", ""]
    lines += ["| Stream | Left the tap | Entered the target | Change |", "|---|--:|--:|---|"]
    for row in mapped["streams"]:
        lines.append("| " + " | ".join(_md(cell) for cell in _mapped_change(row)) + " |")
    return lines


def _invocation_html(invocation: Mapping[str, Any] | None) -> str:
    if not invocation:
        return ""
    head = "".join(f"<th>{_e(h)}</th>" for h in _CHILD_HEADERS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in _child_cells(child)) + "</tr>"
        for child in invocation["children"]
    )
    errors = "".join(
        f"<li>{_e(child['name'])}: {_e(child['error'])}</li>"
        for child in invocation["children"]
        if child.get("error")
    )
    return (
        f"<h2>Invocation</h2><p>Blocks: <code>{_e(' '.join(invocation['blocks']))}</code></p>"
        f"<table><tr>{head}</tr>{rows}</table>" + (f"<ul>{errors}</ul>" if errors else "")
    )


def _mapped_html(mapped: Mapping[str, Any] | None) -> str:
    if not mapped:
        return ""
    head = "<tr><th>Stream</th><th>Left the tap</th><th>Entered the target</th><th>Change</th></tr>"
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in _mapped_change(row)) + "</tr>"
        for row in mapped["streams"]
    )
    return f"<h2>Mapped by {_e(', '.join(mapped['mappings']))}</h2><table>{head}{rows}</table>"


def _dbt_markdown(blocks: Sequence[Mapping[str, Any]]) -> list[str]:
    """One table of node results per dbt block (issue 6)."""
    lines: list[str] = []
    for block in blocks:
        lines += [f"### dbt: {_md(block['phase'])}", ""]
        if block.get("missing"):
            lines += [f"No results of this run: {_md(block['missing'])}", ""]
            continue
        lines += [
            f"Invocation `{block.get('invocation_id')}`, exit {block.get('exit_code')}.",
            "",
            "| Node | Type | Status | Compile | Execute | Rows | Message |",
            "|---|---|---|--:|--:|--:|---|",
        ]
        for node in block["nodes"]:
            mark = _STATUS_MARK.get("failed" if node["status"] in {"error", "fail"} else "", "")
            lines.append(
                f"| {_md(node['relation'] or node['unique_id'])} | {_md(node['resource_type'])} | "
                f"{mark} {_md(node['status'])} | {_seconds(node.get('compile_s'))} | "
                f"{_seconds(node.get('execute_s'))} | {_rows(node)} | "
                f"{_md(str(node.get('message') or '')[:200])} |"
            )
        lines.append("")
    return lines


def _dbt_html(blocks: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for block in blocks:
        parts.append(f"<h2>dbt: {_e(block['phase'])}</h2>")
        if block.get("missing"):
            parts.append(f"<p>No results of this run: {_e(block['missing'])}</p>")
            continue
        rows = "".join(
            f"<tr><td>{_e(node['relation'] or node['unique_id'])}</td>"
            f"<td>{_e(node['resource_type'])}</td><td>{_e(node['status'])}</td>"
            f"<td class=n>{_e(_seconds(node.get('compile_s')))}</td>"
            f"<td class=n>{_e(_seconds(node.get('execute_s')))}</td>"
            f"<td class=n>{_e(_rows(node))}</td>"
            f"<td>{_e(str(node.get('message') or '')[:300])}</td></tr>"
            for node in block["nodes"]
        )
        parts.append(
            f"<p>Invocation {_e(block.get('invocation_id'))}, exit {_e(block.get('exit_code'))}</p>"
            "<table><tr><th>Node</th><th>Type</th><th>Status</th><th>Compile</th><th>Execute</th>"
            f"<th>Rows</th><th>Message</th></tr>{rows}</table>"
        )
    return "".join(parts)


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;
color:#1b1b1b;background:#fff}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:4px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f3f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;margin:0}dt{color:#555}
dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
pre{background:#f6f8fa;padding:8px;overflow:auto}svg text{font:12px system-ui,sans-serif}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _layers(
    nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """Column of each node: 0 for sources, else one right of its furthest predecessor."""
    layer = {node["id"]: 0 for node in nodes}
    for _ in range(len(nodes)):  # longest path; bounded so a cycle cannot loop forever
        changed = False
        for edge in edges:
            want = layer[edge["source"]] + 1
            if layer[edge["target"]] < want <= len(nodes):
                layer[edge["target"]] = want
                changed = True
        if not changed:
            break
    return layer


def _graph_rows(
    nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]], layer: Mapping[str, int]
) -> dict[str, int]:
    """Row of each node in its column, by its predecessors' mean row: fewer crossing edges."""
    parents: dict[str, list[str]] = {node["id"]: [] for node in nodes}
    for edge in edges:
        parents[edge["target"]].append(edge["source"])
    row: dict[str, int] = {}
    for column in sorted(set(layer.values())):
        members = [node["id"] for node in nodes if layer[node["id"]] == column]
        placed = {
            n: sum(row[p] for p in parents[n] if p in row) / max(1, len(parents[n]))
            for n in members
        }
        members.sort(key=placed.__getitem__)  # stable: unlinked nodes keep the report's order
        row.update({n: i for i, n in enumerate(members)})
    return row


def _graph_svg(report: Mapping[str, Any]) -> str:
    nodes, edges = report["nodes"], report["edges"]
    if not nodes:
        return "<p>No lineage was recorded.</p>"
    layer = _layers(nodes, edges)
    box_w, box_h, gap_x, gap_y, pad = 200, 34, 90, 16, 10
    row_of = _graph_rows(nodes, edges, layer)
    rows: dict[int, int] = {}
    place: dict[str, tuple[int, int]] = {}
    for node in nodes:
        column, row = layer[node["id"]], row_of[node["id"]]
        rows[column] = max(rows.get(column, 0), row + 1)
        place[node["id"]] = (pad + column * (box_w + gap_x), pad + row * (box_h + gap_y))
    width = pad * 2 + (max(layer.values()) + 1) * (box_w + gap_x) - gap_x
    height = pad * 2 + max(rows.values()) * (box_h + gap_y) - gap_y
    fill = {"stream": "#e3f2fd", "table": "#e8f5e9", "source": "#fff8e1", "model": "#f3e5f5"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z" fill="#607d8b"/></marker></defs>',
    ]
    for edge in edges:
        (x1, y1), (x2, y2) = place[edge["source"]], place[edge["target"]]
        x1, y1, y2 = x1 + box_w, y1 + box_h // 2, y2 + box_h // 2
        mid = (x1 + x2) // 2
        title = f"<title>{_e(edge.get('via', ''))}</title>" if edge.get("via") else ""
        parts.append(
            f'<path d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}" fill="none" '
            f'stroke="#607d8b" stroke-width="1.5" marker-end="url(#arrow)">{title}</path>'
        )
    for node in nodes:
        x, y = place[node["id"]]
        label = f"{node['kind']}: {node['name']}"
        short = label if len(label) <= 28 else label[:27] + "…"
        parts.append(
            f"<g><title>{_e(node.get('namespace', ''))} {_e(label)}</title>"
            f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="{fill.get(node["kind"], "#eceff1")}" stroke="#90a4ae"/>'
            f'<text x="{x + 10}" y="{y + 22}">{_e(short)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _gantt_svg(report: Mapping[str, Any]) -> str:
    _, span, rows = _timeline(report)
    if not rows:
        return "<p>No phases were recorded.</p>"
    label_w, bar_w, row_h, pad = 170, 560, 26, 10
    height = pad * 2 + row_h * len(rows) + 20
    width = label_w + bar_w + pad * 2 + 70
    scale = bar_w / span if span else 0.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="phase timeline">'
    ]
    for tick in range(5):
        x = pad + label_w + bar_w * tick / 4
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad}" x2="{x:.1f}" y2="{height - 20}" stroke="#e0e0e0"/>'
            f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle" fill="#757575">'
            f"+{span * tick / 4:.1f}s</text>"
        )
    for index, (phase, offset, length) in enumerate(rows):
        y = pad + index * row_h
        x = pad + label_w + offset * scale
        w = max(2.0, length * scale)
        colour = _STATUS_COLOUR.get(phase["status"], "#607d8b")
        parts.append(
            f'<text x="{pad}" y="{y + 17}">{_e(phase["phase"])}</text>'
            f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" rx="3" '
            f'fill="{colour}"><title>{_e(phase["status"])}, {length:.2f} s</title></rect>'
            f'<text x="{x + w + 6:.1f}" y="{y + 17}" fill="#424242">{length:.2f} s</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _cross_checks_html(report: Mapping[str, Any]) -> str:
    lines = _cross_check_lines(report)
    if not lines:
        return ""
    return "<h2>Cross-checks</h2><ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"


def to_html(report: Mapping[str, Any]) -> str:
    """One self-contained HTML page: summary, lineage graph, phase timeline, streams."""
    status = report["status"]
    pipeline = report["pipeline"]
    summary = [
        ("Pipeline", _pipeline_line(pipeline)),
        ("Run id", report["run_id"]),
        ("Correlation id", report["correlation_id"]),
        ("Started", report["started_at"]),
        ("Ended", report["ended_at"] or "-"),
        ("Duration", _seconds(report["duration_s"])),
        ("Records", _records(report)),
        ("Bytes", _size(report["bytes"])),
    ]
    if report.get("digest"):
        summary.append(("Digest (sha256)", report["digest"]))
    if report.get("error"):
        summary.append(("Error", report["error"]))
    for key, value in sorted((report.get("ci") or {}).items()):
        summary.append((f"CI {key}", value))
    stream_rows = "".join(
        f"<tr><td>{_e(row['stream'])}</td><td class=n>{row['records']:,}</td>"
        f"<td class=n>{_e(_size(row['bytes']))}</td>"
        f"<td>{_e(', '.join(f'{k} {v:,}' for k, v in sorted(row['counts'].items())))}</td>"
        f"<td>{_e(row['first_record_at'] or '-')}</td><td>{_e(row['last_record_at'] or '-')}</td>"
        f"<td>{_e(row['target_table'])}</td><td>{_e(_landed(row))}</td></tr>"
        for row in report["streams"]
    )
    phase_rows = "".join(
        f"<tr><td>{_e(p['phase'])}</td><td>{_e(p.get('plugin') or '')}</td>"
        f"<td>{_e(p['status'])}</td><td class=n>{_e(_seconds(p['duration_s']))}</td>"
        f"<td class=n>{'' if p['exit_code'] is None else p['exit_code']}</td></tr>"
        for p in report["phases"]
    )
    tails = "".join(
        f"<h3>stderr of {_e(p['phase'])}</h3><pre>{_e(chr(10).join(p['stderr_tail']))}</pre>"
        for p in report["phases"]
        if p["stderr_tail"]
    )
    colour = _STATUS_COLOUR.get(status, "#607d8b")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(pipeline['name'])} {_e(status)}: flext-context run</title>"
        f"<style>{_CSS}</style></head><body>"
        f'<h1>{_e(pipeline["name"])} <span class=badge style="background:{colour}">'
        f"{_e(status)}</span></h1>"
        "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in summary) + "</dl>"
        f"{_invocation_html(report.get('invocation'))}{_mapped_html(report.get('mapped'))}"
        f"<h2>Lineage</h2>{_graph_svg(report)}"
        f"{_dbt_html(report.get('dbt') or [])}"
        f"<h2>Phase timeline</h2>{_gantt_svg(report)}"
        "<table><tr><th>Phase</th><th>Plugin</th><th>Status</th><th>Duration</th><th>Exit</th>"
        f"</tr>{phase_rows}</table>{tails}"
        "<h2>Streams</h2><table><tr><th>Stream</th><th>Records</th><th>Bytes</th>"
        "<th>Messages</th><th>First record</th><th>Last record</th><th>Table</th>"
        "<th>Landed</th></tr>"
        f"{stream_rows}</table>"
        + _cross_checks_html(report)
        + f"<h2>Anomalies</h2><p>{report['anomalies']['count']} anomalies.</p>"
        f"<footer><p>flext-context {_e(report.get('flext_context_version') or '')}; "
        f"log events {report['log']['first_seq']}-{report['log']['last_seq']}, "
        f"last hash {_e(report['log']['last_hash'][:16])}…</p></footer>"
        "</body></html>\n"
    )
