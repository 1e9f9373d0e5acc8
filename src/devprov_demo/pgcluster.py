"""A PostgreSQL cluster of our own (for the tests, and for ``make up``'s replicas): Debian's server binaries,
a directory of its own, a loopback port, an unprivileged user.

``running_cluster()`` is a throwaway one (a temporary directory, removed afterwards: the tests);
``kept_cluster(directory)`` keeps its data in ``directory`` between runs (``make up``: under the stack's
work directory, like the SQLite files) and starts again on what is there.

Layout of a cluster's directory (0700, the server user's)::

    data/        the cluster (initdb into ``data.new``, renamed when complete: a half-made one is redone)
    password     the superuser's password, made up at initdb (0600)
    .s.PGSQL.*   the server's Unix socket and its lock

``make postgresql`` installs Debian's ``postgresql`` when it is missing.  The server refuses to run as
root, and the tests or the stack may run as root: then the cluster belongs to the ``postgres`` system user
that Debian's package creates, and the server commands run as that user, which must be able to reach the
directory (``unreachable``).

The server (``postgres`` itself, not ``pg_ctl``: a child of ours) listens on 127.0.0.1 only (a free port,
or the one asked for), with its Unix socket in the cluster's directory, password authentication (SCRAM)
for one superuser, and ``fsync`` off: only a power cut could tell the difference for a development
cluster.  It gets SIGINT (fast shutdown) when the process that started it dies, so a SIGKILLed stack leaves
no server behind.  A server or backend still running on the data directory when a cluster starts (a
stack killed a moment ago, its server still shutting down) is stopped and waited for, and then a
``postmaster.pid`` left behind (the server itself SIGKILLed) is stale for sure and removed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from litestore import private_directory
from provkit.signals import exit_with_parent

SUPERUSER = "devprov"
SERVER_USER = "postgres"  # who runs the server when we are root
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def server_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def _binaries() -> Path:
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError(unavailable() or "no PostgreSQL server")
    return binaries


def unavailable(note: Path | None = None) -> str | None:
    """Why no cluster can be started here (None: one can); ``note`` is where ``make postgresql`` wrote why
    it could not install the server."""
    if server_binaries() is None:
        why = note.read_text().strip() if note and note.exists() else "`make postgresql` has not run"
        return f"Debian's PostgreSQL server is missing ({why}); `make postgresql` installs it"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"the tests run as root and there is no '{SERVER_USER}' system user to run the server as"
    return None


def server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: ``postgres`` when we are root, else None (ourselves)."""
    return pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None


def unreachable(directory: Path, user: pwd.struct_passwd) -> Path | None:
    """The first existing directory on the way to ``directory`` that ``user`` may not pass through (None:
    it may reach it)."""
    groups = {user.pw_gid, *(g for g in os.getgrouplist(user.pw_name, user.pw_gid))}
    for here in [*reversed(directory.resolve().parents), directory.resolve()]:
        try:
            info = here.stat()
        except FileNotFoundError:
            return None
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid == user.pw_uid:
            allowed = mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = mode & stat.S_IXGRP
        else:
            allowed = mode & stat.S_IXOTH
        if not allowed:
            return here
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    directory: Path  # the data directory
    port: int
    password: str
    server: subprocess.Popen[bytes] | None = None
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

    def database(self, name: str) -> str:
        """The URL of database ``name``, created (empty) unless it is there from an earlier run."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def server_user(self) -> str:
        return pwd.getpwuid(self.directory.stat().st_uid).pw_name


@dataclass(frozen=True)
class _RunAs:
    """Popen's ``user``, ``group`` and ``extra_groups`` for running a command as ``user`` (None: as
    ourselves)."""

    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None

    @classmethod
    def of(cls, user: pwd.struct_passwd | None) -> _RunAs:
        return cls() if user is None else cls(user.pw_uid, user.pw_gid, [])


def _own(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


def _initdb(binaries: Path, top: Path, user: pwd.struct_passwd | None) -> None:
    """A new cluster in ``top/data`` (made in ``data.new`` and renamed when complete) and its password."""
    staging, pwfile = top / "data.new", top / "password"
    shutil.rmtree(staging, ignore_errors=True)  # a half-made one from an interrupted start
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(18) + "\n")
    _own(pwfile, user)
    run_as = _RunAs.of(user)
    made = subprocess.run(
        [
            str(binaries / "initdb"),
            "--pgdata", str(staging),
            "--username", SUPERUSER,
            "--pwfile", str(pwfile),
            "--auth", "scram-sha-256",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        ],
        capture_output=True,
        cwd=top,
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=run_as.groups,
    )
    if made.returncode != 0:
        raise RuntimeError(f"initdb failed: {made.stderr.decode(errors='replace')[-2000:]}")
    os.rename(staging, top / "data")


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory``: a server on that data directory and its
    backends (a server works in its data directory)."""
    target = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd") == target:
                    found.append(int(entry.name))
    return found


def _clear_leftovers(top: Path, data: Path) -> None:
    """Stop a server still running on ``data`` (ours: the caller holds the directory) and wait for it and
    its backends to be gone; then remove what a dead server leaves behind (postmaster.pid, socket locks)."""
    pid_file = data / "postmaster.pid"
    if _processes_in(data):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().split()[0])
            if pid in _processes_in(data):
                os.kill(pid, signal.SIGINT)  # fast shutdown
        deadline = time.monotonic() + STOP_TIMEOUT
        while left := _processes_in(data):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {left} still run in {data}; stop them and start again")
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    for stale in top.glob(".s.PGSQL.*"):
        stale.unlink(missing_ok=True)


def _wait_ready(cluster: Cluster, log: Path) -> bool:
    """Wait until the server accepts a connection (True) or has exited (False)."""
    assert cluster.server is not None
    deadline = time.monotonic() + START_TIMEOUT
    while cluster.server.poll() is None:
        try:
            with psycopg.connect(cluster.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; its log:\n{_tail(log)}") from None
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def _serving(top: Path, port: int, log: Path, user: pwd.struct_passwd | None) -> Iterator[Cluster]:
    """Run the server on ``top/data`` (on ``port``; 0: a free one), yield the cluster, stop it."""
    binaries = _binaries()
    data = top / "data"
    password = (top / "password").read_text().strip()
    cluster: Cluster | None = None
    for _ in range(1 if port else 5):  # a port found free may be taken before the server binds it
        cluster = Cluster(data, port or _free_port(), password)
        command = [
            str(binaries / "postgres"), "-D", str(data),
            "-c", "listen_addresses=127.0.0.1", "-c", f"port={cluster.port}",
            "-c", f"unix_socket_directories={top}", "-c", "fsync=off", "-c", "max_connections=200",
        ]  # fmt: skip
        run_as = _RunAs.of(user)
        with log.open("ab") as out:
            cluster.server = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=top,
                start_new_session=True,  # a terminal's Ctrl-C reaches the stack, which stops it in order
                preexec_fn=functools.partial(exit_with_parent, signal.SIGINT),
                user=run_as.uid,
                group=run_as.gid,
                extra_groups=run_as.groups,
            )
        if _wait_ready(cluster, log):
            break
    else:
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{_tail(log)}")
    try:
        yield cluster
    finally:
        _stop(cluster.server)


def _stop(server: subprocess.Popen[bytes] | None) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL, each given time to work."""
    if server is None:
        return
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        if server.poll() is not None:
            return
        server.send_signal(signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(STOP_TIMEOUT)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running_cluster(port: int = 0) -> Iterator[Cluster]:
    """A throwaway cluster on ``port`` (0: a free one) in a temporary directory, removed afterwards."""
    binaries = _binaries()
    user = server_user()
    top = Path(tempfile.mkdtemp(prefix="devprov-pg-"))
    try:
        _own(top, user)
        _initdb(binaries, top, user)
        with _serving(top, port, top / "server.log", user) as cluster:
            yield cluster
    finally:
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def kept_cluster(top: Path, log: Path, port: int = 0) -> Iterator[Cluster]:
    """The cluster in ``top`` (made on first use, 0700), started on what an earlier run left there; the
    server's output goes to ``log``.  The caller holds ``top`` (no other user of it runs)."""
    binaries = _binaries()
    user = server_user()
    private_directory(top)
    _own(top, user)
    if user is not None and (blocked := unreachable(top, user)) is not None:
        raise RuntimeError(
            f"the PostgreSQL server runs as user {user.pw_name} (we are root), which cannot pass through "
            f"{blocked} to reach {top}: let it through (e.g. chmod o+x) or choose a work directory it can "
            "reach"
        )
    if (top / "data").exists():
        if not (top / "password").exists():
            raise RuntimeError(f"{top / 'password'} is missing: the cluster in {top} cannot be used")
        _clear_leftovers(top, top / "data")
    else:
        _initdb(binaries, top, user)
    with _serving(top, port, log, user) as cluster:
        yield cluster
