"""Mapper mode: a Meltano mapper that passes the Singer stream through, counted and recorded.

For pipelines that must stay on `meltano run` (an orchestrator builds that command):
`meltano run tap-x flext-count target-y` puts this process between tap and target. It forwards
stdin to stdout byte for byte (the relay), counts every message per stream, and records the
same lineage events as `flext-context run` (run, phase, stream stats, anomalies), under the
correlation id `MELTANO_RUN_ID` when the caller set one, else its own.

What a mapper cannot see: the target's confirmed state (Meltano stores it), what landed in the
destination, the target's timing and exit code, and the tap's exit code. Those need
`flext-context run`. The run record says so (`pipeline.mapper.cannot_see`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

CANNOT_SEE = (
    "the target's confirmed state (Meltano stores it; the mapper sees only the tap's STATE)",
    "what landed in the destination (no landing check)",
    "the target's timing, exit code and stderr",
    "the tap's exit code and stderr",
)
ABOUT = {
    "name": "flext-context-mapper",
    "description": "Passes a Singer stream through unchanged, counting and recording it.",
    "capabilities": ["stream-maps"],
    "settings": [
        {"name": "lineage_path", "description": "Lineage log (default as flext-context run)."},
        {"name": "pipeline", "description": "The name the run is recorded under."},
    ],
}


def _config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        decoded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"flext-context-mapper: error: cannot read --config {path}: {exc}\n")
        raise SystemExit(2) from exc
    return decoded if isinstance(decoded, dict) else {}


def identity_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the run's identity is read from: Meltano's run id is the correlation id."""
    from flext_meltano_context import ids

    env = dict(environ)
    given = env.get("MELTANO_RUN_ID", "")
    if given and ids.is_uuid(given) and not env.get("FLEXT_CORRELATION_ID"):
        env["FLEXT_CORRELATION_ID"] = given.lower()
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: `flext-context-mapper --config FILE` (as Meltano calls it)."""
    parser = argparse.ArgumentParser(
        prog="flext-context-mapper",
        description="Pass a Singer stream from stdin to stdout unchanged, counted and recorded "
        "in the flext-context lineage log. Declared under 'mappers:' in meltano.yml.",
    )
    parser.add_argument("--config", type=Path, help="The mapping's config (Meltano writes it).")
    parser.add_argument("--about", action="store_true", help="Print what this mapper is; exit.")
    parser.add_argument("--format", default="json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.about:
        sys.stdout.write(json.dumps(ABOUT, indent=2) + "\n")
        return 0
    return run(_config(args.config), os.environ)


def run(config: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """Relay stdin to stdout and record the run; the exit code Meltano sees."""
    from flext_meltano_context import ids, logs, runenv, state
    from flext_meltano_context.__about__ import __version__
    from flext_meltano_context.errors import FlextContextError
    from flext_meltano_context.lineage import default_log_path
    from flext_meltano_context.lineage.ci import ci_context
    from flext_meltano_context.lineage.recorder import Recorder
    from flext_meltano_context.relay import relay

    logs.configure("json", "warning")  # stdout is the stream: every log line goes to stderr
    env = identity_env(environ)
    tap = env.get("MELTANO_EXTRACTOR_NAME") or "tap"
    mapping = env.get("MELTANO_MAPPER_NAME") or str(config.get("mapping") or "flext-count")
    name = str(config.get("pipeline") or f"{tap}-via-{mapping}")
    identity = runenv.identity_from_env(env, job_name=name)
    lineage_path = Path(str(config["lineage_path"])) if config.get("lineage_path") else None
    path = lineage_path or default_log_path(env)
    phase_id = ids.uuid7()
    started = time.time()
    recorder = Recorder(path, run_id=identity.run_id, correlation_id=identity.correlation_id)
    try:
        recorder.record(
            "run_started",
            {
                "pipeline": {
                    "name": name,
                    "tap": tap,
                    "target": mapping,
                    "transformers": [],
                    "state_id": None,
                    "mode": "meltano",
                    "mapper": {"mapping": mapping, "cannot_see": list(CANNOT_SEE)},
                },
                "parent_correlation_id": identity.parent_correlation_id,
                "inherited_correlation_from": identity.inherited_from,
                "openlineage_parent": identity.openlineage_parent(),
                "ci": ci_context(env),
                "flext_context_version": __version__,
                "phase_run_ids": {"map": phase_id},
            },
            fsync=True,
        )
        recorder.record(
            "phase_started",
            {
                "phase": "map",
                "plugin": mapping,
                "phase_run_id": phase_id,
                "started_at": state.iso(started),
            },
        )
        try:
            with _stopped_by_signals():
                stats = relay(
                    sys.stdin.fileno(), sys.stdout.fileno(), digest=True, close_sink=False
                )
            _end_output()  # the target gets its end of input now, not after the recording
        except Stopped as exc:
            _close(recorder, "aborted", started, None, str(exc), phase_id, mapping)
            return 128 + exc.signum
        except (OSError, FlextContextError) as exc:
            _close(recorder, "failed", started, None, f"relay failed: {exc}", phase_id, mapping)
            sys.stderr.write(f"flext-context-mapper: error: {exc}\n")
            return 1
        failed = stats.sink_closed_early
        error = "the next block stopped reading before the end of the stream" if failed else None
        for stream in stats.streams.values():
            recorder.record("stream_stats", stream.event_data())
        if stats.anomaly_count:
            recorder.record(
                "anomalies",
                {
                    "count": stats.anomaly_count,
                    "first": [
                        {"kind": a.kind, "line": a.line, "offset": a.offset, "excerpt": a.excerpt,
                         "stream": a.stream}
                        for a in stats.anomalies[:20]
                    ],
                },
            )  # fmt: skip
        status = "failed" if failed else "success"
        _close(recorder, status, started, stats, error, phase_id, mapping)
        counts = ", ".join(f"{s.name} {s.records:,}" for s in stats.streams.values()) or "none"
        sys.stderr.write(
            f"flext-context-mapper: {stats.records():,} records relayed ({counts}); correlation id "
            f"{identity.correlation_id}, run id {identity.run_id}\n"
        )
        return 1 if failed else 0
    finally:
        recorder.close()


class Stopped(Exception):  # noqa: N818 - a stop request, not a fault
    """SIGTERM/SIGINT while relaying: Meltano is ending the run."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} while relaying")


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM/SIGINT raise Stopped, so the run is closed as aborted in the lineage log."""

    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_output() -> None:
    """Close our end of the pipe to the next block (stdout now points at /dev/null)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _close(
    recorder: Any,
    status: str,
    started: float,
    stats: Any,
    error: str | None,
    phase_id: str,
    mapping: str,
) -> None:
    from flext_meltano_context import state

    ended = time.time()
    recorder.record(
        "phase_completed",
        {
            "phase": "map",
            "plugin": mapping,
            "phase_run_id": phase_id,
            "started_at": state.iso(started),
            "ended_at": state.iso(ended),
            "duration_s": round(ended - started, 3),
            "exit_code": 0 if status == "success" else 1,
            "status": status,
            "metrics": {},
        },
    )
    recorder.record(
        "run_completed",
        {
            "status": status,
            "started_at": state.iso(started),
            "ended_at": state.iso(ended),
            "duration_s": round(ended - started, 3),
            "records": stats.records() if stats is not None else 0,
            "bytes": stats.bytes if stats is not None else 0,
            "digest": stats.digest if stats is not None else None,
            "error": error,
        },
        fsync=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
