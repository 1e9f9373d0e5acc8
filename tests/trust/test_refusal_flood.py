"""A flood of calls the gate refuses is a first row and a count, not a durable write each
(``provkit.refusal_audit``): real factory_svc and activation_svc gRPC servers on loopback TLS (factory_svc
asking for no client certificate, so that every caller reaches the gate anonymous; activation_svc requiring
them, for callers with a certificate naming no party or a party the table refuses), their real SQLite files,
and their ``/metrics``, which still count every refusal."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from enrollment.provisioning_env import OemTls, activation_env, factory_env, failure
from support.metrics import scrape
from support.waiting import until

from activation_svc.app import ActivationApp
from activation_svc.settings import load_settings as load_activation_settings
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from devprov.v1 import factory_service_pb2_grpc as fpb_grpc
from factory_svc.app import FactoryApp
from factory_svc.settings import load_settings as load_factory_settings
from provkit.authz import KINDS_OVER_CAP
from provkit.channels import ChannelSecurity, create_channel
from provkit.context import Role
from provkit.devpki import TlsPair
from provkit.grpc_server import RunningServer
from provkit.pki_cli import issue_party

pytestmark = pytest.mark.slow

MINT = "/devprov.v1.FactoryService/MintCertificate"
ENROLL = "/devprov.v1.FactoryService/Enroll"
ACTIVATE = "/devprov.v1.ActivationService/Activate"
REFUSALS = "devprov_refusals_total"
SUMMARY = re.compile(r" and ([0-9,]+) more (?:like this|of other kinds) between ")


@dataclass
class Services:
    factory_app: FactoryApp
    activation_app: ActivationApp
    servers: list[RunningServer]
    tls: OemTls
    folder: Path
    stopped: bool = False

    def security(self, who: TlsPair | None) -> ChannelSecurity:
        if who is None:  # anonymous: TLS without a client certificate
            return ChannelSecurity(ca_pem=self.tls.authority.ca_pem)
        return ChannelSecurity(ca_pem=self.tls.authority.ca_pem, cert_pem=who.cert_pem, key_pem=who.key_pem)

    async def mint(self, who: TlsPair | None, times: int) -> list[tuple[grpc.StatusCode, str]]:
        """``times`` MintCertificate calls as ``who``, 50 at a time; each one's status and reason."""
        async with create_channel(self.servers[0].address, self.security(who)) as channel:
            stub = fpb_grpc.FactoryServiceStub(channel)
            return await _refused(
                lambda: stub.MintCertificate(
                    fpb.MintCertificateRequest(
                        device_id=str(uuid.uuid4()), server_key_generation=fpb.ServerKeyGeneration()
                    )
                ),
                times,
            )

    async def enroll(self, who: TlsPair | None, times: int) -> list[tuple[grpc.StatusCode, str]]:
        async with create_channel(self.servers[0].address, self.security(who)) as channel:
            stub = fpb_grpc.FactoryServiceStub(channel)
            request = fpb.EnrollRequest(device_id=str(uuid.uuid4()), certificate_pem="-")
            return await _refused(lambda: stub.Enroll(request), times)

    async def activate(self, who: TlsPair | None, times: int) -> list[tuple[grpc.StatusCode, str]]:
        async with create_channel(self.servers[1].address, self.security(who)) as channel:
            stub = apb_grpc.ActivationServiceStub(channel)
            request = apb.ActivateRequest(device_id=str(uuid.uuid4()), activation_code="0000-0000-0000-0000")
            return await _refused(lambda: stub.Activate(request), times)

    def factory_rows(self) -> list[tuple[str, str, str, int]]:
        """The ledger's refusals, read from the file: (method, reason, caller, repeats) in order."""
        with contextlib.closing(sqlite3.connect(self.folder / "factory" / "ledger.sqlite3")) as db:
            return db.execute("SELECT method, reason, caller, repeats FROM refusals ORDER BY id").fetchall()

    def activation_rows(self) -> list[tuple[str, str, str]]:
        """activation_svc's audit rows of refusals, from the file: (action, detail, caller) in order."""
        with contextlib.closing(sqlite3.connect(self.folder / "activation" / "audit.sqlite3")) as db:
            return db.execute(
                "SELECT action, detail, caller FROM audit WHERE outcome = 'refused' ORDER BY id"
            ).fetchall()

    async def stop(self) -> None:
        """What SIGTERM does: the servers stop, then the services close (the open windows are written)."""
        if not self.stopped:
            self.stopped = True
            for server in self.servers:
                await server.stop(1)
            await self.activation_app.close()
            await self.factory_app.close()


async def _refused(call: Callable[[], Awaitable[Any]], times: int) -> list[tuple[grpc.StatusCode, str]]:
    answers = []
    for start in range(0, times, 50):
        batch = await asyncio.gather(*(failure(call()) for _ in range(min(50, times - start))))
        answers += [(d.code, d.reason) for d in batch]
    return answers


def stands_for(detail: str) -> int:
    """How many refusals an audit row of activation_svc stands for (a summary: its count)."""
    found = SUMMARY.search(detail)
    return int(found.group(1).replace(",", "")) if found else 1


@contextlib.asynccontextmanager
async def services(folder: Path, emulator: Any, **refusal_audit: str) -> AsyncIterator[Services]:
    tls = OemTls.create(folder / "tls")
    factory = {
        **{k: v for k, v in factory_env(folder, emulator).items() if "INSECURE" not in k},
        "FACTORY_SERVER_TLS_CERT_FILE": str(tls.server_cert),
        "FACTORY_SERVER_TLS_KEY_FILE": str(tls.server_key),
        "FACTORY_SERVER_CLIENT_CA_FILE": str(tls.ca_file),
        "FACTORY_SERVER_CLIENT_AUTH": "none",
        "FACTORY_METRICS_LISTEN": "127.0.0.1:0",
        **{f"FACTORY_REFUSAL_AUDIT_{k.upper()}": v for k, v in refusal_audit.items()},
    }
    # activation_svc requires client certificates: its gate sees party-less ones and refused roles
    activation = activation_env(
        folder,
        emulator,
        tls,
        ACTIVATION_METRICS_LISTEN="127.0.0.1:0",
        **{f"ACTIVATION_REFUSAL_AUDIT_{k.upper()}": v for k, v in refusal_audit.items()},
    )
    factory_app = await FactoryApp.open(load_factory_settings(env=factory))
    activation_app = await ActivationApp.open(load_activation_settings(env=activation))
    up = Services(
        factory_app, activation_app, [await factory_app.start(), await activation_app.start()], tls, folder
    )
    try:
        yield up
    finally:
        await up.stop()


async def test_a_flood_of_refused_calls_is_one_row_and_a_count_the_graceful_stop_completes(
    tmp_path, module_emulator
) -> None:
    async with services(tmp_path, module_emulator, window_seconds="600") as up:
        no_party = up.tls.authority.client_certificate("no-party")
        operator = issue_party(up.tls.authority, Role.OPERATOR, "ops", common_name="ops-1")
        other_operator = issue_party(up.tls.authority, Role.OPERATOR, "ops", common_name="ops-2")
        before = await scrape(up.factory_app.observe.metrics_url)

        anonymous = await up.mint(None, 500)
        assert set(anonymous) == {(grpc.StatusCode.UNAUTHENTICATED, "CLIENT_CERTIFICATE_REQUIRED")}
        assert set(await up.enroll(None, 2)) == {
            (grpc.StatusCode.UNAUTHENTICATED, "CLIENT_CERTIFICATE_REQUIRED")
        }
        unrecognised = await up.activate(no_party, 500)
        assert set(unrecognised) == {(grpc.StatusCode.UNAUTHENTICATED, "CALLER_IDENTITY_UNRECOGNISED")}
        # another reason, another caller: a first row of their own
        denied = (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_AUTHORIZED")
        assert await up.activate(operator, 3) == [denied] * 3
        assert await up.activate(other_operator, 2) == [denied] * 2

        # the firsts are written before their answers; the repeats only counted so far
        rows = up.factory_rows()
        assert [(m, r, n) for m, r, _, n in rows] == [
            (MINT, "CLIENT_CERTIFICATE_REQUIRED", 0),
            (ENROLL, "CLIENT_CERTIFICATE_REQUIRED", 0),
        ]
        assert rows[0][2].startswith("tls-anonymous:ipv4:127.0.0.1:")  # who: the peer's address
        audit = up.activation_rows()
        assert [(stands_for(d), d.split()[0]) for _, d, _ in audit] == [
            (1, "CALLER_IDENTITY_UNRECOGNISED"),
            (1, "CALLER_NOT_AUTHORIZED"),
            (1, "CALLER_NOT_AUTHORIZED"),
        ]
        assert "ops-1 sha256:" in audit[1][2] and "ops-2 sha256:" in audit[2][2]
        # /metrics counts every refusal
        after = await scrape(up.factory_app.observe.metrics_url)
        assert after.value(
            REFUSALS, grpc_method="MintCertificate", reason="CLIENT_CERTIFICATE_REQUIRED"
        ) == 500 + (
            before.value(REFUSALS, grpc_method="MintCertificate", reason="CLIENT_CERTIFICATE_REQUIRED")
        )
        activation = await scrape(up.activation_app.observe.metrics_url)
        assert (
            activation.value(REFUSALS, grpc_method="Activate", reason="CALLER_IDENTITY_UNRECOGNISED") == 500
        )
        assert activation.value(REFUSALS, grpc_method="Activate", reason="CALLER_NOT_AUTHORIZED") == 5

        await up.stop()
        assert [(m, r, n) for m, r, _, n in up.factory_rows()] == [
            (MINT, "CLIENT_CERTIFICATE_REQUIRED", 0),
            (ENROLL, "CLIENT_CERTIFICATE_REQUIRED", 0),
            (MINT, "CLIENT_CERTIFICATE_REQUIRED", 499),
            (ENROLL, "CLIENT_CERTIFICATE_REQUIRED", 1),
        ]
        assert [row[2] for row in up.factory_rows()[2:]] == [row[2] for row in rows]  # the same callers
        summaries = up.activation_rows()[3:]
        assert [(a, stands_for(d), c) for a, d, c in summaries] == [
            (ACTIVATE, 499, audit[0][2]),
            (ACTIVATE, 2, audit[1][2]),
            (ACTIVATE, 1, audit[2][2]),
        ]
        assert summaries[0][1].startswith(
            f"CALLER_IDENTITY_UNRECOGNISED role=- method={ACTIVATE} and 499 more like this between "
        )


async def test_the_timer_writes_the_summary_when_the_window_closes(tmp_path, module_emulator) -> None:
    async with services(tmp_path, module_emulator, window_seconds="0.5") as up:
        answers = await up.mint(None, 200)
        assert len(answers) == 200 and {reason for _, reason in answers} == {"CLIENT_CERTIFICATE_REQUIRED"}
        await until(lambda: up.factory_app.refusal_audit.open_kinds == 0, "every window closes")
        rows = up.factory_rows()  # the services still run: the timer wrote the summaries
        firsts = [n for *_, n in rows if n == 0]
        assert sum(n or 1 for *_, n in rows) == 200  # every refusal, in a row or a count, exactly
        assert len(rows) <= 2 * len(firsts) and any(n for *_, n in rows)


async def test_past_the_cap_new_kinds_are_summarised_together(tmp_path, module_emulator) -> None:
    async with services(tmp_path, module_emulator, window_seconds="600", max_kinds="2") as up:
        authority = up.tls.authority
        no_party = authority.client_certificate("no-party")
        await up.activate(no_party, 5)
        await up.activate(issue_party(authority, Role.OPERATOR, "ops", common_name="ops-1"), 5)
        await up.activate(
            issue_party(authority, Role.OPERATOR, "ops", common_name="ops-2"), 5
        )  # over the cap
        await up.activate(issue_party(authority, Role.FACTORY, "plant-1"), 5)  # a fourth kind
        await up.activate(no_party, 5)  # the first kind still counts in its own window
        await up.stop()
        rows = up.activation_rows()
        assert [(d.split()[0], stands_for(d)) for _, d, _ in rows] == [
            ("CALLER_IDENTITY_UNRECOGNISED", 1),
            ("CALLER_NOT_AUTHORIZED", 1),
            ("CALLER_NOT_AUTHORIZED", 1),  # the overflow's first, in full
            ("CALLER_IDENTITY_UNRECOGNISED", 9),
            ("CALLER_NOT_AUTHORIZED", 4),
            (KINDS_OVER_CAP, 9),
        ]
        assert "ops-2 sha256:" in rows[2][2]
        assert " and 9 more of other kinds between " in rows[5][1]
        assert sum(stands_for(d) for _, d, _ in rows) == 25


async def test_what_a_refused_caller_sends_is_audited_bounded(tmp_path, module_emulator) -> None:
    # an anonymous caller chooses the request's device id: a first refusal row keeps at most 128 characters
    async with services(tmp_path, module_emulator) as up:
        async with create_channel(up.servers[0].address, up.security(None)) as channel:
            request = fpb.MintCertificateRequest(
                device_id="d" * 1_000_000, server_key_generation=fpb.ServerKeyGeneration()
            )
            refused = await failure(fpb_grpc.FactoryServiceStub(channel).MintCertificate(request))
        assert refused.reason == "CLIENT_CERTIFICATE_REQUIRED"
        with contextlib.closing(sqlite3.connect(tmp_path / "factory" / "ledger.sqlite3")) as db:
            [(length,)] = db.execute("SELECT length(device_id) FROM refusals").fetchall()
        assert length == 128
