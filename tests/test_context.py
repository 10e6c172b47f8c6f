"""The FlextContext API: nesting, isolation, propagation, and bad input that never raises."""

from __future__ import annotations

import asyncio
import threading
import types
import uuid
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

import flext_meltano_context
from flext_meltano_context import FlextContext, ids
from flext_meltano_context.logs import add_context

Correlation = FlextContext.Correlation
Serialization = FlextContext.Serialization


@pytest.fixture(autouse=True)
def _empty_context() -> Iterator[None]:
    FlextContext.Utilities.clear_context()
    yield
    FlextContext.Utilities.clear_context()


def test_seed_example_runs_as_documented() -> None:
    with Correlation.new_correlation() as cid:
        with FlextContext.Service.service_context("meltano-etl", "1.0"):
            with FlextContext.Performance.timed_operation("extract") as perf:
                FlextContext.Performance.add_operation_metadata("records", 10)
            headers = Serialization.get_correlation_context()
    assert headers["X-Correlation-Id"] == cid
    assert perf["duration_seconds"] >= 0
    assert perf["metadata"] == {"records": 10}
    assert headers["X-Service-Name"] == "meltano-etl"


def test_uuid7_ids_are_version_7_and_time_ordered() -> None:
    made = [ids.uuid7() for _ in range(5000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    parsed = uuid.UUID(made[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_new_correlation_nests_and_restores_the_outer_id() -> None:
    with Correlation.new_correlation() as outer:
        with Correlation.new_correlation() as inner:
            assert Correlation.get_correlation_id() == inner
            assert Correlation.get_parent_correlation_id() == outer
        assert Correlation.get_correlation_id() == outer
        assert Correlation.get_parent_correlation_id() is None
    assert Correlation.get_correlation_id() is None


def test_context_is_restored_when_the_block_raises() -> None:
    with Correlation.new_correlation() as outer:
        with pytest.raises(RuntimeError), FlextContext.Service.service_context("svc"):
            with Correlation.new_correlation():
                raise RuntimeError("boom")
        assert Correlation.get_correlation_id() == outer
        assert FlextContext.Service.get_service_name() is None


def test_inherit_correlation_prefers_current_then_environment_then_new() -> None:
    with Correlation.new_correlation() as cid, Correlation.inherit_correlation() as got:
        assert got == cid
    imported = ids.uuid7()
    with Correlation.inherit_correlation({"FLEXT_CORRELATION_ID": imported}) as got:
        assert got == imported
    with Correlation.inherit_correlation({}) as got:
        assert uuid.UUID(got).version == 7
    assert Correlation.get_correlation_id() is None


def test_set_correlation_id_rejects_a_malformed_id() -> None:
    with pytest.raises(ValueError, match="not a valid id"):
        Correlation.set_correlation_id("has spaces and\nnewlines")
    Correlation.set_correlation_id("job-42")
    assert Correlation.get_correlation_id() == "job-42"


def test_request_context_defaults_a_request_id_and_freezes_metadata() -> None:
    meta = {"tenant": "acme"}
    with FlextContext.Request.request_context(user_id="u1", operation_name="sync", metadata=meta):
        meta["tenant"] = "changed later"
        assert FlextContext.Request.get_request_metadata() == {"tenant": "acme"}
        assert FlextContext.Request.get_user_id() == "u1"
        assert FlextContext.Request.get_operation_name() == "sync"
        request_id = FlextContext.Request.get_request_id()
        assert request_id is not None
        assert uuid.UUID(request_id).version == 7
    assert FlextContext.Request.get_request_id() is None


def test_nested_timed_operations_form_a_tree_of_spans() -> None:
    with FlextContext.Performance.timed_operation("pipeline") as root:
        with FlextContext.Performance.timed_operation("extract") as child:
            FlextContext.Performance.add_operation_metadata("rows", 3)
            assert FlextContext.Performance.get_operation_metadata() == {"rows": 3}
        with FlextContext.Performance.timed_operation("load"):
            pass
        assert FlextContext.Performance.get_operation_metadata() == {}
    assert [c["operation"] for c in root["children"]] == ["extract", "load"]
    assert child["parent_span_id"] == root["span_id"]
    assert root["parent_span_id"] is None
    assert root["end_time"] >= child["end_time"] >= child["start_time"] >= root["start_time"]
    assert root["duration_seconds"] >= child["duration_seconds"]


def test_traceparent_carries_the_correlation_id_and_current_span() -> None:
    with Correlation.new_correlation() as cid, FlextContext.Performance.timed_operation("x") as op:
        tp = Serialization.get_correlation_context()["traceparent"]
    assert tp == f"00-{uuid.UUID(cid).hex}-{op['span_id']}-01"


def test_to_env_uses_exactly_the_documented_names() -> None:
    with Correlation.new_correlation(), Correlation.new_correlation() as cid:
        with FlextContext.Service.service_context("etl"):
            env = Serialization.to_env()
    assert set(env) >= {
        "FLEXT_CORRELATION_ID",
        "FLEXT_PARENT_CORRELATION_ID",
        "FLEXT_SERVICE_NAME",
        "MELTANO_RUN_ID",
        "TRACEPARENT",
    }
    assert env["MELTANO_RUN_ID"] == cid == env["FLEXT_CORRELATION_ID"]
    assert ids.parse_traceparent(env["TRACEPARENT"]) is not None


def test_a_non_uuid_correlation_id_exports_no_run_id_or_traceparent() -> None:
    Correlation.set_correlation_id("airflow-run-7")
    env = Serialization.to_env()
    assert env["FLEXT_CORRELATION_ID"] == "airflow-run-7"
    assert "MELTANO_RUN_ID" not in env
    assert "TRACEPARENT" not in env


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.", min_size=1, max_size=30)


@given(service=_names, version=st.one_of(st.none(), _names))
def test_to_env_and_from_env_round_trip(service: str, version: str | None) -> None:
    FlextContext.Utilities.clear_context()
    with Correlation.new_correlation() as outer, Correlation.new_correlation() as inner:
        with FlextContext.Service.service_context(service, version):
            env = Serialization.to_env()
            headers = Serialization.get_correlation_context()
    for carrier in (env, headers, {k.lower(): v for k, v in headers.items()}):
        FlextContext.Utilities.clear_context()
        Serialization.from_env(carrier) if carrier is env else Serialization.set_from_context(
            carrier
        )
        assert Correlation.get_correlation_id() == inner
        assert Correlation.get_parent_correlation_id() == outer
        assert FlextContext.Service.get_service_name() == service
        assert FlextContext.Service.get_service_version() == version


@given(st.uuids(version=4))
def test_traceparent_alone_imports_the_trace_id_as_correlation_id(value: uuid.UUID) -> None:
    FlextContext.Utilities.clear_context()
    applied = Serialization.set_from_context({"traceparent": f"00-{value.hex}-00f067aa0ba902b7-01"})
    assert applied == {"correlation_id": str(value)}


def test_import_precedence_is_flext_then_traceparent_then_meltano_run_id() -> None:
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    tp = f"00-{uuid.UUID(b).hex}-00f067aa0ba902b7-01"
    Serialization.set_from_context(
        {"MELTANO_RUN_ID": c, "TRACEPARENT": tp, "FLEXT_CORRELATION_ID": a}
    )
    assert Correlation.get_correlation_id() == a
    FlextContext.Utilities.clear_context()
    Serialization.set_from_context({"MELTANO_RUN_ID": c, "TRACEPARENT": tp})
    assert Correlation.get_correlation_id() == b
    FlextContext.Utilities.clear_context()
    Serialization.set_from_context({"meltano_run_id": c})
    assert Correlation.get_correlation_id() == c


@pytest.mark.parametrize(
    "carrier",
    [
        {"traceparent": "00-zzzz-00f067aa0ba902b7-01"},
        {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
        {"MELTANO_RUN_ID": "not-a-uuid"},
        {"X-Correlation-Id": "x" * 10_000},
        {"X-Correlation-Id": "bad id\r\nSet-Cookie: a=b"},
        {"FLEXT_SERVICE_NAME": 42},
        {"x-service-name": "\x00\x01"},
    ],
    ids=["traceparent-garbage", "traceparent-zero", "run-id", "10kB", "crlf", "int", "control"],
)
def test_bad_input_is_ignored_with_a_warning_and_never_raises(carrier: dict[str, object]) -> None:
    with Correlation.new_correlation() as cid, structlog.testing.capture_logs() as logs:
        applied = Serialization.set_from_context(carrier)
        assert applied == {}
        assert Correlation.get_correlation_id() == cid
        assert FlextContext.Service.get_service_name() is None
    assert [e["event"] for e in logs] == ["context_value_ignored"]
    assert len(logs[0]["value"]) <= 40  # never the whole value


def test_a_bad_field_is_dropped_and_the_good_ones_applied_in_one_step() -> None:
    good = str(uuid.uuid4())
    with structlog.testing.capture_logs() as logs:
        applied = Serialization.set_from_context(
            {"X-Correlation-Id": good, "X-Service-Name": "y" * 10_000}
        )
    assert applied == {"correlation_id": good}
    assert FlextContext.Service.get_service_name() is None
    assert logs[0]["name"] == "x_service_name"


def test_a_non_mapping_is_rejected_without_raising() -> None:
    with structlog.testing.capture_logs() as logs:
        assert Serialization.set_from_context(["not", "a", "mapping"]) == {}  # type: ignore[arg-type]  # on purpose
    assert logs[0]["event"] == "context_import_rejected"


def test_contexts_are_isolated_across_50_threads() -> None:
    seen: dict[int, tuple[str, str | None]] = {}
    barrier = threading.Barrier(50)

    def work(i: int) -> None:
        with Correlation.new_correlation() as cid:
            with FlextContext.Service.service_context(f"svc-{i}"):
                barrier.wait()  # every thread is inside its context at once
                seen[i] = (cid, FlextContext.Service.get_service_name())
                assert Correlation.get_correlation_id() == cid

    with Correlation.new_correlation() as main_cid:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert Correlation.get_correlation_id() == main_cid
    assert len({cid for cid, _ in seen.values()}) == 50
    assert all(name == f"svc-{i}" for i, (_, name) in seen.items())


def test_contexts_are_isolated_across_50_asyncio_tasks() -> None:
    async def work(i: int) -> tuple[str, str | None, str | None]:
        with Correlation.new_correlation() as cid:
            with FlextContext.Request.request_context(user_id=f"user-{i}"):
                await asyncio.sleep(0.001 * (50 - i))  # interleave the tasks
                return cid, Correlation.get_correlation_id(), FlextContext.Request.get_user_id()

    async def main() -> list[tuple[str, str | None, str | None]]:
        return await asyncio.gather(*(work(i) for i in range(50)))

    results = asyncio.run(main())
    assert all(cid == current for cid, current, _ in results)
    assert [user for _, _, user in results] == [f"user-{i}" for i in range(50)]
    assert len({cid for cid, _, _ in results}) == 50


def test_every_log_line_carries_the_correlation_id() -> None:
    with structlog.testing.capture_logs(processors=[add_context]) as logs:
        log = structlog.get_logger()
        with Correlation.new_correlation() as cid, FlextContext.Service.service_context("etl"):
            log.info("step_started")
            with FlextContext.Performance.timed_operation("extract"):
                log.info("records_relayed", records=3)
            log.warning("step_completed")
    assert [e["correlation_id"] for e in logs] == [cid, cid, cid]
    assert [e.get("operation") for e in logs] == [None, "extract", None]
    assert {e["service"] for e in logs} == {"etl"}


def test_full_context_is_json_serializable_and_summary_is_one_line() -> None:
    import json

    with Correlation.new_correlation() as cid, FlextContext.Service.service_context("etl", "2"):
        with FlextContext.Request.request_context(user_id="u", metadata={"k": [1, 2]}):
            full = json.loads(json.dumps(Serialization.get_full_context()))
            summary = FlextContext.Utilities.get_context_summary()
    assert full["correlation_id"] == cid
    assert full["trace_id"] == uuid.UUID(cid).hex
    assert full["request_metadata"] == {"k": [1, 2]}
    assert "\n" not in summary
    assert f"correlation={cid}" in summary
    assert "service=etl@2" in summary
    assert FlextContext.Utilities.get_context_summary() == "(empty context)"


def test_all_matches_the_documented_api() -> None:
    documented = {
        "Correlation": {
            "new_correlation",
            "inherit_correlation",
            "get_correlation_id",
            "get_parent_correlation_id",
            "set_correlation_id",
        },
        "Service": {"service_context", "get_service_name", "get_service_version"},
        "Request": {
            "request_context",
            "get_user_id",
            "get_operation_name",
            "get_request_id",
            "get_request_metadata",
        },
        "Performance": {"timed_operation", "add_operation_metadata", "get_operation_metadata"},
        "Serialization": {
            "get_correlation_context",
            "set_from_context",
            "get_full_context",
            "to_env",
            "from_env",
        },
        "Utilities": {"get_context_summary", "clear_context"},
    }
    for namespace, names in documented.items():
        public = {n for n in vars(getattr(FlextContext, namespace)) if not n.startswith("_")}
        assert public == names, namespace
    exported = set(flext_meltano_context.__all__)
    public = {
        name
        for name, value in vars(flext_meltano_context).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == public | {"__version__"}
    assert flext_meltano_context.__all__ == sorted(flext_meltano_context.__all__)
