"""Giving back what an emptied ``ssl.MemoryBIO`` keeps.

OpenSSL's memory BIO grows its buffer to the most it ever held and never shrinks it: reading drains the
bytes, not the allocation.  The TLS shell's two BIOs per connection each held a whole handshake flight
(the certificates both ways), ~1.7 KiB per connection together, for as long as the connection lived.
``ssl`` has no call that frees it; OpenSSL has ``BIO_set_mem_buf`` (``BIO_C_SET_BUF_MEM``), which frees
the buffer of a BIO that owns it (``BIO_CLOSE``, as every BIO ``ssl`` makes does) and puts another in
its place: here a new, empty one, so the BIO takes the next bytes as if it were new.

How the BIO is reached: CPython's ``MemoryBIO`` (C struct ``PySSLMemoryBIO``) begins with the object
header, then the ``BIO *``; the functions are OpenSSL's through the ``_ssl`` extension's own handle (as
in :mod:`.accept_any`, whose version check applies).  The layout is proven once per process on probe
BIOs before anything is written through it (:func:`layout_proven`): the pointer must lead to a memory
BIO whose pending byte count follows what ``ssl`` writes and reads, and a released probe must take and
give back bytes as before.  Each BIO released is checked again (a memory BIO, nothing pending by both
counts).  When the proof fails the buffers are simply kept (:func:`release` returns False).
"""

from __future__ import annotations

import ctypes
import logging
import ssl
from functools import cache

from azure_iot_emulator.mqtt.accept_any import LayoutError, _libssl

log = logging.getLogger(__name__)

BIO_CTRL_PENDING = 10
BIO_C_SET_BUF_MEM = 114
BIO_C_GET_BUF_MEM_PTR = 115
BIO_CLOSE = 0x01
BIO_TYPE_MEM = 0x0401  # 1 | BIO_TYPE_SOURCE_SINK


def _pointer(bio: ssl.MemoryBIO) -> int:
    """The ``BIO *`` of ``bio``, checked: a memory BIO whose pending count is ``bio.pending``."""
    if type(bio) is not ssl.MemoryBIO:
        raise LayoutError(f"not an ssl memory BIO: {type(bio).__name__}")
    if ssl.MemoryBIO.__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        raise LayoutError("the ssl memory BIO object is too small to hold a BIO pointer after its header")
    pointer = ctypes.c_void_p.from_address(id(bio) + object.__basicsize__).value or 0
    if not pointer or pointer % ctypes.alignment(ctypes.c_void_p):
        raise LayoutError(f"no plausible BIO pointer in the memory BIO object ({pointer:#x})")
    lib = _libssl()
    if lib.bio_method_type(pointer) != BIO_TYPE_MEM:
        raise LayoutError("the pointer in the memory BIO object is not a memory BIO's")
    if lib.bio_ctrl(pointer, BIO_CTRL_PENDING, 0, None) != bio.pending:
        raise LayoutError("the BIO pointer does not follow the memory BIO's pending bytes")
    return pointer


def _replace_buffer(pointer: int) -> None:
    lib = _libssl()
    fresh = lib.buf_mem_new()
    if not fresh:
        raise MemoryError("BUF_MEM_new failed")
    if lib.bio_ctrl(pointer, BIO_C_SET_BUF_MEM, BIO_CLOSE, fresh) != 1:  # frees the old buffer
        lib.buf_mem_free(fresh)
        raise LayoutError("BIO_set_mem_buf refused")


@cache
def layout_proven() -> bool:
    """Whether this Python's memory BIOs can be released (proven on probes, once per process)."""
    try:
        probe, other = ssl.MemoryBIO(), ssl.MemoryBIO()
        if _pointer(probe) == _pointer(other):
            raise LayoutError("two memory BIOs share one BIO pointer")
        for chunk in (b"", b"x" * 7, b"y" * 3000):
            probe.write(chunk)
            _pointer(probe)  # pending follows
        probe.read(5)
        _pointer(probe)
        probe.read()
        _replace_buffer(_pointer(probe))
        probe.write(b"after")
        if _pointer(probe) and probe.read() != b"after":
            raise LayoutError("a released memory BIO did not give back what it was given")
    except LayoutError as exc:
        log.warning("memory BIO buffers are kept (%s)", exc)
        return False
    return True


class _BufMem(ctypes.Structure):
    _fields_ = [  # OpenSSL's public struct buf_mem_st
        ("length", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("max", ctypes.c_size_t),
        ("flags", ctypes.c_ulong),
    ]


def allocated(bio: ssl.MemoryBIO) -> int:
    """The bytes ``bio``'s buffer holds allocated now, whatever it holds pending (a diagnostic: raises
    :class:`LayoutError` when this Python's layout is not the one proven)."""
    if not layout_proven():
        raise LayoutError("this Python's memory BIOs are not laid out as expected")
    buffer = ctypes.c_void_p()
    _libssl().bio_ctrl(_pointer(bio), BIO_C_GET_BUF_MEM_PTR, 0, ctypes.addressof(buffer))
    if not buffer.value:
        raise LayoutError("the memory BIO has no buffer")
    return int(_BufMem.from_address(buffer.value).max)


def release(bio: ssl.MemoryBIO) -> bool:
    """Free the buffer the emptied ``bio`` keeps (it takes new bytes as before).  False, and nothing
    done, when ``bio`` holds bytes or this Python's layout was not proven."""
    if bio.pending or not layout_proven():
        return False
    try:
        _replace_buffer(_pointer(bio))
    except (LayoutError, MemoryError) as exc:
        log.warning("memory BIO buffer kept: %s", exc)
        return False
    return True
