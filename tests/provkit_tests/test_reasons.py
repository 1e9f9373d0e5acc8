"""Error reasons: one enum per package, the tables of docs/error-reasons.md rendered from them, one
translation of cloud failures (provkit.cloud_errors) with the reasons, messages and retry delays the call
sites had."""

from __future__ import annotations

from pathlib import Path

import pytest

from activation_svc.allocation.model import AllocationReason
from activation_svc.batch.shipment import BatchReason
from activation_svc.errors import Reason as ActivationReason
from activation_svc.portal.errors import PortalReason
from device_client.errors import DeviceClientError
from device_client.errors import Reason as DeviceReason
from factory_svc.errors import Reason as FactoryReason
from provkit.cloud import CloudAlreadyExists, CloudRejected, CloudUnavailable
from provkit.cloud_errors import CloudService, translating_cloud_errors
from provkit.errors import DomainError, ErrorKind, InvalidArgument, Reason, ReasonEnum

REASONS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "error-reasons.md"  # linked from the README

REASON_ENUMS: tuple[type[ReasonEnum], ...] = (
    Reason,
    ActivationReason,
    PortalReason,
    BatchReason,
    AllocationReason,
    DeviceReason,
    FactoryReason,
)


@pytest.mark.parametrize("reasons", REASON_ENUMS, ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_the_docs_show_each_reason_table_as_the_enum_defines_it(reasons: type[ReasonEnum]) -> None:
    table = reasons.markdown()
    said = f"{REASONS_PAGE.name}'s table for {reasons.__module__} should read:\n{table}"
    assert table in REASONS_PAGE.read_text(), said


def test_a_reason_is_declared_once() -> None:
    names = [member.value for reasons in REASON_ENUMS for member in reasons]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_a_reason_member_is_its_wire_string() -> None:
    assert ActivationReason.ACTIVATION_DENIED == "ACTIVATION_DENIED"
    error = InvalidArgument(Reason.DEVICE_ID_EMPTY, "the device id is empty")
    assert type(error.reason) is str and error.reason == "DEVICE_ID_EMPTY"
    assert DeviceClientError("x", DeviceReason.STATE_IN_USE).reason == "STATE_IN_USE"


def test_a_reason_without_its_meaning_is_refused() -> None:
    with pytest.raises(ValueError, match="meaning"):
        ReasonEnum("Broken", [("SOME_REASON", ("SOME_REASON", ""))])


def test_an_unreachable_cloud_is_unavailable_with_the_service_delay_or_five_seconds() -> None:
    with pytest.raises(DomainError) as caught, translating_cloud_errors(CloudService.HUB):
        raise CloudUnavailable("connection refused", status=None, retry_after=None)
    error = caught.value
    assert error.kind is ErrorKind.UNAVAILABLE and error.reason == "HUB_UNAVAILABLE"
    assert error.message == "HUB cannot be reached: connection refused" and error.retry_after == 5.0
    assert isinstance(error.__cause__, CloudUnavailable)
    dps = translating_cloud_errors(CloudService.DPS, unavailable_note="; later")
    with pytest.raises(DomainError) as caught, dps:
        raise CloudUnavailable("throttled", status=429, retry_after=12.0)
    assert caught.value.retry_after == 12.0
    assert caught.value.message == "DPS cannot be reached: throttled; later"


def test_a_refusal_is_a_failed_precondition_naming_what_was_refused() -> None:
    update = translating_cloud_errors(CloudService.DPS, refused="the update")
    with pytest.raises(DomainError) as caught, update:
        raise CloudRejected("bad body", status=400)
    error = caught.value
    assert error.kind is ErrorKind.FAILED_PRECONDITION and error.reason == "DPS_REFUSED"
    assert error.message == "DPS refused the update: bad body" and error.metadata == {}
    hub = translating_cloud_errors(CloudService.HUB, refused_metadata=True)
    with pytest.raises(DomainError) as caught, hub:
        raise CloudRejected("unauthorised", status=401)
    assert caught.value.message == "the IoT hub refused the request: unauthorised"
    assert caught.value.metadata == {"status": "401"}


def test_other_cloud_failures_are_left_to_the_domain() -> None:
    with pytest.raises(CloudAlreadyExists), translating_cloud_errors(CloudService.DPS):
        raise CloudAlreadyExists("taken", status=409)
