"""A throw-away PostgreSQL cluster for tests and benchmarks, with Debian's server binaries.

`cluster()` runs initdb in a temporary directory, starts the server on a free loopback port
(password authentication only, no Unix socket) and removes everything afterwards; `.ci/run`
installs the `postgresql` package. `stop()` and `start()` let a test take the server away
mid-run. Imported by conftest.py (the session's `postgres` fixture) and benchmarks/lineage.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class NoServerError(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


@dataclass(frozen=True, slots=True)
class Server:
    port: int
    password: str

    def config(self, **changes: Any) -> dict[str, Any]:
        """A target-postgres config for this server; `changes` override or add settings."""
        base = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": "postgres",
            "password": self.password,
            "database": "postgres",
        }
        return {**base, **changes}

    def url(self, *, user: str = "postgres", password: str | None = None, **query: str) -> str:
        """A libpq URL for `user` (with the superuser's password unless another is given)."""
        secret = self.password if password is None else password
        auth = f"{user}:{urllib.parse.quote(secret, safe='')}@" if secret else f"{user}@"
        tail = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"postgresql://{auth}127.0.0.1:{self.port}/postgres{tail}"


def server_binaries() -> Path | None:
    """The newest Debian PostgreSQL bin directory with initdb and pg_ctl, if any."""
    found = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            version = tuple(int(p) for p in re.findall(r"\d+", bin_dir.parent.name))
            found.append((version, bin_dir))
    return max(found)[1] if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """A running throw-away cluster: its server, and stop/start for fault injection."""

    def __init__(self, bin_dir: Path, root: Path, as_user: list[str], server: Server) -> None:
        self.bin_dir, self.root, self.as_user, self.server = bin_dir, root, as_user, server

    def pg(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *argv],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def start(self) -> subprocess.CompletedProcess[str]:
        data, log = self.root / "data", self.root / "server.log"
        return self.pg(str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        stopped = self.pg(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "stop"
        )
        if stopped.returncode != 0 and "not running" not in stopped.stderr:
            raise RuntimeError(f"pg_ctl stop failed: {stopped.stderr}")


@contextlib.contextmanager
def cluster(*, durable: bool = False) -> Iterator[Cluster]:
    """A PostgreSQL cluster on 127.0.0.1, stopped and removed afterwards.

    Tests run it without fsync; `durable` keeps PostgreSQL's defaults (for benchmarks).
    """
    bin_dir = server_binaries()
    if bin_dir is None:
        raise NoServerError(
            "no PostgreSQL server under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
    as_user: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged user
        runuser = shutil.which("runuser")
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                owner = owner or pwd.getpwnam(name)
        if runuser is None or owner is None:
            raise NoServerError("running as root: need runuser and a postgres or nobody user")
        as_user = [runuser, "-u", owner.pw_name, "--"]
    # Not pytest's tmp_path: its base directory is private to root, the server user must enter.
    with tempfile.TemporaryDirectory(prefix="flext-pg-") as tmp:
        root = Path(tmp)
        password = f"pg-{secrets.token_hex(8)}"
        (root / "pwfile").write_text(password + "\n")
        if owner is not None:
            for path in (root, root / "pwfile"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        data, logfile = root / "data", root / "server.log"
        running = Cluster(bin_dir, root, as_user, Server(0, password))
        init = running.pg(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            f"--pwfile={root / 'pwfile'}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        try:
            for _attempt in range(3):  # another process may take the free port first
                port = free_port()
                with (data / "postgresql.conf").open("a") as conf:
                    conf.write(
                        f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                        "unix_socket_directories = ''\nmax_connections = 200\n"
                    )
                    if not durable:
                        conf.write(
                            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                        )
                start = running.start()
                if start.returncode == 0:
                    break
            else:
                log = logfile.read_text() if logfile.exists() else ""
                raise RuntimeError(f"PostgreSQL did not start:\n{start.stderr}\n{log[-2000:]}")
            running.server = Server(port, password)
            yield running
        finally:
            running.stop("immediate")
