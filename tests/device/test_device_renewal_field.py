"""A device renews its own certificate in the field, with real processes: factory_svc (`serve`, its EST
listener on) minting a short-lived certificate (MintCertificate's shortest validity, an hour, with
``renewal.fraction`` set so that it falls due soon after the device starts), the emulator, and
`device-client run` with Microsoft's SDK.  Checked: it renews by itself while sending telemetry every
second with no gap and no duplicate among the acknowledged messages (read back from the hub); the hub
identity's thumbprint becomes the new certificate's; a kill -9 between "new certificate received" and
"promoted" resumes on the next start; a revoked device's renewal is refused with its reason and the device
keeps its old identity; a device off past its old certificate's end with a renewed one in pending/ changes
over to it at start."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from device_cloud import activate, get_twin, received_telemetry
from enrollment.provisioning_env import factory_env
from support.certs import TestCa
from support.device_process import device_status as _status
from support.emulator import free_port
from support.factory_process import FactoryProcess
from support.waiting import until
from test_device_cli_run_emulator import _env, _start
from test_device_renewal import _server_identity

from device_client.errors import EXIT_REVOKED
from device_client.identity import build_csr_pem, generate_key, key_to_pem
from device_client.revocation import crl_urls
from device_client.state import StateDir
from devprov.v1 import factory_service_pb2 as pb
from provkit.channels import ChannelSecurity, create_channel
from provkit.faults import CRASH_ENV

pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.skipif(
        importlib.util.find_spec("factory_svc.renewal") is None,
        reason="the factory's EST listener is not on this branch yet",
    ),
    pytest.mark.slow,
]

LIFETIME = timedelta(hours=1)  # MintCertificate's shortest validity


@pytest.fixture
def emulator(module_emulator):
    """The module's emulator: each test's devices have ids of their own, and no test stops it or counts
    what the whole emulator holds (tests/README.md)."""
    return module_emulator


class Field:
    """factory_svc with its EST listener, and devices minted by it with short-lived certificates."""

    def __init__(self, tmp_path, emulator, *, crl: bool = False) -> None:
        """``crl``: the factory serves its CRL on loopback and names it in the certificates it mints."""
        self.tmp_path = tmp_path
        self.emulator = emulator
        self.root = tmp_path / "devices"
        tls_ca = TestCa()
        cert, key = _server_identity(tmp_path, tls_ca)
        self.tls_anchor = tmp_path / "est-anchor.pem"
        self.tls_anchor.write_bytes(tls_ca.certificate.public_bytes(serialization.Encoding.PEM))
        self.est_url = f"https://127.0.0.1:{free_port('127.0.0.1')}"
        crl_port = free_port("127.0.0.1")
        self.crl_url = f"http://127.0.0.1:{crl_port}/crl/issuing-ca.crl" if crl else None
        crl_env = {"FACTORY_CRL_HTTP_PORT": str(crl_port), "FACTORY_CRL_URL": self.crl_url} if crl else {}
        self.factory = FactoryProcess(
            {
                **factory_env(tmp_path, emulator),
                "FACTORY_RENEWAL_LISTEN": self.est_url.removeprefix("https://"),
                "FACTORY_RENEWAL_TLS_CERT_FILE": str(cert),
                "FACTORY_RENEWAL_TLS_KEY_FILE": str(key),
                "FACTORY_ENROLL_MIN_REMAINING_VALIDITY_DAYS": "0",  # an hour-long certificate
                **crl_env,
            },
            tmp_path / "factory.log",
        )

    async def __aenter__(self) -> Field:
        await self.factory.start()
        self.channel = create_channel(self.factory.target, ChannelSecurity(insecure=True))
        from devprov.v1 import factory_service_pb2_grpc as pb_grpc

        self.stub = pb_grpc.FactoryServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.factory.stop()

    async def device(self) -> str:
        """A device minted (CSR) with a certificate valid for LIFETIME, enrolled and activated."""
        self.minted_at = datetime.now(UTC)
        guid = str(uuid.uuid4())
        key = generate_key()
        request = pb.MintCertificateRequest(
            device_id=guid, csr_pem=build_csr_pem(key, guid).decode(), request_id=str(uuid.uuid4())
        )
        request.validity.FromTimedelta(LIFETIME)
        minted = await self.stub.MintCertificate(request)
        chain_pem = minted.certificate.certificate_chain_pem.encode()
        StateDir(self.root, guid).write_identity(
            key_pem=key_to_pem(key), chain_pem=chain_pem, metadata={"guid": guid}, force=False
        )
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        self.leaf = leaf
        await self.stub.Enroll(
            pb.EnrollRequest(
                device_id=guid,
                certificate_pem=leaf.public_bytes(serialization.Encoding.PEM).decode(),
                request_id=str(uuid.uuid4()),
            )
        )
        await activate(self.emulator, guid)
        return guid

    def env(self, due_in: timedelta = timedelta(seconds=15)) -> dict[str, str]:
        """The device's settings; its certificate falls due ``due_in`` from now (renewal.fraction)."""
        nb, na = self.leaf.not_valid_before_utc, self.leaf.not_valid_after_utc
        fraction = max(0.01, (datetime.now(UTC) + due_in - nb) / (na - nb))
        return {
            **_env(self.emulator, self.root),
            "DEVICE_CLIENT_RENEWAL_EST_URL": self.est_url,
            "DEVICE_CLIENT_RENEWAL_CA_FILE": str(self.tls_anchor),
            "DEVICE_CLIENT_RENEWAL_CHECK_INTERVAL_S": "5",
            "DEVICE_CLIENT_RENEWAL_FRACTION": f"{fraction:.6f}",
        }


def _hub_thumbprint(emulator, guid: str, hub: str) -> str:
    from device_cloud import _registry

    device = _registry(emulator, hub).get_device(guid)
    return device.authentication.x509_thumbprint.primary_thumbprint.upper()


def _acknowledged_without_gap(status: dict, received: list[dict]) -> None:
    """Everything the device counts as acknowledged reached the hub once (or again with the same id)."""
    telemetry = status["telemetry"]
    acknowledged = set(range(1, telemetry["next_seq"] - telemetry["pending"]))
    seqs = [m["seq"] for m in received]
    assert telemetry["dropped"] == 0
    assert acknowledged - set(seqs) == set()
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))  # no gap
    ids = {(m["seq"], m["message_id"]) for m in received}
    assert len(ids) == len(set(seqs))  # a message the hub got twice carries the same id both times


async def test_a_short_lived_device_renews_by_itself_while_telemetry_flows(tmp_path, emulator, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    async with Field(tmp_path, emulator) as field:
        guid = await field.device()
        env = field.env(due_in=timedelta(seconds=10))  # the device sends for a few seconds first
        before = (await _status(env, guid))["identity"]
        proc = await _start(env, "run", guid, "--interval", "1")

        async def renewed() -> bool:
            report = await _status(env, guid)
            last = report["renewal"]["last"]
            return last is not None and last["state"] == "confirmed"

        try:
            await until(renewed, "the renewal confirmed", timeout=240, interval=0.2)
            hub = (await _status(env, guid))["assignment"]["assigned_hub"]
            seen = len(await received_telemetry(emulator, guid, hub))
            await until(
                lambda: _more_than(emulator, guid, hub, seen + 3),
                "three more messages",
                timeout=60,
                interval=0.2,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-3000:]
        after = await _status(env, guid)
    assert after["identity"]["serial"] != before["serial"]
    assert after["renewal"]["pending"] is None and not after["renewal"]["previous_kept"]
    hub = after["assignment"]["assigned_hub"]  # where the factory's enrollment put it
    thumbprint = await asyncio.to_thread(_hub_thumbprint, emulator, guid, hub)
    assert thumbprint == after["identity"]["thumbprint_sha1"] != before["thumbprint_sha1"]
    _acknowledged_without_gap(after, await received_telemetry(emulator, guid, hub))
    twin = await get_twin(emulator, guid, hub)
    reported = twin.properties.reported["certificate"]
    assert reported["serial"] == after["identity"]["serial"]
    assert reported["renewal"]["state"] == "confirmed"


async def _more_than(emulator, guid: str, hub: str, count: int) -> bool:
    return len(await received_telemetry(emulator, guid, hub)) > count


@pytest.mark.parametrize("point", ["renewal.received", "renewal.before_promote", "renewal.promoted"])
async def test_killed_between_received_and_promoted_the_device_resumes_the_change_over(
    tmp_path, emulator, monkeypatch, point: str
):
    """kill -9 with the new certificate in pending/ (received; registered and connected, about to promote)
    or just promoted (previous/ kept, not confirmed): the next start ends on the new certificate."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    async with Field(tmp_path, emulator) as field:
        guid = await field.device()
        env = field.env(due_in=timedelta(seconds=10))
        before = (await _status(env, guid))["identity"]
        crashing = await _start({**env, CRASH_ENV: point}, "run", guid, "--interval", "1")
        await asyncio.wait_for(crashing.communicate(), 300)
        assert crashing.returncode == -signal.SIGKILL
        killed = await _status(env, guid)
        if point == "renewal.promoted":
            assert killed["renewal"]["pending"] is None and killed["renewal"]["previous_kept"]
            new_serial = killed["identity"]["serial"]
        else:
            assert killed["identity"]["serial"] == before["serial"]  # not promoted
            new_serial = killed["renewal"]["pending"]["serial"]  # received
        assert new_serial != before["serial"]

        restarted = await _start(env, "run", guid, "--interval", "1")

        async def confirmed() -> bool:
            last = (await _status(env, guid))["renewal"]["last"]
            return last is not None and last["state"] == "confirmed"

        try:
            await until(confirmed, "the renewal confirmed after the restart", timeout=120, interval=0.2)
        finally:
            restarted.send_signal(signal.SIGTERM)
            await asyncio.wait_for(restarted.communicate(), 60)
        after = await _status(env, guid)
    assert after["identity"]["serial"] == new_serial
    hub = after["assignment"]["assigned_hub"]  # where the factory's enrollment put it
    thumbprint = await asyncio.to_thread(_hub_thumbprint, emulator, guid, hub)
    assert thumbprint == after["identity"]["thumbprint_sha1"]
    _acknowledged_without_gap(after, await received_telemetry(emulator, guid, hub))


async def test_a_revoked_devices_renewal_is_refused_and_it_keeps_its_identity(tmp_path, emulator):
    async with Field(tmp_path, emulator) as field:
        guid = await field.device()
        env = field.env()
        before = (await _status(env, guid))["identity"]
        await field.stub.RevokeCertificate(
            pb.RevokeCertificateRequest(device_id=guid, request_id=str(uuid.uuid4()))
        )
        # due at once: the listener is asked right at boot
        proc = await _start(field.env(due_in=timedelta(0)), "run", guid)

        async def refused() -> dict | None:
            last = (await _status(env, guid))["renewal"]["last"]
            return last if last is not None and last["state"] == "refused" else None

        try:
            last = await until(refused, "the renewal refused", timeout=120, interval=0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        after = await _status(env, guid)
    assert last["reason"] == "CERTIFICATE_REVOKED"
    assert "CERTIFICATE_REVOKED" in err.decode()  # logged with its reason
    assert after["identity"]["serial"] == before["serial"]
    assert after["renewal"]["pending"] is None
    assert datetime.fromisoformat(after["identity"]["not_after"]) > datetime.now(UTC) - timedelta(minutes=5)
    fingerprint = x509.load_pem_x509_certificates((field.root / guid / "device-chain.pem").read_bytes())[0]
    assert fingerprint.fingerprint(hashes.SHA1()).hex().upper() == before["thumbprint_sha1"]


@pytest.mark.faults
async def test_a_revoked_device_records_its_renewal_refusal_before_its_revocation(tmp_path, emulator):
    """With the factory's CRL named in its certificate, a revoked device's run ends by itself: DPS refuses
    it and the CRL lists it.  The renewal it asked for at boot is refused by the listener, and that refusal
    is recorded before the revocation is (a recorded revocation ends every later run before it asks
    anything): killed right after the revocation is written, the device has both on record, and the next
    run stops at once without asking again."""
    async with Field(tmp_path, emulator, crl=True) as field:
        guid = await field.device()
        assert crl_urls(field.leaf) == [field.crl_url]
        env = field.env(due_in=timedelta(0))  # due at once: the listener is asked right at boot
        await field.stub.RevokeCertificate(
            pb.RevokeCertificateRequest(device_id=guid, request_id=str(uuid.uuid4()))
        )
        killed = await _start({**env, CRASH_ENV: "revocation.recorded"}, "run", guid)
        _, err = await asyncio.wait_for(killed.communicate(), 180)
        assert killed.returncode == -signal.SIGKILL, err.decode()[-3000:]
        on_record = await _status(env, guid)
        again = await _start(env, "run", guid)
        _, again_err = await asyncio.wait_for(again.communicate(), 60)
        after = await _status(env, guid)
    serial = on_record["identity"]["serial"]
    assert on_record["revocation"]["serial"] == serial and on_record["revocation"]["crl_url"] == field.crl_url
    last = on_record["renewal"]["last"]
    assert (last["state"], last["reason"]) == ("refused", "CERTIFICATE_REVOKED"), last
    assert again.returncode == EXIT_REVOKED, again_err.decode()[-3000:]
    assert "[CERTIFICATE_REVOKED]" in again_err.decode()
    assert "due for renewal" not in again_err.decode()
    assert after["renewal"]["last"] == last


async def test_an_expired_device_with_a_pending_renewal_changes_over_instead_of_stopping(
    tmp_path, emulator, monkeypatch
):
    """The device was off past its old certificate's end with a renewed one already in ``pending/``
    ("received", kill -9 or power loss before the change-over): the next start changes over to the pending
    certificate (DPS holds it as the enrollment's secondary) and confirms it, instead of stopping with
    CERTIFICATE_EXPIRED.  The old certificate is made expired by minting and renewing it while the
    in-process factory's clock stands 61 minutes back (MintCertificate's shortest validity is an hour)."""
    from renewal.renewal_env import EstClient, MovableClock, ServerTls, renewal_env, running_factory

    from device_client import renewal as device_renewal

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
    root, tls, clock = tmp_path / "devices", ServerTls.create(tmp_path / "tls"), MovableClock()
    env = renewal_env(tmp_path, emulator, tls, FACTORY_ENROLL_MIN_REMAINING_VALIDITY_DAYS="0")
    clock.offset = -timedelta(minutes=61)  # before the factory opens: its CA is made valid from then
    async with running_factory(env, clock=clock) as factory:
        guid, key = str(uuid.uuid4()), generate_key()
        request = pb.MintCertificateRequest(
            device_id=guid, csr_pem=build_csr_pem(key, guid).decode(), request_id=str(uuid.uuid4())
        )
        request.validity.FromTimedelta(LIFETIME)
        chain_pem = (await factory.stub.MintCertificate(request)).certificate.certificate_chain_pem
        state = StateDir(root, guid)
        state.write_identity(
            key_pem=key_to_pem(key), chain_pem=chain_pem.encode(), metadata={"guid": guid}, force=False
        )
        old = x509.load_pem_x509_certificates(chain_pem.encode())[0]
        await factory.stub.Enroll(
            pb.EnrollRequest(
                device_id=guid,
                certificate_pem=old.public_bytes(serialization.Encoding.PEM).decode(),
                request_id=str(uuid.uuid4()),
            )
        )
        await activate(emulator, guid)
        # renewed through the listener an hour ago: DPS holds the new certificate as the secondary
        new_key = generate_key()
        answer = await EstClient(factory.est_url, tls, state.chain_path, state.key_path).renew(
            x509.load_pem_x509_csr(build_csr_pem(new_key, guid))
        )
        assert answer.status == 200, answer.body
        clock.offset = timedelta(0)
        assert old.not_valid_after_utc < datetime.now(UTC)  # the old certificate has expired
        leaf = next(c for c in answer.certificates if c.subject == old.subject)
        new_serial = device_renewal.serial_of(leaf)
        chain = [leaf, *factory.app.ca.chain]
        state.write_pending(
            key_pem=key_to_pem(new_key),
            chain_pem=device_renewal.chain_pem(chain),
            metadata={"guid": guid, "serial": new_serial, "replaces": device_renewal.serial_of(old)},
        )
        assert state.load_pending().info.serial_hex == new_serial

        device_env = {
            **_env(emulator, root),
            "DEVICE_CLIENT_RENEWAL_EST_URL": factory.est_url,
            "DEVICE_CLIENT_RENEWAL_CA_FILE": str(tls.ca_file),
        }
        proc = await _start(device_env, "run", guid, "--interval", "1")

        async def confirmed() -> bool:
            assert proc.returncode is None, "device-client run stopped"
            last = (await _status(device_env, guid))["renewal"]["last"]
            return last is not None and last["state"] == "confirmed"

        try:
            await until(confirmed, "the change-over confirmed", timeout=180, interval=0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-3000:]
        assert "CERTIFICATE_EXPIRED" not in err.decode()
        after = await _status(device_env, guid)
        superseded = await factory.app.ledger.renewals.superseded_by(device_renewal.serial_of(old))
    assert after["identity"]["serial"] == new_serial == superseded
    assert after["renewal"]["pending"] is None and not after["renewal"]["previous_kept"]
    hub = after["assignment"]["assigned_hub"]
    thumbprint = await asyncio.to_thread(_hub_thumbprint, emulator, guid, hub)
    assert thumbprint == leaf.fingerprint(hashes.SHA1()).hex().upper() == after["identity"]["thumbprint_sha1"]
