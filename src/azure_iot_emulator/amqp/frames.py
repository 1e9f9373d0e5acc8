"""Outgoing AMQP frames with every field of their performative present.

AMQP 1.0 lets an encoder drop a performative's trailing null fields, and proton does.  Azure's services
write them all, and azure-eventhub's own AMQP stack (pyamqp) relies on that: it reads fields by position
(an ``open``'s properties at index 9, a ``transfer``'s payload at index 11) without padding short lists.
So the connection passes proton's output through :class:`FramePadder`, which appends the missing nulls to
each performative's field list -- the same performative, spelt long; nothing else in a frame changes.

Only the list's header is rewritten (``list0``/``list8``/``list32`` constructor, size, count): the fields
themselves are proton's bytes, untouched.
"""

from __future__ import annotations

import struct

# Performative descriptor -> its number of fields (AMQP 1.0 part 2.7).
ARITY = {0x10: 10, 0x11: 8, 0x12: 14, 0x13: 11, 0x14: 11, 0x15: 6, 0x16: 3, 0x17: 1, 0x18: 1}
_HEADER = 8
_NULL = b"\x40"


def _list_parts(body: bytes, at: int) -> tuple[int, bytes, int] | None:
    """(field count, the fields' bytes, the index after the list) of the list at ``body[at]``."""
    constructor = body[at]
    if constructor == 0x45:  # list0
        return 0, b"", at + 1
    if constructor == 0xC0:  # list8: size, count (1 byte each)
        size, count = body[at + 1], body[at + 2]
        return count, body[at + 3 : at + 2 + size], at + 2 + size
    if constructor == 0xD0:  # list32
        size, count = struct.unpack_from(">II", body, at + 1)
        return count, body[at + 9 : at + 5 + size], at + 5 + size
    return None


def _encode_list(count: int, fields: bytes) -> bytes:
    if len(fields) + 1 <= 255 and count <= 255:
        return bytes((0xC0, len(fields) + 1, count)) + fields
    return b"\xd0" + struct.pack(">II", len(fields) + 4, count) + fields


def pad_frame(frame: bytes) -> bytes:
    """``frame`` (a whole AMQP frame) with its performative's missing trailing fields as nulls."""
    doff, kind = frame[4], frame[5]
    start = doff * 4
    body = frame[start:]
    if kind != 0 or len(body) < 3 or body[0] != 0x00:
        return frame  # SASL frames, empty (keep-alive) frames, anything unexpected: as they are
    if body[1] == 0x53:  # smallulong descriptor
        descriptor, at = body[2], 3
    elif body[1] == 0x80 and len(body) >= 10:
        descriptor, at = int.from_bytes(body[2:10], "big"), 10
    else:
        return frame
    arity = ARITY.get(descriptor)
    parts = _list_parts(body, at) if arity is not None and at < len(body) else None
    if arity is None or parts is None or parts[0] >= arity:
        return frame
    count, fields, end = parts
    padded = body[:at] + _encode_list(arity, fields + _NULL * (arity - count)) + body[end:]
    header = struct.pack(">I", start + len(padded)) + frame[4:start]
    return header + padded


class FramePadder:
    """Feed it proton's output as it comes; it returns whole frames, padded (the protocol header that
    opens the connection passes through)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._header = _HEADER  # bytes of the AMQP protocol header still to pass through

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data
        out: list[bytes] = []
        if self._header:
            passed = buffer[: self._header]
            out.append(passed)
            self._header -= len(passed)
            buffer = buffer[len(passed) :]
        while len(buffer) >= _HEADER:
            size = int.from_bytes(buffer[:4], "big")
            if len(buffer) < size:
                break
            out.append(pad_frame(buffer[:size]))
            buffer = buffer[size:]
        self._buffer = buffer
        return b"".join(out)
