"""The run's identity and what every child process is given."""

from __future__ import annotations

import json

from flext_meltano_context import ids
from flext_meltano_context.runenv import child_environ, identity_from_env, phase_env

ROOT_RUN = "01a21700-0000-7000-8000-000000000001"
PARENT_RUN = "01a21700-0000-7000-8000-000000000002"
AIRFLOW = {
    "OPENLINEAGE_CONTEXT": json.dumps(
        {
            "parent": {
                "run": {"runId": PARENT_RUN},
                "job": {"namespace": "airflow", "name": "dag.task"},
                "root": {
                    "run": {"runId": ROOT_RUN},
                    "job": {"namespace": "airflow", "name": "dag"},
                },
            }
        }
    )
}


def test_a_new_run_correlates_by_its_own_run_id() -> None:
    identity = identity_from_env({}, job_name="tap-to-target")
    assert identity.correlation_id == identity.run_id
    assert identity.inherited_from is None
    assert identity.trace_id == ids.trace_id_of(identity.run_id)


def test_correlation_is_inherited_in_precedence_order() -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    tp = f"00-{trace}-b7ad6b7169203331-01"
    both = identity_from_env(
        {"FLEXT_CORRELATION_ID": "ci-42", "TRACEPARENT": tp, **AIRFLOW}, job_name="j"
    )
    assert (both.correlation_id, both.inherited_from) == ("ci-42", "FLEXT_CORRELATION_ID")
    traced = identity_from_env({"TRACEPARENT": tp, **AIRFLOW}, job_name="j")
    assert traced.inherited_from == "TRACEPARENT"
    assert traced.trace_id == trace
    lineage = identity_from_env(AIRFLOW, job_name="j")
    assert (lineage.correlation_id, lineage.inherited_from) == (ROOT_RUN, "OPENLINEAGE_CONTEXT")
    assert lineage.correlation_id != lineage.run_id


def test_a_malformed_inherited_id_is_ignored() -> None:
    identity = identity_from_env(
        {"FLEXT_CORRELATION_ID": "bad id with spaces", "TRACEPARENT": "junk"}, job_name="j"
    )
    assert identity.correlation_id == identity.run_id


def test_every_phase_gets_the_same_correlation_and_trace_but_its_own_span_and_run() -> None:
    identity = identity_from_env({"FLEXT_PARENT_CORRELATION_ID": "outer", **AIRFLOW}, job_name="j")
    extract = phase_env(identity, phase="extract", kind="extract", phase_run_id=ids.uuid7())
    load = phase_env(identity, phase="load", kind="load", phase_run_id=ids.uuid7())
    for env in (extract, load):
        assert env["FLEXT_CORRELATION_ID"] == identity.correlation_id
        assert env["FLEXT_RUN_ID"] == env["MELTANO_RUN_ID"] == identity.run_id
        assert env["FLEXT_PARENT_CORRELATION_ID"] == "outer"
        assert env["DBT_ENV_CUSTOM_ENV_FLEXT_CORRELATION_ID"] == identity.correlation_id
        assert ids.parse_traceparent(env["TRACEPARENT"]) is not None
        assert env["OPENLINEAGE_ROOT_PARENT_ID"] == f"airflow/dag/{ROOT_RUN}"
    assert extract["TRACEPARENT"][3:35] == load["TRACEPARENT"][3:35]
    assert extract["TRACEPARENT"] != load["TRACEPARENT"]
    parent = json.loads(extract["OPENLINEAGE_CONTEXT"])["parent"]
    assert parent["job"] == {"namespace": "flext-context", "name": "j.extract"}
    assert parent["root"]["run"]["runId"] == ROOT_RUN
    assert extract["OPENLINEAGE_PARENT_ID"].startswith("flext-context/j.extract/")


def test_child_environment_replaces_inherited_run_variables() -> None:
    identity = identity_from_env({}, job_name="j")
    overlay = phase_env(identity, phase="load", kind="load", phase_run_id=ids.uuid7())
    env = child_environ({"PATH": "/bin", "FLEXT_PARENT_CORRELATION_ID": "stale"}, overlay)
    assert env["PATH"] == "/bin"
    assert "FLEXT_PARENT_CORRELATION_ID" not in env
