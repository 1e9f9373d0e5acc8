"""The SASL layer of an AMQP 1.0 connection, server side: the three frames before the AMQP header.

Azure's clients authenticate on the ``$cbs`` node *after* the connection opens (a SAS token in a
``put-token`` request), so SASL only has to let them in: azure-eventhub (pyamqp) and @azure/event-hubs
(rhea) choose ``ANONYMOUS``; uamqp (azure-iot-hub's cloud-to-device sender) chooses ``MSSBCBS``
("authenticate later with CBS").  Proton's own SASL server knows ANONYMOUS, EXTERNAL and PLAIN only, so
this module runs the exchange itself and hands proton the bytes that follow it.  The frame bodies are
encoded and decoded by proton's codec (:class:`proton.Data`); only the 8-byte frame header is built here.

Exchange (AMQP 1.0 part 5.3): client ``AMQP 3 1 0 0`` -> server the same header and ``sasl-mechanisms``;
client ``sasl-init`` (mechanism) -> server ``sasl-outcome`` (0 ok, 1 auth failed); then the client sends
``AMQP 0 1 0 0`` and the AMQP connection proper starts.  A client that skips SASL (starts with
``AMQP 0 1 0 0``) is let through as well: authorisation is CBS's job either way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proton import Data, symbol

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
MECHANISMS = ("MSSBCBS", "ANONYMOUS")
MAX_SASL_FRAME = 4096  # sasl-init carries a mechanism, a short initial response and a host name

_SASL_FRAME_TYPE = 0x01
_SASL_MECHANISMS = 0x40
_SASL_INIT = 0x41
_SASL_OUTCOME = 0x44
_OK, _AUTH_FAILED = 0, 1


class SaslRefused(Exception):
    """The peer spoke something else than the SASL this server offers: send ``reply`` (a failed outcome,
    when there is one to send) and close the connection."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass
class SaslResult:
    reply: bytes = b""
    """What to send back now."""
    rest: bytes = b""
    """Bytes after the exchange: the start of the AMQP connection (proton's)."""
    done: bool = False
    mechanism: str | None = None


def _frame(body: bytes) -> bytes:
    size = 8 + len(body)
    return struct.pack(">IBBH", size, 2, _SASL_FRAME_TYPE, 0) + body


def mechanisms_frame() -> bytes:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(_SASL_MECHANISMS)
    data.put_list()
    data.enter()
    data.put_array(False, Data.SYMBOL)
    data.enter()
    for name in MECHANISMS:
        data.put_symbol(symbol(name))
    data.exit()
    data.exit()
    data.exit()
    return _frame(data.encode())


def outcome_frame(code: int) -> bytes:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(_SASL_OUTCOME)
    data.put_list()
    data.enter()
    data.put_ubyte(code)
    data.exit()
    data.exit()
    return _frame(data.encode())


def _init_mechanism(body: bytes) -> str:
    """The mechanism named by a ``sasl-init`` frame body."""
    data = Data()
    try:
        data.decode(body)
    except Exception as exc:  # proton raises its own DataException for undecodable input
        raise SaslRefused(f"undecodable SASL frame: {exc}") from exc
    data.rewind()
    if data.next() != Data.DESCRIBED:
        raise SaslRefused("SASL frame is not a described list")
    data.enter()
    data.next()
    code = data.get_object()
    if code != _SASL_INIT:
        raise SaslRefused(f"expected sasl-init, got descriptor {code!r}")
    data.next()
    if data.type() != Data.LIST:
        raise SaslRefused("sasl-init body is not a list")
    data.enter()
    if data.next() != Data.SYMBOL:
        raise SaslRefused("sasl-init names no mechanism")
    return str(data.get_symbol())


class SaslServer:
    """Feed it the connection's first bytes until ``done``; it answers what SASL needs answered."""

    def __init__(self) -> None:
        self._buffer = b""
        self._state = "header"
        self.done = False
        self.mechanism: str | None = None

    def feed(self, data: bytes) -> SaslResult:
        """Raises :class:`SaslRefused` for anything but the exchange above."""
        self._buffer += data
        reply = b""
        while not self.done:
            if self._state == "header":
                if len(self._buffer) < 8:
                    break
                header, self._buffer = self._buffer[:8], self._buffer[8:]
                if header == AMQP_HEADER:  # no SASL layer: straight to AMQP
                    self.done = True
                    return SaslResult(reply, header + self._buffer, True, None)
                if header != SASL_HEADER:
                    raise SaslRefused("not an AMQP 1.0 SASL header", reply)
                reply += SASL_HEADER + mechanisms_frame()
                self._state = "init"
            elif self._state == "init":
                if len(self._buffer) < 8:
                    break
                size, doff, kind, _channel = struct.unpack(">IBBH", self._buffer[:8])
                if kind != _SASL_FRAME_TYPE or doff < 2 or not 8 <= size <= MAX_SASL_FRAME:
                    raise SaslRefused("malformed SASL frame", reply)
                if len(self._buffer) < size:
                    break
                body, self._buffer = self._buffer[doff * 4 : size], self._buffer[size:]
                try:
                    mechanism = _init_mechanism(body)
                except SaslRefused as exc:
                    raise SaslRefused(str(exc), reply) from exc
                if mechanism not in MECHANISMS:
                    refusal = reply + outcome_frame(_AUTH_FAILED)
                    raise SaslRefused(f"SASL mechanism {mechanism} not offered", refusal)
                self.mechanism = mechanism
                reply += outcome_frame(_OK)
                self._state = "amqp"
                self.done = True
        if self.done:
            rest, self._buffer = self._buffer, b""
            return SaslResult(reply, rest, True, self.mechanism)
        return SaslResult(reply)
