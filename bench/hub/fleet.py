"""The fleet run's own pieces: one certificate per device, and a probe of what one server-side TLS
connection holds in memory (the floor under the emulator's memory per connected device).

- :func:`device_identities` writes ``{device id}.pem`` (a self-signed P-256 certificate, then its key)
  for every device, as a manufacturer's fleet has one identity per device; the emulator registers each
  device with its own thumbprint.
- :func:`tls_connection_kib` completes handshakes in memory (the emulator's own server context, a
  client presenting a device certificate, TLS 1.3, one record each way) and reports the heap bytes
  (glibc ``mallinfo2``) each server-side connection keeps: OpenSSL's state through Python's ``ssl``
  (the ``SSLObject`` and its two memory BIOs, as the emulator's TLS shell holds them: their handshake
  buffers given back, ``membio.py``), no socket, no MQTT.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from azure_iot_emulator.mqtt.membio import release
from azure_iot_emulator.mqtt.tls import server_context
from azure_iot_emulator.pki import issue_server_certificate

from .servers import TestCa


def _identity(ca: TestCa, device_id: str, now: datetime) -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = now - timedelta(hours=1), now + timedelta(days=2)
    cert = ca.leaf(device_id, key, not_before=start, not_after=end, self_signed=True)
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, cert.fingerprint(hashes.SHA1()).hex().upper()  # Azure's thumbprint


def device_identities(directory: Path, device_ids: Sequence[str]) -> dict[str, str]:
    """Each device's own certificate and key in ``directory/{id}.pem`` (0600); returns id -> SHA-1
    thumbprint (what the hub's registry holds)."""
    directory.mkdir(parents=True, exist_ok=True)
    now, ca = datetime.now(UTC), TestCa()
    thumbprints: dict[str, str] = {}
    for device_id in device_ids:
        pem, sha1 = _identity(ca, device_id, now)
        path = directory / f"{device_id}.pem"
        path.touch(0o600)
        path.write_bytes(pem)
        thumbprints[device_id] = sha1
    return thumbprints


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def mallinfo() -> MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info: MallInfo2 = libc.mallinfo2()
    return info


def _heap_in_use() -> int:
    return int(mallinfo().uordblks)


class _End:
    """One side of an in-memory TLS connection."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side)

    def send_to(self, other: _End) -> None:
        if data := self.outgoing.read():
            other.incoming.write(data)


def tls_connection_kib(directory: Path, connections: int = 500) -> float:
    """Heap KiB that one completed server-side TLS connection (the emulator's context) keeps."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = issue_server_certificate(directory, ["127.0.0.1"], datetime.now(UTC))
    server = server_context(pki.cert_path, pki.key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    pem, _ = _identity(TestCa(), "probe-device", datetime.now(UTC))
    (directory / "probe.pem").write_bytes(pem)
    client.load_cert_chain(directory / "probe.pem")

    def handshake() -> _End:
        s, c = _End(server, True), _End(client, False)
        for _ in range(8):
            for side in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.tls.do_handshake()
            c.send_to(s)
            s.send_to(c)
        if s.tls.getpeercert(binary_form=True) is None:
            raise RuntimeError("the probe's client certificate did not reach the server")
        for bio in (s.incoming, s.outgoing):  # as the shell does once the handshake's flights are read
            release(bio)
        c.tls.write(b"x" * 100)
        c.send_to(s)
        s.tls.read(65536)
        s.tls.write(b"ack!")
        s.send_to(c)
        c.tls.read(100)
        return s

    for _ in range(20):
        handshake()
    gc.collect()
    before = _heap_in_use()
    kept = [handshake() for _ in range(connections)]
    gc.collect()
    per_connection = (_heap_in_use() - before) / len(kept) / 1024
    del kept
    return per_connection
