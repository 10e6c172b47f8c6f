"""The target side of a run.

Starts the target with the run's context environment, feeds its stdin from the relay, reads the
state lines it prints on stdout (each one a state the target confirmed, handed on as it arrives),
aggregates its `METRIC:` lines and its final `Reader ... completed processing` line, and records
start, end of input, exit and exit code.
"""

from targets_wrapper.target import Target

__all__ = ["Target"]
