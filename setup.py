"""Build the relay's compiled scanner when a C compiler works; without one, install anyway.

The extension is optional (issue 14): where compiling fails, setuptools prints a warning and the
package installs with the pure-Python relay, which `flext-context --version` then names. The
source's sha256 is compiled in, so an extension left from an older `_scanner.c` is refused at
import instead of being used with a newer relay.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "flext_meltano_context/_scanner.c"
digest = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "flext_meltano_context._scanner",
            sources=[SOURCE],
            define_macros=[("SOURCE_SHA256", f'"{digest}"')],
            extra_compile_args=["-O2", "-Wall"],
            optional=True,
        )
    ]
)
