"""The telemetry the emulator's hubs received, read as any client of the emulator reads it: over each hub's
service REST API (the emulator's ``GET /messages?after=<sequenceNumber>`` extension), with the hub's
``iothubowner`` key and the CA from the emulator's ``connection.json`` - never its database.

    feed = HubFeed(emulator.connection)
    new = await feed.read_new()      # every hub's messages since the last call, oldest first per hub
    await feed.close()

A hub that cannot be read now (the emulator restarting, a timeout) is skipped and asked again from the same
point next time; ``unreachable`` names the hubs the last call could not read, and why.
"""

from __future__ import annotations

import base64
import binascii
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

import jsonsafe
from azure_iot_emulator.connection_info import ConnectionInfo, HubConnection
from azure_iot_emulator.sas import generate_sas

PAGE = 500  # messages per request (the emulator answers at most 1000)
TOKEN_LIFETIME_S = 3600
API_VERSION = "2021-04-12"


@dataclass(frozen=True)
class ReceivedMessage:
    seq: int  # the hub's sequenceNumber (increasing)
    hub: str
    device_id: str
    enqueued_time: str  # ISO 8601, UTC
    body: bytes

    def body_text(self) -> str | None:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None


def message_from_json(item: object) -> ReceivedMessage:
    """One message of the REST answer; ``ValueError`` when it is not one."""
    if not isinstance(item, Mapping):
        raise ValueError("a message is not a JSON object")
    seq, hub, device, enqueued, body = (
        item.get(k) for k in ("sequenceNumber", "hub", "deviceId", "enqueuedTimeUtc", "bodyBase64")
    )
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("sequenceNumber is not an integer")
    if not all(isinstance(v, str) for v in (hub, device, enqueued, body)):
        raise ValueError("a message lacks hub, deviceId, enqueuedTimeUtc or bodyBase64")
    try:
        raw = base64.b64decode(str(body), validate=True)
    except binascii.Error as exc:
        raise ValueError("bodyBase64 is not base64") from exc
    return ReceivedMessage(seq, str(hub), str(device), str(enqueued), raw)


def _authorization(hub: HubConnection) -> str:
    parts = dict(p.split("=", 1) for p in hub["connection_string"].split(";") if "=" in p)
    return generate_sas(
        hub["host_name"],
        parts["SharedAccessKey"],
        policy=parts.get("SharedAccessKeyName"),
        expiry=int(time.time()) + TOKEN_LIFETIME_S,
    )


class HubFeed:
    def __init__(self, connection: ConnectionInfo, *, page: int = PAGE, timeout_s: float = 10.0) -> None:
        self._hubs = list(connection["hubs"])
        self._page_size = page
        self._tls = ssl.create_default_context(cafile=connection["ca_pem_path"])
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._cursors = {hub["host_name"]: 0 for hub in self._hubs}
        self._session: aiohttp.ClientSession | None = None
        self.unreachable: dict[str, str] = {}

    async def read_new(self) -> list[ReceivedMessage]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        found: list[ReceivedMessage] = []
        self.unreachable = {}
        for hub in self._hubs:
            try:
                found += await self._read_hub(self._session, hub)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.unreachable[hub["host_name"]] = f"{type(exc).__name__}: {exc}"
        return found

    async def _read_hub(self, session: aiohttp.ClientSession, hub: HubConnection) -> list[ReceivedMessage]:
        name = hub["host_name"]
        found: list[ReceivedMessage] = []
        while True:
            page = await self._page(session, hub, self._cursors[name])
            found += page
            if page:
                self._cursors[name] = page[-1].seq
            if len(page) < self._page_size:
                return found

    async def _page(
        self, session: aiohttp.ClientSession, hub: HubConnection, after: int
    ) -> list[ReceivedMessage]:
        params = {"after": str(after), "top": str(self._page_size), "api-version": API_VERSION}
        headers = {"Authorization": _authorization(hub)}
        url = f"{hub['rest_endpoint']}/messages"
        async with session.get(url, params=params, headers=headers, ssl=self._tls) as response:
            if response.status != 200:
                raise ValueError(f"{url} answered {response.status}")
            answer: Any = jsonsafe.loads(await response.read())
        if not isinstance(answer, list):
            raise ValueError(f"{url} answered no list")
        return [message_from_json(item) for item in answer]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
