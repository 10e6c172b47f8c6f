"""The HTML report renders in headless Chromium: not blank, no console errors, no fetches.

Chromium logs every console message on stderr with `--enable-logging=stderr --v=0`, as
`INFO:CONSOLE...] "<message>", source: ...` (uncaught exceptions and CSP refusals included),
which needs no DevTools client; a control page with a throwing script proves the scan sees them.
The screenshot is decoded with zlib (8-bit RGB/RGBA PNG, the five scanline filters) to count
non-white pixels.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from flext_meltano_context.lineage.example import record_example_run
from flext_meltano_context.lineage.render import to_html
from flext_meltano_context.lineage.report import build_report, run_records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian 'chromium' is not installed (.ci/run installs it)"
)
_CONSOLE = re.compile(r"CONSOLE|Uncaught|Refused to", re.IGNORECASE)


def _render(page: Path, tmp_path: Path, size: str = "1000,700") -> tuple[Path, list[str]]:
    """Screenshot of `page` and the console lines Chromium logged while loading it."""
    assert CHROMIUM is not None
    shot = tmp_path / f"{page.stem}.png"
    profile = tmp_path / f"profile-{page.stem}"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            f"--window-size={size}",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return shot, [line for line in result.stderr.splitlines() if _CONSOLE.search(line)]


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered scanlines of an 8-bit RGB or RGBA PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8
    assert colour in (2, 6)
    step = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * step
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - step] if x >= step else 0
            up = prev[x]
            corner = prev[x - step] if x >= step else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(row[i] for i in range(len(row)) if i % step < 3) for row in rows]


def _non_white(path: Path) -> int:
    _, _, rows = _png_pixels(path)
    return sum(
        1 for row in rows for i in range(0, len(row), 3) if row[i : i + 3] != b"\xff\xff\xff"
    )


def test_html_report_is_one_file_that_fetches_nothing(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    page = to_html(build_report(run_records(log, record_example_run(log, status="failed"))))
    assert "<script" not in page
    assert "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<svg" in page
    assert "disk full" in page


@needs_chromium
def test_html_report_renders_in_headless_chromium_without_console_errors(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log, status="failed")
    page = tmp_path / "report.html"
    page.write_text(to_html(build_report(run_records(log, run))), encoding="utf-8")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>notDefined()</script></body></html>")

    shot, console = _render(page, tmp_path)
    assert console == []
    width, height, _ = _png_pixels(shot)
    painted = _non_white(shot)
    assert painted > 0.02 * width * height, f"only {painted} of {width * height} pixels drawn"

    blank_shot, _ = _render(blank, tmp_path, "200,150")
    assert _non_white(blank_shot) == 0  # the pixel count tells a blank page apart
    _, broken_console = _render(broken, tmp_path, "200,150")
    assert any("notDefined" in line for line in broken_console)  # and the scan sees errors


def test_html_of_a_real_run_shows_each_landing_verdict_with_its_level(tmp_path: Path) -> None:
    from tests.test_lineage_report import record_real_run

    log, run = record_real_run(tmp_path)
    page = to_html(build_report(run_records(log, run)))
    assert "<td>missing 1 (by key, 4 of 5; e.g. id=3)</td>" in page
    assert "<td>ok (by key, 5 of 5)</td>" in page
    assert "<script" not in page


@needs_chromium
def test_html_of_a_real_run_renders_in_headless_chromium(tmp_path: Path) -> None:
    from tests.test_lineage_report import record_real_run

    log, run = record_real_run(tmp_path)
    page = tmp_path / "report.html"
    page.write_text(to_html(build_report(run_records(log, run))), encoding="utf-8")
    shot, console = _render(page, tmp_path)
    assert console == []
    width, height, _ = _png_pixels(shot)
    assert _non_white(shot) > 0.02 * width * height
