"""What DPS tests do as a device: the X.509 individual enrollment a device needs, and one registration
with azure-iot-device's ProvisioningDeviceClient (aio), unchanged; the fields of a registration state as
the service API shows it."""

from __future__ import annotations

import asyncio

from azure.iot.device import X509
from azure.iot.device.aio import ProvisioningDeviceClient

from device_client.dps import release

REGISTER_TIMEOUT = 60

# Azure's DeviceRegistrationState, what the service API shows of a registration (GET /registrations/{id}, a
# group's query, an individual enrollment's registrationState): unlike the device's answer, no `x509`,
# `symmetricKey` or `tpm` (the REST reference, the Node and Python service SDKs' models).
SERVICE_REGISTRATION_STATE = frozenset(
    {
        "registrationId",
        "createdDateTimeUtc",
        "assignedHub",
        "deviceId",
        "status",
        "substatus",
        "errorCode",
        "errorMessage",
        "lastUpdatedDateTimeUtc",
        "etag",
        "payload",
    }
)


def x509_enrollment(reg_id: str, pem: str, **extra) -> dict:
    return {
        "registrationId": reg_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
        **extra,
    }


async def sdk_register(emu, reg_id: str, cert, timeout: float = REGISTER_TIMEOUT, payload=None):
    """One registration; ``payload``: the SDK's ``provisioning_payload`` (sent to a custom allocation
    webhook)."""
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=emu.dps_host,
        registration_id=reg_id,
        id_scope=emu.id_scope,
        x509=X509(str(cert.cert_path), str(cert.key_path)),
        server_verification_cert=emu.ca_pem,
    )
    if payload is not None:
        client.provisioning_payload = payload
    return await register_once(client, timeout)


async def register_once(client: ProvisioningDeviceClient, timeout: float = REGISTER_TIMEOUT):
    """``client.register()``, then the client closed whatever the outcome.  The SDK closes its connection
    itself only after "assigned" and has no public close: a refused client stays connected and reconnects
    when it is dropped, so a later client with the same registration id would be kicked out by it, again
    and again (the broker lets one connection per client id live)."""
    result = None
    try:
        result = await asyncio.wait_for(client.register(), timeout)
        return result
    finally:
        if result is None or result.status != "assigned":
            await release(client, 5.0)
