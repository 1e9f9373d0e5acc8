"""What DPS tests do as a device: the X.509 individual enrollment a device needs, and one registration
with azure-iot-device's ProvisioningDeviceClient (aio), unchanged."""

from __future__ import annotations

import asyncio

from azure.iot.device import X509
from azure.iot.device.aio import ProvisioningDeviceClient

REGISTER_TIMEOUT = 60


def x509_enrollment(reg_id: str, pem: str, **extra) -> dict:
    return {
        "registrationId": reg_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
        **extra,
    }


async def sdk_register(emu, reg_id: str, cert, timeout: float = REGISTER_TIMEOUT):
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=emu.dps_host,
        registration_id=reg_id,
        id_scope=emu.id_scope,
        x509=X509(str(cert.cert_path), str(cert.key_path)),
        server_verification_cert=emu.ca_pem,
    )
    return await asyncio.wait_for(client.register(), timeout)
