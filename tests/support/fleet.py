"""A fleet of device identities for fleet tests and the fleet benchmark: state directories signed by the
test CA, enrolled (enabled, static to the default hub) in DPS through azure-iot-deviceprovisioning's bulk
operation, so the devices only have to boot."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_client.state import StateDir
from support.certs import TestCa

BULK_MAX = 10  # Azure allows at most 10 enrollments per bulk operation


async def enrolled_fleet(ca: TestCa, emulator: Any, root: Path, count: int) -> list[str]:
    """``count`` devices under ``root``, enrolled and enabled; returns their GUIDs."""
    guids = [str(uuid.uuid4()) for _ in range(count)]
    enrollments = []
    for guid in guids:
        key_pem, chain_pem = ca.identity(guid)
        StateDir(root, guid).write_identity(
            key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": guid}, force=False
        )
        leaf = x509.load_pem_x509_certificates(chain_pem)[0].public_bytes(Encoding.PEM).decode()
        enrollments.append(
            {
                "registrationId": guid,
                "deviceId": guid,
                "provisioningStatus": "enabled",
                "allocationPolicy": "static",
                "iotHubs": [emulator.default_hub],
                "attestation": {
                    "type": "x509",
                    "x509": {"clientCertificates": {"primary": {"certificate": leaf}}},
                },
            }
        )
    async with DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    ) as dps:

        async def chunk(start: int) -> None:
            result = await dps.enrollment.run_bulk_operation(
                bulk_operation={"mode": "create", "enrollments": enrollments[start : start + BULK_MAX]}
            )
            assert result["isSuccessful"], result

        starts = list(range(0, count, BULK_MAX))
        for first in range(0, len(starts), 8):
            await asyncio.gather(*(chunk(s) for s in starts[first : first + 8]))
    return guids


def fleet_overrides(emulator: Any, **more: Any) -> dict[str, Any]:
    return {
        "id_scope": emulator.id_scope,
        "global_endpoint": emulator.dps_host,
        "trusted_ca_file": str(emulator.ca_path),
        "telemetry_interval_s": 30.0,
        "backoff_initial_s": 0.5,
        "backoff_max_s": 10.0,
        "first_attempt_window_s": 2.0,
        "sdk_timeout_s": 30.0,
        **more,
    }
