"""Which relay scanner runs: the compiled one when it is built and current, else pure Python.

`FLEXT_CONTEXT_SCANNER` forces one (`c` or `python`; `auto`, the default, picks the compiled one
when it can). Kept apart from relay.py so `flext-context --version` can say which is active
without importing the relay (issue 14).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from types import ModuleType

from flext_meltano_context.errors import UsageError

ABI_VERSION = 1  # must equal ABI_VERSION in _scanner.c
ENV = "FLEXT_CONTEXT_SCANNER"
CHOICES = ("auto", "c", "python")


@functools.cache
def compiled() -> tuple[ModuleType | None, str]:
    """The compiled scanner module, or None and why it cannot be used."""
    try:
        from flext_meltano_context import _scanner
    except ImportError as exc:
        return None, f"extension not built: {exc}"
    if _scanner.ABI_VERSION != ABI_VERSION:
        return None, (
            f"extension is stale (interface {_scanner.ABI_VERSION}, this relay needs"
            f" {ABI_VERSION}); reinstall flext-meltano-context to rebuild it"
        )
    source = Path(__file__).with_name("_scanner.c")
    if _scanner.SOURCE_SHA256 and source.exists():
        current = hashlib.sha256(source.read_bytes()).hexdigest()
        if current != _scanner.SOURCE_SHA256:
            return None, (
                "extension is stale (built from an older _scanner.c); run"
                " `pip install -e .` again to rebuild it"
            )
    return _scanner, ""


def choice() -> str:
    """The scanner the environment asks for: auto, c or python."""
    wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise UsageError(f"{ENV}={wanted!r} is not one of {', '.join(CHOICES)}")
    return wanted


def use_compiled() -> bool:
    """Whether the relay uses the compiled scanner; `c` without a usable one is an error."""
    wanted = choice()
    if wanted == "python":
        return False
    module, reason = compiled()
    if module is None and wanted == "c":
        raise UsageError(
            f"{ENV}=c but the compiled scanner cannot be used: {reason}; install a C compiler"
            " and reinstall, or unset the variable"
        )
    return module is not None


def describe() -> str:
    """One line for `--version`: which scanner is active, and why when it is not compiled."""
    module, reason = compiled()
    try:
        wanted = choice()
    except UsageError as exc:
        return f"scanner: {exc}"
    if wanted == "python":
        return f"scanner: pure Python ({ENV}=python)"
    if module is None:
        return f"scanner: pure Python ({reason})"
    return "scanner: compiled"
