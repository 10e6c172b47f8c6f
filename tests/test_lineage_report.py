"""Reports on runs recorded with the pipeline's event vocabulary: JSON (schema), Markdown, gates."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the test extra
import pytest
from click.testing import CliRunner

from flext_meltano_context.cli import cli
from flext_meltano_context.lineage import LineageLog, Recorder
from flext_meltano_context.lineage.ci import ci_context
from flext_meltano_context.lineage.example import record_example_run
from flext_meltano_context.lineage.redact import REDACTED, is_secret_key, redact
from flext_meltano_context.lineage.render import to_html, to_markdown
from flext_meltano_context.lineage.report import (
    build_report,
    list_runs,
    report_schema,
    resolve_run_id,
    run_records,
)

T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.timezone.utc)


def _validate(report: dict[str, object]) -> None:
    jsonschema.Draft202012Validator.check_schema(report_schema())
    validator = jsonschema.Draft202012Validator(
        report_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(report)


@pytest.mark.parametrize("status", ["success", "failed", "aborted"])
def test_json_report_of_a_run_validates_against_the_shipped_schema(
    tmp_path: Path, status: str
) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log, status=status, start=T0)
    report = build_report(run_records(log, run))
    _validate(report)
    assert (report["status"], report["records"], report["run_id"]) == (status, 6200, run)
    assert [p["phase"] for p in report["phases"]] == ["extract", "load", "dbt-duckdb:run"]
    assert {s["stream"]: s["records"] for s in report["streams"]} == {
        "users": 1200,
        "orders": 5000,
    }
    assert report["edges"][0] == {
        "source": "stream:users",
        "target": "table:users",
        "via": "target-duckdb",
    }


def test_a_run_without_its_end_is_reported_as_incomplete(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    recorder = Recorder(log, run_id="r-1", correlation_id="c-1")
    recorder.record("run_started", {"pipeline": {"name": "p", "tap": "t", "target": "g"}})
    report = build_report(run_records(log, "r-1"))
    _validate(report)
    assert (report["status"], report["records"], report["ended_at"]) == ("incomplete", 0, None)
    assert [run.status for run in list_runs(log)] == ["incomplete"]


def test_lineage_edges_events_extend_the_graph_for_dbt(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log, start=T0)
    Recorder(log, run_id=run, correlation_id="c").record(
        "lineage_edges",
        {
            "edges": [
                {"source": "table:users", "target": "source:raw.users", "via": "dbt"},
                {"source": "source:raw.users", "target": {"kind": "model", "name": "dim_users"}},
            ]
        },
    )
    report = build_report(run_records(log, run))
    _validate(report)
    assert {"source": "source:raw.users", "target": "model:dim_users"} in report["edges"]
    markdown = to_markdown(report)
    assert '[("model: dim_users")]' in markdown


def test_runs_are_listed_and_found_by_prefix_or_as_the_last(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    first = record_example_run(log, pipeline="a-to-b", start=T0)
    second = record_example_run(log, pipeline="c-to-d", status="failed", start=T0)
    assert [(r.run_id, r.status) for r in list_runs(log)] == [
        (first, "success"),
        (second, "failed"),
    ]
    assert [r.run_id for r in list_runs(log, pipeline="a-to-b")] == [first]
    assert resolve_run_id(log, None) == second
    assert resolve_run_id(log, first[:30]) == first


def test_markdown_has_summary_streams_timeline_and_a_mermaid_graph(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log, status="failed", start=T0)
    markdown = to_markdown(build_report(run_records(log, run)))
    assert markdown.startswith("## ❌ tap-example-to-target-duckdb: failed")
    assert "| users | 1,200 |" in markdown
    assert "| load | target-duckdb | ❌ failed | +0.10 s | 2.40 s | 1 |" in markdown
    assert "```mermaid\nflowchart LR" in markdown
    assert '  n0 -->|"target-duckdb"| n1' in markdown
    assert "duckdb.IOException: disk full" in markdown


def test_secrets_in_a_plugin_config_never_reach_the_log(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    config = {
        "host": "db.example",
        "password": "hunter2",
        "api_key": "sk-123",
        "clientSecret": "s3",
        "auth": {"token": "t0k"},
        "sqlalchemy_url": "postgresql://loader:pa55word@db.example/warehouse",
        "key_properties": ["id"],
    }
    record_example_run(log, extra={"plugin_config": config})
    text = log.read_text()
    for secret in ("hunter2", "sk-123", '"s3"', "t0k", "pa55word"):
        assert secret not in text
    started = next(LineageLog(log).read())["data"]["plugin_config"]
    assert started["password"] == started["api_key"] == started["auth"] == REDACTED
    assert started["sqlalchemy_url"] == "postgresql://loader:[REDACTED]@db.example/warehouse"
    assert started["key_properties"] == ["id"]
    stats = next(r for r in LineageLog(log).read() if r["event"] == "stream_stats")
    column = stats["data"]["schema"]["properties"]["password"]
    assert column == "string"  # a column's name is not a secret


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("DB_PASSWORD", True),
        ("privateKey", True),
        ("aws_secret_access_key", True),
        ("key", True),
        ("refresh_token", True),
        ("credentials_json", True),
        ("key_properties", False),
        ("primary_key", False),
        ("monkey", False),
        ("stream", False),
        ("tokenizer_name", False),
    ],
    ids=lambda value: str(value),
)
def test_secret_looking_keys(name: str, secret: bool) -> None:
    assert is_secret_key(name) is secret


def test_redaction_keeps_structure_and_non_secret_values() -> None:
    assert redact({"a": [{"password": "x", "n": 1}], "ok": True}) == {
        "a": [{"password": REDACTED, "n": 1}],
        "ok": True,
    }


def test_ci_context_takes_named_variables_only() -> None:
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_RUN_ID": "42",
        "GITHUB_SHA": "abc",
        "GITHUB_REF": "refs/heads/main",
        "GITHUB_WORKFLOW": "ci",
        "GITHUB_ACTOR": "octo",
        "GITHUB_REPOSITORY": "o/r",
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_TOKEN": "ghs_secret",
        "AWS_SECRET_ACCESS_KEY": "x",
    }
    context = ci_context(env)
    assert context["run_url"] == "https://github.com/o/r/actions/runs/42"
    assert (context["provider"], context["sha"], context["actor"]) == ("github", "abc", "octo")
    assert "ghs_secret" not in json.dumps(context)
    assert ci_context({"GITLAB_CI": "true", "CI_PIPELINE_ID": "7"}) == {
        "provider": "gitlab",
        "pipeline_id": "7",
    }
    assert ci_context({"CI": "true", "BUILD_NUMBER": "9"}) == {
        "provider": "generic",
        "build_number": "9",
    }
    assert ci_context({"HOME": "/root"}) == {}


# --- the commands ---------------------------------------------------------------------------


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner(catch_exceptions=False).invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_runs_lists_newest_first_as_table_or_json(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    first = record_example_run(log, start=T0)
    second = record_example_run(log, status="failed", start=T0)
    code, out, _ = _invoke("runs", "--log", str(log), "--format", "json")
    assert code == 0
    assert [run["run_id"] for run in json.loads(out)] == [second, first]
    code, out, _ = _invoke("runs", "--log", str(log), "--limit", "1")
    assert code == 0
    assert out.splitlines()[0].startswith("RUN ID")
    assert second in out
    assert first not in out


def test_report_writes_each_format_to_stdout_or_a_file(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_example_run(log, start=T0)
    code, out, _ = _invoke("report", "--log", str(log), "--last", "--format", "json")
    assert code == 0
    _validate(json.loads(out))
    target = tmp_path / "out" / "report.md"
    code, out, err = _invoke(
        "report", run, "--log", str(log), "--format", "markdown", "-o", str(target)
    )
    assert (code, out) == (0, "")
    assert f"wrote {target}" in err
    assert "```mermaid" in target.read_text()
    code, out, _ = _invoke("report", "--log", str(log), "--format", "openlineage")
    assert json.loads(out.splitlines()[0])["eventType"] == "START"


def test_report_of_an_unknown_run_says_what_to_do(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    record_example_run(log)
    code, out, err = _invoke("report", "nope", "--log", str(log))
    assert (code, out) == (1, "")
    assert "no run 'nope'" in err
    assert "flext-context runs" in err


def test_verify_command_exit_codes(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    record_example_run(log)
    code, out, _ = _invoke("verify", str(log))
    assert code == 0
    assert "intact, 13 lines, 1 runs" in out
    lines = log.read_bytes().splitlines(keepends=True)
    del lines[4]
    log.write_bytes(b"".join(lines))
    code, out, err = _invoke("verify", str(log))
    assert (code, out) == (1, "")
    assert "line 5: deleted: prev does not match" in err


def test_check_passes_a_good_run_and_names_each_violated_rule(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    record_example_run(log, pipeline="p", start=T0)
    record_example_run(log, pipeline="other", streams={"users": 1}, start=T0)
    record_example_run(log, pipeline="p", streams={"users": 1100, "orders": 1000}, start=T0)
    code, _, err = _invoke("check", "--log", str(log), "--require-success", "--max-drop-pct", "50")
    assert code == 1
    assert err.splitlines() == [
        "check failed: stream 'orders' dropped 80.0% (5000 -> 1000 records) against run "
        f"{list_runs(log)[0].run_id}, more than 50%"
    ]
    code, _, err = _invoke(
        "check", "--log", str(log), "--min-records", "users=1000", "--max-drop-pct", "90"
    )
    assert code == 0
    assert err.startswith("check passed")
    code, _, err = _invoke("check", "--log", str(log), "--min-records", "users=5000")
    assert code == 1
    assert "stream 'users' has 1100 records, fewer than the minimum 5000" in err
    code, _, err = _invoke("check", "--log", str(log), "--min-records", "users")
    assert code == 2
    assert "STREAM=N" in err


def test_check_require_success_fails_a_failed_run(tmp_path: Path) -> None:
    log = tmp_path / "lineage.jsonl"
    record_example_run(log, status="failed")
    code, _, err = _invoke("check", "--last", "--log", str(log), "--require-success")
    assert code == 1
    assert "status is failed, not success: step 'load' exited with 1" in err


def test_the_log_path_comes_from_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "custom.jsonl"
    monkeypatch.setenv("FLEXT_CONTEXT_LINEAGE_PATH", str(log))
    run = record_example_run(log)
    code, out, _ = _invoke("runs", "--format", "json")
    assert code == 0
    assert json.loads(out)[0]["run_id"] == run


@pytest.mark.parametrize("command", ["runs", "report", "verify", "check"])
def test_every_lineage_command_has_help(command: str) -> None:
    code, out, _ = _invoke(command, "--help")
    assert code == 0
    assert "Usage:" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("md:db?motherduck_token=abc123", "md:db?motherduck_token=[REDACTED]"),
        ("https://h/p?page=2&api_key=k3y", "https://h/p?page=2&api_key=[REDACTED]"),
        ("x;password=hunter2;host=h", "x;password=[REDACTED];host=h"),
        ("http://h/?primary_key=id&sort=asc", "http://h/?primary_key=id&sort=asc"),
    ],
    ids=["motherduck", "api-key", "semicolon", "not-secret"],
)
def test_secret_query_parameters_are_redacted_from_free_text(text: str, expected: str) -> None:
    from flext_meltano_context.lineage.redact import redact_text

    assert redact_text(text) == expected


def test_graph_rows_follow_their_parents_so_chains_stay_straight() -> None:
    from flext_meltano_context.lineage.render import _graph_rows, _layers

    nodes = [{"id": i} for i in ("s:a", "s:b", "t:a", "t:b", "src:b", "src:a")]
    edges = [
        {"source": "s:a", "target": "t:a"},
        {"source": "s:b", "target": "t:b"},
        {"source": "t:a", "target": "src:a"},
        {"source": "t:b", "target": "src:b"},
    ]
    rows = _graph_rows(nodes, edges, _layers(nodes, edges))
    assert rows["src:a"] == rows["t:a"] == rows["s:a"] == 0
    assert rows["src:b"] == rows["t:b"] == rows["s:b"] == 1


# --- reports of real runs (issue 10): events written by execute(), landing by key included ----


def record_real_run(tmp_path: Path) -> tuple[Path, str]:
    """A real standalone run through execute(): a fake tap, a file target that loses users id 3."""
    from flext_meltano_context.pipeline import PipelineSpec, Settings, execute
    from tests.conftest import FAKES, fake

    out = tmp_path / "out"
    script = tmp_path / "target-jsonl"  # the jsonl family's probe reads what it wrote
    shutil.copy(FAKES / "target_lossy.py", script)
    config = tmp_path / "target.json"
    config.write_text(json.dumps({"destination_path": str(out)}))
    tap = fake("tap_keyed.py", "1-5", "--streams", "users,orders")
    target = [sys.executable, str(script), str(out), "--drop", "users:3", "--config", str(config)]
    log = tmp_path / "lineage.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXT_", "MELTANO_"))}
    result = execute(
        PipelineSpec(tap="tap", target="target", tap_cmd=tuple(tap), target_cmd=tuple(target)),
        environ=env,
        settings=Settings(lineage_path=log),
    )
    assert result.status == "success", result.error
    return log, result.run_id


def test_a_real_runs_report_names_the_missing_key_and_its_level(tmp_path: Path) -> None:
    log, run = record_real_run(tmp_path)
    report = build_report(run_records(log, run))
    _validate(report)
    landed = {row["stream"]: row["landing"] for row in report["streams"]}
    assert landed["users"] == {
        "family": "jsonl",
        "relayed": 5,
        "basis": "distinct_keys",
        "landed": 4,
        "status": "missing",
        "label": "missing 1",
        "difference": 1,
        "level": "by key",
        "bound": None,
        "reason": None,
        "samples": [{"id": 3}],
        "key_columns": ["id"],
    }
    assert (landed["orders"]["label"], landed["orders"]["level"]) == ("ok", "by key")
    markdown = to_markdown(report)
    assert "missing 1 (by key, 4 of 5; e.g. id=3)" in markdown
    assert "ok (by key, 5 of 5)" in markdown
    code, _out, err = _invoke("check", "--log", str(log), "--require-landed")
    assert code == 1
    assert f"stream 'users' of run {run}: missing 1 in the destination, by key" in err
    assert "e.g. id=3" in err
    assert "stream 'orders'" not in err


def record_checked_run(log: Path, *, counting_error: str | None, mismatch: bool) -> str:
    """A run with the run loop's cross_checks event and run_completed.counting_error (issue 10)."""
    recorder = Recorder(log, run_id="run-x", correlation_id="cid-x")
    recorder.record("run_started", {"pipeline": {"name": "p", "tap": "t", "target": "target-y"}})
    recorder.record("stream_stats", {"stream": "users", "counts": {"RECORD": 20}, "bytes": 900})
    reported = 4 if mismatch else 22
    checks: list[dict[str, Any]] = [
        {"kind": "target_lines", "stream": None, "expected": 22, "reported": reported},
        {"kind": "tap_record_count", "stream": "users", "expected": 20, "reported": 20},
    ]
    for item in checks:
        item["status"] = "ok" if item["expected"] == item["reported"] else "count_mismatch"
    recorder.record("cross_checks", {"checks": checks})
    why = counting_error or "no key values were collected"
    row = {"stream": "users", "relayed": 20, "basis": "records", "landed": None}
    row.update({"status": "not checked", "label": "not checked", "difference": 0})
    row.update({"level": None, "bound": None, "reason": why, "dataset": None})
    recorder.record("landing", {"family": "duckdb", "streams": [row]})
    end = {"status": "success", "records": 20, "bytes": 900, "counting_error": counting_error}
    recorder.record("run_completed", end)
    recorder.close()
    return "run-x"


@pytest.mark.parametrize(
    ("counting_error", "mismatch", "allowed_code"),
    [(None, False, 0), (None, True, 1), ("ValueError: bad", False, 0)],
    ids=["all-counts-agree", "target-read-fewer-lines", "counting-stopped"],
)
def test_cross_checks_and_incomplete_counts_are_reported_and_gated(
    tmp_path: Path, counting_error: str | None, mismatch: bool, allowed_code: int
) -> None:
    log = tmp_path / "lineage.jsonl"
    run = record_checked_run(log, counting_error=counting_error, mismatch=mismatch)
    report = build_report(run_records(log, run))
    _validate(report)
    assert report["counting_error"] == counting_error
    assert [c["status"] for c in report["cross_checks"]] == [
        "count_mismatch" if mismatch else "ok",
        "ok",
    ]
    markdown = to_markdown(report)
    html = to_html(report)
    line = f"all streams: target_lines {4 if mismatch else 22} against 22 relayed"
    assert line in markdown
    assert line in html
    if counting_error:
        assert "20 (incomplete: counting stopped: ValueError: bad)" in markdown
        assert "incomplete: counting stopped" in html
    else:
        assert "incomplete" not in markdown
    code, _out, err = _invoke("check", "--log", str(log), "--require-landed")
    assert code == 1  # not checked, always
    assert "stream 'users' of run run-x: not checked" in err
    assert ("count_mismatch" in err) == mismatch
    assert ("counts are incomplete" in err) == bool(counting_error)
    code, _out, err = _invoke("check", "--log", str(log), "--require-landed", "--allow-unchecked")
    assert code == allowed_code, err
    if mismatch:
        assert (
            "all streams of run run-x: count_mismatch, the target reported reading 4 against "
            "22 relayed"
        ) in err


@pytest.mark.parametrize(
    ("records", "code"), [(0, 0), (3, 1)], ids=["no-records-nothing-to-land", "records-unchecked"]
)
def test_a_stream_without_a_landing_result_fails_only_if_it_had_records(
    tmp_path: Path, records: int, code: int
) -> None:
    log = tmp_path / "lineage.jsonl"
    recorder = Recorder(log, run_id="run-y", correlation_id="cid-y")
    recorder.record("run_started", {"pipeline": {"name": "p", "tap": "t", "target": "x"}})
    recorder.record("stream_stats", {"stream": "users", "counts": {"RECORD": records}})
    recorder.record("run_completed", {"status": "success", "records": records, "bytes": 0})
    recorder.close()
    got, _out, err = _invoke("check", "--log", str(log), "--require-landed")
    assert got == code, err
    if code:
        assert "stream 'users' of run run-y: not checked (no landing check ran)" in err
