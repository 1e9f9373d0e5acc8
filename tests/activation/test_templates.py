"""Metadata templates: a JSON Schema per OEM tenant from activation_svc's settings, refused at start-up
when it is no usable template (naming the tenant), enforced on Activate over gRPC (INVALID_ARGUMENT
METADATA_TEMPLATE_VIOLATION naming the field, nothing changed), served to the OEM's parties by
GetMetadataTemplate, and turned into typed form fields."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    dps_enrollment,
    enrolled,
    factory_env,
    failure,
    running_activation,
    running_factory,
)
from support.shipment import TEMPLATE

from activation_svc.settings import load_settings
from activation_svc.templates.fields import metadata_from_values, template_fields
from activation_svc.templates.schema import Template
from devprov.v1 import activation_service_pb2 as apb
from provkit.errors import ConfigurationError

GOOD = {
    "tags": {"chassisNumber": "VX200-20260001", "machineModel": "VX-200", "site": {"city": "Lyon"}},
    "properties": {"desired": {"telemetryIntervalSeconds": 5, "maxTemperature": 70, "ecoMode": True}},
}


def write_template(folder: Path, schema: object = TEMPLATE, name: str = "acme.schema.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(schema))
    return path


# ------------------------------------------------------------------------------------------ start-up
DPS = "HostName=127.0.0.2;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=YQ=="
HUB = "HostName=127.0.0.2;SharedAccessKeyName=iothubowner;SharedAccessKey=YQ=="


def _settings_env(tmp_path: Path, templates: str = "") -> dict[str, str]:
    cloud = {"ACTIVATION_CLOUD_DPS_CONNECTION_STRING": DPS, "ACTIVATION_CLOUD_HUB_CONNECTION_STRINGS": HUB}
    return {"ACTIVATION_DATA_DIR": str(tmp_path), "ACTIVATION_TEMPLATES": templates, **cloud}


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "objekt"}, "not a valid JSON Schema (Draft 2020-12)"),
        ({"type": "object", "properties": {"tags": {"minLength": -1}}}, "not a valid JSON Schema"),
        ({"type": "array"}, '"type": "object"'),
        ({"type": "object", "properties": {"reported": {}}}, 'only have the properties "tags" and "desired"'),
        ({"type": "object", "properties": {"tags": {"$ref": "https://example.com/s.json"}}}, "outside"),
        ({"type": "object", "properties": {"tags": {"$ref": "#/$defs/missing"}}}, "does not resolve"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_a_schema_that_is_no_template_stops_the_service_naming_the_tenant(
    tmp_path: Path, schema: object, words: str
) -> None:
    path = write_template(tmp_path, schema, "globex.json")
    with pytest.raises(ConfigurationError) as refused:
        load_settings(env=_settings_env(tmp_path, f"globex={path}"))
    assert "OEM tenant 'globex'" in str(refused.value) and words in str(refused.value)


def test_a_template_file_that_is_not_json_or_missing_is_refused_naming_the_tenant(tmp_path: Path) -> None:
    bad = tmp_path / "acme.json"
    bad.write_text('{"type": "object", "type": "object"}')  # a duplicate key: jsonsafe refuses it
    with pytest.raises(ConfigurationError, match=r"tenant 'acme'.*appears twice"):
        load_settings(env=_settings_env(tmp_path, f"acme={bad}"))
    with pytest.raises(ConfigurationError, match="cannot read the metadata template of OEM tenant 'acme'"):
        load_settings(env=_settings_env(tmp_path, f"acme={tmp_path / 'nowhere.json'}"))
    with pytest.raises(ConfigurationError, match="not an OEM tenant"):
        load_settings(env=_settings_env(tmp_path, f"Acme Corp={bad}"))


def test_templates_come_from_the_settings_file_relative_to_it(tmp_path: Path) -> None:
    write_template(tmp_path / "templates")
    config = tmp_path / "activation.toml"
    config.write_text('[templates]\nacme = "templates/acme.schema.json"\n')
    settings = load_settings(env=_settings_env(tmp_path), config=config)
    assert set(settings.templates.by_tenant) == {"acme"}
    assert settings.templates.by_tenant["acme"].schema == TEMPLATE


# ------------------------------------------------------------------------------------ checking, fields
def test_each_violation_names_its_field_as_the_request_names_it() -> None:
    template = Template.build("acme", TEMPLATE)
    found = template.violations(
        {"chassisNumber": "AB-1", "colour": "red"}, {"telemetryIntervalSeconds": "5", "ecoMode": 1}
    )
    fields = {v.field: v.description for v in found}
    assert set(fields) == {
        "metadata_json.tags.chassisNumber",  # pattern
        "metadata_json.tags.machineModel",  # required, missing
        "metadata_json.tags.colour",  # not in the template
        "metadata_json.properties.desired.telemetryIntervalSeconds",  # a string, not a number
        "metadata_json.properties.desired.ecoMode",  # 1 is no boolean
    }
    assert fields["metadata_json.tags.machineModel"] == "required by the template, missing"
    assert template.violations(GOOD["tags"], GOOD["properties"]["desired"]) == []


def test_the_form_fields_are_typed_by_the_template() -> None:
    fields = template_fields(TEMPLATE)
    kinds = {f.name: (f.kind, f.required) for f in fields.fields}
    assert kinds == {
        "tags.chassisNumber": ("text", True),
        "tags.machineModel": ("choice", True),
        "tags.site.city": ("text", False),
        "desired.telemetryIntervalSeconds": ("number", True),
        "desired.maxTemperature": ("integer", False),
        "desired.ecoMode": ("boolean", False),
    }
    by_name = fields.by_name()
    assert by_name["tags.chassisNumber"].placeholder == "VX200-20260001"  # an example: a placeholder only
    assert by_name["desired.telemetryIntervalSeconds"].placeholder == "5"  # the default: likewise
    typed = metadata_from_values(
        fields,
        {
            "tags.chassisNumber": " VX200-20260001 ",
            "tags.machineModel": '"VX-200"',
            "tags.site.city": "Lyon",
            "desired.telemetryIntervalSeconds": "2.5",
            "desired.maxTemperature": "70",
            "desired.ecoMode": "false",
        },
    )
    assert typed == {
        "tags": {"chassisNumber": "VX200-20260001", "machineModel": "VX-200", "site": {"city": "Lyon"}},
        "properties": {"desired": {"telemetryIntervalSeconds": 2.5, "maxTemperature": 70, "ecoMode": False}},
    }
    # empty fields are left out (required catches them); text that is no number is sent as typed
    loose = metadata_from_values(fields, {"desired.maxTemperature": "hot", "tags.chassisNumber": ""})
    assert loose == {"tags": {}, "properties": {"desired": {"maxTemperature": "hot"}}}


# ------------------------------------------------------------------------------------------- gRPC
@pytest_asyncio.fixture
async def stack(emulator, tmp_path):
    tls = OemTls.create(tmp_path / "oem-tls")
    path = write_template(tmp_path / "templates")
    env = activation_env(tmp_path, emulator, tls, ACTIVATION_TEMPLATES=f"acme={path}")
    async with (
        running_factory(factory_env(tmp_path, emulator)) as (_, factory),
        running_activation(env, tls) as (_, activation),
    ):
        yield factory, activation


@pytest.mark.slow
async def test_grpc_activate_refuses_metadata_off_the_template_naming_the_field(stack, emulator, tmp_path):
    factory, activation = stack
    device, code = await enrolled(factory, tmp_path)
    before = await dps_enrollment(emulator, device.device_id)
    off = json.loads(json.dumps(GOOD))
    off["properties"]["desired"]["telemetryIntervalSeconds"] = 0  # below the minimum
    refused = await failure(activation.Activate(activate_request(device.device_id, code, json.dumps(off))))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.reason == "METADATA_TEMPLATE_VIOLATION"
    assert refused.metadata["field"] == "metadata_json.properties.desired.telemetryIntervalSeconds"
    assert refused.metadata["tenant"] == "acme"
    assert [v.field for v in refused.field_violations] == [refused.metadata["field"]]
    assert "telemetryIntervalSeconds" in refused.message
    # clearing would leave the required fields missing: refused as well
    cleared = await failure(
        activation.Activate(
            apb.ActivateRequest(device_id=device.device_id, activation_code=code, clear_metadata=True)
        )
    )
    assert cleared.reason == "METADATA_TEMPLATE_VIOLATION"
    # a first activation without metadata keeps an enrollment without the required fields: refused too
    kept = await failure(activation.Activate(activate_request(device.device_id, code, "")))
    assert kept.reason == "METADATA_TEMPLATE_VIOLATION" and kept.metadata["field"].startswith(
        "metadata_json."
    )
    after = await dps_enrollment(emulator, device.device_id)
    assert after["etag"] == before["etag"] and after["provisioningStatus"] == "disabled"

    reply = await activation.Activate(activate_request(device.device_id, code, json.dumps(GOOD)))
    assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment["initialTwin"]["tags"]["machineModel"] == "VX-200"
    assert enrollment["initialTwin"]["properties"]["desired"]["telemetryIntervalSeconds"] == 5
    # once activated, keeping the (conforming) metadata is fine
    again = await activation.Activate(activate_request(device.device_id, code, ""))
    assert again.metadata_change == apb.METADATA_CHANGE_KEPT


@pytest.mark.slow
async def test_the_oem_reads_its_own_template(stack):
    _, activation = stack
    reply = await activation.GetMetadataTemplate(apb.GetMetadataTemplateRequest())
    assert reply.tenant == "acme" and json.loads(reply.schema_json) == TEMPLATE
    assert reply.schema_digest == Template.build("acme", TEMPLATE).digest
