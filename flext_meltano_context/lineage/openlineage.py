"""OpenLineage RunEvents for our runs, built from lineage records, and sent when configured.

The pipeline run is one OpenLineage run (START, then COMPLETE/FAIL/ABORT) and each phase (extract,
load, each dbt block) a child run with `parent` and `root` facets. Inputs are the tap's streams,
outputs the target's tables, with `schema`, `inputStatistics`/`outputStatistics`. A stream's
datasets are its `input_dataset`/`output_dataset` (`{namespace, name}`) when the pipeline records
them, named as dbt-ol names them so graphs join (DuckDB `duckdb://{path}`, `{db}.{schema}.{table}`);
otherwise `singer://{plugin}` and the stream name.

The same `EventBuilder` turns records into events while the run records them (`Emitter`) and
afterwards from the log (`flext-context report --format openlineage`), so both give the same
events. openlineage-python (extra `openlineage`) is imported only when OpenLineage is configured
(`OPENLINEAGE_URL`, `OPENLINEAGE__TRANSPORT__*`, `OPENLINEAGE_CONFIG`, `openlineage.yml`) and not
disabled (`OPENLINEAGE_DISABLED=true`). Sending never fails a run: the first failure is a warning
and stops sending for the rest of the run; the lineage log keeps everything.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from flext_meltano_context.__about__ import __version__
from flext_meltano_context.errors import FlextContextError

SPEC_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
PRODUCER = f"https://pypi.org/project/flext-meltano-context/{__version__}/"
DEFAULT_NAMESPACE = "flext-context"
_FACETS = "https://openlineage.io/spec/facets"
FACET_URLS = {
    "parent": f"{_FACETS}/1-2-0/ParentRunFacet.json#/$defs/ParentRunFacet",
    "errorMessage": f"{_FACETS}/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet",
    "processing_engine": (
        f"{_FACETS}/1-1-1/ProcessingEngineRunFacet.json#/$defs/ProcessingEngineRunFacet"
    ),
    "tags": f"{_FACETS}/1-0-0/TagsRunFacet.json#/$defs/TagsRunFacet",
    "jobType": f"{_FACETS}/2-0-4/JobTypeJobFacet.json#/$defs/JobTypeJobFacet",
    "schema": f"{_FACETS}/1-2-0/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet",
    "inputStatistics": (
        f"{_FACETS}/1-0-0/InputStatisticsInputDatasetFacet.json"
        "#/$defs/InputStatisticsInputDatasetFacet"
    ),
    "outputStatistics": (
        f"{_FACETS}/1-0-2/OutputStatisticsOutputDatasetFacet.json"
        "#/$defs/OutputStatisticsOutputDatasetFacet"
    ),
}
_TERMINAL = {"success": "COMPLETE", "failed": "FAIL", "aborted": "ABORT", "skipped": "ABORT"}


class OpenLineageSetupError(FlextContextError):
    """OpenLineage is configured but cannot be used (extra not installed, bad configuration)."""


def _facet(kind: str, /, **fields: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER, "_schemaURL": FACET_URLS[kind], **fields}


def _job_ref(namespace: str, name: str) -> dict[str, str]:
    return {"namespace": namespace, "name": name}


def openlineage_context_env(
    parent_run_id: str,
    parent_job: tuple[str, str],
    root_run_id: str,
    root_job: tuple[str, str],
) -> dict[str, str]:
    """Environment that makes a child (dbt-ol, another tool) a child run of ours.

    `parent_job`/`root_job` are `(namespace, name)`. Sets `OPENLINEAGE_CONTEXT` (read first by
    dbt-ol 1.52+) and the legacy `OPENLINEAGE_PARENT_ID`/`OPENLINEAGE_ROOT_PARENT_ID`
    (`namespace/job/runId`).
    """
    context = {
        "parent": {
            "run": {"runId": parent_run_id},
            "job": _job_ref(*parent_job),
            "root": {"run": {"runId": root_run_id}, "job": _job_ref(*root_job)},
        }
    }
    return {
        "OPENLINEAGE_CONTEXT": json.dumps(context, separators=(",", ":")),
        "OPENLINEAGE_PARENT_ID": f"{parent_job[0]}/{parent_job[1]}/{parent_run_id}",
        "OPENLINEAGE_ROOT_PARENT_ID": f"{root_job[0]}/{root_job[1]}/{root_run_id}",
    }


def _parent_facet(
    parent: Mapping[str, Any], root: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`parent` facet from `{"run": {"runId"}, "job": {...}}` and an optional root of that shape."""
    fields: dict[str, Any] = {
        "run": {"runId": str(parent["run"]["runId"])},
        "job": _job_ref(str(parent["job"]["namespace"]), str(parent["job"]["name"])),
    }
    if root:
        fields["root"] = {
            "run": {"runId": str(root["run"]["runId"])},
            "job": _job_ref(str(root["job"]["namespace"]), str(root["job"]["name"])),
        }
    return _facet("parent", **fields)


def _inherited_parent(value: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(parent, root) from `run_started.openlineage_parent` (an OPENLINEAGE_CONTEXT-like value)."""
    if not isinstance(value, Mapping):
        return None
    parent = value.get("parent", value)
    try:
        ref = {"run": {"runId": parent["run"]["runId"]}, "job": dict(parent["job"])}
        root = parent.get("root") or ref
        return ref, {"run": {"runId": root["run"]["runId"]}, "job": dict(root["job"])}
    except (KeyError, TypeError):
        return None


def _field_type(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        kinds = [str(item) for item in value if item != "null"]
        return kinds[0] if len(kinds) == 1 else "/".join(kinds) or "null"
    if isinstance(value, Mapping):
        return _field_type(value.get("type", value.get("format", "object")))
    return "unknown"


class EventBuilder:
    """Feeds on one run's lineage records and returns the RunEvents each one completes."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace or os.environ.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE
        self.run_id: str | None = None
        self.job_name = "pipeline"
        self.pipeline: dict[str, Any] = {}
        self.correlation_id = ""
        self.version = __version__
        self.inherited: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.streams: dict[str, dict[str, Any]] = {}
        self.phases_started: set[str] = set()
        self.dbt: dict[str, dict[str, Any]] = {}  # dbt_results by phase (issue 6)

    def feed(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        """RunEvents for `record` (often none)."""
        event, data, ts = record["event"], record.get("data") or {}, record["ts"]
        if event == "run_started":
            self.run_id = str(record["run_id"])
            self.correlation_id = str(record.get("correlation_id", ""))
            self.pipeline = dict(data.get("pipeline") or {})
            self.job_name = str(
                self.pipeline.get("name")
                or f"{self.pipeline.get('tap', 'tap')}-to-{self.pipeline.get('target', 'target')}"
            )
            self.version = str(data.get("flext_context_version") or __version__)
            self.inherited = _inherited_parent(data.get("openlineage_parent"))
            return [self._pipeline_event("START", ts)]
        if self.run_id is None:
            return []
        if event == "stream_stats":
            self.streams[str(data.get("stream", "?"))] = dict(data)
        elif event == "dbt_results":
            self.dbt[str(data.get("phase", "?"))] = dict(data)
        elif event == "landing":  # issue 7: the destination's own count and dataset name
            for row in data.get("streams") or []:
                stats = self.streams.get(str(row.get("stream")))
                if stats is not None:
                    stats["landing"] = dict(row)
        elif event == "phase_started" and data.get("phase_run_id"):
            self.phases_started.add(str(data["phase_run_id"]))
            return [self._phase_event("START", data, ts)]
        elif event == "phase_completed" and data.get("phase_run_id"):
            if str(data["phase_run_id"]) not in self.phases_started:
                return []  # never started (e.g. skipped before its start): no run to end
            kind = _TERMINAL.get(str(data.get("status")), "COMPLETE")
            return [self._phase_event(kind, data, ts)]
        elif event == "run_completed":
            kind = _TERMINAL.get(str(data.get("status")), "FAIL")
            return [self._pipeline_event(kind, ts, error=data.get("error"), final=True)]
        return []

    def _root(self) -> dict[str, Any]:
        if self.inherited is not None:
            return self.inherited[1]
        return {"run": {"runId": self.run_id}, "job": _job_ref(self.namespace, self.job_name)}

    def _event(
        self,
        kind: str,
        ts: str,
        run: dict[str, Any],
        job: dict[str, Any],
        inputs: list[dict[str, Any]],
        outputs: list[dict[str, Any]],
    ) -> dict[str, Any]:
        return {
            "eventType": kind,
            "eventTime": ts,
            "producer": PRODUCER,
            "schemaURL": SPEC_URL,
            "run": run,
            "job": job,
            "inputs": inputs,
            "outputs": outputs,
        }

    def _run_facets(self, error: Any) -> dict[str, Any]:
        facets: dict[str, Any] = {
            "processing_engine": _facet(
                "processing_engine",
                version=self.version,
                name="flext-context",
                openlineageAdapterVersion=__version__,
            ),
            "tags": _facet(
                "tags",
                tags=[{"key": "correlation_id", "value": self.correlation_id, "source": "FLEXT"}],
            ),
        }
        if error:
            facets["errorMessage"] = _facet(
                "errorMessage", message=str(error)[:4000], programmingLanguage="python"
            )
        return facets

    def _pipeline_event(
        self, kind: str, ts: str, *, error: Any = None, final: bool = False
    ) -> dict[str, Any]:
        facets = self._run_facets(error)
        if self.inherited is not None:
            facets["parent"] = _parent_facet(*self.inherited)
        job = {
            "namespace": self.namespace,
            "name": self.job_name,
            "facets": {
                "jobType": _facet(
                    "jobType", processingType="BATCH", integration="FLEXT_CONTEXT", jobType="DAG"
                )
            },
        }
        inputs = self._inputs() if final else []
        outputs = self._outputs() if final else []
        return self._event(kind, ts, {"runId": self.run_id, "facets": facets}, job, inputs, outputs)

    def _phase_event(self, kind: str, data: Mapping[str, Any], ts: str) -> dict[str, Any]:
        phase = str(data.get("phase", "phase"))
        pipeline_ref = {
            "run": {"runId": self.run_id},
            "job": _job_ref(self.namespace, self.job_name),
        }
        facets = self._run_facets(_phase_error(data) if kind in {"FAIL", "ABORT"} else None)
        facets["parent"] = _parent_facet(pipeline_ref, self._root())
        job = {
            "namespace": self.namespace,
            "name": f"{self.job_name}.{phase}",
            "facets": {
                "jobType": _facet(
                    "jobType", processingType="BATCH", integration="FLEXT_CONTEXT", jobType="TASK"
                )
            },
        }
        terminal = kind != "START"
        inputs = self._inputs() if terminal and phase == "extract" else []
        outputs = self._outputs() if terminal and phase == "load" else []
        if terminal and phase in self.dbt:
            inputs, outputs = _dbt_datasets(self.dbt[phase])
        run = {"runId": str(data["phase_run_id"]), "facets": facets}
        return self._event(kind, ts, run, job, inputs, outputs)

    def _dataset(self, stats: Mapping[str, Any], side: str) -> dict[str, Any]:
        stream = str(stats.get("stream", "?"))
        plugin = self.pipeline.get("tap" if side == "input" else "target", side)
        given = stats.get(f"{side}_dataset") or {}
        dataset: dict[str, Any] = {
            "namespace": str(given.get("namespace") or f"singer://{plugin}"),
            "name": str(given.get("name") or stream),
            "facets": {},
        }
        properties = (stats.get("schema") or {}).get("properties") or {}
        if properties:
            dataset["facets"]["schema"] = _facet(
                "schema",
                fields=[{"name": str(k), "type": _field_type(v)} for k, v in properties.items()],
            )
        counts = stats.get("counts") or {}
        numbers = {"rowCount": int(counts.get("RECORD", 0)), "size": int(stats.get("bytes") or 0)}
        if side == "input":
            dataset["inputFacets"] = {"inputStatistics": _facet("inputStatistics", **numbers)}
        else:
            metrics = stats.get("target_metrics") or {}
            if isinstance(metrics.get("record_count"), int):
                numbers["rowCount"] = metrics["record_count"]  # what the target says it wrote
            landing = stats.get("landing") or {}
            if isinstance(landing.get("landed"), int) and landing.get("level") is not None:
                numbers["rowCount"] = landing["landed"]  # counted in the destination itself
                if landing.get("dataset") and not given:
                    dataset["namespace"] = str(landing["dataset"]["namespace"])
                    dataset["name"] = str(landing["dataset"]["name"])
            dataset["outputFacets"] = {"outputStatistics": _facet("outputStatistics", **numbers)}
        return dataset

    def _inputs(self) -> list[dict[str, Any]]:
        return [self._dataset(stats, "input") for stats in self.streams.values()]

    def _outputs(self) -> list[dict[str, Any]]:
        return [self._dataset(stats, "output") for stats in self.streams.values()]


def _dbt_datasets(data: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A dbt block's sources and built relations, named as dbt-ol names them (issue 6)."""
    inputs = [
        {"namespace": str(item["namespace"]), "name": str(item["name"]), "facets": {}}
        for item in data.get("inputs") or []
        if isinstance(item, Mapping) and item.get("namespace") and item.get("name")
    ]
    outputs = []
    for item in data.get("outputs") or []:
        if not isinstance(item, Mapping) or not item.get("name") or item.get("status") != "success":
            continue
        dataset: dict[str, Any] = {
            "namespace": str(item.get("namespace") or "duckdb://"),
            "name": str(item["name"]),
            "facets": {},
        }
        if isinstance(item.get("rows"), int):
            stats = _facet("outputStatistics", rowCount=item["rows"])
            dataset["outputFacets"] = {"outputStatistics": stats}
        outputs.append(dataset)
    return inputs, outputs


def _phase_error(data: Mapping[str, Any]) -> str:
    tail = "\n".join(str(line) for line in data.get("stderr_tail") or [])
    code = data.get("exit_code")
    head = f"phase {data.get('phase')!r} {data.get('status')}" + (
        f" with exit code {code}" if code is not None else ""
    )
    return f"{head}\n{tail}" if tail else head


def run_events(
    records: Iterable[Mapping[str, Any]], namespace: str | None = None
) -> list[dict[str, Any]]:
    """Every RunEvent of one run, from its lineage records in log order."""
    builder = EventBuilder(namespace)
    return [event for record in records for event in builder.feed(record)]


def is_configured(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> bool:
    """True when OpenLineage is set up the way openlineage-python reads it, and not disabled."""
    env = os.environ if environ is None else environ
    if env.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OPENLINEAGE_URL") or env.get("OPENLINEAGE_CONFIG"):
        return True
    if any(name.startswith("OPENLINEAGE__TRANSPORT") for name in env):
        return True
    here = cwd or Path.cwd()
    return (here / "openlineage.yml").is_file() or (
        Path.home() / ".openlineage" / "openlineage.yml"
    ).is_file()


class Emitter:
    """Sends the RunEvents of one run as its records are written, from a thread of its own.

    The pipeline never waits on the lineage server: events go to a queue and a daemon thread
    sends them in order; `close` waits for it at most `close_timeout` seconds.
    """

    def __init__(self, transport: Any, *, close_timeout: float = 15.0) -> None:
        self.builder = EventBuilder()
        self.transport: Any | None = transport
        self.close_timeout = close_timeout
        self.sent = 0
        self.failed: str | None = None
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send, name="openlineage-emitter", daemon=True)
        self._thread.start()

    def on_record(self, record: Mapping[str, Any]) -> None:
        """Queue whatever RunEvents `record` completes."""
        for event in self.builder.feed(record):
            self._queue.put(event)

    def close(self) -> None:
        """Send what is queued (waiting at most `close_timeout`), then close the transport."""
        self._queue.put(None)
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            structlog.get_logger().warning(
                "openlineage_emit_unfinished",
                waited_s=self.close_timeout,
                hint="events stay in the lineage log; 'flext-context report --format "
                "openlineage' rebuilds them",
            )

    def _send(self) -> None:
        while (event := self._queue.get()) is not None:
            if self.transport is None:
                continue  # a send failed: drop the rest of this run's events (they are logged)
            try:
                self.transport.emit(event)
                self.sent += 1
            # Any transport failure (connection refused, HTTP 5xx, a full disk) must not fail the
            # run: the lineage log keeps the events and `report --format openlineage` rebuilds them.
            except Exception as exc:  # noqa: BLE001
                self.failed = f"{type(exc).__name__}: {str(exc)[:300]}"
                structlog.get_logger().warning(
                    "openlineage_emit_failed",
                    event_type=event["eventType"],
                    job=event["job"]["name"],
                    error=self.failed,
                    hint="events stay in the lineage log; 'flext-context report --format "
                    "openlineage' rebuilds them",
                )
                self._close_transport()
        self._close_transport()

    def _close_transport(self) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            try:
                transport.close(5.0)
            except Exception as exc:  # noqa: BLE001  # closing must not fail the run either
                structlog.get_logger().warning("openlineage_close_failed", error=str(exc)[:300])


def emitter_from_env() -> Emitter | None:
    """An emitter with openlineage-python's configured transport, or None when not configured."""
    if not is_configured():
        return None
    try:
        from openlineage.client import OpenLineageClient
    except ImportError as exc:
        raise OpenLineageSetupError(
            "OpenLineage is configured but openlineage-python is not installed; "
            "install flext-meltano-context[openlineage]"
        ) from exc
    try:
        client = OpenLineageClient()
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise OpenLineageSetupError(f"the OpenLineage configuration is not usable: {exc}") from exc
    # The transport, not client.emit: our events are dicts already checked against the spec,
    # and Transport.emit serializes dicts as they are.
    return Emitter(client.transport)
