"""The run options: each wins over its variable, Meltano-only flags fail in standalone mode."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]  # no stubs in the test extra
import pytest
from click.testing import CliRunner

from flext_meltano_context import blocks, options, strategy
from flext_meltano_context.cli import cli
from flext_meltano_context.errors import UsageError
from flext_meltano_context.pipeline import Settings
from flext_meltano_context.result import result_schema
from tests.conftest import FAKES

pytestmark = pytest.mark.usefixtures("clean_env")


def fake(script: str, *args: str) -> str:
    return " ".join([sys.executable, str(FAKES / script), *args])


def test_options_win_over_their_variables_and_unset_options_leave_them() -> None:
    env = {
        "FLEXT_CONTEXT_STRICT": "true",
        "FLEXT_CONTEXT_LANDING": "true",
        "FLEXT_CONTEXT_GRACE_SECONDS": "30",
        "FLEXT_CONTEXT_RECORD_COLUMN_STREAMS": "a",
        "FLEXT_CONTEXT_INJECT_STATE": "false",
    }
    overrides = options.setting_overrides(
        strict=False, landing=False, grace_seconds=2.5, log_path="x/l.jsonl"
    )
    settings = Settings.from_env({**env, **overrides})
    assert (settings.strict, settings.landing, settings.grace_seconds) == (False, False, 2.5)
    assert settings.lineage_path == Path("x/l.jsonl").absolute()
    assert settings.record_column_streams == frozenset({"a"})  # not given: the variable holds
    kept = Settings.from_env({**env, **options.setting_overrides()})
    assert (kept.strict, kept.landing, kept.inject_state) == (True, True, False)
    assert options.setting_overrides(timeout=9) == {"FLEXT_CONTEXT_TIMEOUT": "9"}
    store = "postgresql://writer@db.example:5432/ops"
    assert options.setting_overrides(log_path=store) == {"FLEXT_CONTEXT_LINEAGE_PATH": store}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state-id-suffix", "x"], "--state-id-suffix is for Meltano mode"),
        (["--refresh-catalog"], "--refresh-catalog is for Meltano mode"),
        (["--state-strategy", "merge"], "--state-strategy is for Meltano mode"),
        (["--run-id", "not-a-uuid"], "must be a UUID"),
        (["--install"], "--install is for Meltano mode"),
        (["--only-install"], "--only-install is for Meltano mode"),
    ],
    ids=["suffix", "refresh-catalog", "strategy", "run-id", "install", "only-install"],
)
def test_meltano_only_flags_and_bad_run_ids_are_errors_in_standalone_mode(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--tap-cmd",
            fake("tap_counter.py"),
            "--target-cmd",
            fake("target_collect.py", str(out)),
            *args,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_a_meltano_flag_is_read_from_its_meltano_run_variable(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--tap-cmd",
            fake("tap_counter.py"),
            "--target-cmd",
            fake("target_collect.py", str(out)),
        ],
        env={"MELTANO_RUN_STATE_ID_SUFFIX": "x"},
        catch_exceptions=False,
    )
    assert result.exit_code == 2
    assert "--state-id-suffix is for Meltano mode" in result.output


def test_standalone_run_writes_a_valid_result_with_the_given_run_id_as_correlation(
    tmp_path: Path,
) -> None:
    out, log, result_path = tmp_path / "out.jsonl", tmp_path / "l.jsonl", tmp_path / "r.json"
    given = str(uuid.uuid4())
    result = CliRunner().invoke(
        cli,
        [
            "run", "--tap-cmd", fake("tap_counter.py", "--records", "7"),
            "--target-cmd", fake("target_collect.py", str(out)),
            "--run-id", given, "--log", str(log), "--result-json", str(result_path), "--no-landing",
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result_path.read_text())
    jsonschema.validate(data, result_schema())
    assert data["correlation_id"] == given
    (pipeline,) = data["pipelines"]
    assert pipeline["streams"] == {"users": {"records": 7, "landed": None, "landing": None}}
    started = [json.loads(x) for x in log.read_text().splitlines()]
    assert started[0]["correlation_id"] == given
    assert pipeline["run_id"] == started[0]["run_id"]
    # One block: the pipeline is the invocation's only run, no parent run.
    assert [e["run_id"] for e in started if e["event"] == "run_started"] == [pipeline["run_id"]]


def test_a_failed_standalone_run_is_in_the_result_file_with_its_error(tmp_path: Path) -> None:
    out, result_path = tmp_path / "out.jsonl", tmp_path / "r.json"
    result = CliRunner().invoke(
        cli,
        [
            "run", "--tap-cmd", fake("tap_counter.py"),
            "--target-cmd", fake("target_collect.py", str(out), "--exit-after", "2"),
            "--log", str(tmp_path / "l.jsonl"), "--result-json", str(result_path),
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 1
    data = json.loads(result_path.read_text())
    jsonschema.validate(data, result_schema())
    assert data["status"] == "failed"
    assert data["pipelines"][0]["status"] == "failed"
    assert "exited with 5" in data["pipelines"][0]["error"]


def test_dry_run_in_standalone_mode_prints_the_commands_and_starts_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--dry-run",
            "--tap-cmd",
            fake("tap_counter.py"),
            "--target-cmd",
            fake("target_collect.py", str(out)),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0
    assert "tap: " in result.output
    assert "tap_counter.py" in result.output
    assert not out.exists()


KINDS = {"t": "extractors", "u": "loaders", "m": "mappers", "d": "utilities", "x": "mappers"}


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["t", "u"], [blocks.Pipeline("t", "u")]),
        (["t", "m", "u", "d:run"], [blocks.Pipeline("t", "u", ("m",)), blocks.Command("d:run")]),
        (
            ["d", "t", "u", "t", "u"],
            [blocks.Command("d"), blocks.Pipeline("t", "u")] * 1 + [blocks.Pipeline("t", "u")],
        ),
    ],
    ids=["pair", "mapping-and-command", "command-first-two-pairs"],
)
def test_split_forms_meltanos_blocks(words: list[str], expected: list[object]) -> None:
    assert blocks.split(words, KINDS, {"m": "x"}) == expected


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["t"], "Loader missing in block set!"),
        (["t", "d"], "bad block sequence at index 1, starting block 't'"),
        (["u"], "bad block sequence at index 1, starting block 'u'"),
        (["t", "x", "u"], "Expected unique mappings name not the mapper plugin name: x."),
        (["zz"], "Block zz not found"),
    ],
    ids=["no-loader", "command-in-pair", "loader-first", "mapper-not-mapping", "unknown"],
)
def test_split_rejects_what_meltano_rejects(words: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        blocks.split(words, KINDS, {"m": "x"})


def test_commands_after_a_pipeline_join_it_and_commands_first_stay_alone() -> None:
    found = blocks.attach_commands(
        [blocks.Command("d:a"), blocks.Pipeline("t", "u"), blocks.Command("d:b")]
    )
    assert found == (blocks.Command("d:a"), blocks.Pipeline("t", "u", commands=("d:b",)))


def test_deep_merge_keeps_old_bookmarks_and_takes_new_values() -> None:
    old = {"bookmarks": {"a": {"id": 1}, "b": {"id": 2}}}
    new = {"bookmarks": {"a": {"id": 5}}}
    assert strategy.deep_merge(old, new) == {"bookmarks": {"a": {"id": 5}, "b": {"id": 2}}}
    assert old == {"bookmarks": {"a": {"id": 1}, "b": {"id": 2}}}  # inputs untouched


def test_help_texts_the_review_found_wrong_read_right() -> None:
    runner = CliRunner()
    check = runner.invoke(cli, ["check", "--help"], catch_exceptions=False).output
    assert "%%" not in check
    assert "more than P percent" in check
    top = runner.invoke(cli, ["--help"], catch_exceptions=False).output
    assert "default: info" in top
    assert "INFO" not in top
    report = runner.invoke(cli, ["report", "--help"], catch_exceptions=False).output
    assert "instead of stdout" in report
    run = runner.invoke(cli, ["run", "--help"], catch_exceptions=False).output
    assert "Standalone: the target's config" not in run
    for flag in ("MELTANO_RUN_FULL_REFRESH", "MELTANO_RUN_STATE_STRATEGY", "MELTANO_RUN_ID"):
        assert flag in run


def test_timeout_stops_the_run_gracefully_and_exits_1_as_meltano_run(tmp_path: Path) -> None:
    import subprocess
    import time

    from tests.test_pipeline_meltano import BIN

    out, result_path = tmp_path / "out.jsonl", tmp_path / "r.json"
    argv = [
        str(BIN / "flext-context"), "run", "--tap-cmd", fake("tap_counter.py", "--hang"),
        "--target-cmd", fake("target_collect.py", str(out)), "--state-out", str(tmp_path / "s"),
        "--timeout", "2", "--log", str(tmp_path / "l.jsonl"), "--result-json", str(result_path),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert 2 <= time.monotonic() - started < 60
    assert "timed out after 2 s" in done.stderr
    data = json.loads(result_path.read_text())
    assert data["status"] == "failed"  # as the run loop records a timeout: failed, exit 1
    assert len(out.read_text().splitlines()) == 10  # what was relayed stayed delivered
    assert json.loads((tmp_path / "s").read_text())["bookmarks"] == {"users": {"id": 10}}


def test_without_a_timeout_the_same_run_is_not_stopped(tmp_path: Path) -> None:
    import subprocess

    from tests.test_pipeline_meltano import BIN

    argv = [
        str(BIN / "flext-context"), "run", "--tap-cmd", fake("tap_counter.py"),
        "--target-cmd", fake("target_collect.py", str(tmp_path / "o")),
        "--timeout", "60", "--log", str(tmp_path / "l.jsonl"),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_install_options_become_meltanos_own_install_run_and_the_last_one_wins(
    tmp_path: Path,
) -> None:
    words = ("tap-x", "cat-it", "target-y", "dbt:run")
    plan = blocks.Plan((), words, environment="dev")
    env = {"MELTANO_PROJECT_ROOT": str(tmp_path), "PATH": "", "MELTANO_SYS_DIR_ROOT": "/nowhere"}
    with pytest.raises(UsageError, match="Meltano was not found"):
        options.install_argv(plan, env, "install")  # no Meltano to be found: said so
    (tmp_path / "run").mkdir()
    exe = tmp_path / "run" / "bin"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    env["MELTANO_SYS_DIR_ROOT"] = str(tmp_path)
    head = [str(exe), "--log-level=info", "--environment=dev", "run"]
    assert options.install_argv(plan, env, "install") == [*head, "--dry-run", "--install", *words]
    assert options.install_argv(plan, env, "only_install") == [*head, "--only-install", *words]
    assert options.install_argv(plan, env, "no_install") is None
    with pytest.raises(UsageError, match="install mode must be one of"):
        options.flags(install="sometimes")
    # As click does for meltano run's three flags (one destination): the last one given wins.
    runner = CliRunner()
    out = runner.invoke(
        cli,
        ["run", "--install", "--no-install", "--tap-cmd", fake("tap_counter.py"),
         "--target-cmd", fake("target_collect.py", "/dev/null"), "--dry-run"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output  # --no-install is allowed in standalone mode
    refused = runner.invoke(
        cli,
        ["run", "--no-install", "--only-install", "--tap-cmd", fake("tap_counter.py"),
         "--target-cmd", fake("target_collect.py", "/dev/null"), "--dry-run"],
    )  # fmt: skip
    assert refused.exit_code == 2
    assert "--only-install is for Meltano mode" in refused.output


def test_the_report_names_what_a_mapper_did_to_each_stream() -> None:
    from flext_meltano_context.lineage.report import _mapped

    shown = _mapped(
        {
            "mappings": ["m"],
            "tap_side": {"kept": 3, "cut": 5, "split": 2, "gone": 4},
            "target_side": {"kept": 3, "cut": 1, "split": 6, "new": 2},
        }
    )
    changes = {row["stream"]: row["change"] for row in shown["streams"]}
    assert changes == {
        "cut": "filtered: 4 fewer",
        "gone": "dropped by the mapper",
        "kept": "unchanged",
        "new": "made by the mapper",
        "split": "split: 4 more",
    }
    unseen = _mapped({"mappings": ["m"], "tap_side": None, "target_side": {"a": 1}})
    assert unseen["streams"] == [
        {
            "stream": "a",
            "tap_records": None,
            "target_records": 1,
            "change": "not counted at the tap",
        }
    ]
