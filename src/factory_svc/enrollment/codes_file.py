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

A file that does not read as one is refused as a whole (``InputError`` naming the line), before anything is
written to it: another file (its first line not the header: ``--codes-out`` naming the manifest, say), a NUL
byte, a control character in a cell (line breaks and tabs only in an error message), a
device id, outcome, delivery or code that is not UTF-8, or a code that is not an activation code.  The
codes reach labels (a ZPL printer obeys what it is sent) and a terminal (``lot-status``).

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

from provkit.activation_code import normalise
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


_ERROR_SPACING = frozenset("\t\n\r")  # what an error message may hold of the control characters


def _control(cell: str, allowed: frozenset[str] = frozenset()) -> str | None:
    for char in cell:
        if (ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0) and char not in allowed:
            return f"U+{ord(char):04X}"
    return None


def _checked(path: Path, number: int, row: Row) -> Row:
    """``row`` (line ``number``) as a codes file's writer makes it, else InputError saying what is wrong."""
    for index, cell in enumerate(row):
        control = _control(cell, _ERROR_SPACING if index == 4 else frozenset())
        if control is not None:
            raise InputError(f"{path} line {number}: {control} in the {HEADER[index]} column")
        if index < 4 and "\ufffd" in cell:  # what the writer puts there is ASCII: a torn line has no end
            raise InputError(f"{path} line {number}: the {HEADER[index]} column is not UTF-8")
    if row[3] and normalise(row[3]) is None:
        raise InputError(f"{path} line {number}: the code of {row[0]} is not an activation code")
    return row


def read_rows(path: Path) -> list[Row]:
    """The lines of a codes file, in order.  A torn last line (a crash in the middle of a write: no line
    end) is ignored.  InputError for a file that is no codes file (see the module's description)."""
    data = path.read_bytes()
    if b"\0" in data:
        raise InputError(f"{path} is not a codes file: it holds U+0000 (a NUL byte)")
    text = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    if text and text.partition("\n")[0].rstrip("\r") != ",".join(HEADER):  # another file, named by mistake
        raise InputError(f"{path} is not a codes file: its first line is not {','.join(HEADER)}")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # a whole line never ends in a quote
    rows: list[Row] = []
    try:
        for row in reader:
            if len(row) == len(HEADER) and row[0] != HEADER[0]:
                rows.append(_checked(path, reader.line_num, (row[0], row[1], row[2], row[3], row[4])))
    except csv.Error as exc:
        raise InputError(f"{path} is not a codes file: {exc}") from None
    return rows


def read_codes(path: Path) -> dict[str, str]:
    """Device id -> its code (the last line with one) of a codes file."""
    return {row[0]: row[3] for row in read_rows(path) if row[3]}
