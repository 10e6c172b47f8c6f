"""Logging: JSON lines when asked or off a terminal, with the context on every line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import structlog

from flext_meltano_context import FlextContext
from flext_meltano_context.logs import configure


def test_json_lines_carry_correlation_service_and_operation() -> None:
    out = io.StringIO()
    configure("json", "INFO", stream=out)
    try:
        with FlextContext.Correlation.new_correlation() as cid:
            with FlextContext.Service.service_context("etl"):
                with FlextContext.Performance.timed_operation("extract"):
                    structlog.get_logger().info("records_relayed", records=7)
                structlog.get_logger().debug("hidden_below_level")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["correlation_id"] == cid
    assert lines[0]["service"] == "etl"
    assert lines[0]["operation"] == "extract"
    assert lines[0]["records"] == 7
    assert lines[0]["level"] == "info"


def test_cli_logs_go_to_stderr_and_stdout_stays_empty() -> None:
    code = (
        "import structlog\n"
        "from flext_meltano_context.logs import configure\n"
        "configure('auto')\n"
        "structlog.get_logger().warning('something_happened')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == ""
    assert json.loads(done.stderr)["event"] == "something_happened"  # not a TTY: JSON
