"""Python's ``ssl`` as a server that requests a client certificate and accepts any certificate presented.

Azure devices registered by thumbprint present self-signed certificates, and devices of a group present
chains of CAs the emulator learns about at run time, so the TLS shell must ask for a certificate, finish
the handshake whatever was presented, and leave authorisation to the endpoint (which reads the leaf
after the handshake).  ``ssl.SSLContext`` can only verify against CAs it was given; OpenSSL itself has
the hook: ``SSL_CTX_set_cert_verify_callback`` replaces the chain verification of a context with a
function of ours, here one that answers "valid".  The handshake's own checks stay OpenSSL's: the
client still proves it holds the key of the certificate it sent (CertificateVerify).

How the hook reaches the context ``ssl`` made: CPython's context object (``_ssl._SSLContext``, C struct
``PySSLContext``) begins with the object header, then the ``SSL_CTX *``; the OpenSSL functions are
resolved through the ``_ssl`` extension's own handle, so they are those of the libssl that ``ssl`` runs
on.  Both assumptions are proven before anything is written (:func:`context_pointer`): the library's
version must be the one ``ssl`` reports, and the pointer must follow the Python object through several
states of two settings (the verify mode and the options, changed through ``ssl`` and read back through
the pointer).  Anything else refuses with :class:`LayoutError`; nothing is ever written through a pointer
that did not pass.

What CPython does later does not undo the hook: setting ``verify_mode`` calls ``SSL_CTX_set_verify``,
which replaces the per-certificate callback, not this one; the context's pointer never changes for the
life of the object; ``post_handshake_auth`` is left off.  A context switched to by an SNI callback would
need the same set-up (none is used here).

The session cache is switched off too (``ssl`` has no setting for it): a server-side cache would keep a
session, with the peer's certificate, per connection long after the handshake.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
from functools import cache

SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_GET_SESS_CACHE_MODE = 45
SSL_SESS_CACHE_OFF = 0
_VERIFY_MODE_BITS = 0x03  # SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
_EXPECTED_MODE = {ssl.CERT_NONE: 0x00, ssl.CERT_OPTIONAL: 0x01, ssl.CERT_REQUIRED: 0x03}

# int (*cb)(X509_STORE_CTX *, void *arg)
_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _any_chain_is_valid(store: int | None, arg: int | None) -> int:
    return 1  # the endpoint authorises from the leaf after the handshake


_accept = _VerifyCallback(_any_chain_is_valid)  # module-level: alive as long as any context using it


class LayoutError(RuntimeError):
    """This Python's ``ssl`` is not laid out as :mod:`accept_any` expects; TLS cannot be set up."""


class _LibSsl:
    """The few OpenSSL functions used (here and in :mod:`.membio`), with their C signatures."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.version_num = lib.OpenSSL_version_num
        self.version_num.argtypes = []
        self.version_num.restype = ctypes.c_ulong
        self.get_verify_mode = lib.SSL_CTX_get_verify_mode
        self.get_verify_mode.argtypes = [ctypes.c_void_p]
        self.get_verify_mode.restype = ctypes.c_int
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.set_cert_verify_callback = lib.SSL_CTX_set_cert_verify_callback
        self.set_cert_verify_callback.argtypes = [ctypes.c_void_p, _VerifyCallback, ctypes.c_void_p]
        self.set_cert_verify_callback.restype = None
        # the memory BIOs' buffers (:mod:`.membio`)
        self.bio_ctrl = lib.BIO_ctrl
        self.bio_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.bio_ctrl.restype = ctypes.c_long
        self.bio_method_type = lib.BIO_method_type
        self.bio_method_type.argtypes = [ctypes.c_void_p]
        self.bio_method_type.restype = ctypes.c_int
        self.buf_mem_new = lib.BUF_MEM_new
        self.buf_mem_new.argtypes = []
        self.buf_mem_new.restype = ctypes.c_void_p
        self.buf_mem_free = lib.BUF_MEM_free
        self.buf_mem_free.argtypes = [ctypes.c_void_p]
        self.buf_mem_free.restype = None


@cache
def _libssl() -> _LibSsl:
    """OpenSSL as the ``_ssl`` extension links it (dlsym on its handle searches its dependencies)."""
    try:
        lib = _LibSsl(ctypes.CDLL(_ssl.__file__))
    except (OSError, AttributeError) as exc:
        raise LayoutError(f"cannot resolve OpenSSL through the ssl module's extension: {exc}") from exc
    if lib.version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise LayoutError(
            f"the OpenSSL found through the ssl module's extension ({lib.version_num():#x}) is not the one "
            f"ssl reports ({ssl.OPENSSL_VERSION_NUMBER:#x})"
        )
    return lib


def _read_pointer(ctx: ssl.SSLContext) -> int:
    """The word after the object header of ``ctx``: where CPython keeps the ``SSL_CTX *``."""
    if not isinstance(ctx, _ssl._SSLContext):
        raise LayoutError(f"not an ssl context: {type(ctx).__name__}")
    if _ssl._SSLContext.__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        raise LayoutError("the ssl context object is too small to hold an SSL_CTX pointer after its header")
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value or 0


def context_pointer(ctx: ssl.SSLContext, pointer: int | None = None) -> int:
    """The ``SSL_CTX *`` of ``ctx``, proven: ``pointer`` (default: read from the object) must be the
    context that ``ctx`` drives.  Only OpenSSL's getters are called through it; ``ctx``'s verify mode and
    options are changed through ``ssl`` and put back.  Raises :class:`LayoutError` when it is not."""
    lib = _libssl()
    candidate = _read_pointer(ctx) if pointer is None else pointer
    if not candidate or candidate % ctypes.alignment(ctypes.c_void_p):
        raise LayoutError(f"no plausible SSL_CTX pointer in the ssl context object ({candidate:#x})")
    mode, options = ctx.verify_mode, ctx.options
    try:
        probes = [ssl.CERT_REQUIRED, ssl.CERT_OPTIONAL] + ([] if ctx.check_hostname else [ssl.CERT_NONE])
        for probe in probes:
            ctx.verify_mode = probe
            if lib.get_verify_mode(candidate) & _VERIFY_MODE_BITS != _EXPECTED_MODE[probe]:
                raise LayoutError("the SSL_CTX pointer does not follow the ssl context's verify mode")
        for flip in (options ^ ssl.OP_NO_RENEGOTIATION, options):
            ctx.options = flip
            if lib.get_options(candidate) != int(ctx.options):
                raise LayoutError("the SSL_CTX pointer does not follow the ssl context's options")
    finally:
        ctx.options = options
        ctx.verify_mode = mode
    return candidate


def accept_any_client_certificate(ctx: ssl.SSLContext, *, required: bool = False) -> None:
    """Make the server context ``ctx`` request a client certificate and accept any certificate at the
    handshake (``required``: refuse a client that presents none), with no session cache."""
    pointer = context_pointer(ctx)
    lib = _libssl()
    # verify_mode first: the hook below survives later verify_mode changes, but set it once, in order.
    ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    lib.set_cert_verify_callback(pointer, _accept, None)
    lib.ctrl(pointer, SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_OFF, None)
    if lib.ctrl(pointer, SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != SSL_SESS_CACHE_OFF:
        raise LayoutError("could not switch the session cache off")
