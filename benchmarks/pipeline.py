"""Wall time of one pipeline under `meltano run` and under `meltano invoke flext-context run`.

The same synthetic tap and null target (tests/fakes/bench_*.py, declared as custom plugins in a
throw-away Meltano project) at 10 and 1,000,000 records, best of a few runs each, the two
runners alternating. Goals (issue 4): at 1M records flext-context is no slower than `meltano
run`; at 10 records its fixed overhead is at most `meltano run`'s + 1.5 s.

    .venv/bin/python benchmarks/pipeline.py [--repeat N] [--records 10,1000000]

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


def records_of_last_run(project: Path) -> int:
    """Records flext-context says its last run relayed, from the lineage log."""
    log = project / ".meltano" / "flext-context" / "lineage.jsonl"
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
    args = parser.parse_args()
    sizes = [int(size) for size in args.records.split(",")]
    with tempfile.TemporaryDirectory(prefix="flext-bench-") as tmp:
        project = Path(tmp)
        (project / "meltano.yml").write_text(PROJECT.format(fakes=FAKES, root=ROOT))
        started = time.perf_counter()
        subprocess.run(
            [str(MELTANO), "install"], cwd=project, check=True, capture_output=True, text=True
        )
        print(f"meltano install: {time.perf_counter() - started:.1f} s", flush=True)
        results: dict[str, dict[str, float]] = {}
        for records in sizes:
            best = {name: float("inf") for name in RUNNERS}
            for attempt in range(args.repeat):
                order = list(RUNNERS) if attempt % 2 == 0 else list(reversed(RUNNERS))
                for name in order:
                    best[name] = min(best[name], timed(project, RUNNERS[name], records))
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
            print(f"{records:>9} records: {json.dumps(results[str(records)])}", flush=True)
    print(json.dumps({"benchmark": "pipeline", "repeat": args.repeat, "records": results}))


if __name__ == "__main__":
    main()
