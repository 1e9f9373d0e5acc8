"""Nobody locks the owner out with wrong codes (issue: a portal of another OEM naming 150 end users, or 120
wrong codes through the web portal from 20 addresses, used to refuse the owner's right code for 15 minutes).

Over real mTLS against real factory_svc / activation_svc servers and the emulator.  What must hold: a party's
failures spend its own budget only; a portal's end users get budgets of their own only on a device the
portal may act on (its OEM's, or one nobody owns yet), so on another OEM's device the certificate has one
budget whatever names it gives - exactly as on an id that does not exist."""

from __future__ import annotations

import uuid

import grpc
import pytest
from enrollment.provisioning_env import dps_enrollment, failure, mint
from trust.test_parties import META, Trust, _enrolled
from trust.test_parties import trust as trust  # the same stack of real servers

from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from provkit.grpc_server import ON_BEHALF_OF_HEADER

pytestmark = pytest.mark.slow

WRONG = "0000-0000-0000-0000"
NAMES = 150


def _activate(device_id: str, code: str) -> apb.ActivateRequest:
    return apb.ActivateRequest(device_id=device_id, activation_code=code, metadata_json=META)


async def _storm(portal: apb_grpc.ActivationServiceStub, device_id: str) -> list[tuple]:
    """One wrong code for each of NAMES end users, one after another: what each got (code, reason)."""
    answers = []
    for n in range(NAMES):
        details = await failure(
            portal.Activate(_activate(device_id, WRONG), metadata=((ON_BEHALF_OF_HEADER, f"198.51.100.{n}"),))
        )
        answers.append((details.code, details.reason))
    return answers


DENIED = (grpc.StatusCode.PERMISSION_DENIED, "ACTIVATION_DENIED")
LIMITED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "ACTIVATION_RATE_LIMITED")


def _one_budget(answers: list[tuple], allowed: int) -> None:
    """What one budget gives NAMES guesses in a row: its free failures checked, then refusals.  The back-off
    doubles after each checked failure (2 s, 4 s, ...), so however slowly the loop runs only a few more get
    checked; a budget per named person would have checked every one."""
    assert answers[:allowed] == [DENIED] * allowed
    assert set(answers) == {DENIED, LIMITED} and len(answers) == NAMES
    assert answers.count(DENIED) <= allowed + 8


async def test_another_oems_portal_naming_150_end_users_spends_one_budget_and_the_owner_gets_in_at_once(
    trust: Trust,
) -> None:
    allowed = trust.activation_app.settings.max_failures
    async with (
        trust.stubs("factory") as (bench, _),
        trust.stubs("portal-globex") as (_f1, globex_portal),
        trust.stubs("oem") as (_f2, acme),
        trust.stubs("portal") as (_f3, acme_portal),
    ):
        device = await mint(bench, str(uuid.uuid4()), trust.folder / "devices")
        enroll = fpb.EnrollRequest(
            device_id=device.device_id, certificate_pem=device.chain_pem, owner_oem="acme"
        )
        code = (await bench.Enroll(enroll)).activation_code
        before = await dps_enrollment(trust.emulator, device.device_id)

        on_acmes = await _storm(globex_portal, device.device_id)
        on_unknown = await _storm(globex_portal, str(uuid.uuid4()))
        _one_budget(on_acmes, allowed)  # the names multiply nothing: one budget for the certificate
        _one_budget(on_unknown, allowed)  # and another OEM's device looks like no device at all
        assert (await dps_enrollment(trust.emulator, device.device_id))["etag"] == before["etag"]

        # the owner, by its back office and by its portal for one of its people, is let in at once
        reply = await acme.Activate(_activate(device.device_id, code))
        assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED and reply.owner_oem == "acme"
        again = await acme_portal.Activate(
            _activate(device.device_id, code), metadata=((ON_BEHALF_OF_HEADER, "203.0.113.9"),)
        )
        assert again.lifecycle == apb.LIFECYCLE_ACTIVATED
    outcomes = [e.outcome for e in await trust.activation_app.audit.entries(device.device_id)]
    assert outcomes.count("denied") == on_acmes.count(DENIED)
    assert outcomes.count("rate-limited") == on_acmes.count(LIMITED)


async def test_before_anyone_owns_it_no_storm_of_names_stops_the_right_code(trust: Trust) -> None:
    async with (
        trust.stubs("factory") as (bench, _),
        trust.stubs("portal-globex") as (_f1, globex_portal),
        trust.stubs("oem-mallory") as (_f2, mallory),
        trust.stubs("portal") as (_f3, acme_portal),
    ):
        device, code = await _enrolled(bench, trust.folder)  # nobody owns it: the first activation claims it
        answers = await _storm(globex_portal, device.device_id)
        assert set(answers) == {(grpc.StatusCode.PERMISSION_DENIED, "ACTIVATION_DENIED")}  # each name once
        for _ in range(trust.activation_app.settings.max_failures + 1):
            await failure(mallory.Activate(_activate(device.device_id, WRONG)))

        # a person at acme's portal with the code on the label: claimed at once, nothing waits
        reply = await acme_portal.Activate(
            _activate(device.device_id, code), metadata=((ON_BEHALF_OF_HEADER, "203.0.113.7"),)
        )
        assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED and reply.owner_oem == "acme"


async def test_a_code_that_cannot_be_a_code_is_refused_unread_and_never_counted(trust: Trust) -> None:
    """"1234" or "X" is a typo, not a guess: INVALID_ARGUMENT before any budget is touched, so however many
    the caller sends, its right code gets in at once."""
    async with trust.stubs("factory") as (bench, _), trust.stubs("oem") as (_f, acme):
        device = await mint(bench, str(uuid.uuid4()), trust.folder / "devices")
        enroll = fpb.EnrollRequest(
            device_id=device.device_id, certificate_pem=device.chain_pem, owner_oem="acme"
        )
        code = (await bench.Enroll(enroll)).activation_code
        for typo in ["1234", "X", code + "7", code.replace(code[0], "U")] * 3:  # U is not in the alphabet
            details = await failure(acme.Activate(_activate(device.device_id, typo)))
            assert (details.code, details.reason) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "ACTIVATION_CODE_MALFORMED",
            )
        reply = await acme.Activate(_activate(device.device_id, code))
        assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED
    outcomes = [e.outcome for e in await trust.activation_app.audit.entries(device.device_id)]
    assert "denied" not in outcomes and "rate-limited" not in outcomes
