"""The relay: same bytes out as in, every message counted, bad lines reported, never filtered."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flext_meltano_context import scanner
from flext_meltano_context.errors import StrictModeError
from flext_meltano_context.relay import Injection, RelayProgress, RelayStats, relay
from tests.conftest import fake

SCHEMA = b'{"type":"SCHEMA","stream":"users","schema":{"properties":{"id":{"type":"integer"}}},"key_properties":["id"]}\n'  # noqa: E501


@pytest.fixture(autouse=True, scope="module", params=["python", "c"], ids=["python", "compiled"])
def scanner_impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs against both relay scanners (FLEXT_CONTEXT_SCANNER, children too)."""
    if request.param == "c" and scanner.compiled()[0] is None:
        pytest.skip(f"compiled scanner: {scanner.compiled()[1]}")
    old = os.environ.get(scanner.ENV)
    os.environ[scanner.ENV] = request.param
    yield request.param
    if old is None:
        del os.environ[scanner.ENV]
    else:
        os.environ[scanner.ENV] = old


def relay_bytes(tmp: Path, data: bytes, **options: Any) -> tuple[RelayStats, bytes]:
    """Relay `data` from one file to another; the stats and what the sink got."""
    source, sink = tmp / "in", tmp / "out"
    source.write_bytes(data)
    with source.open("rb") as i, sink.open("wb") as o:
        stats = relay(i.fileno(), o.fileno(), close_sink=False, **options)
    return stats, sink.read_bytes()


def reference_counts(data: bytes) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Counts by type and by stream the plain way: json.loads on each line."""
    types: Counter[str] = Counter()
    streams: dict[str, Counter[str]] = {}
    for line in data.splitlines():
        message = json.loads(line)
        types[message["type"]] += 1
        if "stream" in message:
            streams.setdefault(message["stream"], Counter())[message["type"]] += 1
    return types, streams


# -- byte identity and counts -----------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=4096))
def test_relay_forwards_every_byte_of_arbitrary_input(
    tmp_path_factory: pytest.TempPathFactory, blob: bytes, chunk: int
) -> None:
    stats, out = relay_bytes(tmp_path_factory.mktemp("r"), blob, chunk_size=chunk, digest=True)
    assert out == blob
    assert stats.bytes == len(blob) == stats.bytes_out
    assert stats.digest == hashlib.sha256(blob).hexdigest()
    assert stats.lines == blob.count(b"\n") + (0 if blob.endswith(b"\n") or not blob else 1)


stream_names = st.text(min_size=1, max_size=12).filter(lambda s: s.strip())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def singer_streams(draw: st.DrawFn) -> bytes:
    """Interleaved streams with SCHEMAs first, any key order, spacing, escaping and endings."""
    names = draw(st.lists(stream_names, min_size=1, max_size=4, unique=True))
    messages: list[dict[str, Any]] = [
        {"type": "SCHEMA", "stream": n, "schema": {"properties": {}}, "key_properties": []}
        for n in names
    ]
    for _ in range(draw(st.integers(min_value=0, max_value=40))):
        kind = draw(st.sampled_from(["RECORD"] * 6 + ["STATE", "ACTIVATE_VERSION", "BATCH", "X"]))
        message: dict[str, Any] = {"type": kind}
        if kind != "STATE":
            message["stream"] = draw(st.sampled_from(names))
        message["record" if kind == "RECORD" else "value"] = draw(json_values)
        messages.append(message)
    lines = []
    for message in messages:
        items = list(message.items())
        if draw(st.booleans()):
            items.reverse()  # some taps put `type` last
        separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
        text = json.dumps(dict(items), separators=separators, ensure_ascii=draw(st.booleans()))
        lines.append(text.encode() + draw(st.sampled_from([b"\n", b"\r\n"])))
    data = b"".join(lines)
    return data[:-1] if draw(st.booleans()) else data  # last line without newline


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(singer_streams(), st.sampled_from([1, 2, 7, 64, 1000, 1 << 20]))
def test_counts_of_generated_streams_equal_a_json_loads_count(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int
) -> None:
    stats, out = relay_bytes(tmp_path_factory.mktemp("r"), data, chunk_size=chunk)
    types, streams = reference_counts(data)
    assert out == data
    assert stats.counts == types
    assert {name: dict(s.counts) for name, s in stats.streams.items()} == streams
    assert stats.anomaly_count == 0
    assert stats.lines == len(data.splitlines())
    streamless = sum(
        len(line) for line in data.splitlines(keepends=True) if "stream" not in json.loads(line)
    )
    assert sum(s.bytes for s in stats.streams.values()) + streamless == len(data)


@given(st.lists(st.binary(max_size=200), max_size=30), st.integers(min_value=1, max_value=300))
@settings(max_examples=100, deadline=None)
def test_garbage_never_raises_and_every_line_is_counted_or_reported(
    tmp_path_factory: pytest.TempPathFactory, parts: list[bytes], chunk: int
) -> None:
    data = b"\n".join(parts)
    stats, out = relay_bytes(tmp_path_factory.mktemp("r"), data, chunk_size=chunk)
    assert out == data
    assert stats.lines == len(data.split(b"\n")) - (1 if data.endswith(b"\n") or not data else 0)


def test_schema_and_key_properties_and_last_state_are_kept(tmp_path: Path) -> None:
    data = (
        SCHEMA
        + b'{"type":"RECORD","stream":"users","record":{"id":1}}\n'
        + b'{"type":"STATE","value":{"bookmarks":{"users":{"id":1}}}}\n'
        + b'{"type":"RECORD","stream":"users","record":{"id":2}}\n'
        + b'{"type":"STATE","value":{"bookmarks":{"users":{"id":2,'
        + b'"big":123456789012345678901234567890}}}}\n'
    )
    stats, _ = relay_bytes(tmp_path, data)
    users = stats.streams["users"]
    assert users.schema == {"properties": {"id": {"type": "integer"}}}
    assert users.key_properties == ("id",)
    assert users.records == 2
    assert users.first_record_at is not None
    assert users.last_record_at is not None
    assert users.first_record_at <= users.last_record_at
    assert stats.states_seen == 2
    big = stats.last_state["bookmarks"]["users"]["big"]
    assert big == 123456789012345678901234567890
    assert isinstance(big, int)
    assert json.loads(json.dumps(stats.to_dict()))["records"] == 2


# -- anomalies --------------------------------------------------------------------------------

ANOMALIES = [
    ("blank_line", b"\n"),
    ("blank_line", b"   \r\n"),
    ("invalid_json", b'{"type":"RECORD","stream":"users","record":{"id":1}\n'),
    ("invalid_utf8", b'{"type":"RECORD","stream":"users","record":{"name":"\xff\xfe"}}\n'),
    ("not_an_object", b'["RECORD","users"]\n'),
    ("missing_type", b'{"stream":"users","record":{}}\n'),
    ("missing_type", b'{"type":7,"stream":"users","record":{}}\n'),
    ("missing_stream", b'{"type":"RECORD","record":{}}\n'),
    ("record_without_schema", b'{"type":"RECORD","stream":"ghosts","record":{}}\n'),
]


@pytest.mark.parametrize(
    ("kind", "bad"), ANOMALIES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(ANOMALIES)]
)
@pytest.mark.parametrize("chunk", [5, 1 << 20], ids=["tiny-chunks", "big-chunks"])
def test_bad_line_is_forwarded_and_reported_where_it_is(
    tmp_path: Path, kind: str, bad: bytes, chunk: int
) -> None:
    good = b'{"type":"RECORD","stream":"users","record":{"id":1}}\n'
    data = SCHEMA + good + bad + good
    stats, out = relay_bytes(tmp_path, data, chunk_size=chunk)
    assert out == data
    assert stats.anomaly_count == 1
    (anomaly,) = stats.anomalies
    assert (anomaly.kind, anomaly.line, anomaly.offset) == (kind, 3, len(SCHEMA + good))
    assert len(anomaly.excerpt) <= 83
    assert stats.lines == 4


def test_invalid_utf8_inside_a_record_is_counted_reported_and_forwarded(tmp_path: Path) -> None:
    bad = b'{"type":"RECORD","stream":"users","record":{"id":2,"name":"caf\xe9"}}\n'
    stats, out = relay_bytes(tmp_path, SCHEMA + bad)
    assert out == SCHEMA + bad
    assert stats.streams["users"].records == 1
    assert [a.kind for a in stats.anomalies] == ["invalid_utf8"]
    assert stats.anomalies[0].stream == "users"


def test_anomaly_excerpt_is_short_even_for_a_huge_line(tmp_path: Path) -> None:
    stats, _ = relay_bytes(tmp_path, b"x" * 100_000 + b"\n")
    assert stats.anomalies[0].kind == "invalid_json"
    assert len(stats.anomalies[0].excerpt) < 100


def test_only_the_first_hundred_anomalies_are_kept_but_all_are_counted(tmp_path: Path) -> None:
    stats, _ = relay_bytes(tmp_path, b"nope\n" * 250)
    assert (stats.anomaly_count, len(stats.anomalies)) == (250, 100)


def test_strict_mode_stops_before_forwarding_the_bad_line(tmp_path: Path) -> None:
    good = b'{"type":"RECORD","stream":"users","record":{"id":1}}\n'
    data = SCHEMA + good * 3 + b"not json\n" + good
    for chunk in (3, 1 << 20):
        source, sink = tmp_path / "in", tmp_path / f"out{chunk}"
        source.write_bytes(data)
        with source.open("rb") as i, sink.open("wb") as o, pytest.raises(StrictModeError) as caught:
            relay(i.fileno(), o.fileno(), strict=True, chunk_size=chunk, close_sink=False)
        assert sink.read_bytes() == SCHEMA + good * 3
        assert "line 5" in str(caught.value)
        stats = caught.value.stats
        assert (stats.records(), stats.anomalies[0].kind) == (3, "invalid_json")


def test_strict_mode_forwards_a_clean_stream_unchanged(tmp_path: Path) -> None:
    data = SCHEMA + b'{"type":"RECORD","stream":"users","record":{"id":1}}'
    stats, out = relay_bytes(tmp_path, data, strict=True, chunk_size=4)
    assert out == data
    assert stats.records() == 1


# -- long lines, pipes, early close, progress -------------------------------------------------


def test_a_100_mb_line_is_forwarded_and_counted(tmp_path: Path) -> None:
    huge = (
        b'{"type":"RECORD","stream":"users","record":{"id":1,"blob":"' + b"a" * (100 << 20) + b'"}}'
    )
    data = SCHEMA + huge + b"\n" + b'{"type":"STATE","value":{}}\n'
    stats, out = relay_bytes(tmp_path, data, digest=True)
    assert len(out) == len(data)
    assert stats.digest == hashlib.sha256(data).hexdigest()
    assert stats.counts == {"SCHEMA": 1, "RECORD": 1, "STATE": 1}
    assert stats.anomaly_count == 0


def test_a_100_mb_line_through_the_cli_keeps_memory_near_the_line_size(tmp_path: Path) -> None:
    huge = b'{"type":"RECORD","stream":"users","record":{"blob":"' + b"a" * (100 << 20) + b'"}}\n'
    source = tmp_path / "in"
    source.write_bytes(SCHEMA + huge)
    code = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'rb') as i:\n"
        "    subprocess.run([sys.executable, '-m', 'flext_meltano_context', 'relay',"
        " '--stats', sys.argv[2]], stdin=i, stdout=subprocess.DEVNULL, check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(source), str(tmp_path / "s.json")],
        capture_output=True,
        check=True,
    )
    peak_mb = int(done.stdout)
    assert peak_mb < 100 * 2.5 + 60, f"peak RSS {peak_mb} MB for a 100 MB line"
    assert json.loads((tmp_path / "s.json").read_text())["records"] == 1


def writer(fd: int, data: bytes) -> threading.Thread:
    """Feed `data` into a pipe's write end from a thread, then close it."""

    def run() -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except BrokenPipeError:
            pass  # the relay stopped reading: what the test is about
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_relay_between_real_pipes_forwards_everything_and_closes_the_sink() -> None:
    record = b'{"type":"RECORD","stream":"users","record":{"id":1,"pad":"' + b"p" * 300 + b'"}}\n'
    data = SCHEMA + record * 20_000
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    feeder = writer(src_w, data)
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(dst_r, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stats = relay(src_r, dst_w)
    reader.join(10)
    feeder.join(10)
    os.close(src_r)
    os.close(dst_r)
    assert bytes(received) == data
    assert stats.records() == 20_000
    assert not stats.sink_closed_early


def test_sink_that_exits_after_ten_lines_ends_the_relay_promptly() -> None:
    record = b'{"type":"RECORD","stream":"users","record":{"id":1}}\n'
    src_r, src_w = os.pipe()
    feeder = writer(src_w, SCHEMA + record * 2_000_000)  # ~100 MB: must not be read to the end
    target = subprocess.Popen(
        fake("relay_head.py", "10"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert target.stdin is not None
    assert target.stdout is not None
    began = time.monotonic()
    stats = relay(src_r, target.stdin.fileno(), close_sink=False)
    elapsed = time.monotonic() - began
    target.stdin.close()
    with target.stdout:
        out = target.stdout.read()
    assert target.wait(10) == 0
    os.close(src_r)
    feeder.join(10)
    assert stats.sink_closed_early
    assert elapsed < 5
    assert out == SCHEMA + record * 9
    assert stats.bytes < 100 << 20


def test_progress_is_reported_at_a_bounded_rate(tmp_path: Path) -> None:
    data = SCHEMA + b'{"type":"RECORD","stream":"users","record":{"id":1}}\n' * 5000
    seen: list[RelayProgress] = []
    relay_bytes(tmp_path, data, chunk_size=1000, progress=seen.append, progress_interval=0.0)
    assert len(seen) > 100
    assert seen[-1].records["users"] <= 5000
    assert all(a.bytes <= b.bytes for a, b in itertools.pairwise(seen))
    rare: list[RelayProgress] = []
    relay_bytes(tmp_path, data, chunk_size=1000, progress=rare.append, progress_interval=3600)
    assert rare == []


# -- injection --------------------------------------------------------------------------------

STREAM = (
    b'{"type":"SCHEMA","stream":"users","schema":{"type":"object","properties":{"id":{"type":"integer"},'
    b'"score":{"type":"number"}},"required":["id"]},"key_properties":["id"]}\n'
    b'{"type":"SCHEMA","stream":"raw","schema":{"type":"object"},"key_properties":[]}\n'
    b'{"type":"RECORD","stream":"users","record":{"id":1,"score":1.50}}\r\n'
    b'{"type": "RECORD", "stream": "users", "record": {}}\n'
    b'{"record":{"id":3,"score":1e2},"stream":"users","type":"RECORD"}\n'
    b'{"type":"RECORD","stream":"raw","record":{"x":1}}\n'
    b'{"type":"STATE","value":{"bookmarks":{"users":{"replication_key_value":1.50,"n":12345678901234567890}},'
    b'"flext_context":{"old":"kept"}}}\n'
)


def injected(
    tmp_path: Path, injection: Injection, chunk: int = 1 << 20
) -> tuple[RelayStats, list[bytes]]:
    stats, out = relay_bytes(tmp_path, STREAM, injection=injection, chunk_size=chunk)
    return stats, out.split(b"\n")[:-1]


@pytest.mark.parametrize("chunk", [3, 1 << 20], ids=["tiny-chunks", "big-chunks"])
def test_record_column_goes_into_schema_properties_and_records_of_selected_streams(
    tmp_path: Path, chunk: int
) -> None:
    stats, lines = injected(
        tmp_path, Injection("cid", record_column_streams=frozenset({"users"})), chunk
    )
    schema = json.loads(lines[0])
    assert schema["schema"]["properties"]["_sdc_correlation_id"] == {"type": ["string", "null"]}
    assert schema["key_properties"] == ["id"]
    assert schema["schema"]["required"] == ["id"]
    assert lines[1] + b"\n" == STREAM.split(b"\n")[1] + b"\n"  # not selected: untouched
    assert (
        lines[2] == b'{"type":"RECORD","stream":"users","record":'
        b'{"_sdc_correlation_id":"cid","id":1,"score":1.50}}\r'
    )
    assert (
        lines[3]
        == b'{"type": "RECORD", "stream": "users", "record": {"_sdc_correlation_id":"cid"}}'
    )
    assert json.loads(lines[4])["record"] == {"id": 3, "score": 100.0, "_sdc_correlation_id": "cid"}
    assert b'"score":1e2' in lines[4]  # the tap's number text is kept
    assert lines[5] == b'{"type":"RECORD","stream":"raw","record":{"x":1}}'
    assert lines[6] == STREAM.split(b"\n")[6]  # no state context: STATE untouched
    assert stats.records() == 4
    assert stats.anomaly_count == 0


def test_schema_patch_is_deterministic(tmp_path: Path) -> None:
    injection = Injection("cid", record_column_streams=frozenset({"*"}))
    _, first = injected(tmp_path, injection)
    _, second = injected(tmp_path, injection)
    assert first[:2] == second[:2]


def test_streams_whose_schema_has_no_properties_get_no_column(tmp_path: Path) -> None:
    _, lines = injected(tmp_path, Injection("cid", record_column_streams=frozenset({"*"})))
    assert lines[1] + b"\n" == STREAM.split(b"\n")[1] + b"\n"
    assert lines[5] == b'{"type":"RECORD","stream":"raw","record":{"x":1}}'


def test_state_context_is_merged_into_the_state_value_keeping_numbers(tmp_path: Path) -> None:
    context = {"correlation_id": "cid", "run_id": "rid"}
    stats, lines = injected(tmp_path, Injection("cid", state_context=context))
    assert lines[:6] == STREAM.split(b"\n")[:6]  # only the STATE line changes
    assert b'"replication_key_value":1.50' in lines[6]
    assert b"12345678901234567890" in lines[6]
    value = json.loads(lines[6])["value"]
    assert value["flext_context"] == {"old": "kept", "correlation_id": "cid", "run_id": "rid"}
    assert stats.last_state["flext_context"]["correlation_id"] == "cid"
    assert stats.last_state["bookmarks"]["users"]["n"] == 12345678901234567890
    assert stats.states_seen == 1


def test_without_injection_the_output_is_byte_identical(tmp_path: Path) -> None:
    _, out = relay_bytes(tmp_path, STREAM, injection=None, chunk_size=5)
    assert out == STREAM


# -- the command line -------------------------------------------------------------------------


def run_cli(
    *args: str, data: bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "flext_meltano_context", "relay", *args],
        input=data,
        capture_output=True,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_cli_relays_stdin_to_stdout_and_writes_stats_to_a_file(tmp_path: Path) -> None:
    data = SCHEMA + b'{"type":"RECORD","stream":"users","record":{"id":1}}\n'
    done = run_cli("--stats", str(tmp_path / "s.json"), "--digest", data=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["streams"]["users"]["counts"] == {"SCHEMA": 1, "RECORD": 1}
    assert stats["digest"] == hashlib.sha256(data).hexdigest()


def test_cli_writes_stats_to_stderr_without_a_file() -> None:
    done = run_cli(data=SCHEMA)
    assert done.returncode == 0
    assert json.loads(done.stderr.splitlines()[-1])["counts"] == {"SCHEMA": 1}


def test_cli_strict_exits_1_before_forwarding_the_bad_line(tmp_path: Path) -> None:
    done = run_cli(
        "--strict", "--stats", str(tmp_path / "s.json"), data=SCHEMA + b"oops\n" + SCHEMA
    )
    assert done.returncode == 1
    assert done.stdout == SCHEMA
    assert b"strict mode stopped the stream at line 2" in done.stderr
    assert json.loads((tmp_path / "s.json").read_text())["anomaly_count"] == 1


def test_cli_injects_the_inherited_correlation_id() -> None:
    cid = "0190b4a0-7c3e-7d2a-9f1e-3b5c7d9e1f20"
    data = STREAM
    done = run_cli(
        "--inject-state-correlation",
        "--record-column",
        "users",
        data=data,
        env={"FLEXT_CORRELATION_ID": cid, "MELTANO_RUN_ID": "0190b4a0-7c3e-7d2a-9f1e-000000000001"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split(b"\n")
    assert json.loads(lines[2])["record"]["_sdc_correlation_id"] == cid
    assert json.loads(lines[6])["value"]["flext_context"]["correlation_id"] == cid
    assert json.loads(lines[6])["value"]["flext_context"]["run_id"].endswith("000000000001")


def test_cli_exits_1_when_the_reader_closes_early(tmp_path: Path) -> None:
    record = b'{"type":"RECORD","stream":"users","record":{"id":1}}\n'
    source = tmp_path / "in"
    source.write_bytes(SCHEMA + record * 300_000)
    with source.open("rb") as stdin:
        relay_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flext_meltano_context",
                "relay",
                "--stats",
                str(tmp_path / "s.json"),
            ],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        head = subprocess.run(
            fake("relay_head.py", "10"), stdin=relay_proc.stdout, capture_output=True, check=True
        )
        assert relay_proc.stdout is not None
        relay_proc.stdout.close()
        _, err = relay_proc.communicate(timeout=30)
    assert relay_proc.returncode == 1
    assert b"closed it" in err
    assert head.stdout == SCHEMA + record * 9
    assert json.loads((tmp_path / "s.json").read_text())["sink_closed_early"] is True


def test_relay_command_has_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flext_meltano_context", "relay", "--help"],
        capture_output=True,
        check=True,
    )
    assert b"--record-column" in done.stdout


def lines_of(data: bytes) -> Iterator[bytes]:
    yield from data.splitlines()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(singer_streams(), st.sampled_from([1, 50, 333, 1 << 20]))
def test_injection_on_generated_streams_changes_only_what_it_must(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int
) -> None:
    injection = Injection("c-1", {"correlation_id": "c-1"}, frozenset({"*"}))
    stats, out = relay_bytes(
        tmp_path_factory.mktemp("r"), data, injection=injection, chunk_size=chunk
    )
    before, after = data.splitlines(), out.splitlines()
    assert len(after) == len(before)
    assert out.endswith(b"\n") == data.endswith(b"\n")
    for old_line, new_line in zip(before, after, strict=True):
        old, new = json.loads(old_line), json.loads(new_line)
        if old["type"] == "RECORD" and isinstance(old["record"], dict):
            assert new == {**old, "record": {**old["record"], "_sdc_correlation_id": "c-1"}}
            assert new_line.endswith(b"\r") == old_line.endswith(b"\r")
        elif old["type"] == "SCHEMA":
            old["schema"]["properties"]["_sdc_correlation_id"] = {"type": ["string", "null"]}
            assert new == old
        elif old["type"] == "STATE" and isinstance(old["value"], dict):
            context = {"flext_context": {"correlation_id": "c-1"}}
            assert new == {**old, "value": {**old["value"], **context}}
        else:
            assert new_line == old_line
    assert stats.counts == reference_counts(data)[0]


def test_a_counting_bug_stops_the_counting_but_never_the_forwarding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flext_meltano_context import relay as relay_module

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(relay_module._PyScanner, "feed", broken)
    monkeypatch.setattr(relay_module._CScanner, "feed", broken)
    data = SCHEMA + b'{"type":"RECORD","stream":"users","record":{"id":1}}\n' * 1000
    stats, out = relay_bytes(tmp_path, data, chunk_size=100, digest=True)
    assert out == data
    assert stats.counting_error == "KeyError: 'a bug'"
    assert stats.digest == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("chunk", [7, 1 << 20], ids=["tiny-chunks", "big-chunks"])
def test_on_lines_sees_every_whole_line_once_in_order(tmp_path: Path, chunk: int) -> None:
    data = SCHEMA + b'{"type":"RECORD","stream":"users","record":{"id":1}}\n' * 50 + b"tail"
    seen: list[bytes] = []
    relay_bytes(tmp_path, data, chunk_size=chunk, on_lines=lambda ls: seen.extend(map(bytes, ls)))
    assert seen == data.split(b"\n")
