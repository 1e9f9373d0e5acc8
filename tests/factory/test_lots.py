"""Production lots (MintCertificates) on a real factory server: CSR lots and server-generated keys, results
committed before they are sent, resumed by lot id without duplicates, keys kept until the lot is
acknowledged, bad items refused one by one; the `factory-svc lot` command (one directory per device, keys
0600 or PKCS#12); and a lot interrupted by kill -9 of the factory process, resumed to exactly one
certificate per device in the ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from factory_env import factory_settings, make_csr, make_key, running_factory, verify_chain
from support.cli_process import run_module, wait_serving
from support.emulator import free_port
from support.parties import FACTORY_URI

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.lots.service import derived_device_id
from provkit.channels import ChannelSecurity
from provkit.grpc_errors import error_details

pytestmark = pytest.mark.timeout(240)


def _csr_lot(lot_id: str, ids: list[str]) -> tuple[pb.LotHeader, list[pb.LotItem]]:
    header = pb.LotHeader(lot_id=lot_id, key_source=pb.KEY_SOURCE_CSR, item_count=len(ids))
    items = [
        pb.LotItem(index=i, device_id=d, csr_pem=make_csr(make_key("p256"), d)) for i, d in enumerate(ids)
    ]
    return header, items


async def _send(stub, header: pb.LotHeader, items: list[pb.LotItem], ack: bool = True, batch: int = 50):
    """Run one lot stream (the items in batches): (results, summary)."""
    summary_seen = asyncio.Event()

    async def requests() -> AsyncIterator[pb.MintCertificatesRequest]:
        yield pb.MintCertificatesRequest(header=header)
        for start in range(0, len(items), batch):
            yield pb.MintCertificatesRequest(items=pb.LotItems(items=items[start : start + batch]))
        await summary_seen.wait()
        if ack:
            yield pb.MintCertificatesRequest(ack=pb.LotAck())

    results, summary = [], None
    async for response in stub.MintCertificates(requests()):
        if response.WhichOneof("part") == "summary":
            summary = response.summary
            summary_seen.set()
        else:
            results.extend(response.results.results)
    return results, summary


async def _ledger_count(factory) -> int:
    return len(await factory.app.ledger.certificates.page(None, 10_000, None))


async def test_a_csr_lot_is_issued_in_order_and_resumes_without_duplicates(tmp_path: Path) -> None:
    ids = [f"lot-a-{n:03d}" for n in range(150)]  # a few chunks
    header, items = _csr_lot("lot-a", ids)
    async with running_factory(factory_settings(tmp_path)) as factory:
        results, summary = await _send(factory.stub, header, items)
        assert [r.index for r in results] == list(range(150))
        assert [r.device_id for r in results] == ids
        assert (summary.issued_count, summary.replayed_count, summary.failed_count) == (150, 0, 0)
        verify_chain(results[7].certificate.certificate_chain_pem)
        assert all(r.certificate.request_id == "lot-a" and not r.private_key_pem for r in results)
        assert await _ledger_count(factory) == 150

        again, summary = await _send(factory.stub, header, items, batch=7)  # answered from the ledger
        assert (summary.issued_count, summary.replayed_count) == (0, 150)
        assert [r.certificate.serial_number for r in again] == [r.certificate.serial_number for r in results]
        assert all(r.replayed for r in again)
        assert await _ledger_count(factory) == 150


async def test_a_partly_sent_lot_resumes_where_the_ledger_stands(tmp_path: Path) -> None:
    ids = [f"lot-b-{n:03d}" for n in range(100)]
    header, items = _csr_lot("lot-b", ids)
    async with running_factory(factory_settings(tmp_path)) as factory:
        partial = [
            pb.MintCertificatesRequest(header=header),
            pb.MintCertificatesRequest(items=pb.LotItems(items=items[:40])),
            pb.MintCertificatesRequest(items=pb.LotItems(items=items[40:70])),
        ]
        call = factory.stub.MintCertificates(iter(partial))  # 70 items, then the client is gone
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert error_details(caught.value).reason == "LOT_INCOMPLETE"
        committed = await _ledger_count(factory)
        assert committed == 64  # the first chunk was committed (and sent) before the stream broke off
        results, summary = await _send(factory.stub, header, items)
        assert (summary.issued_count, summary.replayed_count) == (100 - committed, committed)
        assert await _ledger_count(factory) == 100
        assert len({r.device_id for r in results}) == 100


async def test_bad_items_are_refused_one_by_one(tmp_path: Path) -> None:
    header, items = _csr_lot("lot-c", ["lot-c-0", "lot-c-1", "lot-c-2", "lot-c-3"])
    items[2].csr_pem = "not a csr"
    items[3].device_id = "lot-c-0"  # the same device twice
    items[3].csr_pem = make_csr(make_key("p256"), "lot-c-0")
    async with running_factory(factory_settings(tmp_path)) as factory:
        results, summary = await _send(factory.stub, header, items)
        assert [r.error.reason for r in results] == ["", "", "CSR_MALFORMED", "DUPLICATE_IN_LOT"]
        assert results[2].error.code == "INVALID_ARGUMENT" and not results[2].HasField("certificate")
        assert (summary.issued_count, summary.failed_count) == (2, 2)
        # a resumed lot must send the same device at the same index
        results, _ = await _send(
            factory.stub, *_csr_lot("lot-c", ["lot-c-0", "other-device", "lot-c-2", "lot-c-3"])
        )
        assert results[1].error.reason == "LOT_ITEM_CHANGED"
        assert results[0].replayed
        # the same lot id with another header
        other = pb.LotHeader(lot_id="lot-c", key_source=pb.KEY_SOURCE_CSR, item_count=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _send(factory.stub, other, [])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(caught.value).reason == "REQUEST_ID_REUSED"
        # lot-c-0 and lot-c-1 from the first attempt; lot-c-2 and lot-c-3 (refused then) by the second
        assert await _ledger_count(factory) == 4


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (pb.LotHeader(key_source=pb.KEY_SOURCE_CSR, item_count=1), "LOT_ID_MISSING"),
        (pb.LotHeader(lot_id="x", key_source=pb.KEY_SOURCE_CSR, item_count=0), "LOT_SIZE_INVALID"),
        (pb.LotHeader(lot_id="x", item_count=1), "LOT_KEY_SOURCE_INVALID"),
        (
            pb.LotHeader(lot_id="x", key_source=pb.KEY_SOURCE_CSR, item_count=1, derive_device_ids=True),
            "LOT_KEY_SOURCE_INVALID",
        ),
        (
            pb.LotHeader(
                lot_id="x",
                key_source=pb.KEY_SOURCE_SERVER_GENERATED,
                key_type=pb.KEY_TYPE_RSA_OTHER,
                item_count=1,
            ),
            "KEY_TYPE_UNSUPPORTED",
        ),
        (pb.LotHeader(lot_id="bad id", key_source=pb.KEY_SOURCE_CSR, item_count=1), "REQUEST_ID_INVALID"),
    ],
)
async def test_bad_headers_are_refused_and_write_nothing(
    tmp_path: Path, header: pb.LotHeader, reason: str
) -> None:
    async with running_factory(factory_settings(tmp_path)) as factory:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _send(factory.stub, header, [])
        assert error_details(caught.value).reason == reason
        assert await _ledger_count(factory) == 0


async def test_generated_keys_are_kept_until_the_lot_is_acknowledged(tmp_path: Path) -> None:
    header = pb.LotHeader(
        lot_id="lot-d", key_source=pb.KEY_SOURCE_SERVER_GENERATED, item_count=70, derive_device_ids=True
    )
    async with running_factory(factory_settings(tmp_path)) as factory:
        first, _ = await _send(factory.stub, header, [], ack=False)
        assert [r.device_id for r in first] == [derived_device_id("lot-d", i) for i in range(70)]
        assert all(r.private_key_pem for r in first)
        resumed, summary = await _send(factory.stub, header, [], ack=True)
        assert summary.replayed_count == 70
        assert [r.private_key_pem for r in resumed] == [r.private_key_pem for r in first]
        after_ack, _ = await _send(factory.stub, header, [])
        assert all(r.replayed and not r.private_key_pem for r in after_ack)
        assert await _ledger_count(factory) == 70


# ------------------------------------------------------------------------------------- real processes
async def _start_server(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "factory_svc.cli",
        "serve",
        env={**os.environ, "FACTORY_CONFIG": str(config)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "factory.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[server]\ninsecure = true\nport = {port}\n'
        f'insecure_identity = "{FACTORY_URI}"\n'
    )
    return config


@pytest.mark.slow
async def test_the_lot_command_writes_a_directory_per_device(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    target = f"127.0.0.1:{port}"
    server = await _start_server(_config(tmp_path, port))
    try:
        await wait_serving(target, ChannelSecurity(insecure=True), "factory-svc serve")
        client = ("--target", target, "--insecure")
        csr_dir = tmp_path / "csrs"
        csr_dir.mkdir()
        boards = [str(uuid.uuid4()).upper() for _ in range(3)]  # as a label shows it
        for n, guid in enumerate(boards):
            (csr_dir / f"board-{n}.csr").write_text(make_csr(make_key("p256"), guid))
        code, out, err = await run_module(
            "factory_svc.cli",
            "lot",
            "csr-lot",
            "--csr-dir",
            str(csr_dir),
            "--out",
            str(tmp_path / "csr-out"),
            *client,
        )
        assert code == 0, err
        assert "3 item(s), 3 issued" in out
        for guid in boards:
            folder = tmp_path / "csr-out" / guid.lower()
            verify_chain((folder / "chain.pem").read_text())
            assert not (folder / "key.pem").exists()

        ids = tmp_path / "ids.txt"
        jigs = [str(uuid.uuid4()), str(uuid.uuid4())]
        ids.write_text("\n".join(jigs) + "\n")
        password = tmp_path / "p12-password"
        password.write_text("correct horse\n")
        code, out, err = await run_module(
            "factory_svc.cli",
            "lot",
            "p12-lot",
            "--ids",
            str(ids),
            "--key-type",
            "p384",
            "--pkcs12-password-file",
            str(password),
            "--out",
            str(tmp_path / "p12-out"),
            *client,
        )
        assert code == 0, err
        bundle = tmp_path / "p12-out" / jigs[1] / "device.p12"
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
        key, cert, cas = pkcs12.load_key_and_certificates(bundle.read_bytes(), b"correct horse")
        assert cert is not None and key is not None and len(cas) == 2
        assert cert.subject.rfc4514_string() == f"CN={jigs[1]}" and key.curve.name == "secp384r1"
        assert cert.public_key() == key.public_key()
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)


@pytest.mark.slow
async def test_a_lot_interrupted_by_kill_9_resumes_to_one_certificate_per_device(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    target = f"127.0.0.1:{port}"
    config = _config(tmp_path, port)
    count = 3000
    out_dir = tmp_path / "out"
    server = await _start_server(config)
    try:
        await wait_serving(target, ChannelSecurity(insecure=True), "factory-svc serve")
        lot = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "factory_svc.cli",
            "lot",
            "line-7-night",
            "--count",
            str(count),
            "--out",
            str(out_dir),
            "--retry-seconds",
            "120",
            "--target",
            target,
            "--insecure",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        written = 0
        for _ in range(6000):  # until a good part of the lot has arrived
            written = len(list(out_dir.glob("*/key.pem"))) if out_dir.exists() else 0
            if written >= 100 or lot.returncode is not None:
                break
            await asyncio.sleep(0.01)
        assert 100 <= written < count, "the lot must be under way when the factory dies"
        server.kill()  # kill -9: no shutdown, no flush beyond what was committed
        await server.wait()
        server = await _start_server(config)
        out, err = await asyncio.wait_for(lot.communicate(), 200)
        assert lot.returncode == 0, err.decode()
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.wait(), 30)
    summary = out.decode()
    assert f"{count} item(s)" in summary and "0 failed" in summary and "(1 attempt(s))" not in summary
    db = sqlite3.connect(tmp_path / "data" / "ledger.sqlite3")
    try:
        per_device = db.execute("SELECT device_id, COUNT(*) FROM certificates GROUP BY device_id").fetchall()
        in_lot = db.execute("SELECT COUNT(*) FROM lot_items WHERE lot_id = 'line-7-night'").fetchone()[0]
        keys_left = db.execute("SELECT COUNT(*) FROM lot_items WHERE private_key_pem IS NOT NULL").fetchone()[
            0
        ]
    finally:
        db.close()
    expected = {derived_device_id("line-7-night", i) for i in range(count)}
    assert {device for device, _ in per_device} == expected
    assert all(n == 1 for _, n in per_device)
    assert in_lot == count and keys_left == 0  # acknowledged: the factory forgot the keys
    for device in list(expected)[:50]:
        folder = out_dir / device
        key = folder / "key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        assert load_pem_private_key(key.read_bytes(), None).public_key() == cert.public_key()


async def test_more_items_than_the_header_announced_are_refused(tmp_path: Path) -> None:
    header, items = _csr_lot("lot-e", ["lot-e-0", "lot-e-1", "lot-e-2"])
    header.item_count = 2
    async with running_factory(factory_settings(tmp_path)) as factory:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _send(factory.stub, header, items)
        assert error_details(caught.value).reason == "LOT_BATCH_INVALID"
        assert await _ledger_count(factory) == 0
