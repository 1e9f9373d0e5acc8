"""Bad input over a real TLS socket to a real emulator process: every malformed or forbidden thing
closes (or refuses) only its own connection, writes nothing, and a healthy device on another connection
keeps working throughout.  Also the DPS topic contract seen from a raw client."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid

import pytest
from azure.core.exceptions import ResourceNotFoundError
from conftest import running_emulator
from support.dps_device import x509_enrollment
from support.mqtt_client import MqttTestClient, client_context

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.codec import encode

API = "api-version=2019-03-31&ClientVersion=raw-test"


@pytest.fixture(scope="module")
def module_emulator(tmp_path_factory):
    """Azure's asynchronous registration (202 assigning, then polls), the emulator's default: the raw
    client checks its topics."""
    with running_emulator(tmp_path_factory.mktemp("emulator") / "data", ["--assignment-delay", "1"]) as emu:
        yield emu


@pytest.fixture
async def enrolled(module_emulator, dps, ca, tmp_path):
    """(registration id, device cert) of an enabled enrollment."""
    reg_id = f"raw-{uuid.uuid4().hex[:10]}"
    cert = ca.issue(tmp_path, reg_id)
    await dps.enrollment.create_or_update(id=reg_id, enrollment=x509_enrollment(reg_id, cert.pem))
    return reg_id, cert


async def dps_connect(emu, reg_id, cert, **kwargs):
    ctx = (
        client_context(emu.ca_pem, str(cert.cert_path), str(cert.key_path))
        if cert
        else client_context(emu.ca_pem)
    )
    return await MqttTestClient.connect(
        emu.dps_host,
        ctx,
        client_id=kwargs.pop("client_id", reg_id),
        username=kwargs.pop("username", f"{emu.id_scope}/registrations/{reg_id}/{API}"),
        **kwargs,
    )


@pytest.mark.slow
async def test_raw_registration_topics_rid_and_polling(module_emulator, enrolled):
    reg_id, cert = enrolled
    client, ack = await dps_connect(module_emulator, reg_id, cert)
    try:
        assert ack == p.ConnAck(0)
        assert (await client.subscribe("$dps/registrations/res/#")).return_codes == (1,)
        rid = str(uuid.uuid4())
        body = json.dumps({"payload": None, "registrationId": reg_id}, sort_keys=True).encode()
        await client.publish(f"$dps/registrations/PUT/iotdps-register/?$rid={rid}", body)
        response = await client.next_publish()
        # Azure's asynchronous registration: 202 assigning with an operation id and an integer retry-after
        assert response.topic == f"$dps/registrations/res/202/?$rid={rid}&retry-after=3"
        accepted = json.loads(response.payload)
        assert accepted["status"] == "assigning" and accepted["operationId"]

        result = await poll_until_done(client, accepted["operationId"])
        assert result["status"] == "assigned" and result["operationId"] == accepted["operationId"]
        assert result["registrationState"]["deviceId"] == reg_id
        assert result["registrationState"]["assignedHub"] in module_emulator.hub_hosts

        # Polling a finished operation again gives the same answer.
        assert await poll_until_done(client, accepted["operationId"]) == result

        await client.publish(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=x1&operationId=4.nope", b" "
        )
        unknown = await client.next_publish()
        assert unknown.topic == "$dps/registrations/res/404/?$rid=x1"
        assert json.loads(unknown.payload)["errorCode"] == 404203
    finally:
        await client.close()


async def poll_until_done(client: MqttTestClient, op_id: str) -> dict:
    """Poll the operation (as the SDK does) until it is no longer 202; every 202 carries retry-after."""
    while True:
        rid = str(uuid.uuid4())
        await client.publish(
            f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op_id}", b" "
        )
        response = await client.next_publish()
        if response.topic.startswith(f"$dps/registrations/res/202/?$rid={rid}&retry-after="):
            assert int(response.topic.rsplit("=", 1)[1]) >= 1
            assert json.loads(response.payload) == {"operationId": op_id, "status": "assigning"}
            await asyncio.sleep(0.2)
            continue
        assert response.topic == f"$dps/registrations/res/200/?$rid={rid}"
        return json.loads(response.payload)


async def test_non_json_register_body_is_400_and_writes_nothing(module_emulator, enrolled, dps):
    reg_id, cert = enrolled
    client, _ = await dps_connect(module_emulator, reg_id, cert)
    try:
        await client.subscribe("$dps/registrations/res/#")
        for n, body in enumerate([b"not json", b"[1, 2]", json.dumps({"registrationId": "other"}).encode()]):
            await client.publish(f"$dps/registrations/PUT/iotdps-register/?$rid=r{n}", body)
            response = await client.next_publish()
            assert response.topic == f"$dps/registrations/res/400/?$rid=r{n}"
            error = json.loads(response.payload)
            assert error["errorCode"] == 400004 and error["trackingId"] and error["timestampUtc"]
        with pytest.raises(ResourceNotFoundError):
            await dps.device_registration_state.get(id=reg_id)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("kwargs", "use_cert"),
    [
        ({}, False),  # no client certificate for an X.509 registration
        ({"username": "0ne00000000/registrations/{id}/" + API}, True),  # foreign ID scope
        ({"client_id": "someone-else"}, True),  # client id differs from the username
        ({"username": "not-a-known-username"}, True),  # nobody claims it
    ],
)
async def test_refused_at_connack(module_emulator, enrolled, kwargs, use_cert):
    reg_id, cert = enrolled
    kwargs = {k: v.replace("{id}", reg_id) for k, v in kwargs.items()}
    client, ack = await dps_connect(module_emulator, reg_id, cert if use_cert else None, **kwargs)
    try:
        assert ack == p.ConnAck(5)
        assert await client.wait_closed()
    finally:
        await client.close()


def _connect_bytes(reg_id: str, scope: str) -> bytes:
    return encode(p.Connect(reg_id, False, 60, f"{scope}/registrations/{reg_id}/{API}"))


BAD_STREAMS = {
    "bad remaining length": lambda c: b"\x10\xff\xff\xff\xff\x7f",
    "wrong protocol name": lambda c: encode(p.Connect("x", protocol_name="MQTX")),
    "wrong protocol level": lambda c: encode(p.Connect("x", protocol_level=5)),
    "packet over the size limit": lambda c: c + b"\x30\xff\xff\xff\x7f" + b"\x00" * 1024,
    "qos 2 publish": lambda c: (
        c + encode(p.Publish("$dps/registrations/PUT/iotdps-register/?$rid=1", b"{}", 2, 1))
    ),
    "forbidden topic": lambda c: c + encode(p.Publish("devices/x/messages/events/", b"{}", 1, 1)),
    "http request": lambda c: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "second connect": lambda c: c + c,
    "reserved packet type": lambda c: c + b"\xf0\x00",
}


@pytest.mark.parametrize("name", list(BAD_STREAMS))
async def test_bad_streams_close_only_their_connection(module_emulator, enrolled, name, ca, tmp_path):
    reg_id, cert = enrolled
    healthy, ack = await dps_connect(module_emulator, reg_id, cert)
    assert ack == p.ConnAck(0)
    await healthy.subscribe("$dps/registrations/res/#")

    other_id = f"bad-{uuid.uuid4().hex[:8]}"
    other_cert = ca.issue(tmp_path, other_id)
    ctx = client_context(module_emulator.ca_pem, str(other_cert.cert_path), str(other_cert.key_path))
    bad = await MqttTestClient.open(module_emulator.dps_host, ctx)
    try:
        bad.send_raw(BAD_STREAMS[name](_connect_bytes(other_id, module_emulator.id_scope)))
        assert await bad.wait_closed(15), f"server kept the connection open after {name}"
        if name == "wrong protocol level":
            assert await bad.expect(p.ConnAck) == p.ConnAck(1)

        # The healthy device on its own connection is unaffected.
        body = json.dumps({"payload": None, "registrationId": reg_id}).encode()
        await healthy.publish("$dps/registrations/PUT/iotdps-register/?$rid=ok", body)
        response = await healthy.next_publish()
        assert response.topic == "$dps/registrations/res/202/?$rid=ok&retry-after=3"
    finally:
        await bad.close()
        await healthy.close()
    assert module_emulator.running


async def test_truncated_frame_and_plaintext_to_the_tls_port(module_emulator, enrolled):
    reg_id, cert = enrolled
    # A frame cut short, then the client goes away.
    ctx = client_context(module_emulator.ca_pem, str(cert.cert_path), str(cert.key_path))
    cut = await MqttTestClient.open(module_emulator.dps_host, ctx)
    cut.send_raw(_connect_bytes(reg_id, module_emulator.id_scope)[:7])
    await asyncio.sleep(0.1)
    await cut.close()
    # Plain TCP garbage where TLS is expected.
    reader, writer = await asyncio.open_connection(module_emulator.dps_host, 8883)
    writer.write(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00" * 4)
    assert await asyncio.wait_for(reader.read(), 10) is not None  # closed (alert or EOF)
    writer.close()
    # Still serving.
    client, ack = await dps_connect(module_emulator, reg_id, cert)
    assert ack == p.ConnAck(0)
    await client.close()


async def test_only_the_dps_response_filter_may_be_subscribed(module_emulator, enrolled):
    reg_id, cert = enrolled
    client, _ = await dps_connect(module_emulator, reg_id, cert)
    try:
        client.send(p.Subscribe(7, (("$dps/registrations/res/#", 1), ("#", 0), ("devices/+/x", 1))))
        assert await client.expect(p.SubAck) == p.SubAck(7, (1, 0x80, 0x80))
    finally:
        await client.close()


async def test_tls_12_and_13_are_both_served(module_emulator, enrolled):
    reg_id, cert = enrolled
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context(module_emulator.ca_pem, str(cert.cert_path), str(cert.key_path))
        ctx.minimum_version = ctx.maximum_version = version
        client = await MqttTestClient.open(module_emulator.dps_host, ctx)
        client.send_raw(_connect_bytes(reg_id, module_emulator.id_scope))
        assert await client.expect(p.ConnAck) == p.ConnAck(0)  # DPS sessions are never persistent
        expected = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert client.writer.get_extra_info("ssl_object").version() == expected
        await client.close()
