"""The fleet run's own pieces: one certificate per device, and a probe of what one server-side TLS
connection holds in memory (the floor under the emulator's memory per connected device).

- :func:`device_identities` writes ``{device id}.pem`` (a self-signed P-256 certificate, then its key)
  for every device, as a manufacturer's fleet has one identity per device; the emulator registers each
  device with its own thumbprint.
- :func:`tls_connection_kib` completes handshakes in memory (the emulator's own server context, a
  client presenting a device certificate, TLS 1.3, one record each way) and reports the heap bytes
  (glibc ``mallinfo2``) each server-side connection keeps: OpenSSL's state through pyOpenSSL, no
  socket, no MQTT.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def _heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().uordblks)


def _pump(source: SSL.Connection, sink: SSL.Connection) -> None:
    try:
        while data := source.bio_read(65536):
            sink.bio_write(data)
    except SSL.WantReadError:
        return


def tls_connection_kib(directory: Path, connections: int = 500) -> float:
    """Heap KiB that one completed server-side TLS connection (the emulator's context) keeps."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = issue_server_certificate(directory, ["127.0.0.1"], datetime.now(UTC))
    server = server_context(pki.cert_path, pki.key_path)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    pem, _ = _identity(TestCa(), "probe-device", datetime.now(UTC))
    (directory / "probe.pem").write_bytes(pem)
    client.use_certificate_file(str(directory / "probe.pem"))
    client.use_privatekey_file(str(directory / "probe.pem"))

    def handshake() -> SSL.Connection:
        s, c = SSL.Connection(server, None), SSL.Connection(client, None)
        s.set_accept_state()
        c.set_connect_state()
        for _ in range(8):
            for side in (c, s):
                with contextlib.suppress(SSL.WantReadError):
                    side.do_handshake()
            _pump(c, s)
            _pump(s, c)
        c.sendall(b"x" * 100)
        _pump(c, s)
        s.recv(65536)
        s.sendall(b"ack!")
        _pump(s, c)
        c.recv(100)
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
