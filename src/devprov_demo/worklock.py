"""One stack per work directory: an exclusive lock, taken before anything under the directory is touched.

``WorkDirLock.acquire(root)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<root>/.devprov-stack.lock`` and
writes who holds it into that same file (pid, start time, command line) for the message a second stack
prints; ``release()`` (or the process's end, even by SIGKILL: the kernel drops a dead process's locks) lets
go.  A lock that is held raises :class:`StackRunning`, naming the holder and the directory; the file's
content is only ever read for that message, so a stale one (a killed stack's) never blocks anybody.

The descriptor is not inherited: the stack's children never hold the lock, only the stack process does.
The lock file survives ``--fresh`` (the stack wipes everything else), so a second stack never locks a new
file while the first still holds the old one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = ".devprov-stack.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a work directory's lock, as its holder wrote it down (fields may be unknown)."""

    pid: int | None
    started: str
    command: str

    @classmethod
    def read(cls, path: Path) -> Holder:
        try:
            data = json.loads(path.read_text())
            pid = data.get("pid")
            started, command = str(data.get("started", "")), str(data.get("command", ""))
            return cls(pid if isinstance(pid, int) else None, started, command)
        except (OSError, ValueError, AttributeError):
            return cls(None, "", "")  # written a moment ago by a holder still starting, or unreadable


class StackRunning(RuntimeError):
    """Another stack holds the work directory."""

    def __init__(self, root: Path, holder: Holder) -> None:
        who = f"pid {holder.pid}" if holder.pid is not None else "a process that has not written its pid yet"
        since = f", started {holder.started}" if holder.started else ""
        command = f": {holder.command}" if holder.command else ""
        super().__init__(
            f"a stack is already running on {root} ({who}{since}{command}); stop it first "
            f"(Ctrl-C in its terminal{f', or kill {holder.pid}' if holder.pid is not None else ''}) or "
            "choose another --work-dir"
        )
        self.root = root
        self.holder = holder


class WorkDirLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: Path, command: str) -> WorkDirLock:
        """Lock ``root`` (an existing directory) for the stack started by ``command`` (for the message of the
        next one), or raise :class:`StackRunning`."""
        path = root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StackRunning(root, Holder.read(path)) from None
        except BaseException:
            os.close(fd)
            raise
        record = {
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go (closing the descriptor drops the lock); the file stays, its content stale."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
