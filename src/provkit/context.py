"""Per-request context shared by handlers and logs (contextvars, set by the gRPC interceptor).

API
---
``CallerIdentity(kind, common_name=None, sha256_thumbprint=None, peer="")``; ``str(identity)`` is the
    form written to ledgers/audit logs: ``"<CN> sha256:<THUMBPRINT>"`` for an mTLS caller,
    ``"tls-anonymous"`` for a TLS caller without a client certificate, ``"insecure:<peer>"`` otherwise.
``current_request_id() -> str``      the request id of the running RPC ("" outside one).
``current_caller() -> CallerIdentity``  who is calling (``CallerIdentity.internal()`` outside an RPC).
``bind_device_id(device_id)``        context manager: logs inside carry ``device_id``.
``request_scope(request_id, caller)``  context manager used by the interceptor (and by tests/CLIs).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

CallerKind = Literal["mtls", "tls-anonymous", "insecure", "internal"]


@dataclass(frozen=True)
class CallerIdentity:
    kind: CallerKind
    common_name: str | None = None
    sha256_thumbprint: str | None = None  # upper-case hex of the client certificate's DER
    peer: str = ""

    @classmethod
    def internal(cls) -> CallerIdentity:
        return cls("internal")

    @property
    def authenticated(self) -> bool:
        return self.kind == "mtls"

    def __str__(self) -> str:
        if self.kind == "mtls":
            return f"{self.common_name or '(no CN)'} sha256:{self.sha256_thumbprint}"
        if self.kind == "insecure":
            return f"insecure:{self.peer}"
        return self.kind


request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
caller_var: contextvars.ContextVar[CallerIdentity | None] = contextvars.ContextVar("caller", default=None)
device_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("device_id", default="")


def current_request_id() -> str:
    return request_id_var.get()


def current_caller() -> CallerIdentity:
    return caller_var.get() or CallerIdentity.internal()


def current_device_id() -> str:
    return device_id_var.get()


@contextlib.contextmanager
def bind_device_id(device_id: str) -> Iterator[None]:
    token = device_id_var.set(device_id)
    try:
        yield
    finally:
        device_id_var.reset(token)


@contextlib.contextmanager
def request_scope(request_id: str, caller: CallerIdentity) -> Iterator[None]:
    tokens = (request_id_var.set(request_id), caller_var.set(caller), device_id_var.set(""))
    try:
        yield
    finally:
        device_id_var.reset(tokens[2])
        caller_var.reset(tokens[1])
        request_id_var.reset(tokens[0])
