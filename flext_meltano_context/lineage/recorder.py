"""What the pipeline records with: redact, append to the lineage log, emit OpenLineage if set up."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from flext_meltano_context.lineage.log import LineageLog
from flext_meltano_context.lineage.redact import redact

if TYPE_CHECKING:
    from flext_meltano_context.lineage.openlineage import Emitter

# Subtrees that hold names (column -> type), not values: keys there are not secrets.
_NAME_SUBTREES: Mapping[str, tuple[str, ...]] = {"stream_stats": ("schema",)}


class Recorder:
    """Records one run's events in the lineage log (and as OpenLineage events when configured)."""

    def __init__(self, path: Path, *, run_id: str, correlation_id: str) -> None:
        self.log = LineageLog(path)
        self.run_id = run_id
        self.correlation_id = correlation_id
        self._emitter: Emitter | None = _emitter_from_env()

    def record(self, event: str, data: Mapping[str, Any], *, fsync: bool = False) -> None:
        """Append `event` with `data` (secrets redacted); OpenLineage failures only warn."""
        clean = redact(data, keep=_NAME_SUBTREES.get(event, ()))
        written = self.log.append(
            event,
            run_id=self.run_id,
            correlation_id=self.correlation_id,
            data=clean,
            fsync=fsync,
        )
        if self._emitter is not None:
            self._emitter.on_record(written)

    def close(self) -> None:
        """Flush and close the OpenLineage transport, if any; the log needs no closing."""
        if self._emitter is not None:
            self._emitter.close()
            self._emitter = None


def _emitter_from_env() -> Emitter | None:
    from flext_meltano_context.lineage import openlineage

    try:
        return openlineage.emitter_from_env()
    except openlineage.OpenLineageSetupError as exc:
        structlog.get_logger().warning("openlineage_disabled", reason=str(exc))
        return None
