"""A throwaway PostgreSQL cluster for the ledger tests and benchmark.

Debian's server binaries (`initdb`, `pg_ctl`, from PATH or /usr/lib/postgresql/*/bin;
.ci/run installs the `postgresql` package when they are missing) build a cluster in
a fresh temp directory, listening on a free loopback port (and a unix socket in that
directory only), trust authentication, fsync off: a test database, not a server.
As root the binaries run as the `postgres` user (or `nobody`): initdb refuses root.
It can be stopped hard (`stop(immediate=True)`) and started again on the same port:
the "database down for a while" cases.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.ports import free_port


def binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    raise RuntimeError(f"no {name}: apt-get install postgresql (.ci/run does)")


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    raise RuntimeError("running as root and no postgres or nobody user to run PostgreSQL as")


class PostgresServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="extproc-pg-"))
        self.data = self.root / "data"
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._cmd(
            [binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> PostgresServer:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._cmd(
            [binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
             "-w", "-t", "60", "start"]
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("postgres not accepting connections in time")
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, immediate: bool = False) -> None:
        mode = "immediate" if immediate else "fast"
        self._cmd([binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"], check=False)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
