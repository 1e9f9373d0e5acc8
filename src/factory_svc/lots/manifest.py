"""A lot's manifest: ``<lot dir>/manifest.json``, the one record of a production lot that every step of the
line reads and updates (``lot`` mints, ``lot --enroll`` / ``enroll-batch --lot`` enroll, ``labels`` prints,
``lot-status`` reads it and asks the factory about the rest).

The lot directory (0700)::

    manifest.json      this file (0600)
    codes.csv          the activation codes (0600, ``factory_svc.enrollment.codes_file``: appended and fsynced
                       as answers come; the last line with a code is the device's code)
    <device id>/       chain.pem, cert.pem, key.pem (0600) or device.p12
    labels/            the labels (0700; files 0600: they carry the codes)

Format (``version`` 1; a reader refuses another version)::

    {"format": "devprov-lot-manifest", "version": 1, "lot_id": "LOT-1", "key_source": "server" | "csr",
     "item_count": 20, "codes_file": "codes.csv", "updated": "<UTC ISO time>",
     "devices": [{"index": 0, "device_id": "<guid>", "serial": "<hex>", "state": "minted",
                  "files": {"chain": "<id>/chain.pem", "cert": "<id>/cert.pem", "key": "<id>/key.pem"},
                  "minted": "<time>", "enrolled": null | {"at": "<time>", "outcome": "CREATED",
                  "delivery": "LIVE", "owner": "acme"}, "label": null | {"at": "<time>",
                  "formats": ["pdf"], "code_digest": "<12 hex>"}, "error": ""}]}

``state`` is derived from the facts beside it: ``mint-failed``, ``minted``, ``enroll-failed``, ``enrolled``,
``printed`` (a label with the device's current code was printed; ``code_digest`` is the first 12 hex digits of
the code's SHA-256, so a label printed before ``rotate-code`` shows as stale).  The manifest holds no code.

Writes are atomic (a temporary file, fsync, rename: a crash leaves the old manifest or the new one) and
0600.  A command that updates the manifest holds ``lot dir/.lock`` (``flock``; released by the kernel when the
process dies, also by kill -9) for its whole run, so two updates of one lot never interleave.  Long runs save
every ``SAVE_EVERY`` seconds and at the end: what a crash loses between two saves is recovered from the
factory's ledger (a resumed lot replays its items) and the codes file (``reconcile``).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonsafe
from factory_svc.enrollment.codes_file import Row
from litestore import private_directory
from provkit.device_id import is_valid_device_id
from provkit.devpki import write_private_file
from provkit.errors import InputError

FORMAT = "devprov-lot-manifest"
VERSION = 1
MANIFEST = "manifest.json"
CODES = "codes.csv"
LABELS = "labels"
SAVE_EVERY = 2.0  # seconds between two saves of a long run (the end always saves)


class DeviceState(enum.StrEnum):
    MINT_FAILED = "mint-failed"
    MINTED = "minted"
    ENROLL_FAILED = "enroll-failed"
    ENROLLED = "enrolled"
    PRINTED = "printed"


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def code_digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Enrolled:
    at: str
    outcome: str  # CREATED, UNCHANGED, REPLACED, QUEUED... (EnrollOutcome)
    delivery: str  # LIVE, QUEUED
    owner: str = ""


@dataclass(frozen=True)
class Printed:
    at: str
    formats: tuple[str, ...]
    code_digest: str


@dataclass
class DeviceEntry:
    index: int
    device_id: str
    serial: str = ""
    files: dict[str, str] = field(default_factory=dict)  # role (chain, cert, key, p12) -> path in the lot
    minted: str = ""
    enrolled: Enrolled | None = None
    label: Printed | None = None
    error: str = ""  # the last failure (minting, or enrolling)

    @property
    def state(self) -> DeviceState:
        if not self.minted:
            return DeviceState.MINT_FAILED
        if self.enrolled is None:
            return DeviceState.ENROLL_FAILED if self.error else DeviceState.MINTED
        return DeviceState.PRINTED if self.label is not None else DeviceState.ENROLLED

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "device_id": self.device_id,
            "serial": self.serial,
            "state": self.state.value,
            "files": dict(sorted(self.files.items())),
            "minted": self.minted,
            "enrolled": None if self.enrolled is None else vars(self.enrolled),
            "label": None
            if self.label is None
            else {**vars(self.label), "formats": list(self.label.formats)},
            "error": self.error,
        }


@dataclass
class LotManifest:
    directory: Path
    lot_id: str
    key_source: str  # server | csr
    item_count: int
    devices: dict[int, DeviceEntry] = field(default_factory=dict)  # by index
    _saved_at: float = field(default=0.0, repr=False)

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def codes_path(self) -> Path:
        return self.directory / CODES

    def file(self, entry: DeviceEntry, role: str) -> Path:
        return self.directory / entry.files[role]

    def by_id(self) -> dict[str, DeviceEntry]:
        return {entry.device_id: entry for entry in self.devices.values()}

    def in_order(self) -> list[DeviceEntry]:
        return [self.devices[index] for index in sorted(self.devices)]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "lot_id": self.lot_id,
            "key_source": self.key_source,
            "item_count": self.item_count,
            "codes_file": CODES,
            "updated": now_text(),
            "devices": [entry.to_json() for entry in self.in_order()],
        }

    def save(self) -> None:
        """Write the manifest atomically (0600); on return it is on disk."""
        data = (json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n").encode()
        write_private_file(self.path, data)
        self._saved_at = time.monotonic()

    def save_now_and_then(self) -> None:
        """Save when the last save is ``SAVE_EVERY`` seconds old (a long run's progress, for lot-status)."""
        if time.monotonic() - self._saved_at >= SAVE_EVERY:
            self.save()

    def reconcile(self, answers: Mapping[str, Row], owner: str) -> int:
        """Devices the codes file shows as enrolled that the manifest does not (a crash between appending the
        codes and saving the manifest) are recorded as enrolled; how many were."""
        changed = 0
        for entry in self.devices.values():
            row = answers.get(entry.device_id)
            if entry.minted and entry.enrolled is None and row is not None:
                entry.enrolled = Enrolled(now_text(), row[1], row[2], owner)
                entry.error = ""
                changed += 1
        return changed


# ------------------------------------------------------------------------------------------------- reading
_KINDS = {str: "a string", int: "an integer", dict: "an object", list: "an array"}


def _need(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InputError(f"{where} is not {_KINDS[kind]}")
    return value


def _text(data: Mapping[str, Any], key: str, where: str) -> str:
    return str(_need(data.get(key, ""), str, f"{where}.{key}"))


def _enrolled(value: Any, where: str) -> Enrolled | None:
    if value is None:
        return None
    data = _need(value, dict, where)
    return Enrolled(
        _text(data, "at", where), _text(data, "outcome", where), _text(data, "delivery", where),
        _text(data, "owner", where),
    )  # fmt: skip


def _printed(value: Any, where: str) -> Printed | None:
    if value is None:
        return None
    data = _need(value, dict, where)
    formats = _need(data.get("formats", []), list, f"{where}.formats")
    return Printed(
        _text(data, "at", where),
        tuple(_need(f, str, f"{where}.formats[]") for f in formats),
        _text(data, "code_digest", where),
    )


def _entry(value: Any, where: str) -> DeviceEntry:
    data = _need(value, dict, where)
    files = _need(data.get("files", {}), dict, f"{where}.files")
    for role, path in files.items():
        _need(path, str, f"{where}.files.{role}")
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise InputError(f"{where}.files.{role} leaves the lot directory: {path!r}")
    entry = DeviceEntry(
        index=int(_need(data.get("index"), int, f"{where}.index")),
        device_id=_text(data, "device_id", where),
        serial=_text(data, "serial", where),
        files=dict(files),
        minted=_text(data, "minted", where),
        enrolled=_enrolled(data.get("enrolled"), f"{where}.enrolled"),
        label=_printed(data.get("label"), f"{where}.label"),
        error=_text(data, "error", where),
    )
    if entry.minted:
        # A minted device's id names its directory and its label files: the factory's form of an id, nothing
        # a path could misread.  (A refused item keeps the id that was asked for, whatever it was.)
        if not is_valid_device_id(entry.device_id) or entry.device_id != entry.device_id.strip().lower():
            raise InputError(f"{where}.device_id is not a device id: {entry.device_id!r}")
    elif entry.enrolled is not None or entry.label is not None or files:
        raise InputError(f"{where} was never minted, yet has files, an enrollment or a label")
    return entry


def load(directory: Path) -> LotManifest:
    """The manifest of the lot in ``directory``; InputError (the command says what is wrong, exit 2) when
    there is none, or it is not a manifest this version reads."""
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _not_a_lot(directory) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = jsonsafe.loads(raw)
    except jsonsafe.JsonRefused as exc:
        raise InputError(f"{path} is not a lot manifest: {exc}") from None
    where = str(path)
    _need(data, dict, where)
    if data.get("format") != FORMAT:
        raise InputError(f"{path} is not a lot manifest (format {data.get('format')!r})")
    if data.get("version") != VERSION:
        raise InputError(
            f"{path} is version {data.get('version')!r}; this factory-svc reads version {VERSION}"
        )
    devices: dict[int, DeviceEntry] = {}
    for n, value in enumerate(_need(data.get("devices"), list, f"{where}: devices")):
        entry = _entry(value, f"{where}: devices[{n}]")
        if entry.index in devices:
            raise InputError(f"{where}: devices[{n}]: index {entry.index} appears twice")
        devices[entry.index] = entry
    manifest = LotManifest(
        directory,
        _text(data, "lot_id", where),
        _text(data, "key_source", where),
        int(_need(data.get("item_count"), int, f"{where}: item_count")),
        devices,
    )
    manifest._saved_at = time.monotonic()
    return manifest


def _not_a_lot(directory: Path) -> InputError:
    return InputError(f"{directory} is not a lot directory (no {MANIFEST}; `factory-svc lot` makes one)")


def open_for_lot(directory: Path, lot_id: str, key_source: str, item_count: int) -> LotManifest:
    """The manifest of a lot being minted into ``directory``: the one there (the same lot, resumed), or a new
    one (saved at once, so the directory says which lot it holds from the start)."""
    if (directory / MANIFEST).exists():
        manifest = load(directory)
        if manifest.lot_id != lot_id:
            raise InputError(
                f"{directory} holds lot {manifest.lot_id!r}; give lot {lot_id!r} a directory of its own"
            )
        manifest.key_source, manifest.item_count = key_source, item_count
        return manifest
    manifest = LotManifest(directory, lot_id, key_source, item_count)
    manifest.save()
    return manifest


@contextlib.contextmanager
def locked(directory: Path, *, create: bool = False) -> Iterator[None]:
    """Hold the lot's lock for a command that updates its manifest; InputError when another holds it.
    ``create``: the directory is made (0700) when missing (``lot``, which mints into it); else a directory
    without a manifest is refused as not a lot directory, before anything is written in it."""
    if create:
        private_directory(directory)
    elif not (directory / MANIFEST).is_file():
        raise _not_a_lot(directory)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another command is updating the lot in {directory}; wait for it to end"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock (and so does the process's end, however it ends)
