"""Request/response nodes (``$cbs``, ``$management``) and claims-based security, as Azure runs them.

A client attaches two links to a node, a sender targeting it and a receiver sourced at it; each request
carries ``operation`` (and ``type``, ``name``...) application properties and a ``message-id``; the answer
comes back on the receiving link with ``correlation-id`` = that message id and ``status-code`` /
``status-description`` application properties.

``$cbs`` ``put-token`` (``type`` ``servicebus.windows.net:sastoken``, ``name`` the audience, body the
token) authorises the connection for what the token's resource covers until the token expires; links
attached afterwards are checked against these grants (:class:`Grants`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast

from proton import Message, int32

from azure_iot_emulator.sas import normalised_resource, resource_allows

CBS = "$cbs"
MANAGEMENT = "$management"
STATUS_CODE = "status-code"
STATUS_DESCRIPTION = "status-description"
SAS_TOKEN_TYPE = "servicebus.windows.net:sastoken"


@dataclass(frozen=True)
class Reply:
    status: int
    description: str
    body: Any = None


def response(request: Message, reply: Reply) -> Message:
    """The answer to ``request``: correlated by its message id, status in the application properties."""
    answer = Message()
    answer.correlation_id = request.id
    if request.reply_to:
        answer.address = request.reply_to
    # The status is an AMQP int, as Azure sends it (uamqp reads nothing else).  (proton's stubs type the
    # application properties as None until set.)
    cast(Any, answer).properties = {STATUS_CODE: int32(reply.status), STATUS_DESCRIPTION: reply.description}
    answer.body = reply.body
    return answer


class TokenRefused(Exception):
    """A token CBS does not accept: ``status`` as Azure answers (401), ``description`` says why."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


@dataclass
class Grants:
    """What the connection's accepted tokens allow: resource (scheme-less, lower case, no trailing
    ``/``) -> expiry (unix seconds)."""

    _until: dict[str, float] = field(default_factory=dict)

    def add(self, resource: str, expiry: float) -> None:
        self._until[normalised_resource(resource)] = expiry

    def allows(self, resource: str, now: float | None = None) -> bool:
        """A grant for ``resource`` or a parent of it (cut at a ``/``) that has not expired."""
        moment = time.time() if now is None else now
        return any(
            expiry > moment and resource_allows(granted, resource) for granted, expiry in self._until.items()
        )


def property_text(message: Message, name: str) -> str | None:
    properties: dict[Any, Any] = cast(Any, message).properties or {}
    value = properties.get(name)
    return value if isinstance(value, str) else None
