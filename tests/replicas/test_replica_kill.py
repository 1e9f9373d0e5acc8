"""kill -9 of one factory_svc replica mid-batch, two real ``factory-svc serve`` processes on one PostgreSQL
database and the emulator as DPS: the other replica finishes, nothing is lost or duplicated.

- replica A dies right after DPS took a chunk's bulk write, before it answered; ``factory-svc enroll-batch``
  run again (through the balancer, as a person would) finishes on B: every device enrolled once, disabled,
  with exactly one code, and that code activates it (activation_svc);
- a client retries its unanswered EnrollBatch with the same request id on B: it gets the codes A made;
- enrollments queued while DPS was down, delivered by the replicas' outboxes in DPS bulk creates: A dies
  right after its first bulk reached DPS, before marking any entry (or at a random moment of the delivery,
  both replicas delivering); B delivers the entries A had claimed (recognising A's writes) and the rest,
  each exactly once;
- an entry queued by a replica that dies before delivering it is delivered by an idle replica (which
  used to look again only after a minute);
- a production lot (MintCertificates) whose replica dies is resumed on the other: one certificate per id;
- two streams of one lot on two replicas at once: one commits each chunk, the other ends LOT_IN_PROGRESS.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    dps_enrollment,
    dps_enrollment_list,
    factory_env,
    mint,
    running_activation,
    running_factory,
    stopped_emulator,
)
from factory.factory_env import make_csr, make_key
from replicas.test_replicas import migrated
from support.cli_process import run_module
from support.factory_process import FactoryProcess
from support.waiting import until

from dbstore import DatabaseUrl
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import factory_service_pb2 as fpb
from devprov_demo.balancer import Balancer
from factory_svc.enrollment.codes_file import read_codes
from factory_svc.enrollment.outbox import NewEntry, Outbox, OutboxMode
from factory_svc.lots.service import derived_device_id
from provkit.activation_code import hash_code, new_code, verify_code
from provkit.grpc_errors import error_details

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240), pytest.mark.slow]

EXIT_UNREACHABLE = 3
METADATA = json.dumps({"tags": {"customer": "acme"}, "properties": {"desired": {"interval_s": 5}}})


async def _migrate(env: dict[str, str]) -> None:
    """The replicas' database migrated in this process (``factory-svc migrate`` as a process, on
    PostgreSQL: tests/dbstore_tests/test_migrate_command.py), sparing each test a Python start-up."""
    await migrated(DatabaseUrl.parse(env["FACTORY_DATABASE_URL"]))


@asynccontextmanager
async def _replicas(
    env: dict[str, str], tmp_path: Path, crash_at: str = "", start_b: bool = True
) -> AsyncIterator[tuple[FactoryProcess, FactoryProcess, str]]:
    """Replicas A (``crash_at`` armed) and B on one data directory (the CA and the codes key) and one
    database, and the address of a balancer in front of them (new connections go to A first).  B is not
    started when ``start_b`` is false (the test starts it)."""
    await _migrate(env)
    a, b = FactoryProcess(env, tmp_path / "a.log"), FactoryProcess(env, tmp_path / "b.log")
    front = None
    try:
        await a.start(crash_at)  # first: it makes the development CA both use
        if start_b:
            await b.start()
        balancer = Balancer([("127.0.0.1", a.port), ("127.0.0.1", b.port)])
        front = await asyncio.start_server(balancer.handle, "127.0.0.1", 0)
        yield a, b, f"127.0.0.1:{front.sockets[0].getsockname()[1]}"
    finally:
        if front is not None:
            front.close()
        await a.stop()
        await b.stop()


async def _mint_files(factory: FactoryProcess, folder: Path, count: int) -> list[tuple[str, str]]:
    """``count`` devices minted (server-side keys) into ``folder``: (device id, chain PEM)."""
    async with factory.stub() as stub:
        minted = await asyncio.gather(*(mint(stub, str(uuid.uuid4()), folder) for _ in range(count)))
    return [(d.device_id, d.chain_pem) for d in minted]


async def _minted(factory: FactoryProcess, folder: Path, count: int) -> list[str]:
    return sorted(d for d, _ in await _mint_files(factory, folder, count))


def _csv_rows(codes: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(codes.read_text().splitlines()))


def _codes_handed_out(codes: Path) -> dict[str, set[str]]:
    """Every code the codes file received, by device (empty rows: answered without a code)."""
    out: dict[str, set[str]] = {}
    for row in _csv_rows(codes):
        if row["activation_code"]:
            out.setdefault(row["device_id"], set()).add(row["activation_code"])
    return out


async def _enrolled_once_with_one_code(emulator, codes: Path, devices: list[str]) -> dict[str, str]:
    """Each device is in DPS exactly once (nothing else is), disabled, and the codes file handed out
    exactly one code for it, which opens its enrollment's code hash; answers the codes."""
    listed = await dps_enrollment_list(emulator)
    assert sorted(e["registrationId"] for e in listed) == devices
    handed = _codes_handed_out(codes)
    assert sorted(handed) == devices and all(len(c) == 1 for c in handed.values())
    assert read_codes(codes) == {d: next(iter(c)) for d, c in handed.items()}
    for enrollment in listed:
        assert enrollment["provisioningStatus"] == "disabled"
        code = next(iter(handed[enrollment["registrationId"]]))
        assert verify_code(code, enrollment["optionalDeviceInformation"]["activationCode"])
    return {d: next(iter(c)) for d, c in handed.items()}


def _rows(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()


def _nothing_duplicated(url: str, devices: list[str]) -> None:
    """One certificate per device in the ledger, at most one outbox entry per device, no code retained
    (every label acknowledged)."""
    per_device = _rows(url, "SELECT device_id, count(*) FROM certificates GROUP BY device_id")
    assert sorted(per_device) == [(d, 1) for d in devices]
    assert all(n == 1 for _, n in _rows(url, "SELECT device_id, count(*) FROM outbox GROUP BY device_id"))
    assert _rows(url, "SELECT count(*) FROM retained_codes") == [(0,)]


async def test_a_replica_killed_after_a_chunk_reached_dps_the_batch_finishes_on_the_other(
    tmp_path, emulator, postgres_url
):
    """60 devices in chunks of 20 (two DPS bulk writes each); A dies right after the third bulk write (the
    second chunk's), before answering.  The run reports the chunks it did not get; run again through the
    balancer (A is gone, B answers), every device ends enrolled once with one code, which activates it."""
    env = factory_env(tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url)
    async with _replicas(env, tmp_path, crash_at="enroll.after_dps_write@3") as (a, b, front):
        devices = await _minted(b, tmp_path / "certs", 60)
        codes = tmp_path / "codes.csv"
        status, err = await a.batch(tmp_path / "certs", codes, "--chunk", "20")
        assert status == EXIT_UNREACHABLE, f"{err}\nreplica A's log ends:\n{a.log_tail()}"
        assert await a.killed() == -signal.SIGKILL
        assert "not answered (40)" in err and len(read_codes(codes)) == 20

        status, err = await b.batch(tmp_path / "certs", codes, "--chunk", "20", target=front)
        assert status == 0, err
        assert "not answered" not in err and "no code in the file" not in err
        rerun = [(r["outcome"], bool(r["activation_code"])) for r in _csv_rows(codes)][20:]
        assert rerun[:20] == [("UNCHANGED", False)] * 20  # answered by A, on disk, acknowledged
        crashed = rerun[20:40]  # A wrote at least the bulk it died after; B hands out the codes A retained
        assert crashed.count(("UNCHANGED", True)) >= 10 and set(crashed) <= {
            ("UNCHANGED", True),
            ("CREATED", True),
        }
        assert rerun[40:] == [("CREATED", True)] * 20  # never reached A

        handed = await _enrolled_once_with_one_code(emulator, codes, devices)
        _nothing_duplicated(postgres_url, devices)
        assert _rows(postgres_url, "SELECT count(*) FROM outbox") == [(0,)]  # all live, nothing queued

    tls = OemTls.create(tmp_path / "tls")
    async with running_activation(activation_env(tmp_path, emulator, tls), tls) as (_app, activation):
        answers = await asyncio.gather(
            *(activation.Activate(activate_request(d, handed[d], METADATA)) for d in devices)
        )
    assert {answer.path for answer in answers} == {apb.ACTIVATION_PATH_ENROLLMENT}
    assert {e["provisioningStatus"] for e in await dps_enrollment_list(emulator)} == {"enabled"}


async def test_a_client_retries_its_unanswered_request_id_on_the_other_replica(
    tmp_path, emulator, postgres_url
):
    """An MES client's EnrollBatch (request id ``batch-7``) whose replica dies after the DPS write is
    retried on B with the same id: B answers every device with the code A made and retained (nothing
    written to DPS twice), and a later replay of ``batch-7`` answers the same.  Where replicas reserve a
    request id before the work, B takes dead A's reservation over once its lease has run out (a short one
    here, so the test does not wait the default)."""
    env = factory_env(
        tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url, FACTORY_REQUESTS_LEASE_SECONDS="2"
    )
    async with _replicas(env, tmp_path, crash_at="enroll.after_dps_write@2") as (a, b, _front):
        minted = await _mint_files(b, tmp_path / "certs", 20)
        items = [fpb.EnrollBatchItem(device_id=d, certificate_pem=pem) for d, pem in minted]
        request = fpb.EnrollBatchRequest(items=items, request_id="batch-7")
        async with a.stub() as stub_a:
            with pytest.raises(grpc.aio.AioRpcError) as killed:
                await stub_a.EnrollBatch(request, timeout=60)
        assert killed.value.code() is grpc.StatusCode.UNAVAILABLE and await a.killed() == -signal.SIGKILL
        async with b.stub() as stub_b:
            answer = await stub_b.EnrollBatch(request, timeout=60)
            replay = await stub_b.EnrollBatch(request, timeout=60)
    devices = sorted(d for d, _ in minted)
    codes = {r.device_id: r.response.activation_code for r in answer.results}
    assert sorted(codes) == devices and all(codes.values()) and answer.failed_count == 0
    assert replay.replayed and {r.device_id: r.response.activation_code for r in replay.results} == codes
    listed = await dps_enrollment_list(emulator)
    assert sorted(e["registrationId"] for e in listed) == devices
    for enrollment in listed:
        assert enrollment["provisioningStatus"] == "disabled"
        assert verify_code(
            codes[enrollment["registrationId"]], enrollment["optionalDeviceInformation"]["activationCode"]
        )
    # both bulk writes reached DPS before A died: B found every device enrolled with its certificate
    assert {r.response.outcome for r in answer.results} == {fpb.ENROLL_OUTCOME_UNCHANGED}


async def _wait_until(what: str, check, timeout: float = 120.0, detail=lambda: "") -> None:
    """``check`` runs in a thread (it asks the database synchronously)."""
    await until(lambda: asyncio.to_thread(check), lambda: f"{what}\n{detail()}", timeout=timeout)


@pytest.mark.parametrize("kill", ["crash-point", "random-moment"])
async def test_a_replica_killed_while_its_outbox_delivers_the_other_delivers_everything_once(
    tmp_path, postgres_url, kill
):
    """DPS down: 80 enrollments queued through A.  DPS back: both replicas' outboxes deliver; A dies
    right after its first bulk delivery reached DPS, before marking any entry (``outbox.after_dps_write@5``,
    the fifth entry that bulk wrote), or at a random moment of the delivery (SIGKILL).  A's claim dies with
    its connection: B delivers those entries (recognising A's writes) and every other one, exactly once in
    effect: each device enrolled in DPS once, with the code the codes file holds.  A replica claims up to 80
    entries at once, so for the crash point B is started only once A has died (else B might claim all 80
    first, and A never reach its crash point): it finds A's claimed entries pending, their writes in DPS."""
    emulator, settings = stopped_emulator(tmp_path)
    env = {**settings, "FACTORY_DATABASE_URL": postgres_url}
    crash_at = "outbox.after_dps_write@5" if kill == "crash-point" else ""
    at_once = kill != "crash-point"
    delivered = "SELECT count(*) FROM outbox WHERE state = 'delivered'"
    try:
        async with _replicas(env, tmp_path, crash_at, start_b=at_once) as (a, b, _front):
            devices = await _minted(a, tmp_path / "certs", 80)
            codes = tmp_path / "codes.csv"
            status, err = await a.batch(tmp_path / "certs", codes, "--chunk", "40")
            assert status == 0, err
            assert set(r[0] for r in _rows(postgres_url, "SELECT state FROM outbox")) == {"pending"}
            emulator.start()
            if kill == "crash-point":
                assert await a.killed() == -signal.SIGKILL
                assert _rows(postgres_url, delivered) == [(0,)]  # written to DPS, none marked
                await b.start()
            else:
                moment = random.randint(1, 40)
                print(f"replica A is killed once {moment} entries are delivered")  # shown on a failure
                await _wait_until(
                    f"{moment} delivered", lambda: _rows(postgres_url, delivered)[0][0] >= moment
                )
                assert await a.kill() == -signal.SIGKILL
            await _wait_until(
                "all delivered",
                lambda: _rows(postgres_url, delivered) == [(80,)],
                detail=lambda: f"replica B's log ends:\n{b.log_tail()}",
            )
            assert b.process is not None and b.process.returncode is None
        rows = _rows(postgres_url, "SELECT device_id, state, outcome FROM outbox ORDER BY seq")
        assert sorted(d for d, _, _ in rows) == devices and {s for _, s, _ in rows} == {"delivered"}
        outcomes = [o for _, _, o in rows]
        # "already-applied": a delivery that found its entry's write in DPS (made by A before it died; or by
        # an attempt whose answer was lost, on a loaded machine) and marked it without writing again
        recognised = outcomes.count("already-applied")
        assert outcomes.count("created") == 80 - recognised
        assert recognised >= (5 if kill == "crash-point" else 0)  # at least the bulk A died after
        await _enrolled_once_with_one_code(emulator, codes, devices)
        _nothing_duplicated(postgres_url, devices)
    finally:
        emulator.stop()


async def test_an_idle_replica_delivers_what_another_one_queued(tmp_path, emulator, postgres_url):
    """Replica B's delivery loop is idle (nothing pending) when replica A queues an enrollment and dies
    before delivering it: B's loop never hears of A's entry, it finds it by looking (every second)."""
    env = factory_env(tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url)
    await _migrate(env)
    async with running_factory(env) as (_app_b, stub_b):
        device = await mint(stub_b, str(uuid.uuid4()), tmp_path / "certs")
        leaf = x509.load_pem_x509_certificates(device.chain_pem.encode())[0]
        code = new_code()
        queued_by_a = NewEntry(
            device.device_id,
            OutboxMode.CREATE,
            device.chain_pem,
            hash_code(code, log2_n=8),
            leaf.fingerprint(hashes.SHA256()).hex().upper(),
        )
        outbox_a = await Outbox.open(DatabaseUrl.parse(postgres_url))
        try:
            await outbox_a.enqueue([queued_by_a], datetime.now(UTC))
        finally:
            await outbox_a.close()  # A is gone: it never delivers
        delivered = "SELECT state FROM outbox"
        await _wait_until(
            "B delivered A's entry", lambda: _rows(postgres_url, delivered) == [("delivered",)], 30
        )
    enrollment = await dps_enrollment(emulator, device.device_id)
    assert enrollment is not None and enrollment["provisioningStatus"] == "disabled"
    assert verify_code(code, enrollment["optionalDeviceInformation"]["activationCode"])


async def test_a_lot_whose_replica_dies_resumes_on_the_other_with_one_certificate_per_id(
    tmp_path, emulator, postgres_url
):
    """`factory-svc lot` through the balancer (on A, chunks of 64); A dies right after committing the third
    chunk, before answering it (``lot.after_commit@3``); the command resumes the lot by its id through the
    balancer, on B: the three committed chunks are replayed from the shared ledger, the rest issued, and
    every id has exactly one certificate."""
    env = factory_env(tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url)
    count, out_dir = 400, tmp_path / "lot"
    async with _replicas(env, tmp_path, crash_at="lot.after_commit@3") as (a, _b, front):
        status, out, err = await run_module(
            "factory_svc.cli", "lot", "line-3-night", "--count", str(count), "--out", str(out_dir),
            "--retry-seconds", "120", "--target", front, "--insecure", env=a.env, timeout=200,
        )  # fmt: skip
        assert status == 0, err
        assert await a.killed() == -signal.SIGKILL
    assert f"{count} item(s), {count - 192} issued, 192 from earlier attempts, 0 failed" in out
    assert "(1 attempt(s))" not in out
    expected = sorted(derived_device_id("line-3-night", i) for i in range(count))
    per_device = _rows(postgres_url, "SELECT device_id, count(*) FROM certificates GROUP BY device_id")
    assert sorted(per_device) == [(d, 1) for d in expected]
    assert _rows(postgres_url, "SELECT count(*) FROM lot_items WHERE lot_id = 'line-3-night'") == [(count,)]
    assert _rows(postgres_url, "SELECT count(*) FROM lot_items WHERE private_key_pem IS NOT NULL") == [(0,)]
    assert sorted(p.name for p in out_dir.iterdir() if p.is_dir()) == expected  # beside the lot's manifest
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert sorted(d["device_id"] for d in manifest["devices"] if d["state"] == "minted") == expected


class _Stream:
    """One MintCertificates stream whose requests the test sends when it chooses (a station's stream)."""

    def __init__(self, stub) -> None:
        self.outbox: asyncio.Queue[fpb.MintCertificatesRequest | None] = asyncio.Queue()
        self.call = stub.MintCertificates(self._requests())
        self.results: list[fpb.LotItemResult] = []
        self.summary: fpb.LotSummary | None = None

    async def _requests(self) -> AsyncIterator[fpb.MintCertificatesRequest]:
        while (message := await self.outbox.get()) is not None:
            yield message

    def send(self, header: fpb.LotHeader | None = None, items: list[fpb.LotItem] = ()) -> None:
        if header is not None:
            self.outbox.put_nowait(fpb.MintCertificatesRequest(header=header))
        if items:
            self.outbox.put_nowait(fpb.MintCertificatesRequest(items=fpb.LotItems(items=items)))

    async def finish(self) -> grpc.aio.AioRpcError | None:
        """Read every answer to the end (then close the requests): the call's error, or None."""
        try:
            async for response in self.call:
                if response.WhichOneof("part") == "summary":
                    self.summary = response.summary
                    self.outbox.put_nowait(None)
                else:
                    self.results.extend(response.results.results)
        except grpc.aio.AioRpcError as exc:
            return exc
        finally:
            self.outbox.put_nowait(None)
        return None


def _lot_items_committed(url: str, lot_id: str) -> int:
    return _rows(url, f"SELECT count(*) FROM lot_items WHERE lot_id = '{lot_id}'")[0][0]


def _csr_lot(lot_id: str, count: int) -> tuple[list[str], fpb.LotHeader, list[fpb.LotItem]]:
    """A lot of ``count`` CSR items (new device ids): (ids, header, items)."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    header = fpb.LotHeader(lot_id=lot_id, key_source=fpb.KEY_SOURCE_CSR, item_count=count)
    items = [
        fpb.LotItem(index=i, device_id=d, csr_pem=make_csr(make_key("p256"), d)) for i, d in enumerate(ids)
    ]
    return ids, header, items


def _recorded_once(url: str, lot_id: str, ids: list[str]) -> dict[int, str]:
    """One certificate per id in the ledger, one item per index in the lot: index -> recorded serial."""
    per_device = _rows(url, "SELECT device_id, count(*) FROM certificates GROUP BY device_id")
    assert sorted(per_device) == sorted((d, 1) for d in ids)
    recorded = dict(_rows(url, f"SELECT item_index, serial_number FROM lot_items WHERE lot_id = '{lot_id}'"))
    assert sorted(recorded) == list(range(len(ids)))
    return recorded


async def test_two_replicas_streaming_one_lot_at_once_keep_one_certificate_per_item(
    tmp_path, emulator, postgres_url
):
    """A key-injection station's stream on A is still open when the station reconnects on B with the same
    lot (CSR items).  A committed the first chunk; B opens the lot (it replays that chunk) and commits the
    second; A, which signed the second chunk too, loses the key conflict: its chunk is rolled back, its
    stream ends with ABORTED / LOT_IN_PROGRESS and a retry delay, and it never sees a certificate that is
    not the recorded one.  B finishes; a resume answers the whole lot from the ledger."""
    env = factory_env(tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url)
    lot_id, count = "line-7-csr", 320
    ids, header, items = _csr_lot(lot_id, count)
    committed = lambda: _lot_items_committed(postgres_url, lot_id)  # noqa: E731
    async with _replicas(env, tmp_path) as (a, b, _front), a.stub() as on_a, b.stub() as on_b:
        first, second = _Stream(on_a), _Stream(on_b)
        first.send(header, items[:64])
        await _wait_until("A committed chunk 0", lambda: committed() == 64, 60)
        second.send(header, items[:128])
        await _wait_until("B committed chunk 1", lambda: committed() == 128, 60)
        first.send(items=items[64:])  # A signs chunk 1 again (it does not know B did)
        lost = await first.finish()
        second.send(items=items[128:])
        assert await second.finish() is None, "B's stream should finish"
        resumed = _Stream(on_a)
        resumed.send(header, items)
        assert await resumed.finish() is None
    assert lost is not None, "A's stream should not finish"
    details = error_details(lost)
    assert (lost.code(), details.reason) == (grpc.StatusCode.ABORTED, "LOT_IN_PROGRESS"), lost
    assert details.retry_after is not None and details.retry_after > 0
    recorded = _recorded_once(postgres_url, lot_id, ids)
    assert [r.index for r in first.results] == list(range(64))  # chunk 0 only: its chunk 1 never came back
    assert second.summary is not None and (second.summary.issued_count, second.summary.replayed_count) == (
        count - 64,
        64,
    )
    assert resumed.summary is not None and resumed.summary.replayed_count == count
    for stream in (first, second, resumed):
        assert all(recorded[r.index] == r.certificate.serial_number for r in stream.results)
    assert [r.index for r in resumed.results] == list(range(count))


async def test_two_replicas_racing_one_whole_lot_answer_only_recorded_certificates(
    tmp_path, emulator, postgres_url
):
    """The same lot (400 CSR items) sent whole to A and B at the same moment: whichever way the chunks
    interleave, each stream finishes or ends ABORTED / LOT_IN_PROGRESS, at least one finishes, every answer
    is the recorded certificate of its index, and a resume answers the whole lot from the ledger."""
    env = factory_env(tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url)
    lot_id, count = "line-8-csr", 400
    ids, header, items = _csr_lot(lot_id, count)
    async with _replicas(env, tmp_path) as (a, b, _front), a.stub() as on_a, b.stub() as on_b:
        streams = [_Stream(on_a), _Stream(on_b)]
        for stream in streams:
            stream.send(header, items)
        outcomes = await asyncio.gather(*(s.finish() for s in streams))
        resumed = _Stream(on_b)
        resumed.send(header, items)
        assert await resumed.finish() is None
    for outcome in outcomes:
        assert outcome is None or (outcome.code(), error_details(outcome).reason) == (
            grpc.StatusCode.ABORTED,
            "LOT_IN_PROGRESS",
        ), outcome
    assert None in outcomes
    recorded = _recorded_once(postgres_url, lot_id, ids)
    for stream in (*streams, resumed):
        assert all(recorded[r.index] == r.certificate.serial_number for r in stream.results)
    assert [r.index for r in resumed.results] == list(range(count))
    assert resumed.summary is not None and resumed.summary.replayed_count == count
