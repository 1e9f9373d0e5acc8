"""File and directory modes: a database holds what its program was trusted with; only its owner reads it.

:func:`private_directory` is also the one way every program of the project (the services, the emulator, the
device client, the demo stack) creates a state directory, whether or not a database goes into it.

Directories the program creates are made ``0700``; directories that already exist are left as they are (they
may be shared on purpose, e.g. a home directory or ``/tmp``).  Database files are ``0600``: a new file is
created with that mode before SQLite opens it, and an existing one (with its ``-wal`` / ``-shm``
companions, which SQLite creates with the database file's mode) is narrowed to it when opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
COMPANIONS = ("-wal", "-shm", "-journal")


def private_directory(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (exactly, whatever the umask); existing
    directories keep their mode."""
    missing: list[Path] = []
    here = path
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:  # another process made it meanwhile: it is theirs to have set
            continue
        os.chmod(directory, DIRECTORY_MODE)


def private_file(path: Path) -> None:
    """Make sure ``path`` exists with mode 0600: create it empty if missing, else narrow its mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        narrow(path)
        return
    os.close(fd)
    os.chmod(path, FILE_MODE)  # the umask may have taken bits away; it never adds any


def narrow(path: Path) -> None:
    """Take group and other permissions off an existing file (a no-op when it has none or is gone)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, mode & 0o700)


def database_files(path: Path) -> list[Path]:
    """The database file and its companions (those that exist now or may later)."""
    return [path, *(path.with_name(path.name + suffix) for suffix in COMPANIONS)]
