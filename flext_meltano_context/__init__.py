"""flext-context: observability and lineage for Meltano/Singer pipelines.

`from flext_meltano_context import FlextContext` is the whole context API. Heavier parts (relay,
pipeline, lineage) live in their modules and are imported where they are used.
"""

from flext_meltano_context.__about__ import __version__
from flext_meltano_context.context import (
    Correlation,
    FlextContext,
    Performance,
    Request,
    Serialization,
    Service,
    Utilities,
)
from flext_meltano_context.errors import FlextContextError, StepError, UsageError
from flext_meltano_context.ids import uuid7

__all__ = [
    "Correlation",
    "FlextContext",
    "FlextContextError",
    "Performance",
    "Request",
    "Serialization",
    "Service",
    "StepError",
    "UsageError",
    "Utilities",
    "__version__",
    "uuid7",
]
