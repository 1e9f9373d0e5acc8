"""RegistrationRefused travels like any exception (it was a frozen dataclass: contextlib's re-raise tried to
set its traceback and failed with FrozenInstanceError)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from device_client.dps import RegistrationOutcome, RegistrationRefused


@contextlib.contextmanager
def attempt() -> Iterator[None]:
    yield


def test_registration_refused_passes_through_a_context_manager() -> None:
    with pytest.raises(RegistrationRefused) as caught, attempt():
        raise RegistrationRefused(RegistrationOutcome.NOT_ACTIVATED, "the enrollment is disabled")
    assert caught.value.outcome is RegistrationOutcome.NOT_ACTIVATED
    assert str(caught.value) == "not_activated: the enrollment is disabled"
