"""The DPS service REST API with Microsoft's azure-iot-deviceprovisioning aio client, unchanged, against
a real emulator process."""

from __future__ import annotations

import base64
import uuid

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError


def new_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def x509_enrollment(reg_id: str, certificate: str, **extra) -> dict:
    return {
        "registrationId": reg_id,
        "attestation": {
            "type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": certificate}}},
        },
        **extra,
    }


async def test_create_get_update_with_etag_and_conflicts(dps, ca, tmp_path, module_emulator):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    hub = module_emulator.hub_hosts[1]
    created = await dps.enrollment.create_or_update(
        id=reg_id,
        enrollment=x509_enrollment(
            reg_id,
            cert.pem,
            provisioningStatus="disabled",
            iotHubHostName=hub,
            initialTwin={"tags": {"line": "A"}, "properties": {"desired": {"fw": "1.0"}}},
            optionalDeviceInformation={"model": "c-100"},
        ),
    )
    info = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["sha1Thumbprint"] == cert.sha1 and info["sha256Thumbprint"] == cert.sha256
    assert info["subjectName"] == f"CN={reg_id}" and info["issuerName"] == "CN=test device CA"
    assert info["version"] == 3 and info["serialNumber"] == format(cert.certificate.serial_number, "X")
    assert created["provisioningStatus"] == "disabled" and created["iotHubHostName"] == hub
    assert created["reprovisionPolicy"] == {"updateHubAssignment": True, "migrateDeviceData": True}
    assert created["capabilities"] == {"iotEdge": False}
    assert created["optionalDeviceInformation"] == {"model": "c-100"}
    assert created["createdDateTimeUtc"].endswith("Z") and created["etag"]

    fetched = await dps.enrollment.get(id=reg_id)
    assert fetched == created

    # Creating again without If-Match: 409, nothing changes.
    with pytest.raises(ResourceExistsError):
        await dps.enrollment.create_or_update(id=reg_id, enrollment=x509_enrollment(reg_id, cert.pem))
    # Wrong etag: 412, nothing changes.
    with pytest.raises(HttpResponseError) as info412:
        await dps.enrollment.create_or_update(
            id=reg_id, enrollment={**fetched, "provisioningStatus": "enabled"}, if_match="not-the-etag"
        )
    assert info412.value.status_code == 412
    assert (await dps.enrollment.get(id=reg_id))["etag"] == created["etag"]

    # The fetched record sent back with its etag: updated, new etag, created time kept.
    updated = await dps.enrollment.create_or_update(
        id=reg_id, enrollment={**fetched, "provisioningStatus": "enabled"}, if_match=fetched["etag"]
    )
    assert updated["provisioningStatus"] == "enabled"
    assert updated["etag"] != created["etag"]
    assert updated["createdDateTimeUtc"] == created["createdDateTimeUtc"]
    assert updated["initialTwin"] == {"tags": {"line": "A"}, "properties": {"desired": {"fw": "1.0"}}}
    # `*` overwrites unconditionally.
    star = await dps.enrollment.create_or_update(
        id=reg_id, enrollment=x509_enrollment(reg_id, cert.pem), if_match="*"
    )
    assert "initialTwin" not in star

    # Delete with a stale etag: 412; with the current one: gone.
    with pytest.raises(HttpResponseError) as del412:
        await dps.enrollment.delete(id=reg_id, if_match=created["etag"])
    assert del412.value.status_code == 412
    await dps.enrollment.delete(id=reg_id, if_match=star["etag"])
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment.get(id=reg_id)
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment.delete(id=reg_id)


async def test_certificate_as_base64_der_and_attestation_mechanism(dps, ca, tmp_path):
    reg_id = new_id()
    cert = ca.issue(tmp_path, reg_id)
    der_b64 = base64.b64encode(cert.der).decode()
    created = await dps.enrollment.create_or_update(id=reg_id, enrollment=x509_enrollment(reg_id, der_b64))
    assert (
        created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha1Thumbprint"] == cert.sha1
    )
    mechanism = await dps.enrollment.get_attestation_mechanism(id=reg_id)
    assert mechanism["type"] == "x509"
    assert mechanism["x509"]["clientCertificates"]["primary"]["info"]["sha256Thumbprint"] == cert.sha256


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("attestation"),
        lambda e: e["attestation"]["x509"]["clientCertificates"]["primary"].update(certificate="not a cert"),
        lambda e: e["attestation"]["x509"]["clientCertificates"]["primary"].update(
            certificate="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
        ),
        lambda e: e.update(provisioningStatus="maybe"),
        lambda e: e.update(iotHubHostName="not-linked.example"),
        lambda e: e.update(initialTwin=["not", "an", "object"]),
        lambda e: e.update(registrationId="someone-else"),
        lambda e: e["attestation"].update(type="magic"),
    ],
)
async def test_bad_enrollments_are_400_and_write_nothing(dps, ca, tmp_path, mutate):
    reg_id = new_id()
    body = x509_enrollment(reg_id, ca.issue(tmp_path, reg_id).pem)
    mutate(body)
    with pytest.raises(HttpResponseError) as info:
        await dps.enrollment.create_or_update(id=reg_id, enrollment=body)
    assert info.value.status_code == 400
    assert info.value.response.json()["errorCode"] // 1000 == 400
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment.get(id=reg_id)


async def test_bulk_create_ten_then_conflicts_per_item_then_delete(dps, ca, tmp_path):
    ids = [new_id("bulk") for _ in range(10)]
    enrollments = [x509_enrollment(i, ca.issue(tmp_path, i).pem) for i in ids]
    result = await dps.enrollment.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollments": enrollments}
    )
    assert result == {"isSuccessful": True, "errors": []}
    for reg_id in ids:
        assert (await dps.enrollment.get(id=reg_id))["registrationId"] == reg_id

    # Creating them again: HTTP 200 with one error per item.
    again = await dps.enrollment.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollments": enrollments[:3]}
    )
    assert again["isSuccessful"] is False
    assert [e["registrationId"] for e in again["errors"]] == ids[:3]
    assert all(e["errorCode"] == 409201 for e in again["errors"])

    # updateIfMatchETag with one stale etag: only that item fails.
    current = [await dps.enrollment.get(id=i) for i in ids[:2]]
    current[0]["provisioningStatus"] = "disabled"
    current[1]["provisioningStatus"] = "disabled"
    current[1]["etag"] = "stale"
    mixed = await dps.enrollment.run_bulk_operation(
        bulk_operation={"mode": "updateIfMatchETag", "enrollments": current}
    )
    assert [e["registrationId"] for e in mixed["errors"]] == [ids[1]]
    assert (await dps.enrollment.get(id=ids[0]))["provisioningStatus"] == "disabled"
    assert (await dps.enrollment.get(id=ids[1]))["provisioningStatus"] == "enabled"

    deleted = await dps.enrollment.run_bulk_operation(
        bulk_operation={"mode": "delete", "enrollments": [{"registrationId": i} for i in ids]}
    )
    assert deleted["isSuccessful"] is True
    for reg_id in ids:
        with pytest.raises(ResourceNotFoundError):
            await dps.enrollment.get(id=reg_id)


async def test_bulk_over_ten_items_or_bad_mode_is_400_and_writes_nothing(dps, ca, tmp_path):
    ids = [new_id("big") for _ in range(11)]
    cert = ca.issue(tmp_path, "shared").pem
    for body in (
        {"mode": "create", "enrollments": [x509_enrollment(i, cert) for i in ids]},
        {"mode": "upsert", "enrollments": [x509_enrollment(ids[0], cert)]},
        {"mode": "create", "enrollments": []},
    ):
        with pytest.raises(HttpResponseError) as info:
            await dps.enrollment.run_bulk_operation(bulk_operation=body)
        assert info.value.status_code == 400
    for reg_id in ids:
        with pytest.raises(ResourceNotFoundError):
            await dps.enrollment.get(id=reg_id)


async def test_query_pages_through_everything(dps, ca, tmp_path):
    prefix = f"q{uuid.uuid4().hex[:6]}"
    ids = sorted(f"{prefix}-{n:02d}" for n in range(7))
    cert = ca.issue(tmp_path, "q").pem
    await dps.enrollment.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollments": [x509_enrollment(i, cert) for i in ids]}
    )
    pages = []
    pager = await dps.enrollment.query(query_specification={"query": "*"}, top=3)
    async for page in pager.by_page():
        pages.append([item["registrationId"] async for item in page])
    assert all(len(page) <= 3 for page in pages)
    seen = [reg_id for page in pages for reg_id in page]
    assert len(seen) == len(set(seen))  # no duplicates across pages
    assert [i for i in seen if i.startswith(prefix)] == ids
    assert len(pages) >= 3


async def test_registration_state_of_an_unknown_device_is_404(dps):
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.get(id=new_id())
    with pytest.raises(ResourceNotFoundError):
        await dps.device_registration_state.delete(id=new_id())


@pytest.mark.parametrize(
    "twin",
    [
        {"tags": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}},  # deeper than the hub allows
        {"properties": {"desired": {"big": "x" * 40_000}}},  # over the desired-properties size limit
        {"tags": {"has.dot": 1}},
    ],
)
async def test_initial_twin_over_hub_limits_is_refused_at_enrollment(dps, ca, tmp_path, twin):
    reg_id = new_id()
    with pytest.raises(HttpResponseError) as info:
        await dps.enrollment.create_or_update(
            id=reg_id, enrollment=x509_enrollment(reg_id, ca.issue(tmp_path, reg_id).pem, initialTwin=twin)
        )
    assert info.value.status_code == 400
    with pytest.raises(ResourceNotFoundError):
        await dps.enrollment.get(id=reg_id)
