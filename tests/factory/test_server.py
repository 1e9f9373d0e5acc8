"""The factory server as a whole: restart keeps CA and ledger, mTLS, health/reflection, configured CA,
insecure-bind refusal."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from factory_env import factory_settings, make_csr, make_key, running_factory, verify_chain
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.parties import FACTORY_URI, party

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.app import FactoryApp
from factory_svc.errors import ERROR_DOMAIN, CaConfigError
from factory_svc.settings import CaSettings, load_settings
from provkit.channels import ChannelSecurity
from provkit.context import Role
from provkit.devpki import CA_KEY_USAGE, DevTlsAuthority
from provkit.grpc_errors import error_details
from provkit.grpc_server import ServerConfigError, ServerSettings, ServerTLS
from provkit.settings import Secret


def _mint(device_id: str) -> pb.MintCertificateRequest:
    return pb.MintCertificateRequest(device_id=device_id, csr_pem=make_csr(make_key("p256"), device_id))


async def test_ca_and_ledger_survive_a_restart(tmp_path: Path) -> None:
    settings = factory_settings(tmp_path)
    async with running_factory(settings) as factory:
        first = await factory.stub.MintCertificate(_mint("restart-1"))
    for name in ("root-ca.key", "issuing-ca.key"):
        assert stat.S_IMODE((tmp_path / "ca" / name).stat().st_mode) == 0o600
    async with running_factory(settings) as factory:
        again = await factory.stub.MintCertificate(_mint("restart-1"))
        got = await factory.stub.GetCertificate(
            pb.GetCertificateRequest(serial_number=first.certificate.serial_number)
        )
    assert got.certificate == first.certificate
    assert again.unexpired_certificate_count == 2
    old_chain = verify_chain(first.certificate.certificate_chain_pem)
    new_chain = verify_chain(again.certificate.certificate_chain_pem)
    assert old_chain[1:] == new_chain[1:]  # same issuing CA and root


async def test_mtls_refuses_anonymous_clients_and_records_the_caller(tmp_path: Path) -> None:
    tls_ca = DevTlsAuthority.create()
    tls_ca.server_certificate(["localhost"]).write(
        tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key"
    )
    (tmp_path / "tls" / "clients.pem").write_bytes(tls_ca.ca_pem)
    tls = ServerTLS(
        tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key", tmp_path / "tls" / "clients.pem"
    )
    station = party(tls_ca, Role.FACTORY, "plant-1", "mes-station-7")
    settings = factory_settings(tmp_path / "data", ServerSettings(tls=tls, error_domain=ERROR_DOMAIN))
    anonymous = ChannelSecurity(ca_pem=tls_ca.ca_pem)
    async with running_factory(settings, security=anonymous, target_host="localhost") as factory:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await factory.stub.MintCertificate(_mint("mtls-1"), timeout=5)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        assert await factory.app.ledger.certificates.page(None, 10, None) == []

    trusted = ChannelSecurity(ca_pem=tls_ca.ca_pem, cert_pem=station.cert_pem, key_pem=station.key_pem)
    async with running_factory(settings, security=trusted, target_host="localhost") as factory:
        reply = await factory.stub.MintCertificate(_mint("mtls-1"))
        stored = await factory.app.ledger.certificates.get(reply.certificate.serial_number)
    thumb = x509.load_pem_x509_certificate(station.cert_pem).fingerprint(hashes.SHA256()).hex().upper()
    assert reply.certificate.caller_identity == f"urn:devprov:factory:plant-1 mes-station-7 sha256:{thumb}"
    assert stored is not None and stored.caller == reply.certificate.caller_identity


async def test_health_and_reflection_describe_the_factory(tmp_path: Path) -> None:
    async with running_factory(factory_settings(tmp_path)) as factory:
        reply = await health_pb2_grpc.HealthStub(factory.channel).Check(
            health_pb2.HealthCheckRequest(service="devprov.v1.FactoryService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(factory.channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="devprov.v1.FactoryService"),
        ]
        replies = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    assert "devprov.v1.FactoryService" in {s.name for s in replies[0].list_services_response.service}
    assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_insecure_mode_refuses_a_non_loopback_bind(tmp_path: Path) -> None:
    settings = factory_settings(tmp_path, ServerSettings(host="0.0.0.0", insecure=True))
    app = await FactoryApp.open(settings)
    try:
        with pytest.raises(ServerConfigError):
            await app.start()
    finally:
        await app.close()


def _write_configured_ca(folder: Path, passphrase: bytes) -> None:
    now = datetime.now(UTC)
    root_key, issuing_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, key, issuer: str, signer, ca_path: int) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=ca_path), critical=True)
            .add_extension(
                CA_KEY_USAGE,
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
            )
        )
        return builder.sign(signer, hashes.SHA384())

    root = cert("Acme Root", root_key, "Acme Root", root_key, 1)
    issuing = cert("Acme Line 3 Issuing", issuing_key, "Acme Root", root_key, 0)
    folder.mkdir(parents=True)
    (folder / "chain.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (issuing, root))
    )
    (folder / "issuing.key").write_bytes(
        issuing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    (folder / "passphrase").write_bytes(passphrase + b"\n")


async def test_configured_ca_with_a_passphrase_from_a_file(tmp_path: Path) -> None:
    _write_configured_ca(tmp_path / "pki", b"correct horse")
    env = {
        "FACTORY_DATA_DIR": str(tmp_path / "data"),
        "FACTORY_SERVER_INSECURE": "true",
        "FACTORY_SERVER_INSECURE_IDENTITY": FACTORY_URI,
        "FACTORY_SERVER_PORT": "0",
        "FACTORY_CA_CHAIN_FILE": str(tmp_path / "pki" / "chain.pem"),
        "FACTORY_CA_KEY_FILE": str(tmp_path / "pki" / "issuing.key"),
        "FACTORY_CA_KEY_PASSPHRASE_FILE": str(tmp_path / "pki" / "passphrase"),
        "FACTORY_DEVICE_IDS": "registration-id",  # this fleet's ids are not GUIDs
    }
    settings = load_settings(env=env)
    async with running_factory(settings) as factory:
        reply = await factory.stub.MintCertificate(_mint("acme-1"))
        # The default validity fits (capped at the issuing CA's end); two years asked for would outlive it.
        too_long = _mint("acme-2")
        too_long.validity.seconds = 2 * 365 * 86400
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await factory.stub.MintCertificate(too_long)
        assert error_details(caught.value).reason == "VALIDITY_EXCEEDS_ISSUER"
    _leaf, issuing, root = verify_chain(reply.certificate.certificate_chain_pem)
    assert issuing.subject.rfc4514_string() == "CN=Acme Line 3 Issuing"
    assert root.subject.rfc4514_string() == "CN=Acme Root"
    assert not (tmp_path / "data" / "ca").exists()

    wrong = CaSettings(settings.ca.chain_file, settings.ca.key_file, Secret("battery staple"))
    with pytest.raises(CaConfigError):
        await FactoryApp.open(factory_settings(tmp_path / "data", ca=wrong))
