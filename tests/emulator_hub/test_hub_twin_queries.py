"""Twin queries through azure-iot-hub's ``query_iot_hub`` (unchanged) on an in-process hub REST app:
WHERE on tags and properties, paging with ``x-ms-continuation``, COUNT() and GROUP BY (read raw: the SDK
turns every row into a Twin model, which has no field for a count), and a clear 400 for what is not
emulated."""

from __future__ import annotations

import pytest
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError
from test_hub_rest_sdk import _send, call, hub_rest  # noqa: F401 - `hub_rest` is a fixture

from azure_iot_emulator.sas import generate_sas

FLEET = {  # device id -> (tags, desired)
    "q-1": ({"site": "north", "line": 1}, {"rate": 5}),
    "q-2": ({"site": "north", "line": 2}, {"rate": 10}),
    "q-3": ({"site": "south", "line": 1}, {"rate": 15}),
    "q-4": ({"site": "south"}, {"rate": 20}),
    "q-5": ({"site": "east", "line": 3}, {}),
}


@pytest.fixture
async def fleet(hub_rest):  # noqa: F811
    rm = IoTHubRegistryManager.from_connection_string(hub_rest["conn"])
    for device_id, (tags, desired) in FLEET.items():
        await call(rm.create_device_with_x509, device_id, "AB" * 20, None, "enabled")
        twin = Twin(tags=tags, properties=TwinProperties(desired=desired))
        await call(rm.update_twin, device_id, twin, "*")
    return rm, hub_rest


async def query_all(rm, text: str, page: int | None = None) -> tuple[list[str], int]:
    """Every page of a query through the SDK: (device ids, number of pages)."""
    ids, pages, token = [], 0, None
    while True:
        result = await call(rm.query_iot_hub, QuerySpecification(query=text), token, page)
        pages += 1
        ids += [twin.device_id for twin in result.items]
        token = result.continuation_token
        if not token:
            return ids, pages


async def test_where_on_tags_and_properties_with_paging(fleet):
    rm, _ = fleet
    assert await query_all(rm, "SELECT * FROM devices WHERE tags.site = 'north'") == (["q-1", "q-2"], 1)
    text = "SELECT * FROM devices WHERE tags.site = 'south' OR properties.desired.rate <= 10"
    assert await query_all(rm, text, page=2) == (["q-1", "q-2", "q-3", "q-4"], 2)
    text = "SELECT * FROM devices WHERE properties.desired.rate > 5 AND NOT tags.line = 1"
    assert await query_all(rm, text, page=1) == (["q-2"], 1)
    assert await query_all(rm, "SELECT * FROM devices WHERE IS_DEFINED(tags.line)", page=3) == (
        ["q-1", "q-2", "q-3", "q-5"], 2
    )


async def raw_query(hub_rest, text: str) -> tuple[int, object]:  # noqa: F811
    endpoint = f"{hub_rest['host']}:{hub_rest['port']}"
    auth = generate_sas(endpoint, hub_rest["key"], policy="iothubowner", expiry=2**31 - 1)
    status, _headers, body = await call(
        _send, "POST", f"https://{endpoint}/devices/query?api-version=2021-04-12",
        str(hub_rest["pki"].ca_path), {"Authorization": auth}, {"query": text},
    )
    return status, body


async def test_count_and_group_by(fleet):
    _, hub_rest = fleet  # noqa: F811
    text = "SELECT COUNT() AS numberOfDevices FROM devices WHERE tags.site = 'south'"
    status, rows = await raw_query(hub_rest, text)
    assert (status, rows) == (200, [{"numberOfDevices": 2}])
    status, rows = await raw_query(
        hub_rest, "SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site"
    )
    assert status == 200
    assert sorted(rows, key=lambda r: r["site"]) == [
        {"site": "east", "n": 1}, {"site": "north", "n": 2}, {"site": "south", "n": 2}
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "SELECT * FROM devices ORDER BY deviceId",
        "SELECT * FROM devices.modules",
        "SELECT * FROM devices WHERE STARTSWITH(deviceId, 'q')",
        "SELECT * FROM devices WHERE tags.site = 'north' AND",
        "SELECT AVG(properties.desired.rate) FROM devices",
    ],
)
async def test_unsupported_syntax_is_a_clear_400(fleet, text):
    rm, _ = fleet
    with pytest.raises(HttpOperationError) as refused:
        await call(rm.query_iot_hub, QuerySpecification(query=text))
    assert refused.value.response.status_code == 400
    assert refused.value.response.headers["iothub-errorcode"] == "ArgumentInvalid"
    assert "unsupported or malformed query" in refused.value.response.json()["Message"]
