"""Pipe helpers shared by the relay, the tap and target wrappers and the lineage log (issue 11)."""

from __future__ import annotations

import fcntl
import os
import stat

import structlog

PIPE_SIZE = 1 << 20
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def enlarge_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer: fewer context switches between tap, relay and target.

    Anything but a pipe is left alone; a refusal (above /proc/sys/fs/pipe-max-size, not Linux)
    keeps the default 64 KiB, which works too.
    """
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if fcntl.fcntl(fd, _F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError as exc:
        structlog.get_logger().debug("pipe_not_enlarged", fd=fd, reason=exc.strerror)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write every byte (a pipe may take less than asked); how many were written.

    A failure raises WriteError, which says how many bytes went out before it (the relay's
    digest covers exactly what the sink accepted).
    """
    view = memoryview(data).cast("B")
    total = len(view)
    done = 0
    try:
        while done < total:
            done += os.write(fd, view[done:])
    except OSError as exc:
        raise WriteError(exc, done) from exc
    finally:
        view.release()
    return done


class WriteError(OSError):
    """`write_all` failed after `written` bytes; `errno` is the underlying error's."""

    def __init__(self, cause: OSError, written: int) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.written = written
