"""The minting domain without gRPC, with a movable clock: validity limits and the unexpired count."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factory_env import make_csr, make_key
from support.clock import ManualClock

from factory_svc.ca.issuing import open_dev_ca
from factory_svc.errors import FailedPrecondition, InvalidArgument
from factory_svc.ledger import Ledger
from factory_svc.mint.model import CsrKey, MintRequest
from factory_svc.mint.service import MintingService, MintPolicy
from provkit.device_id import is_valid_device_id, normalise_device_id


async def test_validity_never_outlives_the_issuing_ca_and_expired_certificates_are_not_counted(
    tmp_path: Path, database_url
) -> None:
    clock = ManualClock(datetime.now(UTC))
    ca = open_dev_ca(tmp_path / "ca", clock)
    ledger = await Ledger.open(database_url, migrate=True)
    try:
        policy = MintPolicy(default_validity=timedelta(days=365))
        minting = MintingService(ca, ledger.certificates, policy, clock)
        csr = CsrKey(make_csr(make_key("p256"), "clocked-1").encode())

        short = await minting.mint(MintRequest("clocked-1", csr, validity=timedelta(hours=1)))
        assert short.unexpired_count == 1
        clock.now += timedelta(hours=2)  # the first certificate has expired
        second = await minting.mint(MintRequest("clocked-1", csr))
        assert second.unexpired_count == 1

        issuer_end = ca.certificate.not_valid_after_utc
        clock.now = issuer_end - timedelta(days=10)
        late = await minting.mint(MintRequest("clocked-1", csr))
        assert late.certificate.not_after == issuer_end  # default validity clamped to the issuer
        with pytest.raises(InvalidArgument) as caught:
            await minting.mint(MintRequest("clocked-1", csr, validity=timedelta(days=11)))
        assert caught.value.reason == "VALIDITY_EXCEEDS_ISSUER"

        clock.now = issuer_end + timedelta(seconds=1)
        with pytest.raises(FailedPrecondition) as expired:
            await minting.mint(MintRequest("clocked-1", csr))
        assert expired.value.reason == "ISSUER_EXPIRED"
        assert len(await ledger.certificates.page("clocked-1", 10, None)) == 3
    finally:
        await ledger.close()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("ABC-123", "abc-123"), ("a.b_c:d-", "a.b_c:d-"), ("x" * 64, "x" * 64), (" padded ", "padded")],
)
def test_device_ids_are_normalised(raw: str, expected: str) -> None:
    assert normalise_device_id(raw) == expected


@pytest.mark.parametrize("raw", ["", "x" * 65, "a b", "a/b", "ab_", "ab:", "ab.", "ü1"])
def test_invalid_device_ids(raw: str) -> None:
    assert not is_valid_device_id(raw)


async def test_two_services_racing_on_one_request_id_issue_one_certificate(
    tmp_path: Path, database_url
) -> None:
    """Two minting services, each with its own ledger on one database (as two replicas are): the ledger's
    request-id constraint decides, the loser answers with the winner's certificate."""
    clock = ManualClock(datetime.now(UTC))
    ca = open_dev_ca(tmp_path / "ca", clock)
    ledger = await Ledger.open(database_url, migrate=True)
    other = await Ledger.open(database_url)
    try:
        services = [MintingService(ca, each.certificates, MintPolicy(), clock) for each in (ledger, other)]
        request = MintRequest(
            "race-1", CsrKey(make_csr(make_key("p256"), None).encode()), request_id="race-req"
        )
        results = await asyncio.gather(*(s.mint(request) for s in services))
        assert results[0].certificate == results[1].certificate
        assert sorted(r.replayed for r in results) == [False, True]
        assert len(await ledger.certificates.page("race-1", 10, None)) == 1
    finally:
        await ledger.close()
        await other.close()


async def test_the_shortest_validity_is_a_setting(tmp_path: Path, database_url) -> None:
    """An hour by default; ``mint.min_validity_minutes`` lowers it (a demonstration of renewal)."""
    from factory_svc.settings import load_settings

    assert load_settings({}).mint.min_validity == timedelta(hours=1)
    lowered = load_settings({"FACTORY_MINT_MIN_VALIDITY_MINUTES": "2"}).mint
    assert lowered.min_validity == timedelta(minutes=2)
    clock = ManualClock(datetime.now(UTC))
    ca = open_dev_ca(tmp_path / "ca", clock)
    ledger = await Ledger.open(database_url, migrate=True)
    try:
        csr = CsrKey(make_csr(make_key("p256"), "short-1").encode())
        default = MintingService(ca, ledger.certificates, MintPolicy(), clock)
        with pytest.raises(InvalidArgument) as refused:
            await default.mint(MintRequest("short-1", csr, validity=timedelta(minutes=3)))
        assert refused.value.reason == "VALIDITY_INVALID"
        minting = MintingService(ca, ledger.certificates, lowered, clock)
        minted = await minting.mint(MintRequest("short-1", csr, validity=timedelta(minutes=3)))
        assert minted.certificate.not_after == (clock.now + timedelta(minutes=3)).replace(microsecond=0)
        with pytest.raises(InvalidArgument):
            await minting.mint(MintRequest("short-1", csr, validity=timedelta(minutes=1)))
    finally:
        await ledger.close()


def test_replicas_starting_at_once_on_a_fresh_data_directory_share_one_development_ca(tmp_path: Path) -> None:
    """Each process looks, finds no CA, makes one and renames it into place: all but the first rename find
    the directory there.  Every process must start, on the CA that won."""
    script = (
        "import sys\n"
        "from datetime import UTC, datetime\n"
        "from pathlib import Path\n"
        "from factory_svc.ca.issuing import open_dev_ca\n"
        "ca = open_dev_ca(Path(sys.argv[1]), lambda: datetime.now(UTC))\n"
        "print(ca.certificate.serial_number)\n"
    )
    command = [sys.executable, "-c", script, str(tmp_path / "data" / "ca")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(6)]
    answers = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * 6
    assert len({out for out, _ in answers}) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ca"]  # no staging directory left
