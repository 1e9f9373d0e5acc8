"""The emulator's TLS server context on Python's ssl: a client certificate is requested and any presented
certificate is accepted at the handshake (self-signed, or of a CA the server was never given), a client
with none is refused when one is required, and the pointer check refuses any SSL_CTX it cannot prove.
Handshakes run in memory (MemoryBIO pairs), with the stdlib as the client."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from support.certs import DeviceCert, TestCa

from azure_iot_emulator.mqtt import accept_any
from azure_iot_emulator.mqtt.accept_any import LayoutError, accept_any_client_certificate, context_pointer
from azure_iot_emulator.mqtt.tls import peer_certificates, server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestCa("emulator CA").server(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])


def _server(pki, *, required: bool = False, hook: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert_path, pki.key_path)
    if hook:
        accept_any_client_certificate(ctx, required=required)
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return ctx


def _client(cert: DeviceCert | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    return ctx


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Both sides to the end of the handshake and one record each way; the server's side, or the
    server's ssl.SSLError."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out)
    done: set[str] = set()
    for _ in range(10):
        for name, side, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if name not in done:
                try:
                    side.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if done == {"c", "s"}:
            break
    c.write(b"hello")
    s_in.write(c_out.read())
    assert s.read(100) == b"hello"
    s.write(b"ack")
    c_in.write(s_out.read())
    assert c.read(100) == b"ack"
    return s


def test_a_self_signed_client_certificate_is_accepted_and_seen(pki, tmp_path) -> None:
    device = TestCa().issue(tmp_path, "self-signed-1", self_signed=True)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        s = _handshake(server_context(pki.cert_path, pki.key_path), _client(device, version))
        assert s.version() == ("TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
        assert peer_certificates(s) == (device.certificate, [])


def test_without_the_hook_the_same_certificate_is_refused(pki, tmp_path) -> None:
    """The control: Python's own verification refuses it (so the hook is what accepts it above)."""
    device = TestCa().issue(tmp_path, "self-signed-2", self_signed=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(_server(pki, hook=False), _client(device))


def test_a_certificate_of_an_unknown_ca_is_accepted_with_its_chain(pki, tmp_path) -> None:
    ca = TestCa("a group's CA the server never saw")
    device = ca.issue(tmp_path, "grouped-1")
    chain_file = tmp_path / "chain.pem"
    chain_file.write_bytes(Path(device.cert_path).read_bytes() + ca.pem)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        client = _client(None, version)
        client.load_cert_chain(chain_file, device.key_path)
        s = _handshake(server_context(pki.cert_path, pki.key_path), client)
        # what the TLS shell hands the endpoint: the leaf, and what the device sent above it
        assert peer_certificates(s) == (device.certificate, [ca.certificate])


def test_no_certificate_is_refused_when_required_and_allowed_when_optional(pki) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        with pytest.raises(ssl.SSLError, match=r"PEER_DID_NOT_RETURN_A_CERTIFICATE|peer did not return"):
            _handshake(_server(pki, required=True), _client(None, version))
        assert _handshake(_server(pki), _client(None, version)).getpeercert(binary_form=True) is None


def test_setting_verify_mode_later_keeps_the_hook(pki, tmp_path) -> None:
    device = TestCa().issue(tmp_path, "self-signed-3", self_signed=True)
    server = _server(pki)
    server.verify_mode = ssl.CERT_REQUIRED
    assert _handshake(server, _client(device)).getpeercert(binary_form=True) == device.der


def test_no_session_is_cached(pki, tmp_path) -> None:
    """A server-side session cache would keep every TLS 1.2 device's session (and certificate)."""
    device = TestCa().issue(tmp_path, "self-signed-4", self_signed=True)
    control = _server(pki, hook=False)
    control.verify_mode = ssl.CERT_NONE
    server = _server(pki)
    for ctx in (control, server):
        ctx.options |= ssl.OP_NO_TICKET  # sessions by id (TLS 1.2), stateful tickets (TLS 1.3): in the cache
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            _handshake(ctx, _client(device, version))
    assert control.session_stats()["number"] > 0
    assert server.session_stats()["number"] == 0


def test_the_pointer_check_refuses_what_it_cannot_prove(pki) -> None:
    ctx = _server(pki, hook=False)
    other = _server(pki, hook=False)
    real = context_pointer(ctx)
    assert real == accept_any._read_pointer(ctx)
    assert context_pointer(other) != real
    mode, options = ctx.verify_mode, ctx.options
    for bogus in (context_pointer(other), 0, real + 1):
        with pytest.raises(LayoutError):
            context_pointer(ctx, bogus)
        assert (ctx.verify_mode, ctx.options) == (mode, options)  # the probes are undone
    with pytest.raises(LayoutError, match="not an ssl context"):
        accept_any._read_pointer(object())  # type: ignore[arg-type]
