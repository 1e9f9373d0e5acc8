"""The DPS adapter's shared-key tokens: one is reused for a while instead of signed for every request, and
none goes out with less than ten minutes of validity left."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest
from azure.iot.deviceprovisioning import _auth

from provkit.dps import SAS_REUSE_SECONDS, _ReusedSasPolicy

ENDPOINT = "dps.example.test"
KEY = base64.b64encode(b"k" * 32).decode()


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _expiry_after(policy: _ReusedSasPolicy) -> tuple[str, int]:
    """The Authorization header of one request through ``policy`` and its token's expiry (``se``)."""
    request = PipelineRequest(HttpRequest("GET", f"https://{ENDPOINT}/enrollments/d1"), PipelineContext(None))
    policy.on_request(request)
    header = request.http_request.headers["Authorization"]
    fields = parse_qs(header.removeprefix("SharedAccessSignature "))
    assert fields["sr"] == [ENDPOINT] and fields["skn"] == ["provisioningserviceowner"]
    return header, int(fields["se"][0])


def test_a_token_is_reused_while_it_has_ten_minutes_left_then_signed_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(_auth, "time", clock)  # the SDK's token expiry follows the same clock
    policy = _ReusedSasPolicy(ENDPOINT, "provisioningserviceowner", KEY, monotonic=clock)

    first, expires = _expiry_after(policy)
    assert expires == clock.now + 3600
    clock.now += SAS_REUSE_SECONDS - 1
    again, same_expiry = _expiry_after(policy)
    assert again == first and same_expiry - clock.now >= 600
    clock.now += 1
    renewed, later = _expiry_after(policy)
    assert renewed != first and later == clock.now + 3600
