"""The tap side of a mapped pipeline: tap | relay | mapper | ... as one process for the run loop.

`python -m flext_meltano_context.chain --stats FILE --commands JSON` starts the tap and each
mapper (one process per mapping, as `meltano run`), counts what leaves the tap with `relay()` into
FILE, and pipes the last mapper's output to its own stdout, which the run loop relays (and counts
again) into the target. So a mapped pipeline is counted on both sides without touching the run
loop. The children stay in this process's process group, so the run loop's signals reach them all;
SIGTERM is also passed to the tap so it can write its final STATE. The exit code is the tap's
when it failed, else the first failed mapper's, else 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flext_meltano_context.chain")
    parser.add_argument("--stats", type=Path, required=True, help="Write the tap side's counts.")
    parser.add_argument("--commands", required=True, help="JSON list of argv: tap, mappers...")
    args = parser.parse_args(argv)
    commands: Any = json.loads(args.commands)
    if not isinstance(commands, list) or len(commands) < 2:
        parser.error("--commands needs the tap's argv and at least one mapper's argv")
    return run(commands, args.stats)


def run(commands: Sequence[Sequence[str]], stats_path: Path) -> int:
    """Run tap and mappers piped together; the relay counts the tap's output."""
    from flext_meltano_context.relay import relay
    from flext_meltano_context.state import write_json_atomic

    tap = subprocess.Popen(list(commands[0]), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    mappers: list[subprocess.Popen[bytes]] = []
    upstream: Any = subprocess.PIPE
    for index, argv in enumerate(commands[1:]):
        last = index == len(commands) - 2
        mapper = subprocess.Popen(
            list(argv), stdin=upstream, stdout=sys.stdout.fileno() if last else subprocess.PIPE
        )
        if mappers:
            assert mappers[-1].stdout is not None  # noqa: S101 - stdout=PIPE above
            mappers[-1].stdout.close()  # the next mapper holds it now
        mappers.append(mapper)
        upstream = mapper.stdout
    first = mappers[0]
    assert tap.stdout is not None  # noqa: S101 - stdout=PIPE above
    assert first.stdin is not None  # noqa: S101 - stdin=PIPE above

    def forward(signum: int, _frame: Any) -> None:
        if tap.poll() is None:
            tap.send_signal(signum)  # the tap ends its stream; the mappers drain and end

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stats = relay(tap.stdout.fileno(), first.stdin.fileno(), close_sink=False)
    finally:
        first.stdin.close()
        tap.stdout.close()
    if stats.sink_closed_early and tap.poll() is None:
        tap.terminate()  # the mapper stopped reading: nothing more can go anywhere
    tap_code = tap.wait()
    codes = [m.wait() for m in mappers]
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    data = stats.to_dict()
    data.update({"tap_exit": tap_code, "mapper_exits": codes})
    write_json_atomic(stats_path, data)
    if tap_code != 0:
        return tap_code if tap_code > 0 else 128 - tap_code
    for code in codes:
        if code != 0:
            return code if code > 0 else 128 - code
    return 1 if stats.sink_closed_early else 0


def side_counts(stats_path: Path) -> dict[str, int] | None:
    """Records per stream that left the tap, from the chain's stats file; None when absent."""
    try:
        data = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    streams = data.get("streams") if isinstance(data, dict) else None
    if not isinstance(streams, dict):
        return None
    return {str(name): int(s.get("records", 0)) for name, s in streams.items()}


if __name__ == "__main__":
    raise SystemExit(main())
