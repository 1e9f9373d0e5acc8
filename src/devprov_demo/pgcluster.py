"""A throwaway PostgreSQL cluster (for the tests, and for ``make up``'s replicas): Debian's server binaries,
a temporary directory, a loopback port, an unprivileged user, removed afterwards.

``make postgresql`` installs Debian's ``postgresql`` when it is missing.  The server refuses to run as
root, and the tests or the stack may run as root: then the cluster belongs to the ``postgres`` system user
that Debian's package creates, and every server command runs through ``runuser``.

The cluster listens on 127.0.0.1 only (a free port, or the one asked for), with its Unix socket inside its
own directory, password authentication (SCRAM) for one superuser whose password is made up per cluster,
and ``fsync`` off: the cluster lives as long as its test session or stack, so only a power cut could tell
the difference.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

SUPERUSER = "devprov"


def server_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def unavailable(note: Path | None = None) -> str | None:
    """Why no cluster can be started here (None: one can); ``note`` is where ``make postgresql`` wrote why
    it could not install the server."""
    if server_binaries() is None:
        why = note.read_text().strip() if note and note.exists() else "`make postgresql` has not run"
        return f"Debian's PostgreSQL server is missing ({why}); `make postgresql` installs it"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "the tests run as root and there is no 'postgres' system user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    directory: Path
    port: int
    password: str
    _databases: int = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str = "") -> str:
        """A new empty database (``name``, or a fresh one); answers its URL."""
        self._databases += 1
        name = name or f"test_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def server_user(self) -> str:
        return pwd.getpwuid(self.directory.stat().st_uid).pw_name


def _as_server_user(command: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *command] if user else command


@contextlib.contextmanager
def running_cluster(port: int = 0) -> Iterator[Cluster]:
    """Start a cluster (initdb + pg_ctl start) on ``port`` (0: a free one), yield it, stop it and remove its
    directory."""
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError(unavailable() or "no PostgreSQL server")
    user = "postgres" if os.geteuid() == 0 else None
    top = Path(tempfile.mkdtemp(prefix="devprov-pg-"))
    try:
        data, password = top / "data", secrets.token_urlsafe(18)
        pwfile = top / "password"
        pwfile.write_text(password + "\n")
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(top, entry.pw_uid, entry.pw_gid)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            _as_server_user(
                [
                    str(binaries / "initdb"),
                    "--pgdata", str(data),
                    "--username", SUPERUSER,
                    "--pwfile", str(pwfile),
                    "--auth", "scram-sha-256",
                    "--encoding", "UTF8",
                    "--locale", "C",
                    "--no-sync",
                ],
                user,
            ),
            check=True,
            capture_output=True,
            cwd=top,
        )
        pwfile.unlink()
        wanted = port
        for _ in range(1 if wanted else 5):  # a port found free may be taken before the server binds it
            port = wanted or _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={top} "
                "-c fsync=off -c max_connections=200"
            )
            started = subprocess.run(
                _as_server_user(
                    [str(binaries / "pg_ctl"), "start", "--pgdata", str(data), "--wait",
                     "--log", str(top / "server.log"), "-o", options],
                    user,
                ),
                capture_output=True,
                cwd=top,
            )
            if started.returncode == 0:
                break
        else:
            log = (top / "server.log").read_text() if (top / "server.log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr.decode()} {log[-2000:]}")
        try:
            yield Cluster(data, port, password)
        finally:
            subprocess.run(
                _as_server_user(
                    [str(binaries / "pg_ctl"), "stop", "--pgdata", str(data), "--mode", "immediate"],
                    user,
                ),
                capture_output=True,
                cwd=top,
            )
    finally:
        shutil.rmtree(top, ignore_errors=True)
