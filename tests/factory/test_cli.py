"""`factory-svc serve` as a real process, driven by the `factory-svc` client commands; SIGTERM stops it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from factory_env import make_csr, make_key, verify_chain
from support.cli_process import run_module, wait_serving
from support.emulator import free_port
from support.parties import FACTORY_URI

from provkit.channels import ChannelSecurity

pytestmark = pytest.mark.slow

FIRST = "c1a0f2e4-5b6d-4e7f-8a9b-0c1d2e3f4a5b"
JIG = "9d8c7b6a-5f4e-4d3c-9b2a-1f0e9d8c7b6a"


async def test_serve_mint_list_and_graceful_stop(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    target = f"127.0.0.1:{port}"
    config = tmp_path / "factory.toml"
    config.write_text(f'data_dir = "data"\n[server]\ninsecure = true\nport = {port}\n'
        f'insecure_identity = "{FACTORY_URI}"\n')
    env = {**os.environ, "FACTORY_CONFIG": str(config)}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "factory_svc.cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_serving(target, ChannelSecurity(insecure=True), "factory-svc serve")
        csr = tmp_path / "device.csr"
        csr.write_text(make_csr(make_key("p256"), FIRST))
        code, out, err = await run_module(
            "factory_svc.cli",
            "mint",
            FIRST.upper(),  # ids are case-insensitive, stored in lower case
            "--csr",
            str(csr),
            "--out",
            str(tmp_path / "out"),
            "--target",
            target,
            "--insecure",
        )
        assert code == 0, err
        assert FIRST in out and "sha256" in out
        leaf, _, _ = verify_chain((tmp_path / "out" / f"{FIRST}.chain.pem").read_text())
        assert f"{leaf.serial_number:X}" in out.upper()

        code, out, err = await run_module(
            "factory_svc.cli",
            "mint",
            JIG,
            "--generate-key",
            "--key-type",
            "p384",
            "--out",
            str(tmp_path / "out"),
            "--target",
            target,
            "--insecure",
        )
        assert code == 0, err
        key_file = tmp_path / "out" / f"{JIG}.key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate((tmp_path / "out" / f"{JIG}.cert.pem").read_bytes())
        assert cert.public_key().curve.name == "secp384r1"

        code, out, err = await run_module("factory_svc.cli", "list", "--target", target, "--insecure")
        assert code == 0 and FIRST in out and JIG in out
        code, out, err = await run_module(
            "factory_svc.cli", "list", FIRST, "--json", "--target", target, "--insecure"
        )
        assert code == 0, err
        (listed,) = [json.loads(line) for line in out.splitlines()]
        assert listed["device_id"] == FIRST and int(listed["serial_number"], 16) == leaf.serial_number

        code, out, err = await run_module(
            "factory_svc.cli",
            "mint",
            "bad id",
            "--csr",
            str(csr),
            "--out",
            str(tmp_path / "out"),
            "--target",
            target,
            "--insecure",
        )
        assert (code, out) == (2, "")  # refused before anything is sent (no field violation echo either)
        assert err == (
            "factory-svc: error: the device id 'bad id' is not a GUID: expected 32 hex digits as 8-4-4-4-12, "
            "like 3f2a9c1e-0000-4000-8000-000000000001 [DEVICE_ID_NOT_A_GUID]\n"
        )
        assert (tmp_path / "data" / "ledger.sqlite3").exists()

        unknown = "0f0e0d0c-0b0a-4909-8807-060504030201"
        code, out, err = await run_module(
            "factory_svc.cli", "list", unknown, "--target", target, "--insecure"
        )
        assert (code, out, err) == (
            1,
            "",
            f"factory-svc: error: no certificate was ever issued for device {unknown}\n"
            f"  mint one: factory-svc mint {unknown} --csr FILE --out DIR\n",
        )

        missing = tmp_path / "nope.csr"
        code, out, err = await run_module(
            "factory_svc.cli", "mint", unknown, "--csr", str(missing), "--out", str(tmp_path / "out"),
            "--target", target, "--insecure",
        )  # fmt: skip
        assert (code, out, err) == (2, "", f"factory-svc: error: the CSR file {missing} does not exist\n")

        # A refusal with one field violation that says what the message says: printed once.
        code, out, err = await run_module(
            "factory_svc.cli", "mint", unknown, "--csr", str(csr), "--out", str(tmp_path / "out"),
            "--target", target, "--insecure",
        )  # fmt: skip
        assert (code, out) == (1, "")
        assert re.fullmatch(r"factory-svc: error: [^\n]+ \[CSR_SUBJECT_MISMATCH\]\n", err), err
    finally:
        server.send_signal(signal.SIGTERM)
        _, log = await asyncio.wait_for(server.communicate(), 30)
    assert server.returncode == 0, log.decode()
    assert b"shutting down" in log
    (listening,) = [json.loads(line) for line in log.splitlines() if b"gRPC server listening" in line]
    assert listening["event_loop"] == "uvloop"  # the loop the service runs on in production
