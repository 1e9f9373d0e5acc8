"""Shared helpers for the portal tests: the real stack (emulator process, factory_svc and activation_svc gRPC
servers from tests/enrollment/provisioning_env.py) plus the portal's settings pointing at activation_svc over
mTLS, and small HTML helpers."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from enrollment.provisioning_env import (
    DeviceFiles,
    OemTls,
    activation_env,
    connection_file,
    dps_enrollment,
    factory_env,
    mint,
    running_activation,
    running_factory,
)
from support.shipment import TEMPLATE

from activation_svc.app import ActivationApp
from activation_svc.portal.app import create_app
from activation_svc.portal.settings import PortalSettings, load_portal_settings
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from devprov.v1 import factory_service_pb2_grpc as fpb_grpc

META = {"tags": {"customer": "acme", "line": {"hall": 3}}, "properties": {"desired": {"interval_s": 5}}}
CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "portal"


def portal_env(address: str, tls: OemTls, emulator, **extra: str) -> dict[str, str]:
    """The portal as an operator would configure it: mTLS to activation_svc, hubs from the same cloud
    settings (the emulator's connection.json) the service reads."""
    return {
        "ACTIVATION_PORTAL_TARGET": address,
        "ACTIVATION_PORTAL_CA_FILE": str(tls.ca_file),
        "ACTIVATION_PORTAL_CERT_FILE": str(tls.portal_cert),
        "ACTIVATION_PORTAL_KEY_FILE": str(tls.portal_key),
        "ACTIVATION_PORTAL_PORT": "0",
        "ACTIVATION_CLOUD_EMULATOR_CONNECTION_FILE": str(connection_file(emulator)),
        **extra,
    }


@dataclass
class PortalStack:
    emulator: object
    factory: fpb_grpc.FactoryServiceStub
    activation: apb_grpc.ActivationServiceStub
    activation_app: ActivationApp
    tls: OemTls
    settings: PortalSettings
    folder: Path
    factory_app: object = None

    async def enrolled(self) -> tuple[DeviceFiles, str]:
        """A freshly minted device, enrolled (disabled) through factory_svc, and its activation code."""
        device = await mint(self.factory, str(uuid.uuid4()), self.folder / "devices")
        reply = await self.factory.Enroll(
            fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        assert reply.outcome == fpb.ENROLL_OUTCOME_CREATED and reply.activation_code
        return device, reply.activation_code

    async def status(self, device_id: str, code: str) -> apb.GetDeviceStatusResponse:
        return await self.activation.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device_id, activation_code=code)
        )

    async def enrollment(self, device_id: str) -> dict:
        found = await dps_enrollment(self.emulator, device_id)
        assert found is not None
        return found


@contextlib.asynccontextmanager
async def portal_stack(
    folder: Path, emulator, *, service_env: Mapping[str, str] | None = None, **portal_extra: str
) -> AsyncIterator[PortalStack]:
    """``service_env``: more settings for activation_svc (e.g. ACTIVATION_TEMPLATES)."""
    tls = OemTls.create(folder / "oem-tls")
    async with (
        running_factory(factory_env(folder, emulator)) as (factory_app, factory),
        running_activation(activation_env(folder, emulator, tls, **(service_env or {})), tls) as (
            app,
            activation,
        ),
    ):
        address = app.grpc_address  # type: ignore[attr-defined]
        settings = load_portal_settings(env=portal_env(address, tls, emulator, **portal_extra))
        yield PortalStack(emulator, factory, activation, app, tls, settings, folder, factory_app)


@contextlib.asynccontextmanager
async def templated_portal(
    folder: Path, emulator, **both: str
) -> AsyncIterator[tuple[PortalStack, TestClient]]:
    """The stack with the tests' OEM template (tests/support/shipment.py) and a client of its portal;
    ``both``: settings the service and the portal read alike (ACTIVATION_DEVICE_IDS...)."""
    template = folder / "acme.schema.json"
    template.write_text(json.dumps(TEMPLATE))
    service_env = {"ACTIVATION_TEMPLATES": f"acme={template}", **both}
    async with (
        portal_stack(folder, emulator, service_env=service_env, **both) as stack,
        TestClient(TestServer(create_app(stack.settings))) as client,
    ):
        yield stack, client


_HIDDEN = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')


def hidden_fields(page: str) -> dict[str, str]:
    return dict(_HIDDEN.findall(page))


def activate_form(
    hidden: Mapping[str, str], device_id: str, code: str, metadata: str, hub: str = ""
) -> dict[str, str]:
    return {**hidden, "device_id": device_id, "activation_code": code, "metadata": metadata, "hub": hub}


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 20_000


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Any]:
    """Debian's Chromium, headless, as a phone (a fresh profile folder), driven by Playwright."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=PHONE,
            is_mobile=True,
            has_touch=True,
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            await context.close()


def chromium_unavailable() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if CHROMIUM.exists():
        return None
    note = REPO / ".venv" / "chromium-unavailable"
    why = note.read_text().strip() if note.exists() else "`make browser` has not run"
    return f"{CHROMIUM} is missing ({why}); `make browser` installs Debian's chromium"
