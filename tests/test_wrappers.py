"""The tap and target wrappers: METRIC lines, stderr tails, confirmed state lines."""

from __future__ import annotations

import json
import os
import sys
import time

from flext_meltano_context.children import Child, Metrics
from targets_wrapper.target import Target

METRIC = (
    '2026-11-26 09:15:04,406 | INFO | singer_sdk.metrics | METRIC: {"type":"counter",'
    '"metric":"record_count","value":%d,"tags":{"stream":"users","pid":1,"context":{}}}'
)


def test_metric_counters_are_summed_per_stream() -> None:
    metrics = Metrics()
    for value in (700, 500):
        metrics.feed(METRIC % value)
    metrics.feed("an ordinary log line")
    metrics.feed("METRIC: {not json")
    assert metrics.to_dict() == {"record_count": {"users": 1200}}
    assert metrics.for_stream("users") == {"record_count": 1200}


def test_json_formatted_metric_lines_and_reader_totals_are_understood() -> None:
    metrics = Metrics()
    metrics.feed(
        json.dumps(
            {
                "message": "METRIC",
                "metric_info": {
                    "type": "timer",
                    "metric": "sync_duration",
                    "value": 1.5,
                    "tags": {"stream": "a"},
                },
            }
        )
    )
    metrics.feed("INFO Reader 'stdin' completed processing 1234 lines of input (5 records)")
    assert metrics.to_dict() == {"sync_duration": {"a": 1.5}}
    assert metrics.lines_processed == 1234


def test_a_chatty_child_is_drained_and_only_the_last_50_lines_kept() -> None:
    code = "import sys\nfor i in range(20000): print('line', i, 'x' * 80, file=sys.stderr)"
    child = Child("chatty", [sys.executable, "-c", code], os.environ, stdin=None, stdout=None)
    done = child.wait(timeout=30)  # would deadlock on a full stderr pipe without the drain
    assert done.returncode == 0
    assert len(done.stderr_tail) == 50
    assert done.stderr_tail[-1].startswith("line 19999")


def test_each_json_line_the_target_prints_is_handed_on_as_a_confirmed_state() -> None:
    seen: list[dict[str, object]] = []
    code = (
        "import sys\nfor line in sys.stdin:\n    print(line.strip(), flush=True)\n"
        "print('not state')"
    )
    target = Target("echo", [sys.executable, "-c", code], os.environ, on_state=seen.append)
    assert target.stdin is not None
    os.write(target.stdin, b'{"bookmarks": {"a": 1}}\n[1]\n{"bookmarks": {"a": 2}}\n')
    target.close_input()
    target.child.wait(timeout=10)
    target.join_output()
    assert seen == [{"bookmarks": {"a": 1}}, {"bookmarks": {"a": 2}}]
    assert (target.states, target.other_lines) == (2, 2)
    assert target.end_of_input_at is not None
    assert target.end_of_input_at <= time.time()
