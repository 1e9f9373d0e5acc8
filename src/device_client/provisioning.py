"""`provision`: the factory test bench gives the device its identity.

Flow: key made on the device (default ECDSA P-256) -> CSR -> factory MintCertificate -> the returned
chain is checked against our key and GUID -> identity stored (key 0600) -> factory Enroll (DPS individual
enrollment, disabled until the OEM activates) -> the activation code is shown once.  With
``server_keygen`` the factory generates the key (the seed's flow for jigs without a crypto library).

The identity is stored before Enroll, so a failed Enroll never loses a minted certificate: running
``provision`` again (without --force) then only retries the enrollment of the stored certificate.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from device_client.errors import FactoryError, IdentityExistsError, Reason
from device_client.factory_client import GrpcFactory
from device_client.factory_port import ENROLLED_STATES, EnrollOutcome, FactoryPort
from device_client.identity import (
    IdentityInfo,
    KeyType,
    build_csr_pem,
    generate_key,
    inspect_identity,
    key_to_pem,
    load_chain,
    load_key,
)
from device_client.settings import RenewalSettings, Settings, render_device_settings
from device_client.state import EST_CA_FILE, TRUSTED_CA_FILE, StateDir, atomic_write


@dataclass(frozen=True)
class ProvisionRequest:
    guid: str
    key_type: KeyType = KeyType.EC_P256
    server_keygen: bool = False
    enroll: bool = True
    force: bool = False
    request_id: str | None = None
    validity: timedelta | None = None  # None: the factory's default (a demo of renewal asks for minutes)


@dataclass(frozen=True)
class ProvisionResult:
    identity: IdentityInfo
    state_path: Path
    enrollment: str  # live | queued | skipped
    activation_code: str | None
    minted: bool  # False when only a pending enrollment was retried


def _device_settings(settings: Settings, state: StateDir) -> None:
    """Record the field configuration known at the factory in the device's own settings.toml."""
    values: dict[str, str] = {}
    cloud = settings.cloud
    if cloud.id_scope:
        values["id_scope"] = cloud.id_scope
    values["global_endpoint"] = cloud.global_endpoint
    if cloud.trusted_ca_file is not None:
        cloud.trusted_ca_pem()  # validates
        target = state.file(TRUSTED_CA_FILE)
        if cloud.trusted_ca_file.resolve() != target.resolve():
            shutil.copyfile(cloud.trusted_ca_file, target)
        values["trusted_ca_file"] = TRUSTED_CA_FILE
    values.update(_renewal_settings(settings, state))
    atomic_write(state.settings_path, render_device_settings(values))


def _renewal_settings(settings: Settings, state: StateDir) -> dict[str, str]:
    """The renewal settings the device keeps (``--est-url``): the listener's URL, its trust anchor (the
    factory CA the bench used, copied into the state directory: the listener's TLS certificate is the
    factory's own by default) and any timing that is not the default."""
    rs = settings.renewal
    if not rs.est_url:
        return {}
    values = {"renewal.est_url": rs.est_url}
    anchor = rs.ca_file or settings.factory.ca_file
    if anchor is not None:
        rs.trusted_ca_pem(settings.factory.ca_file)  # validates
        target = state.file(EST_CA_FILE)
        if anchor.resolve() != target.resolve():
            shutil.copyfile(anchor, target)
        values["renewal.ca_file"] = EST_CA_FILE
    defaults = RenewalSettings()
    for key, value, default in (
        ("fraction", rs.fraction, defaults.fraction),
        ("days_before", rs.days_before, defaults.days_before),
        ("check_interval_s", rs.check_interval_s, defaults.check_interval_s),
    ):
        if value != default:
            values[f"renewal.{key}"] = repr(value)
    return values


def record_enrollment(state: StateDir, outcome: EnrollOutcome) -> None:
    """Note in the device's metadata that (and how) its certificate is enrolled."""
    metadata = dict(
        state.read_metadata(), enrollment=outcome.status, enrolled_at=datetime.now(UTC).isoformat()
    )
    atomic_write(state.file("identity.json"), json.dumps(metadata, indent=2, sort_keys=True).encode())


async def provision_with(
    factory: FactoryPort, request: ProvisionRequest, settings: Settings
) -> ProvisionResult:
    state = StateDir(settings.state_root, request.guid)
    # A device that is running holds its run lock: its key and chain are not replaced under it.
    with state.locked() if state.path.is_dir() else contextlib.nullcontext():
        return await _provision_unlocked(factory, request, settings, state)


async def _provision_unlocked(
    factory: FactoryPort, request: ProvisionRequest, settings: Settings, state: StateDir
) -> ProvisionResult:
    base_id = request.request_id or str(uuid.uuid4())
    minted = True
    if state.has_identity() and not request.force:
        existing = state.load_identity()
        pending = existing.metadata.get("enrollment") not in ENROLLED_STATES
        if not (pending and request.enroll):
            raise IdentityExistsError(
                f"device {request.guid!r} already has an identity in {state.path} "
                f"(serial {existing.info.serial_hex}); use --force to replace it",
                Reason.IDENTITY_EXISTS,
            )
        minted = False  # resume: enroll the stored certificate
    if minted:
        if request.server_keygen:
            cert = await factory.mint_with_server_key(
                request.guid, request.key_type, f"{base_id}:mint", validity=request.validity
            )
            if not cert.private_key_pem:
                raise FactoryError(
                    "the factory returned no private key for server-side generation",
                    Reason.NO_KEY,
                )
            key = load_key(cert.private_key_pem, source="factory response")
        else:
            key = generate_key(request.key_type)
            cert = await factory.mint_with_csr(
                request.guid, build_csr_pem(key, request.guid), f"{base_id}:mint", validity=request.validity
            )
        chain = load_chain(cert.certificate_chain_pem, source="factory response")
        info = inspect_identity(request.guid, key, chain, source="factory response")
        metadata = {
            "guid": request.guid,
            "key_origin": "factory" if request.server_keygen else "device",
            "serial": info.serial_hex,
            "thumbprint_sha1": info.thumbprint_sha1,
            "thumbprint_sha256": info.thumbprint_sha256,
            "not_after": info.not_after.isoformat(),
            "provisioned_at": datetime.now(UTC).isoformat(),
            "factory": settings.factory.address,
            "enrollment": "pending" if request.enroll else "skipped",
        }
        state.write_identity(
            key_pem=key_to_pem(key),
            chain_pem=cert.certificate_chain_pem,
            metadata=metadata,
            force=request.force,
        )
        _device_settings(settings, state)
    stored = state.load_identity()
    if not request.enroll:
        return ProvisionResult(stored.info, state.path, "skipped", None, minted)
    leaf_pem = load_chain(stored.chain_path.read_bytes(), source=str(stored.chain_path))[0]
    # --force (rework, RMA) re-enrolls the new certificate in place of the old one.
    outcome = await factory.enroll(
        request.guid, leaf_pem.public_bytes(Encoding.PEM), f"{base_id}:enroll", replace=request.force
    )
    record_enrollment(state, outcome)
    return ProvisionResult(stored.info, state.path, outcome.status, outcome.activation_code, minted)


async def provision(request: ProvisionRequest, settings: Settings) -> ProvisionResult:
    """Provision over gRPC with the configured factory address and TLS options."""
    async with GrpcFactory(settings.factory) as factory:
        return await provision_with(factory, request, settings)
