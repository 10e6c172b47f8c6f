"""Relay throughput against the raw pipe and a Meltano-style relay, measured in the same run.

    python benchmarks/relay.py --messages 1000000

Every variant runs as a real pipeline of processes, `cat FILE | <relay> | cat > /dev/null`:
the raw pipe (`cat`), Meltano's loop (asyncio `readline` + `write` + `drain` per line, no
parsing), and `flext-context relay` without and with `--digest` and with `--record-column`, and
`relay()` with and without key collection into a KeySet (every stream is keyed) for
`key_cpu_us_per_msg`. The relay variants run once per scanner implementation
(FLEXT_CONTEXT_SCANNER=c, then python; issue 14). Throughput excludes each variant's start-up
(the same pipeline over empty input), so the numbers compare relaying, not interpreter start;
the JSON also carries the start-up times. The relay's CPU time and peak RSS come from `wait4` on
its process. The last lines are one JSON object per implementation (`impl`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

STREAMS = ("users", "orders", "events")
CAT = shutil.which("cat") or "/bin/cat"
ASYNCIO_RELAY = """
import asyncio, sys

async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)  # Meltano: elt.buffer_size / 2
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout.buffer
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()
    writer.close()

asyncio.run(main())
"""


def generate(path: Path, messages: int) -> Counter[str]:
    """A realistic stream: SCHEMAs, nested records of 3 interleaved streams, a STATE per 10,000."""
    rng = random.Random(7)
    counts: Counter[str] = Counter()
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": ["string", "null"]},
            "address": {"type": "object"},
            "tags": {"type": "array"},
            "score": {"type": "number"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    }
    with path.open("wb") as out:
        for name in STREAMS:
            line = {"type": "SCHEMA", "stream": name, "schema": schema, "key_properties": ["id"]}
            out.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            counts["SCHEMA"] += 1
        records = 0
        while sum(counts.values()) < messages:
            name = STREAMS[rng.randrange(3)]
            record = {
                "id": records,
                "name": f"customer {records} é",
                "email": f"c{records}@example.com",
                "address": {
                    "street": f"{rng.randrange(9999)} Main St",
                    "city": rng.choice(["Lisbon", "Porto", "Braga"]),
                    "geo": {"lat": round(rng.uniform(-90, 90), 6), "lon": 12.5},
                },
                "tags": rng.sample(["a", "b", "c", "d", "e"], 3),
                "score": round(rng.random() * 100, 3),
                "active": rng.random() < 0.5,
                "updated_at": "2026-11-26T09:15:04.406000+00:00",
            }
            line = {
                "type": "RECORD",
                "stream": name,
                "record": record,
                "time_extracted": "2026-11-26T09:15:04.406000+00:00",
            }
            out.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
            counts["RECORD"] += 1
            records += 1
            if records % 10_000 == 0 and sum(counts.values()) < messages:
                state = {"type": "STATE", "value": {"bookmarks": {name: {"id": records}}}}
                out.write(json.dumps(state, separators=(",", ":")).encode() + b"\n")
                counts["STATE"] += 1
    return counts


def file_sha256(path: Path) -> str:
    """Streaming digest: the benchmark's own memory must stay small (children inherit it)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


KEYS_DRIVER = """
import sys
from flext_meltano_context.keys import KeySet
from flext_meltano_context.relay import relay
keys = KeySet() if sys.argv[1] == "keys" else None
relay(0, 1, keys=keys)
"""


def pipeline(
    source: Path, middle: list[str], sink: str = os.devnull, env: dict[str, str] | None = None
) -> dict[str, float]:
    """Run `cat source | middle | cat > sink`; wall seconds, CPU seconds and peak RSS of middle."""
    began = time.perf_counter()
    with Path(sink).open("wb") as out:
        head = subprocess.Popen([CAT, str(source)], stdout=subprocess.PIPE)
        mid = subprocess.Popen(
            middle, stdin=head.stdout, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}
        )
        tail = subprocess.Popen([CAT], stdin=mid.stdout, stdout=out)
        assert head.stdout is not None
        assert mid.stdout is not None
        head.stdout.close()
        mid.stdout.close()
        _, status, usage = os.wait4(mid.pid, 0)
        mid.returncode = os.waitstatus_to_exitcode(status)
        head.wait()
        tail.wait()
    wall = time.perf_counter() - began
    if mid.returncode != 0:
        raise SystemExit(f"{middle} exited with {mid.returncode}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
    }


def best(
    source: Path, empty: Path, middle: list[str], runs: int, env: dict[str, str] | None = None
) -> dict[str, float]:
    """Fastest of `runs`, minus the fastest start-up over empty input."""
    empties = [pipeline(empty, middle, env=env) for _ in range(3)]
    startup = min(e["wall"] for e in empties)
    results = [pipeline(source, middle, env=env) for _ in range(runs)]
    fastest = min(results, key=lambda r: r["wall"])
    return {
        **fastest,
        "startup": startup,
        "startup_cpu": min(e["cpu"] for e in empties),
        "seconds": max(fastest["wall"] - startup, 1e-9),
        "rss_mb": max(r["rss_mb"] for r in results),
    }


def implementations() -> list[str]:
    """The scanners to measure: the compiled one when it is built, and pure Python."""
    from flext_meltano_context import scanner

    return (["c"] if scanner.compiled()[0] is not None else []) + ["python"]


def measure_impl(
    impl: str, work: Path, source: Path, empty: Path, expected: Counter[str], runs: int, mb: float
) -> dict[str, Any]:
    """Correctness, then every relay variant with FLEXT_CONTEXT_SCANNER=impl."""
    env = {"FLEXT_CONTEXT_SCANNER": impl}
    stats_file, copy = work / "stats.json", work / "copy.jsonl"
    relay = [sys.executable, "-m", "flext_meltano_context", "--log-level", "WARNING", "relay"]
    pipeline(source, [*relay, "--stats", str(stats_file), "--digest"], sink=str(copy), env=env)
    stats = json.loads(stats_file.read_text())
    want, got = file_sha256(source), file_sha256(copy)
    copy.unlink()
    variants = {
        "relay": [*relay, "--stats", str(stats_file)],
        "digest": [*relay, "--stats", str(stats_file), "--digest"],
        "column": [*relay, "--stats", str(stats_file), "--record-column", "*"],
        "nokeys": [sys.executable, "-c", KEYS_DRIVER, "none"],
        "keys": [sys.executable, "-c", KEYS_DRIVER, "keys"],
    }
    measured: dict[str, dict[str, float]] = {}
    for name, command in variants.items():
        measured[name] = m = best(source, empty, command, runs, env)
        print(
            f"{impl:>6} {name:>7}: {mb / m['seconds']:8,.0f} MB/s  wall {m['wall']:.2f} s"
            f" (start-up {m['startup']:.2f} s)  cpu {m['cpu']:.2f} s"
            f"  peak RSS {m['rss_mb']:.0f} MB",
            file=sys.stderr,
        )
    return {
        "measured": measured,
        "bytes_identical": want == got == stats["digest"],
        "counts_exact": stats["counts"] == dict(expected) and stats["anomaly_count"] == 0,
    }


def summary(
    impl: str, run: dict[str, Any], base: dict[str, dict[str, float]], messages: int, mb: float
) -> dict[str, Any]:
    """The JSON line of one implementation: the keys this benchmark has always printed, and more."""
    measured = {**base, **run["measured"]}

    def rate(name: str) -> float:
        return mb / measured[name]["seconds"]

    def cpu_us(name: str) -> float:
        return measured[name]["cpu"] * 1e6 / messages

    return {
        "impl": impl,
        "messages": messages,
        "mb": round(mb, 1),
        "relay_mb_s": round(rate("relay")),
        "raw_pipe_mb_s": round(rate("raw")),
        "asyncio_mb_s": round(rate("asyncio")),
        "digest_mb_s": round(rate("digest")),
        "record_column_mb_s": round(rate("column")),
        "ratio_vs_raw": round(rate("relay") / rate("raw"), 3),
        "ratio_vs_asyncio": round(rate("relay") / rate("asyncio"), 2),
        "digest_ratio_vs_raw": round(rate("digest") / rate("raw"), 3),
        "record_column_ratio_vs_raw": round(rate("column") / rate("raw"), 3),
        "ratio_vs_raw_with_startup": round(measured["raw"]["wall"] / measured["relay"]["wall"], 3),
        "cpu_us_per_msg": round(cpu_us("relay"), 3),
        "digest_cpu_us_per_msg": round(cpu_us("digest"), 3),
        "asyncio_cpu_us_per_msg": round(cpu_us("asyncio"), 3),
        "key_cpu_us_per_msg": round(cpu_us("keys") - cpu_us("nokeys"), 3),
        # cpu_us_per_msg includes the interpreter's start (imports); this one leaves it out
        "net_cpu_us_per_msg": round(
            (measured["relay"]["cpu"] - measured["relay"]["startup_cpu"]) * 1e6 / messages, 3
        ),
        "keys_mb_s": round(rate("keys")),
        "peak_rss_mb": round(max(measured[n]["rss_mb"] for n in ("relay", "digest", "column")), 1),
        "keys_peak_rss_mb": round(measured["keys"]["rss_mb"], 1),  # the KeySet holds every key
        "relay_startup_s": round(measured["relay"]["startup"], 3),
        "startup_excluded": True,
        "counts_exact": run["counts_exact"],
        "bytes_identical": run["bytes_identical"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3, help="runs per variant; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flext-relay-bench-") as tmp:
        work = Path(tmp)
        source, empty = work / "stream.jsonl", work / "empty"
        empty.write_bytes(b"")
        expected = generate(source, args.messages)
        mb = source.stat().st_size / 1e6
        print(f"{args.messages:,} messages, {mb:,.0f} MB, counts {dict(expected)}", file=sys.stderr)
        base = {
            "raw": best(source, empty, [CAT], args.runs),
            "asyncio": best(source, empty, [sys.executable, "-c", ASYNCIO_RELAY], args.runs),
        }
        runs = {
            impl: measure_impl(impl, work, source, empty, expected, args.runs, mb)
            for impl in implementations()
        }
    for impl, run in runs.items():
        print(json.dumps(summary(impl, run, base, args.messages, mb)))


if __name__ == "__main__":
    main()
