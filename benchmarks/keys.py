"""The landing check's key set and probe: memory and speed against a plain Python set, same run.

    python benchmarks/keys.py --keys 10000000

Each variant runs in a process of its own, so its peak RSS (from `wait4`) is its own:
- `set`: the baseline, every canonical key in one Python set (unbounded memory);
- `keyset`: `KeySet` at its default budget (256 MB), spilling sorted runs to disk past it, then
  one pass of `count()` and one of `iter()` (what the probe reads);
- `probe`: the check by key end to end on `--probe-keys` keys against a DuckDB table holding all
  but one of them (`Check.finish`: wire file, probe process, anti-join), with our duckdb.
Keys are fed in batches of 10,000, as the relay hands a region of lines to the collector, in a
scrambled order. Prints one line per variant, then one JSON object (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 10_000
_LEN = struct.Struct("<I")


def key(number: int) -> bytes:
    """The canonical key of one integer id (what `keys.canonical([b"123"])` gives)."""
    digits = str(number).encode()
    return b"I" + _LEN.pack(len(digits)) + digits


def ids(count: int) -> Any:
    """0..count-1 in a scrambled order (a multiplier prime to count), as a tap's keys come."""
    step = 2_654_435_761 % count or 1
    while _gcd(step, count) != 1:
        step += 1
    return ((i * step) % count for i in range(count))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def batches(count: int) -> Any:
    batch: list[bytes] = []
    for number in ids(count):
        batch.append(key(number))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def variant_set(count: int, _work: Path) -> dict[str, Any]:
    began = time.perf_counter()
    held: set[bytes] = set()
    for batch in batches(count):
        held.update(batch)
    added = time.perf_counter() - began
    began = time.perf_counter()
    seen = sum(1 for _ in held)
    read = time.perf_counter() - began
    assert seen == count
    return {"add_s": added, "read_s": read, "spills": 0}


def variant_keyset(count: int, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from flext_meltano_context.keys import KeySet, canonical

    assert key(12345) == canonical([b"12345"])
    keys = KeySet(spill_dir=work)
    began = time.perf_counter()
    for batch in batches(count):
        keys.add_many("s", batch)
    added = time.perf_counter() - began
    began = time.perf_counter()
    counted = keys.count("s")
    seen = sum(1 for _ in keys.iter("s"))
    read = time.perf_counter() - began
    assert counted == seen == count, (counted, seen)
    spills = keys.spills
    keys.close()
    return {"add_s": added, "read_s": read, "spills": spills}


def variant_probe(count: int, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import duckdb

    from flext_meltano_context import landing
    from flext_meltano_context.keys import KeySet

    database = work / "w.duckdb"
    with duckdb.connect(str(database)) as conn:
        conn.execute("CREATE SCHEMA raw")
        conn.execute("CREATE TABLE raw.s AS SELECT range AS id FROM range(1, ?)", [count])
    keys = KeySet(spill_dir=work)
    for batch in batches(count):
        keys.add_many("s", batch)
    check = landing.prepare(
        names=["target-duckdb"],
        argv=["target-duckdb"],
        config={"path": str(database), "default_target_schema": "raw"},
        config_source="benchmark",
        approximate=False,
        workdir=work,
    )
    began = time.perf_counter()
    result = check.finish({"s": count}, keys, {"s": ["id"]}, frozenset(), "benchmark")
    took = time.perf_counter() - began
    (row,) = result.streams
    assert (row.label, row.samples) == ("missing 1", ({"id": 0},)), row
    return {"probe_s": took, "label": row.label}


VARIANTS = {"set": variant_set, "keyset": variant_keyset, "probe": variant_probe}


def measure(name: str, count: int) -> dict[str, Any]:
    """Run one variant in a child process; its result with the child's peak RSS and CPU time."""
    with tempfile.TemporaryDirectory(prefix="flext-bench-keys-") as work:
        out = Path(work) / "result.json"
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", name, "--keys", str(count), "--out", str(out)],
            cwd=work,
        )
        _pid, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"variant {name} failed")
        result: dict[str, Any] = json.loads(out.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--probe-keys", type=int, default=1_000_000)
    parser.add_argument("--skip-baseline", action="store_true", help="no plain-set run")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = VARIANTS[args.child](args.keys, Path.cwd())
        args.out.write_text(json.dumps(result))
        return
    results: dict[str, Any] = {"keys": args.keys, "probe_keys": args.probe_keys}
    names = ["keyset"] if args.skip_baseline else ["set", "keyset"]
    for name in names:
        found = measure(name, args.keys)
        found["keys_per_s"] = round(args.keys / found["add_s"])
        results[name] = found
        print(
            f"{name:7} {args.keys:>12,} keys: add {found['keys_per_s']:>11,} keys/s, "
            f"read {found['read_s']:6.2f} s, peak RSS {found['peak_rss_mb']:7.1f} MB, "
            f"spills {found['spills']}",
            file=sys.stderr,
        )
    if "set" in results:
        base, ours = results["set"], results["keyset"]
        results["keyset_vs_set"] = {
            "add_speed": round(ours["keys_per_s"] / base["keys_per_s"], 3),
            "peak_rss": round(ours["peak_rss_mb"] / base["peak_rss_mb"], 3),
        }
        print(
            f"keyset/set: {results['keyset_vs_set']['add_speed']:.2f}x the adding speed, "
            f"{results['keyset_vs_set']['peak_rss']:.2f}x the peak RSS",
            file=sys.stderr,
        )
    if args.probe_keys:
        probe = measure("probe", args.probe_keys)
        probe["keys_per_s"] = round(args.probe_keys / probe["probe_s"])
        results["probe"] = probe
        print(
            f"probe   {args.probe_keys:>12,} keys: {probe['probe_s']:.2f} s "
            f"({probe['keys_per_s']:,} keys/s), peak RSS {probe['peak_rss_mb']:.1f} MB, "
            f"{probe['label']}",
            file=sys.stderr,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
