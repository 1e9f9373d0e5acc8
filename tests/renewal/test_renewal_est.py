"""EST renewal through the real listener (TLS on loopback, a real emulator): a device renews with our client,
the enrollment holds the new certificate as secondary, the device registers with it through DPS
(Microsoft's device SDK) and its hub identity's thumbprint changes; the promotion signal makes it the
primary and supersedes the old one.  Every refusal of the contract, each with nothing written; and a
standard EST client (openssl req + curl) unchanged."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    connect_to_hub,
    dps_enrollment,
    mint,
    register,
    registry,
    running_activation,
)
from renewal_env import (
    CRL_URL,
    EstClient,
    MovableClock,
    ServerTls,
    as_device,
    csr_for,
    new_key,
    renewal_env,
    running_factory,
)

from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.mint.issuer import serial_hex
from provkit.devpki import DevTlsAuthority

pytestmark = pytest.mark.timeout(240)
META = {"tags": {"line": 3}, "properties": {"desired": {"interval_s": 5}}}


def _sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def _leaf(certificates: list[x509.Certificate]) -> x509.Certificate:
    (leaf,) = [
        c for c in certificates if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    return leaf


def _slots(enrollment: dict) -> dict:
    return enrollment["attestation"]["x509"]["clientCertificates"]


async def _enrolled(factory, folder: Path):
    device = await mint(factory.stub, str(uuid.uuid4()), folder)
    reply = await factory.stub.Enroll(
        fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
    )
    return device, reply.activation_code


@pytest.mark.slow
async def test_a_device_renews_and_its_enrollment_and_hub_identity_change_over(
    tmp_path, module_emulator
) -> None:
    emulator = module_emulator
    tls, oem = ServerTls.create(tmp_path / "tls"), OemTls.create(tmp_path / "oem-tls")
    async with (
        running_factory(renewal_env(tmp_path, emulator, tls)) as factory,
        running_activation(activation_env(tmp_path, emulator, oem), oem) as (_app, activation),
    ):
        device, code = await _enrolled(factory, tmp_path / "devices")
        await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
        hub = (await register(emulator, device)).registration_state.assigned_hub
        before = await dps_enrollment(emulator, device.device_id)
        old = x509.load_pem_x509_certificates(device.chain_pem.encode())[0]

        client = EstClient(factory.est_url, tls, device.cert_path, device.key_path)
        # a certs-only PKCS#7 holds a DER SET: the order is the encoding's, not the chain's
        assert set((await client.cacerts()).certificates) == set(factory.app.ca.chain)
        key = new_key()
        answer = await client.renew(csr_for(device.device_id, key))
        leaf = _leaf(answer.certificates)
        issuing, root = factory.app.ca.chain
        assert set(answer.certificates) == {leaf, issuing, root}
        assert leaf.subject == old.subject and leaf.issuer == issuing.subject
        leaf.verify_directly_issued_by(issuing)
        assert [issuing, root] == list(factory.app.ca.chain)
        assert leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert points[0].full_name[0].value == CRL_URL
        for extension in old.extensions:  # the same extensions as a minted one
            if not isinstance(extension.value, x509.SubjectKeyIdentifier):
                assert leaf.extensions.get_extension_for_oid(extension.oid).value == extension.value
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert timedelta(days=365) <= lifetime <= timedelta(days=365, minutes=6)

        # the enrollment: the new certificate as secondary, everything else as it was
        during = await dps_enrollment(emulator, device.device_id)
        assert _slots(during)["primary"]["info"]["sha256Thumbprint"] == _sha256(old)
        assert _slots(during)["secondary"]["info"]["sha256Thumbprint"] == _sha256(leaf)
        for field in (
            "provisioningStatus",
            "initialTwin",
            "optionalDeviceInformation",
            "iotHubs",
            "deviceId",
        ):
            assert during.get(field) == before.get(field), field

        # a retry with the same key answers the same certificate (no second one)
        again = await client.renew(csr_for(device.device_id, key))
        assert _leaf(again.certificates) == leaf
        listed = await factory.stub.ListCertificates(fpb.ListCertificatesRequest(device_id=device.device_id))
        assert len(listed.certificates) == 2

        # the device registers with the new certificate (Microsoft's SDK): the hub identity follows
        renewed = as_device(device, key, answer.certificates, tmp_path / "renewed")
        result = await register(emulator, renewed)
        assert result.status == "assigned" and result.registration_state.assigned_hub == hub
        identity = await asyncio.to_thread(registry(emulator, hub).get_device, device.device_id)
        assert identity.authentication.x509_thumbprint.primary_thumbprint.upper() == renewed.sha1
        await connect_to_hub(emulator, renewed, hub)

        # the promotion signal: a request with the new certificate
        assert (
            await EstClient(factory.est_url, tls, renewed.cert_path, renewed.key_path).cacerts()
        ).status == 200
        after = await dps_enrollment(emulator, device.device_id)
        assert set(_slots(after)) == {"primary"}
        assert _slots(after)["primary"]["info"]["sha256Thumbprint"] == _sha256(leaf)
        assert after["provisioningStatus"] == "enabled" and after["initialTwin"] == before["initialTwin"]
        superseded = await factory.app.ledger.renewals.superseded_by(serial_hex(old.serial_number))
        assert superseded == serial_hex(leaf.serial_number)
        refused = await client.renew(csr_for(device.device_id, new_key()))
        assert (refused.status, refused.reason) == (403, "CERTIFICATE_SUPERSEDED")


def _issuing_ca(tmp_path: Path):
    ca_dir = tmp_path / "factory" / "ca"
    cert = x509.load_pem_x509_certificate((ca_dir / "issuing-ca.pem").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "issuing-ca.key").read_bytes(), None)
    return cert, key


def _foreign_leaf(tmp_path: Path, common_name: str) -> tuple[Path, Path]:
    """A certificate the device CA signed that the factory never recorded (CN not a device id)."""
    issuer, issuer_key = _issuing_ca(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = issuer.not_valid_before_utc + timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=3000))
        .sign(issuer_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "foreign.pem", tmp_path / "foreign.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def _openssl_csr(tmp_path: Path, subject: str, key_spec: list[str], name: str) -> tuple[bytes, Path]:
    """``openssl req``: a new key and a DER CSR for ``subject``; (the body, base64), the key file."""
    key, der = tmp_path / f"{name}.key", tmp_path / f"{name}.der"
    subprocess.run(
        ["openssl", "req", "-new", *key_spec, "-nodes", "-keyout", str(key), "-subj", subject,
         "-outform", "DER", "-out", str(der)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return base64.b64encode(der.read_bytes()), key


async def test_every_refusal_has_its_status_and_reason_and_writes_nothing(tmp_path, module_emulator) -> None:
    emulator = module_emulator
    tls = ServerTls.create(tmp_path / "tls")
    clock = MovableClock()
    env = renewal_env(
        tmp_path, emulator, tls,
        FACTORY_RENEWAL_EXPIRED_GRACE_DAYS="10", FACTORY_RENEWAL_MAX_PER_DAY="3",
        FACTORY_METRICS_LISTEN="127.0.0.1:0",
    )  # fmt: skip
    async with running_factory(env, clock) as factory:
        ledger = factory.app.ledger
        device, _ = await _enrolled(factory, tmp_path / "devices")
        client = EstClient(factory.est_url, tls, device.cert_path, device.key_path)
        current_key = serialization.load_pem_private_key(device.key_path.read_bytes(), None)

        async def written() -> tuple[int, int]:
            certificates = await ledger.certificates.page(device.device_id, 100, None)
            renewals = await ledger.renewals.issued_since(device.device_id, clock() - timedelta(days=3650))
            return len(certificates), len(renewals)

        async def refused(answer, status: int, reason: str) -> None:
            assert (answer.status, answer.reason) == (status, reason), answer.body
            assert answer.body.decode().startswith(f"{reason}: ")
            assert await written() == (1, 0)

        await refused(await EstClient(factory.est_url, tls).renew(csr_for(device.device_id, new_key())), 401,
                      "CLIENT_CERTIFICATE_REQUIRED")  # fmt: skip
        foreign_cert, foreign_key = _foreign_leaf(tmp_path, "not a device")
        untrusted = EstClient(factory.est_url, tls, foreign_cert, foreign_key)
        await refused(await untrusted.renew(csr_for("not a device", new_key())), 403, "CERTIFICATE_UNTRUSTED")
        other_ca = DevTlsAuthority.create().client_certificate(device.device_id)
        other_ca.write(tmp_path / "other.pem", tmp_path / "other.key")
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):  # refused at the handshake
            await EstClient(factory.est_url, tls, tmp_path / "other.pem", tmp_path / "other.key").cacerts()
        await refused(await client.post(b"not a request"), 400, "CSR_INVALID")
        await refused(await client.renew(csr_for(str(uuid.uuid4()), new_key())), 400, "CSR_SUBJECT_MISMATCH")
        weak, _ = _openssl_csr(tmp_path, f"/CN={device.device_id}", ["-newkey", "rsa:1024"], "weak")
        await refused(await client.post(weak), 400, "KEY_TOO_WEAK")
        await refused(await client.renew(csr_for(device.device_id, current_key)), 400, "KEY_REUSED")
        der = bytearray(csr_for(device.device_id, new_key()).public_bytes(serialization.Encoding.DER))
        der[-3] ^= 0x01  # inside the signature
        await refused(await client.post(base64.b64encode(bytes(der))), 400, "CSR_SIGNATURE_INVALID")

        # expired: refused outside the grace window, renewed inside it
        leaf = x509.load_pem_x509_certificates(device.chain_pem.encode())[0]
        past_expiry = leaf.not_valid_after_utc - clock()
        clock.offset = past_expiry + timedelta(days=11)
        await refused(await client.renew(csr_for(device.device_id, new_key())), 403, "CERTIFICATE_EXPIRED")
        clock.offset = past_expiry + timedelta(days=9)
        inside = await client.renew(csr_for(device.device_id, new_key()))
        assert inside.status == 200 and await written() == (2, 1)
        clock.offset = timedelta(0)

        # not enrolled, revoked
        lone = await mint(factory.stub, str(uuid.uuid4()), tmp_path / "lone")
        answer = await EstClient(factory.est_url, tls, lone.cert_path, lone.key_path).renew(
            csr_for(lone.device_id, new_key())
        )
        assert (answer.status, answer.reason) == (403, "DEVICE_NOT_ENROLLED")
        revoked, _ = await _enrolled(factory, tmp_path / "revoked")
        await factory.stub.RevokeCertificate(fpb.RevokeCertificateRequest(device_id=revoked.device_id))
        answer = await EstClient(factory.est_url, tls, revoked.cert_path, revoked.key_path).renew(
            csr_for(revoked.device_id, new_key())
        )
        assert (answer.status, answer.reason) == (403, "CERTIFICATE_REVOKED")
        assert len(await ledger.certificates.page(revoked.device_id, 10, None)) == 1

        # the rate limit: three renewals a day, the fourth waits
        busy, _ = await _enrolled(factory, tmp_path / "busy")
        busy_client = EstClient(factory.est_url, tls, busy.cert_path, busy.key_path)
        for _ in range(3):
            assert (await busy_client.renew(csr_for(busy.device_id, new_key()))).status == 200
        limited = await busy_client.renew(csr_for(busy.device_id, new_key()))
        assert (limited.status, limited.reason) == (429, "RENEWAL_RATE_LIMITED")
        assert limited.retry_after is not None and 0 < int(limited.retry_after) <= 86400
        assert len(await ledger.certificates.page(busy.device_id, 10, None)) == 4

        async with aiohttp.ClientSession() as session, session.get(factory.app.observe.metrics_url) as scrape:
            metrics = await scrape.text()
        assert 'devprov_renewals_refused_total{reason="KEY_REUSED"} 1.0' in metrics
        assert 'devprov_renewals_issued_total{outcome="issued"} 4.0' in metrics
        assert 'devprov_certificates_expiring{within="later"}' in metrics


async def test_openssl_and_curl_renew_unchanged(tmp_path, module_emulator) -> None:
    tls = ServerTls.create(tmp_path / "tls")
    async with running_factory(renewal_env(tmp_path, module_emulator, tls)) as factory:
        device, _ = await _enrolled(factory, tmp_path / "devices")
        body, key = _openssl_csr(
            tmp_path,
            f"/CN={device.device_id}",
            ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "new",
        )
        (tmp_path / "csr.b64").write_bytes(body)
        url = factory.est_url + "/.well-known/est/simplereenroll"
        curl = await asyncio.create_subprocess_exec(
            "curl", "--silent", "--show-error", "--fail", "--cacert", str(tls.ca_file),
            "--cert", str(device.cert_path), "--key", str(device.key_path),
            "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{tmp_path / 'csr.b64'}",
            "-o", str(tmp_path / "answer.b64"), url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _out, err = await asyncio.wait_for(curl.communicate(), 60)
        assert curl.returncode == 0, err
        (tmp_path / "answer.der").write_bytes(base64.b64decode((tmp_path / "answer.b64").read_bytes()))
        printed = subprocess.run(
            ["openssl", "pkcs7", "-inform", "DER", "-in", str(tmp_path / "answer.der"), "-print_certs"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        leaf = _leaf(x509.load_pem_x509_certificates(printed.encode()))
        assert leaf.subject.rfc4514_string() == f"CN={device.device_id}"
        pub = subprocess.run(
            ["openssl", "pkey", "-in", str(key), "-pubout"], check=True, capture_output=True, timeout=60
        ).stdout
        assert (
            leaf.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            == pub
        )
