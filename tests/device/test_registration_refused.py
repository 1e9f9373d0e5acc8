"""A refused registration: RegistrationRefused travels like any exception (it was a frozen dataclass:
contextlib's re-raise tried to set its traceback and failed with FrozenInstanceError); a refused device asks
the CRL its certificate names whether it is revoked (issue 25 item 6): only a CRL verified against its
issuer says so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    factory_env,
    running_activation,
    running_factory,
)
from support.certs import TestCa
from support.cli_process import run_module
from support.emulator import free_port
from test_device_cli_run_emulator import _env, _start

from device_client.dps import RegistrationOutcome, RegistrationRefused
from device_client.errors import EXIT_REVOKED
from device_client.identity import generate_key, serial_hex_of
from device_client.revocation import (
    CrlUnavailable,
    HttpCrlFetcher,
    RevocationStatus,
    check_revocation,
    crl_urls,
)
from device_client.state import CHAIN_FILE
from devprov.v1 import factory_service_pb2 as fpb

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def attempt() -> Iterator[None]:
    yield


def test_registration_refused_passes_through_a_context_manager() -> None:
    with pytest.raises(RegistrationRefused) as caught, attempt():
        raise RegistrationRefused(RegistrationOutcome.NOT_ACTIVATED, "the enrollment is disabled")
    assert caught.value.outcome is RegistrationOutcome.NOT_ACTIVATED
    assert str(caught.value) == "not_activated: the enrollment is disabled"


# -- a refused device asks the CRL its certificate names ------------------------------------------------
URL = "http://crl.example/crl/issuing-ca.crl"


class Served:
    """A CrlFetcher over fixed bodies (a URL without one cannot be fetched)."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self.bodies = bodies

    async def fetch(self, url: str) -> bytes:
        if url not in self.bodies:
            raise CrlUnavailable(f"{url} cannot be fetched: connection refused")
        return self.bodies[url]


def _device(ca: TestCa, *urls: str) -> list[x509.Certificate]:
    key = generate_key()
    return x509.load_pem_x509_certificates(ca.chain_pem("dev-1", key, crl_urls=urls))


async def test_a_verified_crl_listing_the_serial_says_revoked_with_its_date_and_reason() -> None:
    ca = TestCa()
    chain = _device(ca, URL)
    crl = ca.crl({chain[0].serial_number: x509.ReasonFlags.key_compromise, 12345: None})
    now = datetime.now(UTC)
    check = await check_revocation(chain, Served({URL: crl}), now)
    assert check.status is RevocationStatus.REVOKED and check.revoked is not None
    assert check.revoked.serial == serial_hex_of(chain[0].serial_number)
    assert check.revoked.reason == "key-compromise" and check.revoked.crl_number == 7
    assert check.revoked.crl_url == URL and check.revoked.checked_at == now
    assert abs((check.revoked.revoked_at - now).total_seconds()) < 5

    clean = await check_revocation(chain, Served({URL: ca.crl({12345: None})}), now)
    assert clean.status is RevocationStatus.NOT_REVOKED


def _forged(ca: TestCa, serial: int) -> bytes:
    """The right issuer's name, listing the device, signed by somebody else's key."""
    return ca.crl({serial: None}, signed_by=ec.generate_private_key(ec.SECP256R1()))


@pytest.mark.parametrize(
    ("bodies", "why"),
    [
        (lambda ca, serial: {}, "cannot be fetched"),
        (_forged, "signature"),
        (lambda ca, serial: {URL: TestCa().crl({serial: None})}, "not the device's issuer"),
        (lambda ca, serial: {URL: b"<html>proxy login</html>"}, "not a CRL"),
    ],
    ids=["unreachable", "forged signature", "another issuer", "not a crl"],
)
async def test_a_crl_that_cannot_be_fetched_or_verified_never_says_revoked(bodies, why) -> None:
    ca = TestCa()
    chain = _device(ca, URL)
    found = bodies(ca, chain[0].serial_number)
    served = found if isinstance(found, dict) else {URL: found}
    check = await check_revocation(chain, Served(served), datetime.now(UTC))
    assert check.status is RevocationStatus.UNKNOWN and check.revoked is None
    assert why in check.detail


async def test_no_crl_named_is_unknown_and_a_later_usable_crl_counts() -> None:
    ca = TestCa()
    bare = _device(ca)
    assert (await check_revocation(bare, Served({}), datetime.now(UTC))).status is RevocationStatus.UNKNOWN
    mirror = "https://mirror.example/issuing-ca.crl"
    chain = _device(ca, URL, mirror)
    crl = ca.crl({chain[0].serial_number: None})
    check = await check_revocation(chain, Served({mirror: crl}), datetime.now(UTC))
    assert check.status is RevocationStatus.REVOKED and check.revoked.reason is None


async def test_the_http_fetcher_reports_an_unreachable_crl() -> None:
    port = free_port("127.0.0.1")
    with pytest.raises(CrlUnavailable):
        await HttpCrlFetcher(5.0).fetch(f"http://127.0.0.1:{port}/crl/issuing-ca.crl")


# -- with the real processes: factory (its CRL over HTTP), activation, emulator, `device-client` -------------
META = {"tags": {"customer": "acme"}, "properties": {"desired": {"telemetryIntervalSeconds": 0.5}}}


class Lines:
    """What a process writes to stderr, read as it comes (JSON log lines parsed)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.text: list[str] = []
        self._grew = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.text.append(line.decode())
            self._grew.set()
        self._grew.set()

    def messages(self) -> list[str]:
        return [json.loads(t)["message"] for t in self.text if t.startswith("{")]

    async def until(self, predicate, timeout: float = 90.0) -> None:
        """Until a line satisfies ``predicate`` (fails when the process ends or the time runs out first)."""

        async def wait() -> None:
            while not any(predicate(m) for m in self.messages()):
                if self._task.done():
                    raise AssertionError(f"the process ended first: {''.join(self.text)[-3000:]}")
                self._grew.clear()
                await self._grew.wait()

        await asyncio.wait_for(wait(), timeout)

    async def end(self, timeout: float = 60.0) -> int:
        await asyncio.wait_for(self._task, timeout)
        return await asyncio.wait_for(self.proc.wait(), timeout)


async def _provisioned(env: dict[str, str], guid: str) -> str:
    """`device-client provision` at the factory (key made on the device, enrolled disabled): its code."""
    code, out, err = await run_module("device_client", "provision", guid, env=env)
    assert code == 0, err
    # enrolled is not live: the enrollment waits, disabled, for the OEM (it said "enrollment   live")
    assert "enrollment   in DPS, disabled until the OEM activates it" in out.splitlines()
    (line,) = [line for line in out.splitlines() if line.startswith("ACTIVATION CODE")]
    assert line.startswith("ACTIVATION CODE (new: print it on the label): ")
    return line.rsplit(" ", 1)[1]


async def _status(env: dict[str, str], guid: str) -> tuple[dict, str]:
    code, out, err = await run_module("device_client", "status", guid, "--json", env=env)
    assert code == 0, err
    code, text, err = await run_module("device_client", "status", guid, env=env)
    assert code == 0, err
    return json.loads(out), text


@pytest.mark.timeout(300)
async def test_a_device_revoked_while_it_runs_stops_saying_revoked_and_status_shows_it(
    tmp_path, module_emulator
):
    port = free_port("127.0.0.1")
    crl_url = f"http://127.0.0.1:{port}/crl/issuing-ca.crl"
    tls = OemTls.create(tmp_path / "oem-tls")
    factory_settings = factory_env(
        tmp_path, module_emulator, FACTORY_CRL_HTTP_PORT=str(port), FACTORY_CRL_URL=crl_url
    )
    guid = str(uuid.uuid4())
    root = tmp_path / "devices"
    async with (
        running_factory(factory_settings) as (factory_app, _factory),
        running_activation(activation_env(tmp_path, module_emulator, tls), tls) as (_app, activation),
    ):
        env = {**_env(module_emulator, root), "DEVICE_CLIENT_FACTORY_ADDRESS": factory_app.grpc_address}
        code = await _provisioned(env, guid)
        leaf = x509.load_pem_x509_certificates((root / guid / CHAIN_FILE).read_bytes())[0]
        assert crl_urls(leaf) == [crl_url]  # the factory named its CRL in the certificate
        await activation.Activate(activate_request(guid, code, json.dumps(META)))

        run = Lines(await _start(env, "run", guid))
        try:
            await run.until(lambda m: m.startswith("message 1 acknowledged"))
            revoked, out, err = await run_module(
                "factory_svc",
                "revoke",
                guid,
                "--reason",
                "key-compromise",
                "--target",
                factory_app.grpc_address,
                "--insecure",
            )
            assert revoked == 0, err
            assert "enrollment  disabled now" in out
            # the hub drops it, DPS refuses it, the CRL lists it: the run ends by itself
            assert await run.end(120) == EXIT_REVOKED
        finally:
            if run.proc.returncode is None:
                run.proc.kill()
                await run.proc.wait()
        said = "".join(run.text)
        assert "Traceback" not in said
        serial = serial_hex_of(leaf.serial_number)
        assert f"device-client: error: the device certificate (serial {serial}) was revoked on " in said
        assert "(key-compromise)" in said and "[CERTIFICATE_REVOKED]" in said
        assert not any("waiting for activation" in m for m in run.messages())

        report, text = await _status(env, guid)
        assert report["identity"]["enrollment"] == "revoked"
        assert report["revocation"]["serial"] == serial and report["revocation"]["crl_url"] == crl_url
        assert report["revocation"]["reason"] == "key-compromise"
        listed = await factory_app.ledger.revocations.revocation_audit()
        assert [(a[1], a[3]) for a in listed] == [(serial, "keyCompromise")]
        assert "enrollment   revoked" in text and "revoked      on " in text and "(key-compromise)" in text

        # the next boot knows at once, without the network
        again = Lines(await _start(env, "run", guid))
        assert await again.end() == EXIT_REVOKED
        assert "[CERTIFICATE_REVOKED]" in "".join(again.text)


@pytest.mark.timeout(300)
async def test_an_unreachable_crl_never_makes_a_refused_device_say_revoked(tmp_path, module_emulator):
    """The certificate names a CRL nobody serves: the device cannot tell, so it keeps waiting as before."""
    crl_url = f"http://127.0.0.1:{free_port('127.0.0.1')}/crl/issuing-ca.crl"
    guid = str(uuid.uuid4())
    root = tmp_path / "devices"
    async with running_factory(factory_env(tmp_path, module_emulator, FACTORY_CRL_URL=crl_url)) as (
        app,
        factory,
    ):
        env = {**_env(module_emulator, root), "DEVICE_CLIENT_FACTORY_ADDRESS": app.grpc_address}
        await _provisioned(env, guid)
        await factory.RevokeCertificate(
            fpb.RevokeCertificateRequest(device_id=guid, reason=fpb.REVOCATION_REASON_KEY_COMPROMISE)
        )
        run = Lines(await _start(env, "run", guid))
        try:
            await run.until(lambda m: m.startswith("waiting for activation"))
        finally:
            run.proc.send_signal(signal.SIGTERM)
        assert await run.end() == 0
    messages = run.messages()
    unknown = [m for m in messages if m.startswith("revocation status unknown")]
    assert unknown and crl_url in unknown[0] and "cannot be fetched" in unknown[0]
    assert not any("revoked" in m for m in messages if m not in unknown)
    assert "CERTIFICATE_REVOKED" not in "".join(run.text)
    report, text = await _status(env, guid)
    assert report["revocation"] is None and report["identity"]["enrollment"] == "live"
    assert "revoked" not in text
