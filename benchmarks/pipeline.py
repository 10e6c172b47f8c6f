"""Wall time of one pipeline under `meltano run` and under `meltano invoke flext-context run`.

The same synthetic tap and null target (tests/fakes/bench_*.py, declared as custom plugins in a
throw-away Meltano project) at 10 and 1,000,000 records, best of a few runs each, the two
runners alternating. Goals (issue 4): at 1M records flext-context is no slower than `meltano
run`; at 10 records its fixed overhead is at most `meltano run`'s + 1.5 s.

    .venv/bin/python benchmarks/pipeline.py [--repeat N] [--records 10,1000000] [--keyed]

`--keyed` (issue 14): the keyed stream (`key_properties: ["id"]`) goes to target-jsonl 0.1.4 from
PyPI instead of the null target, a destination the landing check knows, so flext-context collects
the distinct keys it relays (compiled scanner) and probes them after the load; meltano run loads
the same. Each size's JSON then says the landing level the run reached (`by key` when the keys
were collected and checked).

The last line printed is one JSON object with both wall times and their ratio per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
MELTANO = Path(sys.executable).parent / "meltano"
PROJECT = """\
default_environment: bench
project_id: flext-context-benchmark
send_anonymous_usage_stats: false
environments:
  - name: bench
plugins:
  extractors:
    - name: bench-tap
      namespace: bench_tap
      executable: {fakes}/bench_tap.py
      capabilities: [catalog, discover, state]
  loaders:
    - name: bench-target
      namespace: bench_target
      executable: {fakes}/bench_target.py
    - name: target-jsonl
      namespace: target_jsonl
      pip_url: target-jsonl==0.1.4
      config:
        destination_path: output
        do_timestamp_file: false
  utilities:
    - name: flext-context
      namespace: flext_context
      pip_url: -e {root}
      executable: flext-context
"""
RUNNERS = {
    "meltano_run": ["run", "bench-tap", "bench-target"],
    "flext_context_run": ["invoke", "flext-context", "run", "bench-tap", "bench-target"],
}


def timed(project: Path, argv: list[str], records: int) -> float:
    """Seconds one `meltano <argv>` takes in `project`; raises with its stderr if it fails."""
    env = {**os.environ, "BENCH_RECORDS": str(records), "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "0"}
    started = time.perf_counter()
    done = subprocess.run(
        [str(MELTANO), *argv], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n  ".join(done.stderr.splitlines()[-15:])
        raise SystemExit(f"`meltano {' '.join(argv)}` exited {done.returncode}:\n  {tail}")
    return elapsed


def landing_levels(project: Path) -> list[str]:
    """The landing check's level per stream in the last run (`by key`, `by count`, ...)."""
    log = project / ".meltano" / "flext-context" / "lineage.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    landing = [e["data"] for e in events if e.get("event") == "landing"]
    if not landing:
        return []
    return sorted({str(s.get("level", s.get("status"))) for s in landing[-1]["streams"]})


def best_of(
    project: Path, runners: dict[str, list[str]], records: int, repeat: int
) -> dict[str, float]:
    """Each runner's best wall time over `repeat` rounds, the order reversed every other round."""
    best = {name: float("inf") for name in runners}
    for attempt in range(repeat):
        order = list(runners) if attempt % 2 == 0 else list(reversed(runners))
        for name in order:
            best[name] = min(best[name], timed(project, runners[name], records))
    return best


def records_of_last_run(project: Path, log: Path | None = None) -> int:
    """Records the last run in `log` (flext-context's default log) relayed, from its lineage."""
    log = log or project / ".meltano" / "flext-context" / "lineage.jsonl"
    completed = [
        json.loads(line)["data"]
        for line in log.read_text().splitlines()
        if '"event":"run_completed"' in line.replace(" ", "")
    ]
    return int(completed[-1]["records"])


def main() -> None:
    """Set up the project, time both runners at each size, print the summary JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per runner and size (best)")
    parser.add_argument("--records", default="10,1000000", help="comma-separated sizes")
    parser.add_argument("--keyed", action="store_true", help="load into target-jsonl, keys on")
    args = parser.parse_args()
    loader = "target-jsonl" if args.keyed else "bench-target"
    runners = {
        name: [loader if a == "bench-target" else a for a in argv] for name, argv in RUNNERS.items()
    }
    sizes = [int(size) for size in args.records.split(",")]
    with tempfile.TemporaryDirectory(prefix="flext-bench-") as tmp:
        project = Path(tmp)
        (project / "meltano.yml").write_text(PROJECT.format(fakes=FAKES, root=ROOT))
        started = time.perf_counter()
        subprocess.run(
            [str(MELTANO), "install"], cwd=project, check=True, capture_output=True, text=True
        )
        print(f"meltano install: {time.perf_counter() - started:.1f} s", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for records in sizes:
            best = best_of(project, runners, records, args.repeat)
            relayed = records_of_last_run(project)
            if relayed != records:
                raise SystemExit(f"flext-context relayed {relayed} records, expected {records}")
            ratio = best["flext_context_run"] / best["meltano_run"]
            results[str(records)] = {
                "meltano_run_s": round(best["meltano_run"], 3),
                "flext_context_run_s": round(best["flext_context_run"], 3),
                "ratio": round(ratio, 3),
                "overhead_s": round(best["flext_context_run"] - best["meltano_run"], 3),
            }
            if args.keyed:
                results[str(records)]["landing_levels"] = landing_levels(project)
            print(f"{records:>9} records: {json.dumps(results[str(records)])}", flush=True)
    summary = {"benchmark": "pipeline", "repeat": args.repeat, "keyed": args.keyed}
    print(json.dumps({**summary, "records": results}))


if __name__ == "__main__":
    main()
