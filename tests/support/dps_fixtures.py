"""Fixtures the DPS tests share (registered in tests/conftest.py): a device CA, Microsoft's DPS service
client on the module's emulator and azure-iot-hub's registry manager for each of its hubs."""

from __future__ import annotations

import pytest
from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient
from azure.iot.hub import IoTHubRegistryManager

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


@pytest.fixture
def hubs(module_emulator, monkeypatch):
    """{hub host: IoTHubRegistryManager} for the module's emulator."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(module_emulator.ca_path))
    return {
        host: IoTHubRegistryManager.from_connection_string(module_emulator.hub_connection_string(host))
        for host in module_emulator.hub_hosts
    }
