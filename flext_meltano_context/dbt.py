"""The dbt phase: per-run artifacts, per-node results, row counts, and lineage to the models.

Each transformer block writes its artifacts to a directory of this run (`--target-path` and
`DBT_TARGET_PATH`), so runs never clobber each other. After the block exits, `run_results.json`
and `manifest.json` are read; artifacts whose `metadata.env.FLEXT_CORRELATION_ID` is not this
run's are refused (an old file left by a dbt that failed before writing its own). dbt-duckdb
reports no row counts (duckdb/dbt-duckdb#496), so built relations are counted read-only with
duckdb once dbt has exited. Lineage runs stream -> target table (target-duckdb's naming) -> dbt
source (by database/schema/identifier, or `meta.singer_stream`) -> models (`parent_map`), with
datasets named as dbt-ol names them (`duckdb://{path}`, `{database}.{schema}.{table}`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flext_meltano_context.errors import FlextContextError, StepError
from targets_wrapper import naming
from targets_wrapper.config import config_path_in, read_config

log = structlog.get_logger("flext_meltano_context.dbt")

# dbt subcommands that accept --target-path and write run_results.json.
ARTIFACT_COMMANDS = frozenset({"build", "run", "test", "seed", "snapshot", "compile"})
RELATION_TYPES = frozenset({"model", "seed", "snapshot"})
KEEP_RUNS = 20  # per-run artifact directories kept; older ones are removed
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


class DbtFailedError(StepError):
    """A dbt block failed; the message names the failing nodes and what dbt said about them."""

    def __init__(
        self, step: str, returncode: int, stderr_tail: Sequence[str], failed: Sequence[NodeResult]
    ) -> None:
        super().__init__(step, returncode, stderr_tail)
        self.failed = tuple(failed)
        if self.failed:
            lines = "\n  ".join(
                f"{node.unique_id}: {node.status}: {(node.message or '').strip()[:300]}"
                for node in self.failed
            )
            self.args = (f"step {step!r} exited with {returncode}; failing dbt nodes:\n  {lines}",)


# --- where the target loads ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Relation:
    """A table or view: `database.schema.name` (the database is DuckDB's catalog name)."""

    database: str | None
    schema: str
    name: str

    @property
    def dataset_name(self) -> str:
        """The dataset name as dbt-ol writes it."""
        return ".".join(part for part in (self.database, self.schema, self.name) if part)

    @property
    def short(self) -> str:
        return f"{self.schema}.{self.name}"

    def key(self) -> tuple[str, str, str]:
        return ((self.database or "").lower(), self.schema.lower(), self.name.lower())


@dataclass(frozen=True, slots=True)
class Warehouse:
    """Where target-duckdb loads: its file, catalog name and schema rules (never credentials)."""

    path: str
    database: str
    default_schema: str | None
    schema_mapping: Mapping[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return f"duckdb://{self.path}"

    def table_of(self, stream: str) -> Relation | None:
        """The table target-duckdb 0.8 writes `stream` to, None when no schema is configured."""
        schema, table = naming.duckdb_table(
            stream, default_schema=self.default_schema, schema_mapping=self.schema_mapping
        )
        return Relation(self.database, schema, table) if schema else None


def warehouse_from_config(config: Mapping[str, Any]) -> Warehouse | None:
    """A Warehouse from target-duckdb's config, None when it names no local DuckDB file."""
    raw = config.get("path") or config.get("filepath")
    if not isinstance(raw, str) or not raw or "://" in raw or raw.startswith(("md:", ":memory:")):
        return None
    default, rules = naming.duckdb_schemas(config)
    return Warehouse(
        path=raw,
        database=naming.duckdb_catalog(config),
        default_schema=default,
        schema_mapping=rules,
    )


def config_of(argv: Sequence[str]) -> dict[str, Any] | None:
    """The JSON config file a plugin command line passes with `--config`, None if none."""
    path = config_path_in(argv)
    if path is None:
        return None
    try:
        return read_config(path)
    except (OSError, ValueError):
        return None


def stream_datasets(
    warehouse: Warehouse | None, streams: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """`output_dataset` and `target_table` for each stream's `stream_stats` event."""
    if warehouse is None:
        return {}
    found = {}
    for stream in streams:
        table = warehouse.table_of(stream)
        if table is not None:
            found[stream] = {
                "output_dataset": {"namespace": warehouse.namespace, "name": table.dataset_name},
                "target_table": table.short,
            }
    return found


# --- artifacts of one block -----------------------------------------------------------------


def artifacts_dir(base: Path, run_id: str, block: str) -> Path:
    """`base/<run_id>/<block>`: this run's own dbt target directory for `block`."""
    return base / run_id / (_SLUG.sub("_", block) or "dbt")


def prune(base: Path, keep: int = KEEP_RUNS) -> None:
    """Remove all but the newest `keep` run directories under `base`."""
    try:
        runs = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for old in runs[:-keep] if keep else runs:
        shutil.rmtree(old, ignore_errors=True)


def block_command(
    block: str, argv: Sequence[str], target: Path
) -> tuple[list[str], dict[str, str]]:
    """argv and env that make a dbt block write its artifacts to `target`.

    `DBT_TARGET_PATH` covers plain dbt; a Meltano plugin may set its own from a setting, so for
    the subcommands that take it, `--target-path` is appended too (the last value wins).
    """
    command = block.partition(":")[2] or (argv[1] if len(argv) > 1 else "")
    out = list(argv)
    if command in ARTIFACT_COMMANDS and "--target-path" not in out:
        out += ["--target-path", str(target)]
    return out, {"DBT_TARGET_PATH": str(target)}


def looks_like_dbt(block: str, argv: Sequence[str]) -> bool:
    """True for blocks that run dbt: their artifacts are expected and missing ones reported."""
    return "dbt" in block.lower() or any("dbt" in Path(arg).name.lower() for arg in argv[:2])


@dataclass(frozen=True, slots=True)
class NodeResult:
    """One dbt node's outcome in this run."""

    unique_id: str
    resource_type: str
    status: str
    message: str | None
    failures: int | None
    execution_time: float | None
    compile_s: float | None
    execute_s: float | None
    started_at: str | None
    completed_at: str | None
    relation: Relation | None = None
    materialized: str | None = None
    rows: int | None = None
    rows_from: str | None = None  # "count" (counted after dbt), "adapter" (rows_affected)

    @property
    def failed(self) -> bool:
        return self.status in {"error", "fail", "runtime error"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "unique_id": self.unique_id,
            "resource_type": self.resource_type,
            "status": self.status,
            "message": (self.message or "")[:1000] or None,
            "failures": self.failures,
            "execution_time": self.execution_time,
            "compile_s": self.compile_s,
            "execute_s": self.execute_s,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "relation": self.relation.dataset_name if self.relation else None,
            "materialized": self.materialized,
            "rows": self.rows,
            "rows_from": self.rows_from,
        }


@dataclass(frozen=True, slots=True)
class BlockResults:
    """What one dbt block did, read from its own artifacts; `missing` says why there are none."""

    block: str
    artifacts_dir: str
    exit_code: int | None
    invocation_id: str | None = None
    dbt_version: str | None = None
    elapsed_s: float | None = None
    nodes: tuple[NodeResult, ...] = ()
    edges: tuple[dict[str, Any], ...] = ()
    inputs: tuple[dict[str, Any], ...] = ()  # OpenLineage-named datasets dbt read
    missing: str | None = None
    count_s: float | None = None  # time spent counting rows after dbt exited

    @property
    def failed_nodes(self) -> tuple[NodeResult, ...]:
        return tuple(node for node in self.nodes if node.failed)

    def results_event(self) -> dict[str, Any]:
        """`dbt_results` event data."""
        statuses: dict[str, int] = {}
        for node in self.nodes:
            statuses[node.status] = statuses.get(node.status, 0) + 1
        return {
            "phase": self.block,
            "artifacts_dir": self.artifacts_dir,
            "exit_code": self.exit_code,
            "invocation_id": self.invocation_id,
            "dbt_version": self.dbt_version,
            "elapsed_s": self.elapsed_s,
            "missing": self.missing,
            "statuses": statuses,
            "count_s": self.count_s,
            "nodes": [node.to_dict() for node in self.nodes],
            "inputs": list(self.inputs),
            "outputs": [
                _dataset(node, self._namespace(node))
                for node in self.nodes
                if node.relation is not None and node.resource_type in RELATION_TYPES
            ],
        }

    def _namespace(self, node: NodeResult) -> str | None:
        for edge in self.edges:
            end = edge["target"]
            if end.get("unique_id") == node.unique_id:
                return str(end.get("namespace") or "") or None
        return None


def _dataset(node: NodeResult, namespace: str | None) -> dict[str, Any]:
    assert node.relation is not None  # noqa: S101 - filtered by the caller
    return {
        "namespace": namespace or "duckdb://",
        "name": node.relation.dataset_name,
        "unique_id": node.unique_id,
        "status": node.status,
        "rows": node.rows,
    }


class ArtifactsRefusedError(Exception):
    """The block's artifacts are absent or not this run's; the message says which and why."""


def read_artifacts(target: Path, correlation_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run_results, manifest) from `target`, if dbt wrote them for `correlation_id`."""
    results_path, manifest_path = target / "run_results.json", target / "manifest.json"
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactsRefusedError(
            f"dbt wrote no run_results.json to {target} (it failed before running any node, "
            "or the plugin ignores --target-path/DBT_TARGET_PATH)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ArtifactsRefusedError(f"{results_path} is not readable JSON: {exc}") from exc
    metadata = results.get("metadata") if isinstance(results, dict) else None
    if not isinstance(metadata, dict):
        metadata = {}
    env = metadata.get("env")
    seen = env.get("FLEXT_CORRELATION_ID") if isinstance(env, dict) else None
    if seen != correlation_id:
        raise ArtifactsRefusedError(
            f"{results_path} belongs to correlation id {seen!r}, not this run's "
            f"{correlation_id!r}: an older dbt invocation wrote it"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("dbt_manifest_unreadable", path=str(manifest_path), error=str(exc)[:200])
        manifest = {}
    if not isinstance(manifest, dict):
        manifest = {}
    manifest_invocation = (manifest.get("metadata") or {}).get("invocation_id")
    if manifest_invocation and manifest_invocation != metadata.get("invocation_id"):
        log.info(
            "dbt_manifest_from_other_invocation",
            manifest=manifest_invocation,
            run_results=metadata.get("invocation_id"),
        )
    return results, manifest


def _seconds(timing: Sequence[Any], name: str) -> tuple[float | None, str | None, str | None]:
    import datetime as dt

    for item in timing:
        if isinstance(item, dict) and item.get("name") == name:
            start, end = item.get("started_at"), item.get("completed_at")
            try:
                took = (
                    dt.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
                    - dt.datetime.fromisoformat(str(start).replace("Z", "+00:00"))
                ).total_seconds()
            except ValueError:
                return None, start, end
            return round(took, 6), start, end
    return None, None, None


def _relation(node: Mapping[str, Any]) -> Relation | None:
    schema = node.get("schema")
    name = node.get("alias") or node.get("identifier") or node.get("name")
    if not isinstance(schema, str) or not isinstance(name, str):
        return None
    database = node.get("database")
    return Relation(database if isinstance(database, str) else None, schema, name)


def node_results(results: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[NodeResult]:
    """Each node of run_results.json, with its relation and materialization from the manifest."""
    nodes = manifest.get("nodes") or {}
    out = []
    for item in results.get("results") or []:
        if not isinstance(item, dict) or not isinstance(item.get("unique_id"), str):
            continue
        unique_id = item["unique_id"]
        node = nodes.get(unique_id) or {}
        kind = str(node.get("resource_type") or unique_id.split(".", 1)[0])
        timing = item.get("timing") or []
        compile_s, _, _ = _seconds(timing, "compile")
        execute_s, exec_start, exec_end = _seconds(timing, "execute")
        materialized = (node.get("config") or {}).get("materialized")
        relation = (
            _relation(node) if kind in RELATION_TYPES and materialized != "ephemeral" else None
        )
        response = item.get("adapter_response") or {}
        affected = response.get("rows_affected") if isinstance(response, dict) else None
        failures = item.get("failures")
        took = item.get("execution_time")
        out.append(
            NodeResult(
                unique_id=unique_id,
                resource_type=kind,
                status=str(item.get("status")),
                message=str(item["message"]) if item.get("message") is not None else None,
                failures=failures if isinstance(failures, int) else None,
                execution_time=round(took, 6) if isinstance(took, (int, float)) else None,
                compile_s=compile_s,
                execute_s=execute_s,
                started_at=exec_start,
                completed_at=exec_end,
                relation=relation,
                materialized=materialized if isinstance(materialized, str) else None,
                rows=affected if isinstance(affected, int) and affected >= 0 else None,
                rows_from="adapter" if isinstance(affected, int) and affected >= 0 else None,
            )
        )
    return out


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def count_rows(path: str, relations: Iterable[Relation]) -> dict[Relation, int]:
    """`count(*)` of each relation in the DuckDB file `path`, opened read-only.

    Only relations in the file's own catalog are counted; an unreadable file or relation is
    logged and left out. Needs the `duckdb` package (extra `duckdb`).
    """
    try:
        import duckdb
    except ImportError:
        log.info("dbt_rows_not_counted", reason="duckdb is not installed; install the duckdb extra")
        return {}
    catalog = Path(path).stem.lower()
    wanted = [r for r in relations if (r.database or catalog).lower() == catalog]
    if not wanted:
        return {}
    counts: dict[Relation, int] = {}
    try:
        db = duckdb.connect(path, read_only=True)
    except duckdb.Error as exc:
        log.warning("dbt_rows_not_counted", path=path, reason=str(exc)[:300])
        return {}
    try:
        for relation in wanted:
            # Identifiers from dbt's manifest, quoted; DuckDB cannot bind identifiers as parameters.
            table = f"{_quote(relation.schema)}.{_quote(relation.name)}"
            try:
                row = db.execute(f"select count(*) from {table}").fetchone()  # noqa: S608
            except duckdb.Error as exc:
                log.warning("dbt_rows_not_counted", relation=relation.short, reason=str(exc)[:300])
                continue
            if row is not None:
                counts[relation] = int(row[0])
    finally:
        db.close()
    return counts


# --- lineage ----------------------------------------------------------------------------------


def lineage_edges(
    manifest: Mapping[str, Any],
    warehouse: Warehouse | None,
    streams: Iterable[str],
    *,
    block: str,
    dbt_path: str | None = None,
    nodes: Iterable[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(edges, input datasets): target table -> dbt source -> models -> downstream models.

    A source matches a stream's table by database/schema/identifier, or by its
    `meta.singer_stream`. Models come in through `parent_map`; only `nodes` (those this block
    ran) and their ancestors are drawn when given.
    """
    namespace = warehouse.namespace if warehouse else f"duckdb://{dbt_path}" if dbt_path else None
    tables = {}
    for stream in streams:
        table = warehouse.table_of(stream) if warehouse else None
        if table is not None:
            tables[stream] = table
    by_key = {table.key(): stream for stream, table in tables.items()}
    sources = manifest.get("sources") or {}
    all_nodes = manifest.get("nodes") or {}
    parent_map = manifest.get("parent_map") or {}

    def end(unique_id: str, kind: str, node: Mapping[str, Any]) -> dict[str, Any] | None:
        relation = _relation(
            {**node, "alias": node.get("identifier") or node.get("alias")}
            if kind == "source"
            else node
        )
        if relation is None:
            return None
        out = {"kind": kind, "name": relation.short, "unique_id": unique_id}
        if namespace:
            out["namespace"] = namespace
        out["dataset"] = relation.dataset_name
        return out

    edges: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    for unique_id, source in sources.items():
        if not isinstance(source, dict):
            continue
        relation = _relation({**source, "alias": source.get("identifier") or source.get("name")})
        matched = by_key.get(relation.key()) if relation else None
        meta_stream = (source.get("meta") or {}).get("singer_stream")
        if matched is None and isinstance(meta_stream, str) and meta_stream in tables:
            matched = meta_stream
        source_end = end(unique_id, "source", source)
        if source_end is None:
            continue
        if matched is not None:
            table = tables[matched]
            table_end = {"kind": "table", "name": table.short, "dataset": table.dataset_name}
            if warehouse is not None:
                table_end["namespace"] = warehouse.namespace
            edges.append({"source": table_end, "target": source_end, "via": block})
    wanted = set(nodes) if nodes is not None else None
    for child_id, parents in parent_map.items():
        child = all_nodes.get(child_id)
        if not isinstance(child, dict) or child.get("resource_type") not in RELATION_TYPES:
            continue
        if wanted is not None and child_id not in wanted:
            continue
        child_end = end(child_id, str(child["resource_type"]), child)
        if child_end is None:
            continue
        for parent_id in parents:
            if parent_id in sources:
                parent_end = end(parent_id, "source", sources[parent_id])
                if parent_end is not None and namespace:
                    dataset = {"namespace": namespace, "name": parent_end["dataset"]}
                    if dataset not in inputs:
                        inputs.append(dataset)
            elif isinstance(all_nodes.get(parent_id), dict):
                parent = all_nodes[parent_id]
                if parent.get("resource_type") not in RELATION_TYPES:
                    continue
                parent_end = end(parent_id, str(parent["resource_type"]), parent)
            else:
                continue
            if parent_end is not None:
                edges.append({"source": parent_end, "target": child_end, "via": block})
    return edges, inputs


def collect(
    block: str,
    target: Path,
    *,
    correlation_id: str,
    exit_code: int | None,
    warehouse: Warehouse | None,
    streams: Iterable[str],
    dbt_path: str | None = None,
) -> BlockResults:
    """Everything one dbt block did, from its own artifacts, with row counts of what it built."""
    import time

    try:
        results, manifest = read_artifacts(target, correlation_id)
    except ArtifactsRefusedError as exc:
        log.warning("dbt_artifacts_missing", block=block, reason=str(exc))
        return BlockResults(block, str(target), exit_code, missing=str(exc))
    metadata = results.get("metadata") or {}
    nodes = node_results(results, manifest)
    path = warehouse.path if warehouse is not None else dbt_path
    started = time.monotonic()
    built = [
        node.relation
        for node in nodes
        if node.relation is not None and node.status == "success" and node.rows is None
    ]
    counts = count_rows(path, built) if path and built else {}
    count_s = round(time.monotonic() - started, 4) if built else None
    nodes = [
        _with_rows(node, counts[node.relation])
        if node.relation is not None and node.relation in counts
        else node
        for node in nodes
    ]
    edges, inputs = lineage_edges(
        manifest,
        warehouse,
        streams,
        block=block,
        dbt_path=dbt_path,
        nodes=[node.unique_id for node in nodes],
    )
    elapsed = results.get("elapsed_time")
    return BlockResults(
        block=block,
        artifacts_dir=str(target),
        exit_code=exit_code,
        invocation_id=metadata.get("invocation_id"),
        dbt_version=metadata.get("dbt_version"),
        elapsed_s=round(elapsed, 3) if isinstance(elapsed, (int, float)) else None,
        nodes=tuple(nodes),
        edges=tuple(edges),
        inputs=tuple(inputs),
        count_s=count_s,
    )


def _with_rows(node: NodeResult, rows: int) -> NodeResult:
    from dataclasses import replace

    return replace(node, rows=rows, rows_from="count")


def target_warehouse(
    target: str, argv: Sequence[str], meltano: Any | None = None
) -> Warehouse | None:
    """Where a DuckDB target loads, from its `--config` file or `meltano invoke --dump=config`.

    Only targets named like DuckDB are asked Meltano (each ask costs about a second).
    """
    config = config_of(argv)
    if config is None and meltano is not None and "duckdb" in target.lower():
        config = _dumped_config(meltano, target)
    if config is None:
        return None
    warehouse = warehouse_from_config(config)
    if warehouse is None:
        return None
    if "duckdb" not in target.lower() and not warehouse.path.endswith((".duckdb", ".db")):
        return None
    return warehouse


def _dumped_config(meltano: Any, target: str) -> dict[str, Any] | None:
    try:
        config: dict[str, Any] = meltano.dump_config(target, timeout=120)
    except FlextContextError as exc:
        # The first line only: the lines after it are Meltano's stderr, which may echo config.
        log.info("target_config_unavailable", target=target, reason=str(exc).splitlines()[0][:200])
        return None
    return config


class DbtPhase:
    """The dbt side of one run: gives each block its artifact directory, then reads it back."""

    def __init__(
        self,
        base: Path,
        *,
        run_id: str,
        correlation_id: str,
        warehouse: Warehouse | None,
        streams: Iterable[str],
        dbt_path: str | None = None,
    ) -> None:
        self.base = base
        self.run_id = run_id
        self.correlation_id = correlation_id
        self.warehouse = warehouse
        self.streams = tuple(streams)
        self.dbt_path = dbt_path
        self.results: dict[str, BlockResults] = {}

    def prepare(
        self, block: str, argv: Sequence[str]
    ) -> tuple[list[str], dict[str, str], Path | None]:
        """(argv, extra env, artifact dir) for `block`; non-dbt blocks run as they are."""
        if not looks_like_dbt(block, argv):
            return list(argv), {}, None
        target = artifacts_dir(self.base, self.run_id, block)
        target.mkdir(parents=True, exist_ok=True)
        prune(self.base)
        out, env = block_command(block, argv, target)
        return out, env, target

    def finish(
        self, block: str, target: Path, exit_code: int | None, recorder: Any
    ) -> BlockResults:
        """Read the block's artifacts and record `dbt_results` and `lineage_edges`."""
        found = collect(
            block,
            target,
            correlation_id=self.correlation_id,
            exit_code=exit_code,
            warehouse=self.warehouse,
            streams=self.streams,
            dbt_path=self.dbt_path,
        )
        self.results[block] = found
        recorder.record("dbt_results", found.results_event())
        if found.edges:
            recorder.record("lineage_edges", {"phase": block, "edges": list(found.edges)})
        return found

    @staticmethod
    def metrics(found: BlockResults) -> dict[str, Any]:
        """A few numbers for the block's `phase_completed.metrics`."""
        statuses: dict[str, int] = {}
        for node in found.nodes:
            statuses[node.status] = statuses.get(node.status, 0) + 1
        return {
            "dbt_invocation_id": found.invocation_id,
            "dbt_nodes": statuses,
            "dbt_artifacts": "missing" if found.missing else "read",
        }
