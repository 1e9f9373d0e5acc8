"""A refused registration: RegistrationRefused travels like any exception (it was a frozen dataclass:
contextlib's re-raise tried to set its traceback and failed with FrozenInstanceError); a refused device asks
the CRL its certificate names whether it is revoked (issue 25 item 6): only a CRL verified against its
issuer says so."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from device_certs import TinyCa, make_crl
from support.emulator import free_port

from device_client.dps import RegistrationOutcome, RegistrationRefused
from device_client.identity import generate_key, serial_hex_of
from device_client.revocation import (
    CrlUnavailable,
    HttpCrlFetcher,
    RevocationStatus,
    check_revocation,
)


@contextlib.contextmanager
def attempt() -> Iterator[None]:
    yield


def test_registration_refused_passes_through_a_context_manager() -> None:
    with pytest.raises(RegistrationRefused) as caught, attempt():
        raise RegistrationRefused(RegistrationOutcome.NOT_ACTIVATED, "the enrollment is disabled")
    assert caught.value.outcome is RegistrationOutcome.NOT_ACTIVATED
    assert str(caught.value) == "not_activated: the enrollment is disabled"


# -- a refused device asks the CRL its certificate names ------------------------------------------------
URL = "http://crl.example/crl/issuing-ca.crl"


class Served:
    """A CrlFetcher over fixed bodies (a URL without one cannot be fetched)."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self.bodies = bodies

    async def fetch(self, url: str) -> bytes:
        if url not in self.bodies:
            raise CrlUnavailable(f"{url} cannot be fetched: connection refused")
        return self.bodies[url]


def _device(ca: TinyCa, *urls: str) -> list[x509.Certificate]:
    key = generate_key()
    return x509.load_pem_x509_certificates(ca.issue("dev-1", key, crl_urls=urls))


async def test_a_verified_crl_listing_the_serial_says_revoked_with_its_date_and_reason() -> None:
    ca = TinyCa()
    chain = _device(ca, URL)
    crl = make_crl(ca, {chain[0].serial_number: x509.ReasonFlags.key_compromise, 12345: None})
    now = datetime.now(UTC)
    check = await check_revocation(chain, Served({URL: crl}), now)
    assert check.status is RevocationStatus.REVOKED and check.revoked is not None
    assert check.revoked.serial == serial_hex_of(chain[0].serial_number)
    assert check.revoked.reason == "key-compromise" and check.revoked.crl_number == 7
    assert check.revoked.crl_url == URL and check.revoked.checked_at == now
    assert abs((check.revoked.revoked_at - now).total_seconds()) < 5

    clean = await check_revocation(chain, Served({URL: make_crl(ca, {12345: None})}), now)
    assert clean.status is RevocationStatus.NOT_REVOKED


def _forged(ca: TinyCa, serial: int) -> bytes:
    """The right issuer's name, listing the device, signed by somebody else's key."""
    return make_crl(ca, {serial: None}, signed_by=ec.generate_private_key(ec.SECP256R1()))


@pytest.mark.parametrize(
    ("bodies", "why"),
    [
        (lambda ca, serial: {}, "cannot be fetched"),
        (_forged, "signature"),
        (lambda ca, serial: {URL: make_crl(TinyCa(), {serial: None})}, "not the device's issuer"),
        (lambda ca, serial: {URL: b"<html>proxy login</html>"}, "not a CRL"),
    ],
    ids=["unreachable", "forged signature", "another issuer", "not a crl"],
)
async def test_a_crl_that_cannot_be_fetched_or_verified_never_says_revoked(bodies, why) -> None:
    ca = TinyCa()
    chain = _device(ca, URL)
    found = bodies(ca, chain[0].serial_number)
    served = found if isinstance(found, dict) else {URL: found}
    check = await check_revocation(chain, Served(served), datetime.now(UTC))
    assert check.status is RevocationStatus.UNKNOWN and check.revoked is None
    assert why in check.detail


async def test_no_crl_named_is_unknown_and_a_later_usable_crl_counts() -> None:
    ca = TinyCa()
    bare = _device(ca)
    assert (await check_revocation(bare, Served({}), datetime.now(UTC))).status is RevocationStatus.UNKNOWN
    mirror = "https://mirror.example/issuing-ca.crl"
    chain = _device(ca, URL, mirror)
    crl = make_crl(ca, {chain[0].serial_number: None})
    check = await check_revocation(chain, Served({mirror: crl}), datetime.now(UTC))
    assert check.status is RevocationStatus.REVOKED and check.revoked.reason is None


async def test_the_http_fetcher_reports_an_unreachable_crl() -> None:
    port = free_port("127.0.0.1")
    with pytest.raises(CrlUnavailable):
        await HttpCrlFetcher(5.0).fetch(f"http://127.0.0.1:{port}/crl/issuing-ca.crl")

