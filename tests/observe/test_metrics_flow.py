"""/metrics after a real flow: mint -> enroll -> activate -> DPS registration -> telemetry, through the real
servers and an emulator process, with Microsoft's SDKs on the device side.  Every counter moves by exactly
what the flow did; refusals are counted under their ErrorInfo reason; the text parses with
prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import pytest
from azure.iot.device import Message
from conftest import running_emulator
from enrollment.provisioning_env import (
    SDK_TIMEOUT,
    OemTls,
    activate_request,
    activation_env,
    factory_env,
    failure,
    hub_session,
    mint,
    register,
    running_activation,
    running_factory,
)
from support.metrics import Scrape, scrape
from support.parties import party

from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from provkit.channels import ChannelSecurity, create_channel
from provkit.context import Role

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

FACTORY = "devprov.v1.FactoryService"
ACTIVATION = "devprov.v1.ActivationService"
BODIES = ['{"t": 21.5}', '{"t": 21.75, "rpm": 1200}', '{"t": 22}']


@pytest.fixture
def emulator(tmp_path):
    """An emulator process serving its own /metrics on a free loopback port."""
    with running_emulator(tmp_path / "emulator", extra_args=["--metrics-listen", "127.0.0.1:0"]) as emu:
        yield emu


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def send_telemetry(emulator, device, hub: str, during) -> None:
    """Connect as the device, send ``BODIES``, run ``during()`` while connected, disconnect."""
    async with hub_session(emulator, device, hub) as client:
        for body in BODIES:
            await asyncio.wait_for(client.send_message(Message(body)), SDK_TIMEOUT)
        await during()


async def test_counters_move_by_exactly_what_the_flow_did(tmp_path, emulator):
    tls = OemTls.create(tmp_path / "oem-tls")
    listen = {"FACTORY_METRICS_LISTEN": "127.0.0.1:0"}
    async with (
        running_factory(factory_env(tmp_path, emulator, **listen)) as (factory_app, factory),
        running_activation(
            activation_env(tmp_path, emulator, tls, ACTIVATION_METRICS_LISTEN="127.0.0.1:0"), tls
        ) as (activation_app, activation),
    ):
        urls = {
            "factory": factory_app.observe.metrics_url,
            "activation": activation_app.observe.metrics_url,
            "emulator": emulator.connection["metrics_url"],
        }
        assert all(url.startswith("http://127.0.0.1:") for url in urls.values()), urls
        before = {name: await scrape(url) for name, url in urls.items()}

        device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
        enrolled = await factory.Enroll(
            fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        hub = emulator.hub_hosts[1]
        metadata = json.dumps({"tags": {"line": "a"}})
        await activation.Activate(activate_request(device.device_id, enrolled.activation_code, metadata, hub))
        # refused by the domain (wrong code) and by the access table (a factory party may not activate)
        wrong = activate_request(device.device_id, "0000-0000-0000-0000", metadata)
        denied = await failure(activation.Activate(wrong))
        assert denied.reason == "ACTIVATION_DENIED"
        stranger = party(tls.authority, Role.FACTORY, "plant-1", "mes")
        stranger.write(tmp_path / "mes.pem", tmp_path / "mes.key")
        security = ChannelSecurity.from_files(tls.ca_file, tmp_path / "mes.pem", tmp_path / "mes.key")
        async with create_channel(activation_app.grpc_address, security) as channel:
            gate = await failure(
                apb_grpc.ActivationServiceStub(channel).Activate(
                    activate_request(device.device_id, enrolled.activation_code, metadata)
                )
            )
        assert gate.code == grpc.StatusCode.PERMISSION_DENIED and gate.reason == "CALLER_NOT_AUTHORIZED"
        registration = await register(emulator, device)
        assert registration.status == "assigned" and registration.registration_state.assigned_hub == hub

        connected: list[Scrape] = []

        async def while_connected() -> None:
            connected.append(await scrape(urls["emulator"]))

        await send_telemetry(emulator, device, hub, while_connected)
        after = {name: await scrape(url) for name, url in urls.items()}

    f0, f1 = before["factory"], after["factory"]
    handled = "grpc_server_handled_total"
    assert delta(f1, f0, handled, grpc_service=FACTORY, grpc_method="MintCertificate", grpc_code="OK") == 1
    assert delta(f1, f0, handled, grpc_service=FACTORY, grpc_method="Enroll", grpc_code="OK") == 1
    assert f1.total(handled) - f0.total(handled) == 2
    seconds = "grpc_server_handling_seconds_count"
    assert delta(f1, f0, seconds, grpc_service=FACTORY, grpc_method="MintCertificate") == 1
    minted = "devprov_certificates_minted_total"
    assert delta(f1, f0, minted, mode="server-generated", key_type="ec-p256") == 1
    assert f1.total(minted) - f0.total(minted) == 1
    assert delta(f1, f0, "devprov_enrollments_total", outcome="created") == 1
    assert f1.total("devprov_enrollments_total") - f0.total("devprov_enrollments_total") == 1
    assert f1.total("devprov_refusals_total") == f0.total("devprov_refusals_total")
    dps_calls = f1.total("devprov_cloud_calls_total", service="dps") - f0.total("devprov_cloud_calls_total")
    assert dps_calls >= 1
    assert f1.total("devprov_cloud_calls_total", outcome="ok") - f0.total(
        "devprov_cloud_calls_total", outcome="ok"
    ) == dps_calls
    assert f1.value("devprov_outbox_depth") == 0 and f1.value("devprov_outbox_oldest_age_seconds") == 0

    a0, a1 = before["activation"], after["activation"]
    assert a1.series("devprov_outbox_depth") == []  # the factory's series, never exported here
    assert a1.series("devprov_certificates_revoked_total") == []
    assert delta(a1, a0, handled, grpc_service=ACTIVATION, grpc_method="Activate", grpc_code="OK") == 1
    denied_calls = delta(
        a1, a0, handled, grpc_service=ACTIVATION, grpc_method="Activate", grpc_code="PERMISSION_DENIED"
    )
    assert denied_calls == 2
    refusals = "devprov_refusals_total"
    assert delta(a1, a0, refusals, grpc_method="Activate", reason="ACTIVATION_DENIED") == 1
    assert delta(a1, a0, refusals, grpc_method="Activate", reason="CALLER_NOT_AUTHORIZED") == 1
    assert a1.total("devprov_refusals_total") - a0.total("devprov_refusals_total") == 2
    assert delta(a1, a0, "devprov_activations_total", outcome="enrollment") == 1
    assert delta(a1, a0, "devprov_activations_total", outcome="refused") == 1  # the gate's never reached it
    assert a1.total("devprov_activations_total") - a0.total("devprov_activations_total") == 2
    calls = "devprov_cloud_calls_total"
    assert delta(a1, a0, calls, service="dps", operation="update_enrollment", outcome="ok") == 1
    assert a1.total("devprov_cloud_throttled_total") == 0

    e0, e1 = before["emulator"], after["emulator"]
    registrations = "iot_emulator_dps_registrations_total"
    assert delta(e1, e0, registrations, result="assigned") == 1
    assert e1.total(registrations) - e0.total(registrations) == 1
    messages = "iot_emulator_telemetry_messages_total"
    assert delta(e1, e0, messages, hub=hub) == len(BODIES)
    assert e1.total(messages) - e0.total(messages) == len(BODIES)
    sent_bytes = sum(len(b.encode()) for b in BODIES)
    assert delta(e1, e0, "iot_emulator_telemetry_bytes_total", hub=hub) == sent_bytes
    assert e1.value("iot_emulator_telemetry_commit_seconds_count") >= 1
    assert connected[0].value("iot_emulator_connected_devices", hub=hub) == 1
    assert e1.value("iot_emulator_connected_devices", hub=hub) == 0
    assert e1.value("iot_emulator_sqlite_bytes") > 0

    # bounded labels: no series anywhere names the device
    for name in after:
        assert device.device_id not in after[name].text


async def test_a_rotated_code_is_counted_once_and_its_replay_not_at_all(tmp_path, emulator):
    async with running_factory(
        factory_env(tmp_path, emulator, FACTORY_METRICS_LISTEN="127.0.0.1:0")
    ) as (factory_app, factory):
        url = factory_app.observe.metrics_url
        device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
        await factory.Enroll(fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem))
        before = await scrape(url)
        rotate = fpb.RotateActivationCodeRequest(device_id=device.device_id, request_id=str(uuid.uuid4()))
        first = await factory.RotateActivationCode(rotate)
        again = await factory.RotateActivationCode(rotate)
        after = await scrape(url)
    assert not first.replayed and again.replayed and again.activation_code == first.activation_code
    rotated = "devprov_activation_codes_rotated_total"
    assert after.total(rotated) - before.total(rotated) == 1
