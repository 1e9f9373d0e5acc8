"""Client channels for the CLIs, the device client, tests and benchmarks.

API
---
``ChannelSecurity(ca_pem=None, cert_pem=None, key_pem=None, server_name=None, insecure=False)``
    ``insecure=True``: plaintext (loopback development).  Otherwise TLS trusting ``ca_pem`` (system roots
    when None); ``cert_pem`` + ``key_pem`` present a client certificate (mTLS); ``server_name`` overrides the
    name checked against the server certificate.
``ChannelSecurity.from_files(ca_file=None, cert_file=None, key_file=None, server_name=None, insecure=False)``
``create_channel(target, security, *, options=(), interceptors=()) -> grpc.aio.Channel``
    Create it inside the event loop that uses it.  ``interceptors``: e.g. OpenTelemetry's client side
    (``provkit.observe.Observability.client_interceptors()``), so a call carries its trace context.
``request_metadata(request_id) -> tuple``   ``(("x-request-id", request_id),)`` for per-call metadata.
``admitted_stream(method, requests, **call_options) -> grpc.aio.StreamStreamCall``
    Start a request-streaming call (a stub's method, e.g. ``stub.MintCertificates``) whose requests are
    held back until the server's gate has admitted the call (``provkit.grpc_server.ADMITTED_HEADER``); a
    refused call then ends with the gate's status and reason, never grpc.aio's "Internal error from Core".

For command-line clients: ``add_channel_arguments(parser, target_help=...)`` (--target, --insecure,
--ca-file, --cert-file, --key-file, --server-name), the settings keys they set (``CHANNEL_FLAGS``, a
``mainkit.settings.FlagKeys``) and ``channel_security(source, section="")`` reading those keys from a
settings source; ``report_failed_call(exc, prog) -> exit code`` (prints the
service's message with its reason, the field violations that add to it and the retry delay;
``EXIT_UNREACHABLE`` when the service is unavailable, else ``EXIT_REFUSED``); ``explained(target, security,
service=...)`` (an async context manager: a call that finds the service unavailable is tried again by
hand, TCP then TLS as configured, and ends in ``mainkit.shell.CommandFailed`` saying why: nothing listens,
plaintext against TLS, a certificate this client does not trust, a client certificate missing; with the
hint ``STACK_HINT`` when the channel's trust is not configured); ``diagnose_connection(target, security)``
(that try by hand: a sentence, or None when the channel as configured works); ``read_input(path, what,
*, max_bytes=MAX_INPUT_BYTES)`` (a file the person named, as UTF-8 text whatever the locale, at most
``max_bytes`` of it read; or ``provkit.errors.InputError`` with a sentence saying why it cannot be used:
missing, a directory, unreadable, larger than the bound, not UTF-8; also what ``ChannelSecurity`` raises for a
certificate without its key);
``describe_os_error(exc)`` (an ``OSError`` as a sentence).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import ssl
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc

from mainkit.settings import FlagKeys, SettingsSource
from mainkit.shell import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from mainkit.shell import EXIT_USAGE as EXIT_USAGE
from mainkit.shell import CommandFailed, error_line
from provkit.errors import InputError
from provkit.grpc_errors import error_details
from provkit.grpc_server import ADMITTED_HEADER, REQUEST_ID_HEADER

EXIT_REFUSED, EXIT_UNREACHABLE = 1, 3


@dataclass(frozen=True)
class ChannelSecurity:
    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    server_name: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_pem is None) != (self.key_pem is None):
            raise InputError("a client certificate needs its key (and the other way round)")
        if self.insecure and (self.ca_pem or self.cert_pem):
            raise InputError("insecure channels take no certificates")

    def __repr__(self) -> str:
        mode = "insecure" if self.insecure else ("mtls" if self.cert_pem else "tls")
        return f"ChannelSecurity({mode}, server_name={self.server_name!r})"

    @classmethod
    def from_files(
        cls,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        server_name: str | None = None,
        insecure: bool = False,
    ) -> ChannelSecurity:
        return cls(
            ca_pem=ca_file.read_bytes() if ca_file else None,
            cert_pem=cert_file.read_bytes() if cert_file else None,
            key_pem=key_file.read_bytes() if key_file else None,
            server_name=server_name,
            insecure=insecure,
        )


def request_metadata(request_id: str | None) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()


_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


def admitted_stream(
    method: grpc.aio.StreamStreamMultiCallable[_Request, _Response],
    requests: AsyncIterable[_Request] | Iterable[_Request],
    **call_options: Any,
) -> grpc.aio.StreamStreamCall[_Request, _Response]:
    """``method(requests, **call_options)``, its first request written once the gate said yes.

    grpc.aio reports a call whose server ended it while a request was being written as INTERNAL "Internal
    error from Core", without the server's status and details (grpc/grpc#36066).  The gate refuses before
    reading any request, so a client streaming at once loses the refusal's reason now and then.  Held back
    until the response headers, the requests go only into a call the gate admitted; a refused call gets
    none and ends with its status.  Create it inside the event loop that runs the call.
    """
    started: asyncio.Future[grpc.aio.StreamStreamCall[_Request, _Response]] = (
        asyncio.get_running_loop().create_future()
    )

    async def held_back() -> AsyncIterator[_Request]:
        call = await started
        headers = await call.initial_metadata()
        if not any(key == ADMITTED_HEADER for key, _value in headers or ()):
            await call.code()  # refused (or ended) before admission: wait for the status, write nothing
            return
        if isinstance(requests, AsyncIterable):
            async for request in requests:
                yield request
        else:
            for request in requests:
                yield request

    call = method(held_back(), **call_options)
    started.set_result(call)
    return call


def create_channel(
    target: str,
    security: ChannelSecurity,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    opts = list(options)
    chain = list(interceptors) or None
    if security.insecure:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=chain)
    if security.server_name:
        opts.append(("grpc.ssl_target_name_override", security.server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=security.ca_pem, private_key=security.key_pem, certificate_chain=security.cert_pem
    )
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=chain)


# The settings keys the options of add_channel_arguments set (``CHANNEL_FLAGS.within("portal")``: under a
# section); channel_security reads them.
CHANNEL_FLAGS = FlagKeys(
    {
        "target": "target",
        "insecure": "insecure",
        "ca_file": "ca_file",
        "cert_file": "cert_file",
        "key_file": "key_file",
        "server_name": "server_name",
    }
)


def channel_security(source: SettingsSource, section: str = "") -> ChannelSecurity:
    """The channel's security from the settings keys ``insecure``, ``ca_file``, ``cert_file``, ``key_file``,
    ``server_name`` (under ``section.`` when given)."""
    prefix = f"{section}." if section else ""
    return ChannelSecurity.from_files(
        ca_file=source.path(prefix + "ca_file"),
        cert_file=source.path(prefix + "cert_file"),
        key_file=source.path(prefix + "key_file"),
        server_name=source.text(prefix + "server_name"),
        insecure=source.flag(prefix + "insecure", False),
    )


def add_channel_arguments(
    parser: argparse.ArgumentParser,
    *,
    target_help: str,
    server_name: bool = True,
    ca_help: str = "CA that signed the service's certificate (default: the system's)",
) -> None:
    """The options every gRPC client command takes: where the service is and how to secure the channel
    (the same names in every command: ``provkit.cli_shell``'s conventions); ``server_name=False``: a
    client without that setting."""
    parser.add_argument("--target", metavar="HOST:PORT", help=target_help)
    parser.add_argument("--insecure", action="store_true", help="plaintext, loopback development only")
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help=ca_help,
    )
    parser.add_argument("--cert-file", type=Path, metavar="PEM", help="client certificate (mTLS)")
    parser.add_argument("--key-file", type=Path, metavar="PEM", help="client key (mTLS)")
    if server_name:
        parser.add_argument(
            "--server-name", metavar="NAME", help="name to check in the service's certificate"
        )


def report_failed_call(exc: grpc.RpcError, prog: str, stream: TextIO | None = None) -> int:
    """Tell a person why a call failed (on standard error); returns the command's exit code.

    ``<prog>: error: <the service's message> [<REASON>]`` (the status name when the service gave no
    reason), then each field violation that says more than the message (a lone violation usually repeats
    it), then ``try again in N s`` when the service said so.
    """
    out = stream or sys.stderr
    details = error_details(exc)
    message = details.message.strip() or "the service gave no reason"
    print(error_line(prog, message, details.reason or details.code.name), file=out)
    for violation in details.field_violations:
        if violation.description.strip() not in message:
            print(f"  {violation.field}: {violation.description}", file=out)
    if details.retry_after is not None:
        print(f"  try again in {max(1, round(details.retry_after))} s", file=out)
    return EXIT_UNREACHABLE if details.code is grpc.StatusCode.UNAVAILABLE else EXIT_REFUSED


# Said when a channel's trust is not configured and the service cannot be used: the likeliest cause is a
# shell that was not pointed at the stack `make up` runs.
STACK_HINT = "running the stack of `make up`? `source var/up/env.sh` points every command at it"
_PROBE_TIMEOUT_S = 3.0


def _host_port(target: str) -> tuple[str, int] | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "localhost", int(port)


def _handshake(address: tuple[str, int], context: ssl.SSLContext, server_name: str | None) -> ssl.SSLSocket:
    raw = socket.create_connection(address, timeout=_PROBE_TIMEOUT_S)
    try:
        return context.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


def _speaks_tls(address: tuple[str, int]) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        _handshake(address, context, None).close()
    except (OSError, ssl.SSLError):
        return False
    return True


def diagnose_connection(target: str, security: ChannelSecurity) -> str | None:
    """Why a channel to ``target`` secured by ``security`` cannot work, found by connecting by hand (TCP,
    then the TLS handshake as configured); None when it works or the target is no host:port."""
    address = _host_port(target)
    if address is None:
        return None
    try:
        socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
    except ConnectionRefusedError:
        return "nothing accepts connections there (is the service running, and is this its address?)"
    except OSError as exc:
        return f"cannot connect: {describe_os_error(exc)}"
    if security.insecure:
        if _speaks_tls(address):
            return "the service speaks TLS, but this client is set to connect in plaintext"
        return None
    context = ssl.create_default_context()
    if security.ca_pem is not None:
        context = ssl.create_default_context(cadata=security.ca_pem.decode(errors="replace"))
    context.set_alpn_protocols(["h2"])
    trusted = "the CA file given" if security.ca_pem is not None else "the system's CAs: no CA file is set"
    try:
        tls = _handshake(address, context, security.server_name or address[0])
    except ssl.SSLCertVerificationError as exc:
        return f"its certificate is not one this client trusts ({exc.verify_message}; trusted: {trusted})"
    except ssl.SSLError as exc:
        if exc.reason == "WRONG_VERSION_NUMBER":
            return "the service does not speak TLS (a plaintext development server? then --insecure)"
        return f"the TLS handshake fails ({exc.reason or exc})"
    except OSError as exc:
        return f"the TLS handshake fails: {describe_os_error(exc)}"
    with tls:
        if security.cert_pem is not None:
            return None
        tls.settimeout(1.0)
        try:
            # A gRPC server speaks first (HTTP/2 SETTINGS); one that wants a client certificate hangs up
            # instead, or sends the TLS alert that says so.
            if tls.recv(1) == b"":
                return (
                    "the service hangs up after the TLS handshake: it wants a client certificate (mTLS), "
                    "and none is set"
                )
        except ssl.SSLError as exc:
            if "CERTIFICATE_REQUIRED" in (exc.reason or ""):
                return "the service asks for a client certificate (mTLS), and none is set"
        except OSError:
            pass
    return None


@contextlib.asynccontextmanager
async def explained(target: str, security: ChannelSecurity, *, service: str) -> AsyncIterator[None]:
    """Calls to ``service`` (e.g. "the factory") at ``target``: one that finds it unavailable for a reason
    ``diagnose_connection`` finds ends in ``CommandFailed`` saying it (exit 3), else the failure as it was."""
    try:
        yield
    except grpc.RpcError as exc:
        details = error_details(exc)
        if details.code is not grpc.StatusCode.UNAVAILABLE or details.reason:
            raise
        cause = await asyncio.to_thread(diagnose_connection, target, security)
        if cause is None:
            raise
        hints = (STACK_HINT,) if security.ca_pem is None else ()
        raise CommandFailed(
            f"cannot reach {service} at {target} as configured: {cause}",
            "UNAVAILABLE",
            exit_code=EXIT_UNREACHABLE,
            hints=hints,
        ) from None


def describe_os_error(exc: OSError) -> str:
    """``cannot read m.json: no such file or directory`` rather than ``[Errno 2] ...``."""
    reason = (exc.strerror or str(exc)).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    return f"{exc.filename}: {reason}" if exc.filename else reason


MAX_INPUT_BYTES = 1024 * 1024  # what read_input takes by default: a certificate, a CSR, metadata, a code


def read_input(path: Path, what: str, *, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The text of a file the person named (``what`` says which, e.g. "metadata file"): UTF-8 whatever the
    locale, and no more than ``max_bytes`` of it read (a wrong path to a huge file, or a device that never
    ends, is refused rather than read into memory)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"the {what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"the {what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {describe_os_error(exc)}") from None
    if len(data) > max_bytes:
        raise InputError(f"the {what} {path} is larger than {max_bytes:,} bytes: is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"the {what} {path} is not text (UTF-8)") from None
