"""The device's certificate renewal, without the cloud: the due rule, the renewal request, what it accepts
back, the state directory's pending/previous transitions (a kill -9 between any two files of a promotion is
completed at start-up), the settings, and the EST client against an RFC 7030 peer on loopback (a TLS
server that asks for the client certificate and answers with provkit.est's bodies)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import ssl
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.certs import TestCa
from support.waiting import ended, until

from device_client import renewal
from device_client.changeover import Changeover, RuntimeHooks
from device_client.est_client import EstClient, EstEndpoint, EstRefused, EstUnavailable
from device_client.identity import generate_key, key_to_pem, load_key
from device_client.settings import load_settings, render_device_settings
from device_client.state import RenewalRecord, StateDir
from provkit import est

GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


# -- the due rule -------------------------------------------------------------------------------------
def test_a_year_long_certificate_is_due_at_two_thirds_of_its_life():
    due = renewal.due_at(T0, T0 + timedelta(days=365), fraction=0.667, days_before=30)
    assert due == T0 + timedelta(days=365) * 0.667  # day 243: earlier than 30 days before expiry


def test_the_remaining_days_win_when_they_come_first():
    due = renewal.due_at(T0, T0 + timedelta(days=365), fraction=0.95, days_before=30)
    assert due == T0 + timedelta(days=335)


def test_a_certificate_shorter_lived_than_days_before_is_due_by_the_fraction_alone():
    short = T0 + timedelta(minutes=3)
    assert renewal.due_at(T0, short, fraction=0.5, days_before=30) == T0 + timedelta(seconds=90)
    assert renewal.due_at(T0, short, fraction=0.5, days_before=0) == T0 + timedelta(seconds=90)
    month = T0 + timedelta(days=31)
    assert renewal.due_at(T0, month, fraction=0.9, days_before=30) == T0 + timedelta(days=1)


def test_the_next_look_is_the_jittered_interval_or_the_due_moment_whichever_is_sooner():
    rng = random.Random(7)
    far = T0 + timedelta(days=100)
    delays = [renewal.next_check_in(86400, now=T0, due=far, rng=rng) for _ in range(200)]
    assert all(0.9 * 86400 <= d <= 1.1 * 86400 for d in delays)
    assert len({round(d) for d in delays}) > 100  # jittered, not a fixed beat a fleet would share
    assert renewal.next_check_in(86400, now=T0, due=T0 + timedelta(seconds=40), rng=rng) == 40
    assert renewal.next_check_in(86400, now=T0, due=T0 - timedelta(seconds=1), rng=rng) == 0


# -- the request and what is accepted back ------------------------------------------------------------
def _leaf(ca: TestCa, key, *, san: bool = False) -> x509.Certificate:
    chain = x509.load_pem_x509_certificates(ca.chain_pem(GUID, key))
    if not san:
        return chain[0]
    builder = (
        x509.CertificateBuilder()
        .subject_name(chain[0].subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{GUID}.devices")]), critical=False)
    )
    return builder.sign(ca.key, hashes.SHA256())


@pytest.mark.parametrize(
    "current",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="ec-p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
        pytest.param(lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), id="rsa-2048"),
    ],
)
def test_the_request_has_a_new_key_of_the_same_kind_and_the_same_subject_and_san(current):
    ca = TestCa()
    key = current()
    leaf = _leaf(ca, key, san=True)
    new = renewal.new_key_like(key)
    csr = est.decode_csr(est.encode_csr(renewal.renewal_request(leaf, new)))
    assert csr.is_signature_valid
    assert csr.subject == leaf.subject
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    assert type(new) is type(key) and new.key_size == key.key_size
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
        serialization.Encoding.DER, public
    )


def test_the_issued_certificate_is_accepted_only_for_our_key_subject_and_ca():
    ca = TestCa()
    key = generate_key()
    current_chain = x509.load_pem_x509_certificates(ca.chain_pem(GUID, key))
    new = generate_key()
    issued = x509.load_pem_x509_certificates(ca.chain_pem(GUID, new))
    now = datetime.now(UTC)
    chain = renewal.accept_issued(issued, key=new, current_chain=current_chain, now=now)
    assert chain[0] == issued[0] and chain[1:] == current_chain[1:]

    with pytest.raises(renewal.IssuedRejected, match="new key"):
        renewal.accept_issued(issued, key=generate_key(), current_chain=current_chain, now=now)
    other_cn = x509.load_pem_x509_certificates(ca.chain_pem("someone-else", new))
    with pytest.raises(renewal.IssuedRejected, match="is for"):
        renewal.accept_issued(other_cn, key=new, current_chain=current_chain, now=now)
    stranger = TestCa()
    stranger.certificate = ca.certificate  # same name, another key: the signature tells
    forged = x509.load_pem_x509_certificates(stranger.chain_pem(GUID, new))
    with pytest.raises(renewal.IssuedRejected, match="not signed"):
        renewal.accept_issued(forged, key=new, current_chain=current_chain, now=now)
    with pytest.raises(renewal.IssuedRejected, match="not valid now"):
        renewal.accept_issued(issued, key=new, current_chain=current_chain, now=now + timedelta(days=400))


def test_the_twin_report_names_serial_validity_and_the_renewal():
    root_info = _info(TestCa())
    report = renewal.CertificateReport(
        root_info, RenewalRecord("refused", T0, "CERTIFICATE_REVOKED", "revoked on ...")
    ).to_twin()
    cert = report["certificate"]
    assert cert["serial"] == root_info.serial_hex
    assert cert["notAfter"] == root_info.not_after.isoformat()
    assert cert["renewal"] == {"state": "refused", "reason": "CERTIFICATE_REVOKED", "at": T0.isoformat()}


def _info(ca: TestCa):
    from device_client.identity import inspect_identity, load_chain

    key = generate_key()
    return inspect_identity(GUID, key, load_chain(ca.chain_pem(GUID, key), source="t"), source="t")


# -- the state directory --------------------------------------------------------------------------------
def _provisioned(tmp_path) -> tuple[StateDir, TestCa]:
    ca = TestCa()
    state = StateDir(tmp_path, GUID)
    key_pem, chain_pem = ca.identity(GUID)
    state.write_identity(key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": GUID}, force=False)
    return state, ca


def _pending(state: StateDir, ca: TestCa) -> str:
    key = generate_key()
    chain = ca.chain_pem(GUID, key)
    state.write_pending(key_pem=key_to_pem(key), chain_pem=chain, metadata={"guid": GUID, "replaces": "x"})
    return state.load_pending().info.serial_hex


def test_pending_is_written_whole_with_a_private_key_and_leaves_the_identity_alone(tmp_path):
    state, ca = _provisioned(tmp_path)
    before = state.load_identity().info.serial_hex
    serial = _pending(state, ca)
    assert state.has_pending() and serial != before
    assert state.load_identity().info.serial_hex == before
    assert (state.pending_path / "device.key").stat().st_mode & 0o077 == 0
    assert not [p.name for p in state.path.iterdir() if p.name.startswith(".")]  # no staging left


def test_promotion_keeps_the_old_identity_as_previous_until_it_is_dropped(tmp_path):
    state, ca = _provisioned(tmp_path)
    old = state.load_identity().info.serial_hex
    new = _pending(state, ca)
    state.promote_pending()
    assert state.load_identity().info.serial_hex == new
    assert not state.has_pending() and state.has_previous()
    assert (state.previous_path / "device-chain.pem").exists()
    assert state.key_path.stat().st_mode & 0o077 == 0
    previous = x509.load_pem_x509_certificates((state.previous_path / "device-chain.pem").read_bytes())[0]
    assert renewal.serial_of(previous) == old
    state.drop_previous()
    assert not state.has_previous()


def test_a_promotion_killed_midway_is_completed_at_start_up(tmp_path):
    """kill -9 after previous/ was made and the new key written, before the chain: the key and the
    certificate do not belong together until finish_promotion writes the rest."""
    state, ca = _provisioned(tmp_path)
    new = _pending(state, ca)
    state.promote_pending()
    # rebuild the interrupted picture: previous/ and pending/ both there, the identity half-written
    promoted = {name: (state.path / name).read_bytes() for name in ("device.key", "device-chain.pem")}
    state.write_pending(
        key_pem=promoted["device.key"],
        chain_pem=promoted["device-chain.pem"],
        metadata={"guid": GUID},
    )
    old_chain = (state.previous_path / "device-chain.pem").read_bytes()
    (state.path / "device-chain.pem").write_bytes(old_chain)
    with pytest.raises(Exception, match="does not match"):
        state.load_identity()
    state.finish_promotion()
    assert state.load_identity().info.serial_hex == new
    assert not state.has_pending() and state.has_previous()


def test_finish_promotion_leaves_a_pending_identity_alone_when_no_promotion_began(tmp_path):
    state, ca = _provisioned(tmp_path)
    old = state.load_identity().info.serial_hex
    _pending(state, ca)
    state.finish_promotion()
    assert state.has_pending() and state.load_identity().info.serial_hex == old


def test_the_renewal_record_round_trips(tmp_path):
    state, _ = _provisioned(tmp_path)
    assert state.read_renewal() is None
    record = RenewalRecord("refused", T0, "RENEWAL_RATE_LIMITED", "3 in 24 h", None)
    state.write_renewal(record)
    assert state.read_renewal() == record


# -- settings ---------------------------------------------------------------------------------------------
def test_renewal_settings_from_a_table_and_the_environment(tmp_path):
    device = tmp_path / "settings.toml"
    device.write_bytes(
        render_device_settings(
            {"id_scope": "0ne1", "renewal.est_url": "https://127.0.0.1:8443", "renewal.ca_file": "est-ca.pem"}
        )
    )
    assert "[renewal]" in device.read_text()
    settings = load_settings(env={"DEVICE_CLIENT_RENEWAL_DAYS_BEFORE": "0"}, device_settings=device)
    rs = settings.renewal
    assert rs.enabled and rs.est_url == "https://127.0.0.1:8443"
    assert rs.ca_file == tmp_path / "est-ca.pem"  # relative to the device's settings file
    assert (rs.fraction, rs.days_before, rs.check_interval_s) == (0.667, 0.0, 86400.0)
    assert not load_settings(env={}).renewal.enabled


@pytest.mark.parametrize(
    ("key", "value"),
    [("EST_URL", "http://127.0.0.1:1"), ("FRACTION", "1.5"), ("CHECK_INTERVAL_S", "0")],
)
def test_bad_renewal_settings_are_refused(key, value):
    from device_client.errors import DeviceSettingsError

    with pytest.raises(DeviceSettingsError):
        load_settings(env={f"DEVICE_CLIENT_RENEWAL_{key}": value})


# -- the EST client against an RFC 7030 peer ---------------------------------------------------------------
def _server_identity(tmp_path, ca: TestCa):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est.test")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(key_to_pem(key))
    return tmp_path / "server.pem", tmp_path / "server.key"


class EstPeer:
    """An RFC 7030 server on loopback: client certificate required, answers set per test."""

    def __init__(self, tmp_path, device_ca: TestCa, tls_ca: TestCa) -> None:
        self.device_ca = device_ca
        self.tls_ca = tls_ca
        self.tmp_path = tmp_path
        self.seen: list[tuple[str, str, bytes]] = []  # (path, client CN, body)
        self.refusal: tuple[int, str, dict[str, str]] | None = None
        self.hold: asyncio.Event | None = None  # set: each request waits for it before it is answered

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        cn = x509.load_der_x509_certificate(peer).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        body = await request.read()
        self.seen.append((request.path, str(cn), body))
        if self.hold is not None:
            await self.hold.wait()
        if self.refusal is not None:
            status, text, headers = self.refusal
            return web.Response(status=status, text=text, headers=headers)
        if request.path == est.SIMPLEREENROLL_PATH:
            csr = est.decode_csr(body)
            leaf = x509.load_pem_x509_certificates(self.device_ca.chain_pem(GUID, _KeyOf(csr)))[0]
            return web.Response(
                body=est.encode_certs_only([leaf, self.device_ca.certificate]),
                content_type="application/pkcs7-mime",
            )
        return web.Response(
            body=est.encode_certs_only([self.device_ca.certificate]), content_type="application/pkcs7-mime"
        )

    async def __aenter__(self) -> EstPeer:
        cert, key = _server_identity(self.tmp_path, self.tls_ca)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(
            cadata=self.device_ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"https://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


class _KeyOf:
    """What TestCa.chain_pem needs of a key: its public key (here the CSR's)."""

    def __init__(self, csr: x509.CertificateSigningRequest) -> None:
        self._public = csr.public_key()

    def public_key(self):
        return self._public


def _client(tmp_path, peer: EstPeer) -> tuple[EstClient, StateDir]:
    state = StateDir(tmp_path / "devices", GUID)
    key_pem, chain_pem = peer.device_ca.identity(GUID)
    state.write_identity(key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": GUID}, force=False)
    anchor = peer.tls_ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    client = EstClient(
        EstEndpoint(peer.url, anchor, 10.0), chain_path=state.chain_path, key_path=state.key_path
    )
    return client, state


async def test_simplereenroll_over_mutual_tls_returns_the_issued_chain(tmp_path):
    async with EstPeer(tmp_path, TestCa(), TestCa()) as peer:
        client, state = _client(tmp_path, peer)
        current = x509.load_pem_x509_certificates(state.chain_path.read_bytes())
        new = renewal.new_key_like(load_key(state.key_path.read_bytes(), source="t"))
        issued = await client.simplereenroll(renewal.renewal_request(current[0], new))
        chain = renewal.accept_issued(issued, key=new, current_chain=current, now=datetime.now(UTC))
        assert chain[0].subject == current[0].subject
        assert await client.cacerts() == [peer.device_ca.certificate]
    assert [(path, cn) for path, cn, _ in peer.seen] == [
        (est.SIMPLEREENROLL_PATH, GUID),  # authenticated with the current certificate
        (est.CACERTS_PATH, GUID),
    ]
    assert est.decode_csr(peer.seen[0][2]).subject == current[0].subject


async def test_a_refusal_carries_the_listeners_reason_and_retry_after(tmp_path):
    async with EstPeer(tmp_path, TestCa(), TestCa()) as peer:
        client, state = _client(tmp_path, peer)
        current = x509.load_pem_x509_certificates(state.chain_path.read_bytes())
        csr = renewal.renewal_request(current[0], generate_key())
        peer.refusal = (
            403,
            "CERTIFICATE_REVOKED: the certificate was revoked on 2030-01-01 (key-compromise)",
            {"X-Devprov-Reason": "CERTIFICATE_REVOKED"},
        )
        with pytest.raises(EstRefused) as refused:
            await client.simplereenroll(csr)
        assert (refused.value.status, refused.value.reason) == (403, "CERTIFICATE_REVOKED")
        assert refused.value.detail.startswith("the certificate was revoked")
        assert not refused.value.retryable
        peer.refusal = (503, "DPS_UNAVAILABLE: DPS did not answer", {"Retry-After": "30"})
        with pytest.raises(EstRefused) as busy:
            await client.simplereenroll(csr)
        assert busy.value.reason == "DPS_UNAVAILABLE" and busy.value.retryable
        assert busy.value.retry_after_s == 30.0
        peer.refusal = (200, "not a PKCS#7", {})
        with pytest.raises(EstUnavailable, match="certs-only"):
            await client.cacerts()


async def test_a_listener_with_another_trust_anchor_is_not_talked_to(tmp_path):
    async with EstPeer(tmp_path, TestCa(), TestCa()) as peer:
        client, _ = _client(tmp_path, peer)
        stranger = TestCa().certificate.public_bytes(serialization.Encoding.PEM).decode()
        wary = EstClient(
            EstEndpoint(peer.url, stranger, 10.0), chain_path=client._chain_path, key_path=client._key_path
        )
        with pytest.raises(EstUnavailable, match=r"certificate verify failed|CERTIFICATE_VERIFY_FAILED"):
            await wary.cacerts()
    assert peer.seen == []


async def test_an_unreachable_listener_is_unavailable(tmp_path):
    async with EstPeer(tmp_path, TestCa(), TestCa()) as peer:
        client, _ = _client(tmp_path, peer)
        url = peer.url
    gone = EstClient(EstEndpoint(url, None, 2.0), chain_path=client._chain_path, key_path=client._key_path)
    with pytest.raises(EstUnavailable):
        await asyncio.wait_for(gone.cacerts(), 30)


def test_the_status_report_shows_validity_due_time_and_a_pending_renewal(tmp_path):
    from device_client.cli import status_report

    state, ca = _provisioned(tmp_path)
    serial = _pending(state, ca)
    state.write_renewal(RenewalRecord("received", T0, serial=serial))
    settings = load_settings(
        env={
            "DEVICE_CLIENT_STATE_ROOT": str(tmp_path),
            "DEVICE_CLIENT_RENEWAL_EST_URL": "https://127.0.0.1:9",
        }
    )
    report = status_report(GUID, settings, now=datetime.now(UTC))
    json.dumps(report)
    assert report["identity"]["not_after"]
    r = report["renewal"]
    assert r["enabled"] and r["pending"]["serial"] == serial and r["last"]["state"] == "received"
    info = state.load_identity().info
    assert (
        r["due_at"]
        == renewal.due_at(info.not_before, info.not_after, fraction=0.667, days_before=30).isoformat()
    )


# -- the renewal side task (Changeover.renewal_loop) against the peer --------------------------------------
def _side_task(tmp_path, peer: EstPeer) -> tuple[Changeover, EstClient, asyncio.Event, list[str]]:
    """A change-over whose side task talks to ``peer``; its certificate is due now, the next look is an
    hour away.  Also: an EST client of the same device, the stop event the side task watches and every
    renewal state it recorded, in order."""
    client, state = _client(tmp_path, peer)
    anchor = tmp_path / "est-anchor.pem"
    anchor.write_bytes(peer.tls_ca.certificate.public_bytes(serialization.Encoding.PEM))
    settings = load_settings(
        env={
            "DEVICE_CLIENT_STATE_ROOT": str(state.path.parent),
            "DEVICE_CLIENT_RENEWAL_EST_URL": peer.url,
            "DEVICE_CLIENT_RENEWAL_CA_FILE": str(anchor),
            "DEVICE_CLIENT_RENEWAL_CHECK_INTERVAL_S": "3600",
        }
    )
    states: list[str] = []

    def update(**changes) -> None:
        if "renewal_state" in changes:
            states.append(changes["renewal_state"])

    async def no_dps(identity, target):
        raise AssertionError("the side task never registers with DPS")

    stop = asyncio.Event()
    hooks = RuntimeHooks(
        update=update,
        log=lambda level, msg, *args, exc_info=False, **extra: None,
        registering=lambda: None,
        registered=lambda: None,
        promoted=lambda: None,
        register_once=no_dps,
    )
    changeover = Changeover(
        state, settings, lambda: datetime.now(UTC), hooks, stop=stop, wake_sender=asyncio.Event()
    )
    changeover.identity = changeover.active = state.load_identity()
    return changeover, client, stop, states


@pytest.mark.parametrize(
    "refusal",
    [
        (403, "CERTIFICATE_REVOKED: it was revoked", {"X-Devprov-Reason": "CERTIFICATE_REVOKED"}),
        (503, "DPS_UNAVAILABLE: DPS did not answer", {"Retry-After": "3600"}),
    ],
    ids=["final", "retry-after"],
)
async def test_after_a_refusal_the_side_task_waits_before_asking_again_and_the_refusal_stays_recorded(
    tmp_path, refusal
):
    """A refusal's record does not wake the side task that wrote it: the next request waits for the check
    interval (a final refusal) or the listener's Retry-After, and renewal.json keeps the refusal's reason
    meanwhile (it used to be overwritten by the next "requested" at once, again and again)."""
    async with EstPeer(tmp_path, TestCa(), TestCa()) as peer:
        peer.refusal = refusal
        changeover, client, stop, states = _side_task(tmp_path, peer)
        loop = asyncio.create_task(changeover.renewal_loop())
        try:
            await until(lambda: renewal.REFUSED in states, "the refusal recorded", fail_if=ended(loop))
            # A round trip to the listener after the refusal: a side task woken by its own record would
            # have recorded its next request within a few turns of the event loop, long before this ends.
            with pytest.raises(EstRefused):
                await client.cacerts()
        finally:
            stop.set()
            await asyncio.wait_for(loop, 30)
    assert states == [renewal.REQUESTED, renewal.REFUSED]
    assert [path for path, _, _ in peer.seen if path == est.SIMPLEREENROLL_PATH] == [est.SIMPLEREENROLL_PATH]
    record = changeover.state_dir.read_renewal()
    assert record is not None and record.state == renewal.REFUSED
    assert record.reason == refusal[1].split(":")[0]


async def test_a_request_cut_short_by_the_end_of_the_run_is_recorded_as_such_not_left_requested(tmp_path):
    async with EstPeer(tmp_path, TestCa(), TestCa()) as peer:
        peer.hold = asyncio.Event()
        changeover, _, _, states = _side_task(tmp_path, peer)
        loop = asyncio.create_task(changeover.renewal_loop())
        try:
            await until(lambda: peer.seen, "the request at the listener", fail_if=ended(loop))
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop
        finally:
            peer.hold.set()
    assert states == [renewal.REQUESTED, renewal.FAILED]
    record = changeover.state_dir.read_renewal()
    assert record is not None and (record.state, record.reason) == (renewal.FAILED, "STOPPED")
