"""The compiled scanner against the pure-Python relay: same stats, anomalies, bytes and keys.

Hypothesis feeds both implementations the same byte streams (Singer-like ones with keyed
streams and odd key values, mutated ones, and plain garbage) in the same chunk sizes; every
observable result must be identical (issue 14).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flext_meltano_context import keys as keys_module
from flext_meltano_context import scanner
from flext_meltano_context.errors import StrictModeError
from flext_meltano_context.keys import KeySet
from flext_meltano_context.relay import relay

COMPILED, WHY_NOT = scanner.compiled()
needs_compiled = pytest.mark.skipif(COMPILED is None, reason=f"compiled scanner: {WHY_NOT}")


@contextmanager
def scanner_env(impl: str) -> Iterator[None]:
    """FLEXT_CONTEXT_SCANNER set for the block (hypothesis examples share one test function)."""
    old = os.environ.get(scanner.ENV)
    os.environ[scanner.ENV] = impl
    try:
        yield
    finally:
        if old is None:
            del os.environ[scanner.ENV]
        else:
            os.environ[scanner.ENV] = old


def outcome(tmp: Path, impl: str, data: bytes, chunk: int, strict: bool) -> dict[str, Any]:
    """Everything observable of one relay run, times left out."""
    source, sink = tmp / "in", tmp / f"out-{impl}"
    source.write_bytes(data)
    keyset = KeySet()
    error = None
    with scanner_env(impl), source.open("rb") as i, sink.open("wb") as o:
        try:
            stats = relay(
                i.fileno(),
                o.fileno(),
                close_sink=False,
                chunk_size=chunk,
                strict=strict,
                keys=keyset,
                digest=True,
            )
        except StrictModeError as exc:
            stats, error = exc.stats, str(exc)
    found = stats.to_dict()
    for name in ("started_at", "first_byte_at", "ended_at"):
        found.pop(name)
    for stream in found["streams"].values():
        assert (stream.pop("first_record_at") is None) == (stream.pop("last_record_at") is None)
    found["error"] = error
    found["out"] = sink.read_bytes()
    found["keys"] = {s: sorted(keyset.iter(s)) for s in keyset.streams()}
    return found


def same_outcome(tmp: Path, data: bytes, chunk: int, strict: bool = False) -> dict[str, Any]:
    python = outcome(tmp, "python", data, chunk, strict)
    compiled = outcome(tmp, "c", data, chunk, strict)
    assert compiled == python
    return python


# -- generated streams --------------------------------------------------------------------------

NUMBERS = [
    b"1",
    b"1.0",
    b"1e0",
    b"10E-1",
    b"-0",
    b"-0.0",
    b"0",
    b"0e5",
    b"1e400",
    b"-1e-400",
    b"0.1",
    b"123456789012345678901234567890",
    b"1.5e3",
    b"2.5",
    b"1E+2",
    b"100e-2",
    b"-12.50",
    b"1e-7",
    b"9007199254740993",
    b"1" + b"0" * 320,
    b"1.7976931348623157e308",
]
raw_strings = st.tuples(
    st.text(st.characters(codec=None), max_size=6)
    | st.sampled_from(["\ud800", "a\udc00", "\U0001f600", "é", ""]),
    st.booleans(),
).map(lambda t: json.dumps(t[0], ensure_ascii=t[1]).encode("utf-8", "surrogatepass"))
raw_values = st.one_of(
    st.sampled_from(NUMBERS),
    st.integers().map(lambda i: str(i).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: str(d).encode()),
    raw_strings,
    st.sampled_from([b"null", b"true", b"false", b'{"a": 1}', b"[1, 2]", b"NaN", b"[]"]),
)
KEY_NAMES = ["id", "k2", "ü", "a\\"]


def member(name: str, raw: bytes, spaced: bool) -> bytes:
    return json.dumps(name).encode() + (b": " if spaced else b":") + raw


@st.composite
def keyed_streams(draw: st.DrawFn) -> bytes:
    """SCHEMAs with key properties, RECORDs with odd key values, STATEs, and some damage."""
    names = draw(
        st.lists(
            st.sampled_from(["users", "orders", "é", "a b", ""]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    lines: list[bytes] = []
    for _ in range(draw(st.integers(min_value=1, max_value=30))):
        kind = draw(st.sampled_from(["RECORD"] * 6 + ["SCHEMA", "STATE", "ACTIVATE_VERSION"]))
        stream = draw(st.sampled_from(names))
        spaced = draw(st.booleans())
        parts = [member("type", json.dumps(kind).encode(), spaced)]
        if kind != "STATE":
            parts.append(member("stream", json.dumps(stream).encode(), spaced))
        if kind == "SCHEMA":
            chosen = draw(st.lists(st.sampled_from(KEY_NAMES), max_size=3))
            parts.append(member("schema", b'{"properties":{}}', spaced))
            if draw(st.integers(0, 5)):
                parts.append(member("key_properties", json.dumps(chosen).encode(), spaced))
        elif kind == "RECORD":
            fields = [
                member(name, draw(raw_values), spaced)
                for name in draw(st.lists(st.sampled_from([*KEY_NAMES, "x"]), max_size=4))
            ]
            record = b"{" + b",".join(fields) + b"}"
            parts.append(
                member("record", record if draw(st.integers(0, 9)) else draw(raw_values), spaced)
            )
        else:
            parts.append(member("value", b'{"bookmarks":{}}', spaced))
        order = draw(st.permutations(parts))
        line = b"{" + (b", " if spaced else b",").join(order) + b"}"
        damage = draw(st.integers(0, 12))
        if damage == 0 and line:
            line = line[: draw(st.integers(0, len(line) - 1))]
        elif damage == 1:
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(st.binary(min_size=1, max_size=3)) + line[at:]
        elif damage == 2:
            line = line.replace(b"\\", b"\\\\\\")
        lines.append(line + draw(st.sampled_from([b"\n", b"\r\n", b"\n", b" \n"])))
    data = b"".join(lines)
    return data[:-1] if draw(st.booleans()) else data


chunks = st.sampled_from([1, 2, 7, 64, 333, 4096, 1 << 20])


@needs_compiled
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keyed_streams(), chunks)
def test_both_scanners_agree_on_generated_keyed_streams(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int
) -> None:
    same_outcome(tmp_path_factory.mktemp("d"), data, chunk)


@needs_compiled
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keyed_streams(), chunks)
def test_both_scanners_agree_in_strict_mode(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int
) -> None:
    same_outcome(tmp_path_factory.mktemp("d"), data, chunk, strict=True)


@needs_compiled
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), chunks)
def test_both_scanners_agree_on_arbitrary_bytes(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int
) -> None:
    same_outcome(tmp_path_factory.mktemp("d"), data, chunk)


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(raw_values)
def test_compiled_canonical_form_is_the_reference_or_defers_to_it(raw: bytes) -> None:
    assert COMPILED is not None
    got = COMPILED.canonical(raw)
    if got is not None:
        assert got == keys_module.component(raw)


# -- examples named by the issue ----------------------------------------------------------------

SCHEMA = b'{"type":"SCHEMA","stream":"users","schema":{},"key_properties":["id","k2"]}\n'


def record(key: bytes, k2: bytes | None = b'"x"') -> bytes:
    second = b',"k2":' + k2 if k2 is not None else b""
    return b'{"type":"RECORD","stream":"users","record":{"id":' + key + second + b',"n":1}}\n'


@needs_compiled
def test_one_and_one_point_zero_are_one_key_in_both_scanners(tmp_path: Path) -> None:
    data = SCHEMA + record(b"1") + record(b"1.0") + record(b"1e0") + record(b"10E-1")
    found = same_outcome(tmp_path, data, 1 << 20)
    assert found["keys"] == {"users": [keys_module.canonical([b"1", b'"x"'])]}


@needs_compiled
def test_missing_key_property_and_compound_keys_match_the_reference(tmp_path: Path) -> None:
    data = SCHEMA + record(b'"a"', None) + record(b'"a"', b"null") + record(b'"\\u00e9"', b"2")
    found = same_outcome(tmp_path, data, 5)
    assert len(found["keys"]["users"]) == 2  # missing and null are one key; é is the other


@needs_compiled
def test_keys_are_collected_only_for_streams_whose_latest_schema_has_keys(tmp_path: Path) -> None:
    unkeyed = b'{"type":"SCHEMA","stream":"users","schema":{},"key_properties":[]}\n'
    data = SCHEMA + record(b"1") + unkeyed + record(b"2") + SCHEMA + record(b"3")
    found = same_outcome(tmp_path, data, 1 << 20)
    assert len(found["keys"]["users"]) == 2


@needs_compiled
def test_a_record_before_its_stream_member_still_gives_its_key(tmp_path: Path) -> None:
    line = b'{"record":{"k2":"x","id":7},"stream":"users","type":"RECORD"}\n'
    found = same_outcome(tmp_path, SCHEMA + line, 1 << 20)
    assert found["keys"]["users"] == [keys_module.canonical([b"7", b'"x"'])]


@needs_compiled
def test_keys_move_to_the_keyset_in_batches_and_all_arrive(tmp_path: Path) -> None:
    data = SCHEMA + b"".join(record(str(i).encode()) for i in range(300_000))
    found = outcome(tmp_path, "c", data, 1 << 20, strict=False)
    assert len(found["keys"]["users"]) == 300_000
    assert found["counts"] == {"SCHEMA": 1, "RECORD": 300_000}


# -- choosing the implementation ----------------------------------------------------------------


def version(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flext_meltano_context", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return done.stdout


@needs_compiled
def test_version_names_the_compiled_scanner_when_it_is_active() -> None:
    assert "scanner: compiled" in version({scanner.ENV: "auto"})


def test_version_names_the_pure_python_scanner_when_forced() -> None:
    assert "scanner: pure Python (FLEXT_CONTEXT_SCANNER=python)" in version({scanner.ENV: "python"})


def test_an_unknown_scanner_choice_is_a_clear_usage_error(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_bytes(SCHEMA)
    with source.open("rb") as stdin:
        done = subprocess.run(
            [sys.executable, "-m", "flext_meltano_context", "relay"],
            stdin=stdin,
            capture_output=True,
            check=False,
            env={**os.environ, scanner.ENV: "fast"},
        )
    assert done.returncode == 2
    assert b"FLEXT_CONTEXT_SCANNER='fast' is not one of auto, c, python" in done.stderr


@needs_compiled
def test_an_extension_built_from_an_older_source_is_refused(tmp_path: Path) -> None:
    package = Path(scanner.__file__).parent
    copy = tmp_path / "flext_meltano_context"
    copy.mkdir()
    for item in package.iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    (copy / "lineage").symlink_to(package / "lineage")
    probe = "from flext_meltano_context import scanner; print(scanner.describe())"
    # -S: no .pth files, so the editable install's finder cannot point back at the checkout
    path = os.pathsep.join([str(tmp_path), sysconfig.get_paths()["purelib"]])
    env = {**os.environ, "PYTHONPATH": path, scanner.ENV: "auto"}

    def describe() -> str:
        return subprocess.run(
            [sys.executable, "-S", "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=tmp_path,  # not the checkout: "-c" puts the working directory first
        ).stdout

    assert describe().strip() == "scanner: compiled"  # the control: an unchanged source
    (copy / "_scanner.c").write_text((copy / "_scanner.c").read_text() + "\n/* edited */\n")
    assert "extension is stale (built from an older _scanner.c)" in describe()


@needs_compiled
def test_the_scan_releases_the_gil_so_other_threads_run_beside_it() -> None:
    assert COMPILED is not None
    line = b'{"type":"RECORD","stream":"users","record":{"id":1,"pad":"' + b"p" * 300 + b'"}}\n'
    data = line * 300_000  # ~100 MB: a scan of a tenth of a second or more
    scan = COMPILED.Scanner()
    scan.register(b"users", (b"id",))
    ticks = 0
    running = True

    def spin() -> None:
        nonlocal ticks
        while running:
            ticks += 1

    # A long switch interval: a thread waiting for a GIL that is held gets nothing for 1 s, so
    # without the release `during` is exactly 0 (the control); with it, the spinner runs.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.05)
        before = ticks
        lines, size, at, _ = scan.scan(data, 0, len(data), 0.0)  # one C call
        during = ticks - before
    finally:
        running = False
        thread.join()
        sys.setswitchinterval(interval)
    assert (lines, size, at) == (300_000, len(data), -1)
    assert during > 0  # with the GIL held for the whole call, the other thread could not tick
