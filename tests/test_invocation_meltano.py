"""`flext-context run` as a drop-in for `meltano run`: blocks, jobs, flags, under real Meltano."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the test extra
import pytest
from click.testing import CliRunner

from flext_meltano_context import blocks
from flext_meltano_context.cli import cli
from flext_meltano_context.errors import UsageError
from flext_meltano_context.lineage.report import report_schema
from flext_meltano_context.result import result_schema
from tests.test_pipeline_meltano import events, meltano, project, stored_state, wrapper

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_env")]

JOBS = """
jobs:
- name: both
  tasks:
  - tap-counter target-collect
  - tap-counter target-other probe:run
- name: broken-first
  tasks:
  - tap-counter target-broken
  - tap-counter target-other
"""


def job_project(tmp_path: Path) -> Path:
    """The pipeline test project plus a second target, a mapper with a mapping, and jobs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = project(tmp_path)
    other = wrapper(
        tmp_path / "bin" / "target-other", "target_collect.py", str(tmp_path / "o.jsonl")
    )
    mapper = wrapper(tmp_path / "bin" / "mapper-cat", "mapper_filter.py", "--keep-every", "2")
    text = (root / "meltano.yml").read_text()
    text = text.replace(
        "  utilities:\n",
        f"""  - name: target-other
    namespace: target_other
    executable: {other}
  mappers:
  - name: mapper-cat
    namespace: mapper_cat
    executable: {mapper}
    mappings:
    - name: cat-it
      config: {{}}
  utilities:
""",
        1,
    )
    (root / "meltano.yml").write_text(text + JOBS)
    assert meltano(root, "state", "list").returncode == 0  # creates the system database
    return root


def run_report(tmp_path: Path, run_id: str) -> Any:
    """The JSON report of one run in the test's lineage log, checked against its schema."""
    log = ["--log", str(tmp_path / "lineage.jsonl")]
    done = CliRunner().invoke(cli, ["report", run_id, *log], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    jsonschema.validate(report, report_schema())
    return report


def run(root: Path, *args: str, **env: str) -> Any:
    return meltano(root, "invoke", "flext-context", "run", *args, **env)


INVOCATIONS = [
    ("both",),
    ("both", "probe:run"),
    ("probe:run", "tap-counter", "target-collect"),
    ("tap-counter", "cat-it", "target-collect"),
    ("tap-counter", "cat-it", "cat-it", "target-collect", "probe"),
    ("tap-counter", "mapper-cat", "target-collect"),
    ("tap-counter", "probe:run"),
    ("tap-counter",),
    ("tap-counter", "cat-it"),
    ("target-collect",),
    ("cat-it", "target-collect"),
    ("tap-counter", "tap-counter", "target-collect"),
    ("nope",),
]


def test_our_block_rule_matches_meltanos_block_parser_on_the_same_invocations(
    tmp_path: Path,
) -> None:
    root = job_project(tmp_path)
    for words in INVOCATIONS:
        reply = blocks.parse_reply(sys.executable, words, "dev", cwd=root)
        kinds = {k: v["type"] for k, v in reply["plugins"].items() if v}
        mapper_of = {k: v["plugin"] for k, v in reply["plugins"].items() if v and v["mapping"]}
        try:
            ours: Any = blocks.shape(blocks.split(reply["words"], kinds, mapper_of), mapper_of)
        except UsageError as exc:
            ours = str(exc)
        if "meltano_blocks" in reply:
            theirs: Any = [
                ("pipeline", tuple(b["plugins"]))
                if b["kind"] == "pipeline"
                else ("command", b["plugin"], b["command"])
                for b in reply["meltano_blocks"]
            ]
        else:
            theirs = reply["meltano_error"]
        assert ours == theirs, words


def test_dry_run_prints_the_plan_of_a_job_a_mapping_and_a_command_and_starts_nothing(
    tmp_path: Path,
) -> None:
    root = job_project(tmp_path)
    done = run(root, "--dry-run", "both", "probe:run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "job both: tap-counter target-collect tap-counter target-other probe:run" in out
    assert "1. pipeline tap-counter-to-target-collect" in out
    assert "state id: dev:tap-counter-to-target-collect" in out
    assert "2. pipeline tap-counter-to-target-other" in out
    assert "then: meltano --environment=dev invoke probe:run" in out
    assert "catalog: discovery by tap-counter" in out
    assert "meltano --environment=dev state get dev:tap-counter-to-target-other" in out
    mapped = run(
        root, "--dry-run", "--state-id-suffix", "s1", "tap-counter", "cat-it", "target-collect"
    )
    assert mapped.returncode == 0, mapped.stderr
    assert "mapping cat-it (mapper mapper-cat)" in mapped.stdout
    assert "state id: dev:tap-counter-to-target-collect:s1" in mapped.stdout
    alone = run(root, "--dry-run", "probe:run")
    assert alone.returncode == 0, alone.stderr
    assert "1. command probe:run" in alone.stdout
    assert not (tmp_path / "lineage.jsonl").exists()
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "probe.json").exists()


def test_a_bad_block_sequence_exits_2_in_meltanos_words(tmp_path: Path) -> None:
    root = job_project(tmp_path)
    done = run(root, "tap-counter", "probe:run")
    assert done.returncode == 2
    assert "Unknown command type or bad block sequence at index 1" in done.stderr
    assert not (tmp_path / "lineage.jsonl").exists()


def test_a_job_runs_each_pair_with_one_correlation_id_and_state_like_meltano_run(
    tmp_path: Path,
) -> None:
    root = job_project(tmp_path)
    result_path = tmp_path / "result.json"
    given = str(uuid.uuid4())
    done = run(root, "--run-id", given, "--result-json", str(result_path), "both")
    assert done.returncode == 0, done.stderr
    result = json.loads(result_path.read_text())
    jsonschema.validate(result, result_schema())
    assert result["status"] == "success"
    assert result["correlation_id"] == given
    names = [p["name"] for p in result["pipelines"]]
    assert names == ["tap-counter-to-target-collect", "tap-counter-to-target-other"]
    assert all(p["streams"]["users"]["records"] == 10 for p in result["pipelines"])
    parent, *started = events(tmp_path, "run_started")
    assert parent["run_id"] == result["invocation_id"]
    assert parent["data"]["invocation"]["blocks"] == [
        "tap-counter", "target-collect", "tap-counter", "target-other", "probe:run"
    ]  # fmt: skip
    assert [e["correlation_id"] for e in (parent, *started)] == [given, given, given]
    run_ids = [e["run_id"] for e in started]
    assert run_ids == [p["run_id"] for p in result["pipelines"]]
    assert {e["data"]["openlineage_parent"]["run"]["runId"] for e in started} == {
        result["invocation_id"]
    }
    closed = [e for e in events(tmp_path, "run_completed") if e["run_id"] == parent["run_id"]]
    assert closed[0]["data"]["child_run_ids"] == run_ids
    assert closed[0]["data"]["status"] == "success"
    assert closed[0]["data"]["records"] == 20
    # `runs` lists the parent and its children; the parent has a report like any run.
    listed = meltano(root, "invoke", "flext-context", "runs", "--format", "json")
    assert [r["run_id"] for r in json.loads(listed.stdout)][::-1] == [parent["run_id"], *run_ids]
    report = meltano(root, "invoke", "flext-context", "report", parent["run_id"])
    assert report.returncode == 0, report.stderr
    parent_report = json.loads(report.stdout)
    assert parent_report["records"] == 20
    jsonschema.validate(parent_report, report_schema())
    children = parent_report["invocation"]["children"]
    assert [(c["name"], c["run_id"], c["status"], c["records"]) for c in children] == [
        ("tap-counter-to-target-collect", run_ids[0], "success", 10),
        ("tap-counter-to-target-other", run_ids[1], "success", 10),
    ]
    assert all(c["duration_s"] > 0 for c in children)
    assert [row["stream"] for c in children for row in c["landing"]] == ["users", "users"]
    assert parent_report["invocation"]["blocks"][-1] == "probe:run"
    assert parent_report["mapped"] is None
    for fmt, marker in (("markdown", "### Invocation"), ("html", "<h2>Invocation</h2>")):
        shown = meltano(
            root, "invoke", "flext-context", "report", parent["run_id"], "--format", fmt
        )
        assert shown.returncode == 0, shown.stderr
        assert marker in shown.stdout
        assert run_ids[0] in shown.stdout
        assert run_ids[1] in shown.stdout
        assert "tap-counter-to-target-other" in shown.stdout
    child_report = json.loads(meltano(root, "invoke", "flext-context", "report", run_ids[0]).stdout)
    assert child_report["invocation"] is None  # a child pipeline's own report: no table
    lineage_events = meltano(
        root, "invoke", "flext-context", "report", parent["run_id"], "--format", "openlineage"
    )
    assert [json.loads(x)["eventType"] for x in lineage_events.stdout.splitlines()] == [
        "START",
        "COMPLETE",
    ]
    # `check` on the invocation applies the rules to each pipeline, or to the one named.
    log = ["--log", str(tmp_path / "lineage.jsonl")]
    ok = CliRunner().invoke(cli, ["check", parent["run_id"], "--min-records", "users=10", *log])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("run ") == 2
    bad = CliRunner().invoke(cli, ["check", "--require-success", "--min-records", "users=11", *log])
    assert bad.exit_code == 1  # --last is the last child here: one pipeline's run
    both = CliRunner().invoke(cli, ["check", parent["run_id"], "--min-records", "users=11", *log])
    assert both.exit_code == 1
    assert "tap-counter-to-target-collect:" in both.output
    assert "tap-counter-to-target-other:" in both.output
    one = CliRunner().invoke(
        cli, ["check", parent["run_id"], "--pipeline", "tap-counter-to-target-other", *log]
    )
    assert one.exit_code == 0, one.output
    assert run_ids[1] in one.output
    assert run_ids[0] not in one.output
    none = CliRunner().invoke(cli, ["check", parent["run_id"], "--pipeline", "nope", *log])
    assert none.exit_code == 2
    probe_env = json.loads((tmp_path / "probe.json").read_text())["env"]
    assert probe_env["FLEXT_CORRELATION_ID"] == given
    # `meltano run` on the same job, in a twin project, stores the same bookmarks per pair.
    twin = job_project(tmp_path / "twin")
    assert meltano(twin, "run", "both").returncode == 0
    for sid in ("dev:tap-counter-to-target-collect", "dev:tap-counter-to-target-other"):
        ours = stored_state(root, sid)["singer_state"]
        theirs = stored_state(twin, sid)["singer_state"]
        assert ours["bookmarks"] == theirs["bookmarks"] == {"users": {"id": 10}}


def test_a_failed_pair_skips_the_rest_as_meltano_run_does(tmp_path: Path) -> None:
    root = job_project(tmp_path)
    result_path = tmp_path / "result.json"
    done = run(root, "--result-json", str(result_path), "broken-first")
    assert done.returncode == 1
    result = json.loads(result_path.read_text())
    jsonschema.validate(result, result_schema())
    assert [p["status"] for p in result["pipelines"]] == ["failed", "skipped"]
    assert "target-broken" in result["pipelines"][0]["error"]
    assert result["pipelines"][1]["run_id"] is None
    assert not (tmp_path / "o.jsonl").exists()
    shown = run_report(tmp_path, result["invocation_id"])
    rows = [(c["status"], c["run_id"] is None) for c in shown["invocation"]["children"]]
    assert rows == [("failed", False), ("skipped", True)]
    assert "target-broken" in shown["invocation"]["children"][0]["error"]
    log = ["--log", str(tmp_path / "lineage.jsonl")]
    markdown = CliRunner().invoke(
        cli, ["report", result["invocation_id"], "--format", "markdown", *log]
    )
    assert "| tap-counter-to-target-other | - | ⏭️ skipped | - | - | - |" in markdown.output
    assert stored_state(root, "dev:tap-counter-to-target-other") == {}


def test_no_state_update_neither_loads_nor_stores_state(tmp_path: Path) -> None:
    root = job_project(tmp_path)
    assert run(root, "tap-counter", "target-collect").returncode == 0
    before = stored_state(root, "dev:tap-counter-to-target-collect")
    done = run(root, "--no-state-update", "tap-counter", "target-collect")
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == [*range(1, 11), *range(1, 11)]  # the second run did not resume
    assert stored_state(root, "dev:tap-counter-to-target-collect") == before
    assert not list((root / ".meltano" / "flext-context" / "no-state-update").iterdir())


@pytest.mark.parametrize(
    ("strategy", "full_refresh"),
    [("auto", False), ("auto", True), ("merge", False), ("overwrite", False), ("overwrite", True)],
    ids=["auto", "auto-full-refresh", "merge", "overwrite", "overwrite-full-refresh"],
)
def test_state_strategy_stores_what_meltano_run_stores(
    tmp_path: Path, strategy: str, full_refresh: bool
) -> None:
    seed = json.dumps({"singer_state": {"bookmarks": {"users": {"id": 3}, "orders": {"id": 7}}}})
    sid = "dev:tap-counter-to-target-collect"
    stored = []
    for name, command in (("ours", ("invoke", "flext-context", "run")), ("theirs", ("run",))):
        root = job_project(tmp_path / name)
        assert meltano(root, "state", "set", "--force", sid, seed).returncode == 0
        flags = ["--state-strategy", strategy, *(["--full-refresh"] if full_refresh else [])]
        done = meltano(root, *command, *flags, "tap-counter", "target-collect")
        assert done.returncode == 0, done.stderr
        value = stored_state(root, sid)["singer_state"]
        value.pop("flext_context", None)
        stored.append(value)
    assert stored[0] == stored[1]


def test_a_mapping_inside_run_is_counted_on_both_sides_and_keeps_state_like_meltano_run(
    tmp_path: Path,
) -> None:
    root = job_project(tmp_path)
    result_path = tmp_path / "result.json"
    done = run(root, "--result-json", str(result_path), "tap-counter", "cat-it", "target-collect")
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == [2, 4, 6, 8, 10]  # the mapper kept every second record
    result = json.loads(result_path.read_text())
    jsonschema.validate(result, result_schema())
    (pipeline,) = result["pipelines"]
    assert pipeline["mappings"] == ["cat-it"]
    assert pipeline["streams"]["users"]["tap_records"] == 10
    assert pipeline["streams"]["users"]["records"] == 5
    (both,) = events(tmp_path, "mapped_streams")
    assert both["data"]["tap_side"] == {"users": 10}
    assert both["data"]["target_side"] == {"users": 5}
    assert both["run_id"] == pipeline["run_id"]
    shown = run_report(tmp_path, pipeline["run_id"])
    assert shown["mapped"] == {
        "mappings": ["cat-it"],
        "streams": [
            {
                "stream": "users",
                "tap_records": 10,
                "target_records": 5,
                "change": "filtered: 5 fewer",
            }
        ],
    }
    log = ["--log", str(tmp_path / "lineage.jsonl")]
    markdown = CliRunner().invoke(cli, ["report", pipeline["run_id"], "--format", "markdown", *log])
    assert "| users | 10 | 5 | filtered: 5 fewer |" in markdown.output
    html = CliRunner().invoke(cli, ["report", pipeline["run_id"], "--format", "html", *log]).output
    assert "<h2>Mapped by cat-it</h2>" in html
    assert "<td>filtered: 5 fewer</td>" in html
    sid = "dev:tap-counter-to-target-collect"
    (started,) = events(tmp_path, "run_started")
    assert started["data"]["pipeline"]["mode"] == "meltano"  # in the log itself, not only result
    assert started["data"]["pipeline"]["state_id"] == sid
    (persisted,) = events(tmp_path, "state_persisted")
    assert persisted["data"]["state_id"] == sid
    assert persisted["data"]["confirmed_states"] >= 1
    twin = job_project(tmp_path / "twin")
    assert meltano(twin, "run", "tap-counter", "cat-it", "target-collect").returncode == 0
    ours, theirs = stored_state(root, sid)["singer_state"], stored_state(twin, sid)["singer_state"]
    assert ours["bookmarks"] == theirs["bookmarks"] == {"users": {"id": 10}}
    again = run(root, "tap-counter", "cat-it", "target-collect")
    assert again.returncode == 0, again.stderr
    argv = json.loads((tmp_path / "tap.env").read_text())["argv"]
    assert "--state" in argv  # the second run resumed from the stored state
    assert stored_state(root, sid)["singer_state"]["bookmarks"] == {"users": {"id": 20}}


def test_a_mapped_pair_stores_each_confirmed_state_so_a_target_crash_keeps_it_as_meltano_run(
    tmp_path: Path,
) -> None:
    root = job_project(tmp_path)
    twin = job_project(tmp_path / "twin")
    sid = "dev:tap-counter-to-target-broken"
    done = run(root, "tap-counter", "cat-it", "target-broken")
    assert done.returncode == 1
    theirs = meltano(twin, "run", "tap-counter", "cat-it", "target-broken")
    assert theirs.returncode != 0
    ours = stored_state(root, sid)["singer_state"]
    assert ours["bookmarks"] == stored_state(twin, sid)["singer_state"]["bookmarks"]
    assert ours["bookmarks"]["users"]["id"] < 10  # confirmed before the crash, not the tap's last
    (started,) = events(tmp_path, "run_started")
    assert ours["flext_context"]["run_id"] == started["run_id"]
    (persisted,) = events(tmp_path, "state_persisted")
    assert persisted["data"]["state_id"] == sid


def test_a_mapped_pair_stores_a_confirmed_state_while_the_pair_still_runs(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from tests.test_pipeline_meltano import BIN

    root = job_project(tmp_path)
    out = tmp_path / "out.jsonl"
    wrapper(tmp_path / "bin" / "target-collect", "target_collect.py", str(out), "--slow", "2")
    sid = "dev:tap-counter-to-target-collect"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    argv = [str(BIN / "meltano"), "invoke", "flext-context", "run"]
    proc = subprocess.Popen(
        [*argv, "tap-counter", "cat-it", "target-collect"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        stored: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while not stored and proc.poll() is None and time.monotonic() < deadline:
            stored = stored_state(root, sid)
        running = proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no end of the pair to store anything at
        proc.wait()
    assert running  # the state was stored while the target was still loading
    assert 0 < stored["singer_state"]["bookmarks"]["users"]["id"] < 10
    lines = len(out.read_text().splitlines())
    assert lines < 5  # the target had not taken every record yet
    assert stored_state(root, sid) == stored  # what was confirmed stays after the crash


def test_a_failing_mapper_fails_the_pipeline_and_leaves_state_untouched(tmp_path: Path) -> None:
    root = job_project(tmp_path)
    wrapper(tmp_path / "bin" / "mapper-cat", "mapper_filter.py", "--keep-every", "0")  # crashes
    done = run(root, "tap-counter", "cat-it", "target-collect")
    assert done.returncode == 1
    assert stored_state(root, "dev:tap-counter-to-target-collect") == {}


def test_install_options_install_through_meltano_first_and_only_install_runs_nothing(
    tmp_path: Path,
) -> None:
    root = job_project(tmp_path)
    text = (root / "meltano.yml").read_text()
    broken = "  - name: target-nowhere\n    namespace: target_nowhere\n"
    broken += f"    pip_url: {tmp_path / 'no-such-package'}\n"
    (root / "meltano.yml").write_text(text.replace("  mappers:\n", broken + "  mappers:\n", 1))
    planned = run(root, "--dry-run", "--only-install", "both")
    assert planned.returncode == 0, planned.stderr
    assert "install: meltano --environment=dev run --only-install tap-counter" in planned.stdout
    only = run(root, "--only-install", "tap-counter", "cat-it", "target-collect")
    assert only.returncode == 0, only.stderr
    assert "tap-counter" in only.stderr  # Meltano's own install messages, on stderr
    assert not (tmp_path / "lineage.jsonl").exists()  # nothing ran
    assert not (tmp_path / "out.jsonl").exists()
    installed = run(root, "--install", "tap-counter", "target-collect")
    assert installed.returncode == 0, installed.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 10
    # A real install that fails: as `meltano run`, Meltano says so and the blocks still run,
    # so the pipeline fails on the plugin it could not install.
    failing = run(root, "--install", "tap-counter", "target-nowhere")
    assert failing.returncode != 0
    assert "Installing loader 'target-nowhere'" in failing.stderr
    assert "Installation failed" in failing.stderr
    assert "cannot start target-nowhere" in failing.stderr
