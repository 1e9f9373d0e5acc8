"""The codes file of ``factory-svc enroll-batch`` / ``rotate-code``: CSV, appended and fsynced as answers
come.

Columns: ``device_id,outcome,delivery,activation_code,error``.  The file is created 0600 (the codes are
secrets) and only ever appended to, each chunk's lines fsynced before the service is told that the labels
may be printed (AcknowledgeActivationCodes), so a crash at any point loses no code that was answered.  A
re-run appends to the same file; a device may then have several lines (the same retained code again, or a
rotated one): **the last line with a code is the device's code**.

A power cut in the middle of a write can leave a torn last line (no line end).  Its chunk was never
acknowledged, so the service still holds its codes and answers them again; readers ignore it, and
``CodesFile.open`` cuts it off before appending (ending it instead would leave an open quote, a torn error
message with a comma in it, that takes every later line into its cell).

API: ``CodesFile.open(path)`` (reads what is there), ``.codes`` (device id -> last code), ``.answers`` (device
id -> its last answered line: enrolled, queued, rotated), ``.append(rows)``, ``.close()``; ``read_codes``,
``read_rows``; ``HEADER``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from provkit.errors import InputError

HEADER = ("device_id", "outcome", "delivery", "activation_code", "error")
Row = tuple[str, str, str, str, str]


class CodesFile:
    def __init__(self, path: Path, fd: int, rows: Sequence[Row]) -> None:
        self.path = path
        self._fd = fd
        self.codes: dict[str, str] = {}  # device id -> the last code written for it
        self.answers: dict[str, Row] = {}  # device id -> its last line with an outcome
        self._note(rows)

    def _note(self, rows: Sequence[Row]) -> None:
        for row in rows:
            if row[3]:
                self.codes[row[0]] = row[3]
            if row[1]:
                self.answers[row[0]] = row

    @classmethod
    def open(cls, path: Path) -> CodesFile:
        rows = read_rows(path) if path.exists() else []
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # also when an older file was more open
        file = cls(path, fd, rows)
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            os.ftruncate(fd, data.rfind(b"\n") + 1)  # a torn line (a power cut) goes; the next starts clean
        if os.fstat(fd).st_size == 0:
            file._write([HEADER])
        return file

    def _write(self, rows: Sequence[Sequence[str]]) -> None:
        out = io.StringIO()
        csv.writer(out).writerows(rows)
        data = out.getvalue().encode()
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
        os.fsync(self._fd)

    def append(self, rows: Sequence[Row]) -> None:
        """Write and fsync ``rows``; on return they are on disk."""
        if not rows:
            return
        self._write(rows)
        self._note(rows)

    def close(self) -> None:
        os.close(self._fd)


def read_rows(path: Path) -> list[Row]:
    """The lines of a codes file, in order.  A torn last line (a crash in the middle of a write: no line
    end) is ignored.  InputError for a file that is no codes file (a field beyond what the csv module
    reads)."""
    data = path.read_bytes()
    text = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    try:
        return [
            (row[0], row[1], row[2], row[3], row[4])
            for row in csv.reader(io.StringIO(text, newline=""))
            if len(row) == len(HEADER) and row[0] != HEADER[0]
        ]
    except csv.Error as exc:
        raise InputError(f"{path} is not a codes file: {exc}") from None


def read_codes(path: Path) -> dict[str, str]:
    """Device id -> its code (the last line with one) of a codes file."""
    return {row[0]: row[3] for row in read_rows(path) if row[3]}
