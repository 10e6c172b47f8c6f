"""Shared fixtures: real Singer plugins from PyPI in venvs of their own, fake plugins."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pg import NoServerError, Server, cluster

ROOT = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"
PLUGIN_CACHE = ROOT / ".cache" / "plugins"
OPENLINEAGE_SPEC = ROOT.parent / "shared" / "openlineage-spec"


def install_tool(*requirements: str) -> Path:
    """A venv with `requirements` installed, cached under .cache/plugins by requirements.

    Real taps and targets pin old dependencies (singer-python pins jsonschema 2.6), so each gets a
    venv of its own, as Meltano gives it. Returns the venv's bin directory.
    """
    key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    slug = requirements[0].split("=")[0].split("<")[0].split(">")[0].split("~")[0].strip()
    venv = PLUGIN_CACHE / f"{slug}-{key}"
    marker = venv / ".installed"
    PLUGIN_CACHE.mkdir(parents=True, exist_ok=True)
    with (PLUGIN_CACHE / f".{slug}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build each venv once
        if not marker.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    *requirements,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            marker.write_text("\n".join(requirements))
    return venv / "bin"


@pytest.fixture(scope="session")
def pypi_tool() -> Callable[..., Path]:
    """Install a real plugin from PyPI once per cache: `pypi_tool("target-jsonl==0.1.4")`."""
    return install_tool


def fake(name: str, *args: str) -> list[str]:
    """argv running the fake plugin `tests/fakes/<name>` with this interpreter."""
    return [sys.executable, str(FAKES / name), *args]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inherited FLEXT_/OPENLINEAGE_/TRACEPARENT/MELTANO_ variables leak into a test."""
    for name in list(os.environ):
        if name.startswith(("FLEXT_", "OPENLINEAGE", "MELTANO_")) or name in {
            "TRACEPARENT",
            "TRACESTATE",
        }:
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Server]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 for this session (see tests/pg.py)."""
    try:
        with cluster() as running:
            yield running.server
    except NoServerError as exc:
        pytest.skip(str(exc))
