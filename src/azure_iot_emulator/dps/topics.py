"""DPS MQTT usernames and topics (pure)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

RESPONSE_FILTER = "$dps/registrations/res/#"
REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/?"
POLL_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/?"

_USERNAME = re.compile(r"^(?P<scope>[^/]+)/registrations/(?P<rid>[^/]+)/(?P<rest>.*)$")


@dataclass(frozen=True)
class DpsUsername:
    id_scope: str
    registration_id: str


def parse_username(username: str | None) -> DpsUsername | None:
    if not username:
        return None
    match = _USERNAME.match(username)
    if match is None or "api-version=" not in match["rest"]:
        return None
    return DpsUsername(match["scope"], match["rid"])


@dataclass(frozen=True)
class Register:
    rid: str


@dataclass(frozen=True)
class Poll:
    rid: str
    operation_id: str


def _query(text: str) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for part in text.split("&"):
        key, sep, value = part.partition("=")
        if not sep:
            return None
        out[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return out


def classify(topic: str) -> Register | Poll | None:
    if topic.startswith(REGISTER_PREFIX):
        query = _query(topic[len(REGISTER_PREFIX) :])
        if query and query.get("$rid"):
            return Register(query["$rid"])
    elif topic.startswith(POLL_PREFIX):
        query = _query(topic[len(POLL_PREFIX) :])
        if query and query.get("$rid") and query.get("operationId"):
            return Poll(query["$rid"], query["operationId"])
    return None


def response_topic(status: int, rid: str, retry_after: int | None = None) -> str:
    topic = f"$dps/registrations/res/{status}/?$rid={urllib.parse.quote(rid, safe='')}"
    if retry_after is not None:
        topic += f"&retry-after={int(retry_after)}"
    return topic
