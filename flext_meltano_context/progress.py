"""What the user sees while a run goes and when it ends, all on stderr (stdout is data).

On a terminal, a live panel per pipeline (rich, imported only there): per stream the records and
records/s, the bytes and MB/s, what the run is doing, the elapsed time; redrawn at most 4 times a
second and cleared at the end. Off a terminal, a structured `records_relayed` log event every
10 s. At the end a short summary: records per stream, phase durations, state, correlation id,
where the lineage log is.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import structlog

if TYPE_CHECKING:
    from flext_meltano_context.pipeline import RunResult
    from flext_meltano_context.relay import RelayProgress


class Progress:
    """The relay's progress callback: a live line on a TTY, a log event every 10 s elsewhere."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 0.25 if self.tty else 10.0
        # The first line after one interval: short runs end with the summary alone.
        self._next = time.monotonic() + (0.0 if self.tty else self.interval)
        self._drawn = False
        self._log = structlog.get_logger("flext_meltano_context.progress")

    def __call__(self, progress: RelayProgress) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        elapsed = max(progress.elapsed, 1e-6)
        if self.tty:
            parts = [
                f"{name} {count:,} ({count / elapsed:,.0f}/s)"
                for name, count in sorted(progress.records.items())
            ]
            text = " | ".join(parts) or f"{progress.lines:,} lines"
            self.stream.write(f"\r\x1b[2K{text[:200]}")
            self.stream.flush()
            self._drawn = True
        else:
            self._log.info(
                "records_relayed",
                records=dict(progress.records),
                lines=progress.lines,
                bytes=progress.bytes,
                elapsed_s=round(progress.elapsed, 1),
            )

    def finish(self) -> None:
        """Clear the live line so the summary starts on a clean one."""
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False


class LiveProgress:
    """The live panel of one pipeline on a terminal (rich's Live display, cleared at the end)."""

    def __init__(
        self, name: str, *, position: str = "", stream: TextIO | None = None, width: int = 100
    ) -> None:
        from rich.console import Console
        from rich.live import Live

        self.name = name
        self.position = position
        self.started = time.monotonic()
        self.last: RelayProgress | None = None
        self.last_at: float | None = None
        self.rates: dict[str, float] = {}
        self._previous: tuple[float, dict[str, int]] | None = None
        console = Console(file=stream or sys.stderr, width=width, force_terminal=True)
        self.live = Live(
            self,  # rendered through __rich__ at each refresh, also while no data comes
            console=console,
            refresh_per_second=4,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def __call__(self, progress: RelayProgress) -> None:
        now = time.monotonic()
        if self._previous is not None and now - self._previous[0] >= 1.0:
            took = now - self._previous[0]
            self.rates = {
                name: (count - self._previous[1].get(name, 0)) / took
                for name, count in progress.records.items()
            }
            self._previous = (now, dict(progress.records))
        elif self._previous is None:
            self._previous = (now, dict(progress.records))
        self.last, self.last_at = progress, now

    def phase(self) -> str:
        if self.last is None or self.last_at is None:
            return "starting: discovery, catalog and state, then the tap's first bytes"
        idle = time.monotonic() - self.last_at
        if idle < 2.0:
            return "extracting and loading"
        return f"no new data for {idle:.0f} s: the tap is working or the target is flushing"

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self.started
        title = Text(f"{self.position}{self.name}  {_clock(elapsed)}  {self.phase()}")
        table = Table(expand=False, box=None, pad_edge=False)
        for column in ("stream", "records", "records/s", "avg/s"):
            table.add_column(column, justify="left" if column == "stream" else "right")
        progress = self.last
        if progress is not None:
            spent = max(progress.elapsed, 1e-6)
            for name, count in sorted(progress.records.items()):
                rate = self.rates.get(name, count / spent)
                table.add_row(name, f"{count:,}", f"{rate:,.0f}", f"{count / spent:,.0f}")
            table.add_row(
                "all",
                f"{sum(progress.records.values()):,}",
                f"{progress.lines:,} lines",
                f"{progress.bytes / 1e6:,.1f} MB ({progress.bytes / 1e6 / spent:,.1f} MB/s)",
            )
        return Group(title, table)

    def finish(self) -> None:
        """Clear the panel so the summary starts on a clean screen."""
        self.live.stop()


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{sec:02d}"


def for_pipeline(name: str, *, position: str = "", stream: TextIO | None = None) -> Any:
    """A LiveProgress on a terminal (rich imported only then), else the logging Progress."""
    out = stream or sys.stderr
    if out.isatty():
        return LiveProgress(name, position=position, stream=out)
    return Progress(out, tty=False)


def summary(result: RunResult) -> str:
    """A few lines for a person: what moved, how long each phase took, what was kept."""
    lines = [f"flext-context run {result.status} in {result.duration_s:.1f} s ({result.mode})"]
    if result.streams:
        width = max(len(name) for name in result.streams)
        for name, count in sorted(result.streams.items()):
            lines.append(f"  {name:<{width}}  {count:>12,} records")
    else:
        lines.append("  no records relayed")
    for phase in result.phases:
        took = f"{phase.duration_s:.1f} s" if phase.duration_s is not None else "-"
        code = f", exit {phase.exit_code}" if phase.exit_code not in (None, 0) else ""
        lines.append(f"  {phase.phase:<10} {phase.plugin}: {phase.status}, {took}{code}")
    if result.state_id is None:
        lines.append("  state: none kept (no state id / --state-out)")
    elif result.state_persisted:
        lines.append(
            f"  state: {result.confirmed_states} confirmed by the target, last one stored "
            f"under {result.state_id}"
        )
    elif result.confirmed_states:  # confirmed, but the store failed or ran out of time
        lines.append(
            f"  state: {result.confirmed_states} confirmed by the target, none stored; "
            f"{result.state_id} left untouched"
        )
    else:
        lines.append(f"  state: the target confirmed none; {result.state_id} left untouched")
    if result.state_loaded_from:
        lines.append(f"  resumed from state written by run {result.state_loaded_from}")
    landing = getattr(result, "landing", None)
    for row in landing.streams if landing is not None else ():
        level = f", {row.level}" if row.level else ""
        if row.landed is None:
            why = f": {row.reason}" if row.reason else ""
            lines.append(f"  landed {row.stream}: {row.label}{level}{why}")
            continue
        shown = "; ".join(", ".join(f"{k}={v!r}" for k, v in s.items()) for s in row.samples)
        lines.append(
            f"  landed {row.stream}: {row.label}{level} (relayed {row.relayed:,}, landed "
            f"{row.landed:,})" + (f"; e.g. {shown}" if shown else "")
        )
    lines.append(f"  correlation id {result.correlation_id}, run id {result.run_id}")
    lines.append(f"  lineage log {result.lineage_path}")
    return "\n".join(lines)
