"""Helpers for the factory tests: a real factory server on loopback, keys, CSRs, chain checks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store
from support.parties import FACTORY_URI

from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.app import FactoryApp
from factory_svc.errors import ERROR_DOMAIN
from factory_svc.mint.service import MintPolicy
from factory_svc.settings import CaSettings, FactorySettings
from provkit.channels import ChannelSecurity, create_channel
from provkit.clock import Clock, now_utc
from provkit.device_id import DeviceIdPolicy
from provkit.grpc_server import RunningServer, ServerSettings

INSECURE = ServerSettings(insecure=True, error_domain=ERROR_DOMAIN, insecure_identity=FACTORY_URI)


@dataclass
class Factory:
    app: FactoryApp
    server: RunningServer
    stub: pb_grpc.FactoryServiceStub
    channel: object
    settings: FactorySettings


def factory_settings(
    data_dir: Path,
    server: ServerSettings = INSECURE,
    ca: CaSettings | None = None,
    device_ids: DeviceIdPolicy = DeviceIdPolicy.REGISTRATION_ID,
) -> FactorySettings:
    """The minting tests name devices readably ("dev-001"): the documented registration-id setting.  The
    default GUID policy has its own tests (test_bad_input.py, the CLI tests)."""
    return FactorySettings(
        server=server, data_dir=data_dir, ca=ca or CaSettings(), mint=MintPolicy(), device_ids=device_ids
    )


@contextlib.asynccontextmanager
async def running_factory(
    settings: FactorySettings,
    *,
    clock: Clock = now_utc,
    security: ChannelSecurity | None = None,
    target_host: str = "127.0.0.1",
) -> AsyncIterator[Factory]:
    app = await FactoryApp.open(settings, clock)
    try:
        server = await app.start()
        try:
            channel = create_channel(
                f"{target_host}:{server.port}", security or ChannelSecurity(insecure=True)
            )
            async with channel:
                yield Factory(app, server, pb_grpc.FactoryServiceStub(channel), channel, settings)
        finally:
            await server.stop(0)
    finally:
        await app.close()


# ------------------------------------------------------------------------------------------------- keys
@functools.cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


def make_key(kind: str):
    return {
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "k256": lambda: ec.generate_private_key(ec.SECP256K1()),
        "rsa1024": lambda: rsa_key(1024),
        "rsa2048": lambda: rsa_key(2048),
        "rsa3072": lambda: rsa_key(3072),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }[kind]()


def make_csr(key, common_name: str | None) -> str:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names)).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_chain(chain_pem: str, when: datetime | None = None) -> list[x509.Certificate]:
    """Verify leaf -> issuing CA -> root with cryptography's client-certificate verifier."""
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    assert len(certs) == 3, "chain must be leaf, issuing CA, root"
    leaf, issuing, root = certs
    # Azure's device certificates carry the id in the subject CN and need no SAN: relax only that rule of
    # the Web PKI end-entity profile (EKU clientAuth, key usage, AKI... stay enforced).
    leaf_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(when or datetime.now(UTC))
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy)
        .build_client_verifier()
    )
    verified = verifier.verify(leaf, [issuing])
    assert [c.subject for c in verified.chain] == [leaf.subject, issuing.subject, root.subject]
    return certs
