"""The tap side of a run.

Builds the tap command (through `meltano invoke` or standalone), starts it with the run's context
environment, drains its stderr on a thread of its own (a chatty tap must never deadlock the pipe),
aggregates Singer SDK `METRIC:` lines, keeps the last stderr lines for error reports and records
start, first byte, first record, end of output and exit code.
"""

from taps_wrapper.tap import Tap, standalone_command

__all__ = ["Tap", "standalone_command"]
