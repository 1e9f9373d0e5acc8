"""The per-device state directory.

Layout of ``{state_root}/{guid}/`` (everything the device keeps between runs)::

    device.key          private key, PKCS#8 PEM, mode 0600 (never leaves the device in CSR mode)
    device-chain.pem    certificate chain PEM: leaf, issuing CA, root (the SDK's X509 cert_file)
    identity.json       metadata: guid, key origin, serial, thumbprints, validity, provisioned_at, enrollment
    settings.toml       optional per-device settings written at provisioning (id_scope, global_endpoint,
                        trusted_ca_file), below environment and command line in precedence
    trusted-ca.pem      optional copy of the trust anchor for DPS / the hub (referenced by settings.toml)
    est-ca.pem          optional copy of the trust anchor for the factory's EST listener (renewal.ca_file)
    assignment.json     cached DPS assignment: assigned_hub, device_id, registered_at (a cache: dropped
                        when the hub refuses the device)
    desired.json        last applied desired properties and their $version
    revocation.json     the certificate's revocation, as a verified CRL listed it (serial, date, reason,
                        CRL URL and number, when checked); removed with a new certificate
    telemetry.db        SQLite: bounded outbox of telemetry not yet acknowledged + sequence counter
    run.lock            flock held by the one process running this device
    renewal.json        the last certificate renewal's state, reason and time (reported in the twin)
    pending/            a renewed identity received from the factory's EST listener, not yet in use:
                        device.key (0600), device-chain.pem, identity.json ("new certificate received")
    previous/           the identity a renewal replaced, kept until the new one is confirmed

Writes are atomic (temporary file + fsync + rename); the private key is created 0600 from the start.
A directory (``pending/``, ``previous/``) is written whole under a temporary name and renamed into place.

Promotion of ``pending/`` (``promote_pending``), each step safe to repeat after a kill -9: copy the current
identity to ``previous/``; write the pending files over the identity's (each atomically); remove
``pending/`` (the commit point).  ``finish_promotion`` at start-up completes one that was interrupted:
``pending/`` *and* ``previous/`` present means the copy was made, so the pending files are written again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from device_client.errors import IdentityError, IdentityExistsError, Reason, StateError
from device_client.identity import IdentityInfo, check_validity, inspect_identity, load_chain, load_key
from litestore import private_directory

log = logging.getLogger(__name__)

KEY_FILE = "device.key"
CHAIN_FILE = "device-chain.pem"
IDENTITY_FILE = "identity.json"
SETTINGS_FILE = "settings.toml"
TRUSTED_CA_FILE = "trusted-ca.pem"
EST_CA_FILE = "est-ca.pem"
ASSIGNMENT_FILE = "assignment.json"
DESIRED_FILE = "desired.json"
REVOCATION_FILE = "revocation.json"
BUFFER_FILE = "telemetry.db"
LOCK_FILE = "run.lock"
RENEWAL_FILE = "renewal.json"
PENDING_DIR = "pending"
PREVIOUS_DIR = "previous"
IDENTITY_FILES = (KEY_FILE, CHAIN_FILE, IDENTITY_FILE)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_identity_files(
    directory: Path, key_pem: bytes, chain_pem: bytes, metadata: dict[str, Any]
) -> None:
    atomic_write(directory / KEY_FILE, key_pem, 0o600)
    atomic_write(directory / CHAIN_FILE, chain_pem)
    atomic_write(directory / IDENTITY_FILE, json.dumps(metadata, indent=2, sort_keys=True).encode())


def _remove_dir(path: Path) -> None:
    """Remove a flat directory; renamed aside first, so a kill -9 midway never leaves half of it in place."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.removing-{os.getpid()}")
    os.replace(path, doomed)
    _fsync_dir(path.parent)
    for child in doomed.iterdir():
        child.unlink()
    doomed.rmdir()


def _iso(value: datetime) -> str:
    return value.isoformat()


def _parse_dt(value: Any, *, source: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise StateError(f"{source}: bad timestamp {value!r}", Reason.STATE_CORRUPTED) from exc
    if parsed.tzinfo is None:
        raise StateError(f"{source}: timestamp without time zone {value!r}", Reason.STATE_CORRUPTED)
    return parsed


@dataclass(frozen=True)
class Assignment:
    """Where DPS put the device."""

    assigned_hub: str
    device_id: str
    registered_at: datetime
    id_scope: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "assigned_hub": self.assigned_hub,
            "device_id": self.device_id,
            "registered_at": _iso(self.registered_at),
            "id_scope": self.id_scope,
        }


@dataclass(frozen=True)
class Revoked:
    """The device's certificate is revoked: what the verified CRL's entry says, and where it came from."""

    serial: str  # upper-case hex, as identity.json and the factory spell it
    revoked_at: datetime
    reason: str | None  # RFC 5280 reason, kebab-case ("key-compromise"); None: unspecified
    crl_url: str
    crl_number: int | None
    checked_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "revoked_at": _iso(self.revoked_at),
            "reason": self.reason,
            "crl_url": self.crl_url,
            "crl_number": self.crl_number,
            "checked_at": _iso(self.checked_at),
        }

    def sentence(self) -> str:
        """"revoked on <date> (key-compromise)", for a person."""
        why = f" ({self.reason})" if self.reason else ""
        return f"revoked on {_iso(self.revoked_at)}{why}"


@dataclass(frozen=True)
class RenewalRecord:
    """Where the certificate's renewal stands (``renewal.json``; the twin's ``certificate.renewal``).

    ``state``: ``requested`` (asked the EST listener), ``received`` (new certificate in ``pending/``),
    ``registered`` (DPS accepted it), ``promoted`` (in use, not confirmed yet), ``confirmed`` (done),
    ``refused`` (the listener said no: ``reason`` is its reason), ``failed`` (could not complete: retried
    with back-off; ``reason`` says why)."""

    state: str
    at: datetime
    reason: str | None = None
    detail: str | None = None
    serial: str | None = None  # the new certificate's, once there is one

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "detail": self.detail,
            "at": _iso(self.at),
            "serial": self.serial,
        }


@dataclass(frozen=True)
class DesiredState:
    version: int
    properties: dict[str, Any]


@dataclass(frozen=True)
class StoredIdentity:
    info: IdentityInfo
    key_path: Path
    chain_path: Path
    metadata: dict[str, Any]


def _read_metadata(path: Path, guid: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: unreadable or not JSON", Reason.STATE_CORRUPTED) from exc
    if not isinstance(data, dict) or str(data.get("guid", "")).lower() != guid:
        raise StateError(f"{path}: does not describe device {guid!r}", Reason.STATE_CORRUPTED)
    return data


def _load_identity_in(directory: Path, guid: str) -> StoredIdentity:
    """The key, chain and metadata in ``directory``, checked to belong together and to ``guid``."""
    key_path, chain_path = directory / KEY_FILE, directory / CHAIN_FILE
    try:
        mode = key_path.stat().st_mode & 0o777
    except FileNotFoundError as exc:
        raise StateError(f"{key_path}: missing", Reason.STATE_INCOMPLETE) from exc
    if mode & 0o077:
        raise StateError(
            f"{key_path}: private key is readable by others (mode {mode:o}); chmod 600 it",
            Reason.KEY_PERMISSIONS,
        )
    metadata = _read_metadata(directory / IDENTITY_FILE, guid)
    try:
        key = load_key(key_path.read_bytes(), source=str(key_path))
        chain = load_chain(chain_path.read_bytes(), source=str(chain_path))
    except IdentityError as exc:
        raise StateError(exc.message, Reason.STATE_CORRUPTED, {"detail": exc.reason}) from exc
    except OSError as exc:
        raise StateError(f"{directory}: unreadable identity ({exc})", Reason.STATE_CORRUPTED) from exc
    info = inspect_identity(guid, key, chain, source=str(directory))
    return StoredIdentity(info=info, key_path=key_path, chain_path=chain_path, metadata=metadata)


class StateDir:
    """One device's state directory; see the module docstring for the layout."""

    def __init__(self, root: Path, guid: str) -> None:
        self.root = root
        self.guid = guid
        self.path = root / guid

    # -- paths ---------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def key_path(self) -> Path:
        return self.file(KEY_FILE)

    @property
    def chain_path(self) -> Path:
        return self.file(CHAIN_FILE)

    @property
    def buffer_path(self) -> Path:
        return self.file(BUFFER_FILE)

    @property
    def settings_path(self) -> Path:
        return self.file(SETTINGS_FILE)

    # -- identity --------------------------------------------------------------------------------------
    def has_identity(self) -> bool:
        return any(self.file(n).exists() for n in (KEY_FILE, CHAIN_FILE, IDENTITY_FILE))

    def require_present(self) -> None:
        if not self.path.is_dir():
            raise StateError(
                f"no state for device {self.guid!r} in {self.root} "
                f"(run `device-client provision {self.guid}`)",
                Reason.STATE_DIR_MISSING,
                {"path": str(self.path)},
            )
        missing = [n for n in (KEY_FILE, CHAIN_FILE, IDENTITY_FILE) if not self.file(n).is_file()]
        if missing:
            raise StateError(
                f"state directory {self.path} is incomplete: missing {', '.join(missing)} "
                f"(re-provision with `device-client provision {self.guid} --force`)",
                Reason.STATE_INCOMPLETE,
                {"missing": ",".join(missing)},
            )

    def write_identity(
        self, *, key_pem: bytes, chain_pem: bytes, metadata: dict[str, Any], force: bool
    ) -> None:
        if self.has_identity() and not force:
            raise IdentityExistsError(
                f"device {self.guid!r} already has an identity in {self.path}; use --force to replace it",
                Reason.IDENTITY_EXISTS,
            )
        private_directory(self.path)
        atomic_write(self.key_path, key_pem, 0o600)
        atomic_write(self.chain_path, chain_pem)
        atomic_write(self.file(IDENTITY_FILE), json.dumps(metadata, indent=2, sort_keys=True).encode())
        # A new certificate makes the cached hub assignment stale: the hub knows the old thumbprint; the
        # old one's revocation is not the new one's.
        self.clear_assignment()
        # Nor does the old certificate's renewal (pending/, previous/, renewal.json) concern the new one.
        self.drop_pending()
        self.drop_previous()
        for stale in (REVOCATION_FILE, RENEWAL_FILE):
            with contextlib.suppress(FileNotFoundError):
                self.file(stale).unlink()

    def read_metadata(self) -> dict[str, Any]:
        return _read_metadata(self.file(IDENTITY_FILE), self.guid)

    def load_identity(self, *, now: datetime | None = None) -> StoredIdentity:
        """Load and check the identity; with ``now`` also require the certificate to be valid then."""
        self.require_present()
        identity = _load_identity_in(self.path, self.guid)
        if now is not None:
            check_validity(identity.info, now=now, source=str(self.path))
        return identity

    # -- assignment cache ------------------------------------------------------------------------------
    def read_assignment(self) -> Assignment | None:
        path = self.file(ASSIGNMENT_FILE)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_bytes())
            return Assignment(
                assigned_hub=str(data["assigned_hub"]),
                device_id=str(data["device_id"]),
                registered_at=_parse_dt(data["registered_at"], source=str(path)),
                id_scope=data.get("id_scope"),
            )
        except (OSError, ValueError, KeyError, TypeError, StateError):
            # Only a cache: a broken one costs one DPS registration, not an outage.
            log.warning("ignoring unreadable assignment cache %s; will register with DPS", path)
            return None

    def write_assignment(self, assignment: Assignment) -> None:
        atomic_write(self.file(ASSIGNMENT_FILE), json.dumps(assignment.to_json(), indent=2).encode())

    def clear_assignment(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.file(ASSIGNMENT_FILE).unlink()

    # -- desired properties ----------------------------------------------------------------------------
    def read_desired(self) -> DesiredState | None:
        path = self.file(DESIRED_FILE)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_bytes())
            return DesiredState(version=int(data["version"]), properties=dict(data["properties"]))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable desired-properties cache %s", path)
            return None

    def write_desired(self, state: DesiredState) -> None:
        body = {"version": state.version, "properties": state.properties}
        atomic_write(self.file(DESIRED_FILE), json.dumps(body, indent=2, sort_keys=True).encode())

    # -- revocation ------------------------------------------------------------------------------------
    def read_revocation(self, serial: str) -> Revoked | None:
        """The recorded revocation of the certificate with ``serial`` (None: none recorded for it)."""
        path = self.file(REVOCATION_FILE)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_bytes())
            number = data.get("crl_number")
            record = Revoked(
                serial=str(data["serial"]),
                revoked_at=_parse_dt(data["revoked_at"], source=str(path)),
                reason=str(data["reason"]) if data.get("reason") else None,
                crl_url=str(data["crl_url"]),
                crl_number=int(number) if number is not None else None,
                checked_at=_parse_dt(data["checked_at"], source=str(path)),
            )
        except (OSError, ValueError, KeyError, TypeError, StateError) as exc:
            raise StateError(f"{path}: unreadable revocation record", Reason.STATE_CORRUPTED) from exc
        return record if record.serial.upper() == serial.upper() else None

    def write_revocation(self, record: Revoked) -> None:
        atomic_write(self.file(REVOCATION_FILE), json.dumps(record.to_json(), indent=2).encode())

    # -- renewal ---------------------------------------------------------------------------------------
    @property
    def pending_path(self) -> Path:
        return self.file(PENDING_DIR)

    @property
    def previous_path(self) -> Path:
        return self.file(PREVIOUS_DIR)

    def has_pending(self) -> bool:
        return self.pending_path.is_dir()

    def has_previous(self) -> bool:
        return self.previous_path.is_dir()

    def write_pending(self, *, key_pem: bytes, chain_pem: bytes, metadata: dict[str, Any]) -> None:
        """Keep a renewed identity in ``pending/``, whole or not at all (written aside, then renamed)."""
        staging = self.file(f".{PENDING_DIR}.tmp-{os.getpid()}")
        if staging.exists():
            _remove_dir(staging)
        private_directory(staging)
        _write_identity_files(staging, key_pem, chain_pem, metadata)
        if self.has_pending():
            _remove_dir(self.pending_path)
        os.replace(staging, self.pending_path)
        _fsync_dir(self.path)

    def drop_pending(self) -> None:
        _remove_dir(self.pending_path)

    def load_pending(self) -> StoredIdentity:
        """The identity in ``pending/``, checked as the main one is (raises :class:`StateError`)."""
        return _load_identity_in(self.pending_path, self.guid)

    def promote_pending(self) -> None:
        """Make ``pending/`` the identity; the replaced one is kept in ``previous/`` (see the docstring)."""
        if not self.has_pending():
            raise StateError(f"{self.pending_path}: no pending identity to promote", Reason.STATE_INCOMPLETE)
        if not self.has_previous():
            staging = self.file(f".{PREVIOUS_DIR}.tmp-{os.getpid()}")
            if staging.exists():
                _remove_dir(staging)
            private_directory(staging)
            _write_identity_files(
                staging,
                self.key_path.read_bytes(),
                self.chain_path.read_bytes(),
                self.read_metadata(),
            )
            os.replace(staging, self.previous_path)
            _fsync_dir(self.path)
        self.finish_promotion()

    def finish_promotion(self) -> None:
        """Complete a promotion a kill -9 interrupted (both ``pending/`` and ``previous/`` present)."""
        if not (self.has_pending() and self.has_previous()):
            return
        pending = self.pending_path
        metadata = json.loads((pending / IDENTITY_FILE).read_bytes())
        _write_identity_files(
            self.path, (pending / KEY_FILE).read_bytes(), (pending / CHAIN_FILE).read_bytes(), metadata
        )
        # The old certificate's revocation is not the new one's; the cached assignment stays: DPS put the
        # device on that hub with the new certificate.
        with contextlib.suppress(FileNotFoundError):
            self.file(REVOCATION_FILE).unlink()
        _remove_dir(pending)

    def drop_previous(self) -> None:
        _remove_dir(self.previous_path)

    def read_renewal(self) -> RenewalRecord | None:
        path = self.file(RENEWAL_FILE)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_bytes())
            return RenewalRecord(
                state=str(data["state"]),
                at=_parse_dt(data["at"], source=str(path)),
                reason=data.get("reason"),
                detail=data.get("detail"),
                serial=data.get("serial"),
            )
        except (OSError, ValueError, KeyError, TypeError, StateError):
            log.warning("ignoring unreadable renewal record %s", path)
            return None

    def write_renewal(self, record: RenewalRecord) -> None:
        atomic_write(self.file(RENEWAL_FILE), json.dumps(record.to_json(), indent=2).encode())

    # -- exclusive use -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the device's run lock: one process per device."""
        self.require_present()
        fd = os.open(self.file(LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StateError(
                    f"device {self.guid!r} is already running (lock {self.file(LOCK_FILE)} is held)",
                    Reason.STATE_IN_USE,
                ) from exc
            yield
        finally:
            os.close(fd)
