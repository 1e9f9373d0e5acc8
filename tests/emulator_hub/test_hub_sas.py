"""SAS verification against the token azure-iot-hub itself builds."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta

import pytest
from azure.iot.hub.sastoken import SasToken as HubSdkSasToken

from azure_iot_emulator.sas import SasError, generate_sas, verify_sas

KEY = base64.b64encode(os.urandom(32)).decode()


def test_token_from_the_hub_service_sdk_verifies():
    token = str(HubSdkSasToken("127.0.0.2:8443", KEY, "iothubowner"))
    parsed = verify_sas(token, key_b64=KEY, policy="iothubowner", now=datetime.now(UTC))
    assert parsed.resource == "127.0.0.2:8443"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "MISSING"),
        ("Bearer x", "MALFORMED"),
        ("SharedAccessSignature sr=a&sig=b", "MALFORMED"),
        ("SharedAccessSignature sr=a&sig=b&se=soon", "MALFORMED"),
        ("SharedAccessSignature sr=a&sig=b&se=\u00b2", "MALFORMED"),  # a digit to str.isdigit, not to int
        ("SharedAccessSignature sr=a&sig=b&se=\u0663", "MALFORMED"),  # an Arabic-Indic 3
        ("SharedAccessSignature sr=a&sig=b&se=" + "9" * 5000, "MALFORMED"),
        ("SharedAccessSignature sr=a&sig=b&se=-5", "MALFORMED"),
    ],
)
def test_malformed(header, reason):
    with pytest.raises(SasError) as info:
        verify_sas(header, key_b64=KEY, policy="iothubowner", now=datetime.now(UTC))
    assert info.value.reason == reason


def test_expired_wrong_key_wrong_policy():
    now = datetime.now(UTC)
    expired = generate_sas(
        "h:1", KEY, policy="iothubowner", expiry=int((now - timedelta(seconds=1)).timestamp())
    )
    with pytest.raises(SasError, match="expired"):
        verify_sas(expired, key_b64=KEY, policy="iothubowner", now=now)
    later = int((now + timedelta(hours=1)).timestamp())
    other_key = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(SasError) as info:
        verify_sas(
            generate_sas("h:1", other_key, policy="iothubowner", expiry=later),
            key_b64=KEY,
            policy="iothubowner",
            now=now,
        )
    assert info.value.reason == "BAD_SIGNATURE"
    with pytest.raises(SasError) as info:
        verify_sas(
            generate_sas("h:1", KEY, policy="registryRead", expiry=later),
            key_b64=KEY,
            policy="iothubowner",
            now=now,
        )
    assert info.value.reason == "WRONG_POLICY"
