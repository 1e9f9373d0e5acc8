"""A shipment of enrolled devices for the batch-activation tests and the activation benchmark: certificates
issued by the factory's own issuing CA (one shared key: only the enrollment matters here), enrolled
(disabled) through factory_svc's EnrollBatch, so each device has its real activation code; and the
shipment CSV an OEM would get.  Also the OEM template both use."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devprov.v1 import factory_service_pb2 as fpb
from provkit.devpki import SIGNATURE_KEY_USAGE

CALL_SIZE = 500

# The OEM template of the tests (Acme): typed fields of every kind the portal renders.
TEMPLATE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["tags", "desired"],
    "additionalProperties": False,
    "properties": {
        "tags": {
            "type": "object",
            "required": ["chassisNumber", "machineModel"],
            "additionalProperties": False,
            "properties": {
                "chassisNumber": {
                    "type": "string",
                    "title": "Chassis number",
                    "description": "Stamped on the machine's frame",
                    "pattern": "^VX[0-9]{3}-[0-9]{8}$",
                    "examples": ["VX200-20260001"],
                },
                "machineModel": {"title": "Machine model", "enum": ["VX-200", "VX-300"]},
                "site": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "title": "City", "maxLength": 64}},
                },
            },
        },
        "desired": {
            "type": "object",
            "required": ["telemetryIntervalSeconds"],
            "additionalProperties": False,
            "properties": {
                "telemetryIntervalSeconds": {
                    "type": "number",
                    "title": "Telemetry interval (s)",
                    "minimum": 1,
                    "maximum": 3600,
                    "default": 5,
                },
                "maxTemperature": {"type": "integer", "title": "Alarm temperature (°C)"},
                "ecoMode": {"type": "boolean", "title": "Eco mode"},
            },
        },
    },
}


def device_certificate(
    issuer: x509.Certificate, device_id: str, public_key: Any, now: datetime
) -> x509.CertificateBuilder:
    """A device certificate as the factory makes them (a year from ``now``), naming ``issuer`` and its key,
    not yet signed."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SIGNATURE_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False
        )
    )


def issue_certificates(ca: Any, count: int) -> list[tuple[str, str]]:
    """(device id, certificate PEM) pairs signed by the factory's issuing CA ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    out = []
    for _ in range(count):
        device_id = str(uuid.uuid4())
        cert = ca.signer.sign_certificate(
            device_certificate(ca.certificate, device_id, key.public_key(), now)
        )
        out.append((device_id, cert.public_bytes(serialization.Encoding.PEM).decode()))
    return out


async def enroll_shipment(factory_app: Any, factory: Any, count: int) -> list[tuple[str, str]]:
    """``count`` devices enrolled (disabled) through factory_svc: (device id, activation code)."""
    devices = issue_certificates(factory_app.ca, count)
    out: list[tuple[str, str]] = []
    for start in range(0, count, CALL_SIZE):
        part = devices[start : start + CALL_SIZE]
        reply = await factory.EnrollBatch(
            fpb.EnrollBatchRequest(
                items=[fpb.EnrollBatchItem(device_id=d, certificate_pem=c) for d, c in part]
            ),
            timeout=300,
        )
        assert reply.failed_count == 0, reply
        out.extend((r.device_id, r.response.activation_code) for r in reply.results)
    return out


def row_fields(index: int) -> dict[str, str]:
    """The template fields of the ``index``-th machine, as a CSV row holds them (text)."""
    return {
        "tags.chassisNumber": f"VX200-{20260000 + index + 1}",
        "tags.machineModel": "VX-200" if index % 2 == 0 else "VX-300",
        "tags.site.city": ("Hamburg", "Lyon", "Turin")[index % 3],
        "desired.telemetryIntervalSeconds": str(5 + index % 10),
        "desired.maxTemperature": str(60 + index % 20),
        "desired.ecoMode": "true" if index % 2 else "false",
    }


def shipment_csv(
    devices: Sequence[tuple[str, str]], hub: str = "", fields: Mapping[int, Mapping[str, str]] | None = None
) -> str:
    """The CSV: guid, code, hub and the template's fields (``fields`` overrides some rows' values)."""
    columns = ["guid", "code", "hub", *row_fields(0)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for index, (device_id, code) in enumerate(devices):
        values = {**row_fields(index), **((fields or {}).get(index, {}))}
        writer.writerow([device_id, code, hub, *(values[c] for c in columns[3:])])
    return out.getvalue()
