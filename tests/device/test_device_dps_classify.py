"""The SDK reports registration refusals only through exception text; check our reading of the real
exception objects the SDK raises (built the way its pipeline builds them)."""

from __future__ import annotations

import pytest
from azure.iot.device import exceptions

from device_client.dps import RegistrationOutcome, classify_registration_error


def _client_error(cause_text: str) -> exceptions.ClientError:
    try:
        try:
            raise exceptions.ServiceError(cause_text)
        except exceptions.ServiceError as cause:
            raise exceptions.ClientError("Unexpected failure") from cause
    except exceptions.ClientError as err:
        return err


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (
            _client_error(
                "Query Status Operation encountered an invalid registration status disabled "
                "with a status code of 200"
            ),
            RegistrationOutcome.NOT_ACTIVATED,
        ),
        (
            _client_error("register request returned a service error status code 404"),
            RegistrationOutcome.NOT_ENROLLED,
        ),
        (
            _client_error("register request returned a service error status code 401"),
            RegistrationOutcome.CREDENTIALS_REFUSED,
        ),
        (
            _client_error(
                "Query Status operation returned a failed registration status with a status code of 200"
            ),
            RegistrationOutcome.NOT_ALLOCATED,  # group mode: the allocation webhook said no
        ),
        (
            exceptions.CredentialError("Credentials invalid, could not connect"),
            RegistrationOutcome.CREDENTIALS_REFUSED,
        ),
        (exceptions.ConnectionFailedError("Could not connect to IoTHub"), RegistrationOutcome.UNREACHABLE),
        (TimeoutError(), RegistrationOutcome.UNREACHABLE),
    ],
)
def test_classification(exc, outcome):
    assert classify_registration_error(exc).outcome is outcome
