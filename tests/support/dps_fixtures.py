"""Fixtures the DPS tests share (registered in tests/conftest.py): a device CA and Microsoft's DPS service
client on the module's emulator."""

from __future__ import annotations

import pytest
from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

from support.certs import TestCa


@pytest.fixture(scope="module")
def ca():
    return TestCa()


@pytest.fixture
async def dps(module_emulator):
    client = DeviceProvisioningClient.from_connection_string(
        module_emulator.dps_connection_string, connection_verify=str(module_emulator.ca_path)
    )
    async with client:
        yield client
