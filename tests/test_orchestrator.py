"""The Python API returns results instead of raising."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flext_meltano_context.orchestrator import FlextMeltanoETLOrchestrator
from tests.conftest import fake

pytestmark = pytest.mark.usefixtures("clean_env")


def test_execute_pipeline_returns_records_and_the_correlation_id(tmp_path: Path) -> None:
    env = {**os.environ, "FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "l.jsonl")}
    env["FLEXT_CORRELATION_ID"] = "ci-build-42"
    result = FlextMeltanoETLOrchestrator().execute_pipeline(
        {
            "tap": fake("tap_counter.py", "--records", "4"),
            "target": fake("target_collect.py", str(tmp_path / "o")),
            "state_out": str(tmp_path / "s.json"),
            "environ": env,
        }
    )
    assert result.is_success
    assert result.value is not None
    assert result.value["records_processed"] == 4
    assert result.value["pipeline_correlation"] == "ci-build-42"
    assert result.value["context"]["phases"] == {"extract": "success", "load": "success"}


def test_a_failed_pipeline_is_a_failed_result_not_an_exception(tmp_path: Path) -> None:
    env = {**os.environ, "FLEXT_CONTEXT_LINEAGE_PATH": str(tmp_path / "l.jsonl")}
    result = FlextMeltanoETLOrchestrator().execute_pipeline(
        {
            "tap": fake("tap_counter.py", "--records", "4", "--fail-after", "2"),
            "target": fake("target_collect.py", str(tmp_path / "o")),
            "environ": env,
        }
    )
    assert result.is_failure
    assert result.exit_code == 1
    assert result.error is not None
    assert "tap_counter.py" in result.error
    assert result.value is not None
    assert result.value["records_processed"] == 2


def test_bad_config_is_a_failed_result_with_exit_code_2() -> None:
    result = FlextMeltanoETLOrchestrator().execute_pipeline({"tap": "tap-x"})
    assert (result.is_success, result.exit_code) == (False, 2)
