"""OpenLineage RunEvents for our runs (work in progress)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flext_meltano_context.errors import FlextContextError


class OpenLineageSetupError(FlextContextError):
    """OpenLineage is configured but cannot be used (extra not installed, bad configuration)."""


class Emitter:
    """Turns lineage records into RunEvents as they are written and sends them."""

    def on_record(self, record: Mapping[str, Any]) -> None:
        """Emit whatever RunEvents `record` completes."""

    def close(self) -> None:
        """Flush and close the transport."""


def emitter_from_env() -> Emitter | None:
    """An emitter when OpenLineage is configured, else None."""
    return None
