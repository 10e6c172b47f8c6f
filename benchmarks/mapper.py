"""Wall time of `meltano run` with and without the flext-count mapping (mapper mode, issue 12).

The same synthetic tap and null target (tests/fakes/bench_*.py) in a throw-away Meltano project,
`meltano run bench-tap bench-target` against `meltano run bench-tap flext-count bench-target`,
best of a few runs each, alternating. Goal: at 1,000,000 records the mapper costs at most 10 %
more wall time. The mapper is this checkout's `flext-context-mapper` (no install needed).

    .venv/bin/python benchmarks/mapper.py [--repeat N] [--records 1000000]

The last line printed is one JSON object with both wall times and their ratio per size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/pipeline.py: the same timing and log reading

from benchmarks.pipeline import best_of, records_of_last_run  # noqa: E402

FAKES = ROOT / "tests" / "fakes"
BIN = Path(sys.executable).parent
PROJECT = """\
default_environment: bench
project_id: flext-context-mapper-benchmark
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
  mappers:
    - name: flext-context-mapper
      namespace: flext_context_mapper
      executable: {bin}/flext-context-mapper
      mappings:
        - name: flext-count
          config:
            lineage_path: {project}/lineage.jsonl
"""
RUNNERS = {
    "meltano_run": ["run", "bench-tap", "bench-target"],
    "with_mapper": ["run", "bench-tap", "flext-count", "bench-target"],
}


def main() -> None:
    """Set up the project, time both invocations at each size, print the summary JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per invocation and size")
    parser.add_argument("--records", default="1000000", help="comma-separated sizes")
    args = parser.parse_args()
    sizes = [int(size) for size in args.records.split(",")]
    with tempfile.TemporaryDirectory(prefix="flext-bench-mapper-") as tmp:
        project = Path(tmp)
        (project / "meltano.yml").write_text(PROJECT.format(fakes=FAKES, bin=BIN, project=project))
        results: dict[str, dict[str, float]] = {}
        for records in sizes:
            best = best_of(project, RUNNERS, records, args.repeat)
            relayed = records_of_last_run(project, project / "lineage.jsonl")
            if relayed != records:
                raise SystemExit(f"the mapper relayed {relayed} records, expected {records}")
            ratio = best["with_mapper"] / best["meltano_run"]
            results[str(records)] = {
                "meltano_run_s": round(best["meltano_run"], 3),
                "with_mapper_s": round(best["with_mapper"], 3),
                "ratio": round(ratio, 3),
                "goal_met": ratio <= 1.10,
            }
            print(f"{records:>9} records: {json.dumps(results[str(records)])}", flush=True)
    print(json.dumps({"benchmark": "mapper", "repeat": args.repeat, "records": results}))


if __name__ == "__main__":
    main()
