"""A SoftHSM2 token for the tests of the ``pkcs11`` CA backend.

The PKCS#11 module is loaded once per process with the configuration it finds in SOFTHSM2_CONF then, and
tokens initialised later are not seen by that process: so one token is made per test session, before any
test loads the module, and each test keeps its keys under labels of its own.  When SoftHSM2 is missing
(``make softhsm`` installs Debian's package), the tests that need it skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from factory_svc.ca.pkcs11_signer import DEBIAN_SOFTHSM2

REPO = Path(__file__).resolve().parents[2]
TOKEN_LABEL = "devprov-tests"
USER_PIN = "4711-user"
SO_PIN = "0815-officer"


def softhsm_unavailable() -> str | None:
    """Why the SoftHSM2 tests cannot run here (None: they can)."""
    if DEBIAN_SOFTHSM2.exists() and shutil.which("softhsm2-util"):
        return None
    note = REPO / ".venv" / "softhsm2-unavailable"
    why = note.read_text().strip() if note.exists() else "`make softhsm` has not run"
    return f"SoftHSM2 is missing ({why}); `make softhsm` installs Debian's softhsm2"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    token: str = TOKEN_LABEL
    pin: str = USER_PIN
    module: Path = DEBIAN_SOFTHSM2

    def new_key_label(self) -> str:
        return f"issuing-{uuid.uuid4().hex[:12]}"

    def env(self, key_label: str, chain_file: Path, *, pin_file: Path | None = None) -> dict[str, str]:
        """FACTORY_* settings of the pkcs11 backend (the PIN in the environment, or in ``pin_file``)."""
        env = {
            "SOFTHSM2_CONF": str(self.conf),
            "FACTORY_CA_BACKEND": "pkcs11",
            "FACTORY_CA_CHAIN_FILE": str(chain_file),
            "FACTORY_CA_PKCS11_MODULE": str(self.module),
            "FACTORY_CA_PKCS11_TOKEN": self.token,
            "FACTORY_CA_PKCS11_KEY_LABEL": key_label,
        }
        if pin_file is None:
            env["FACTORY_CA_PKCS11_PIN"] = self.pin
        else:
            env["FACTORY_CA_PKCS11_PIN_FILE"] = str(pin_file)
        return env


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    why = softhsm_unavailable()
    if why is not None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read when this process first loads the module
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--pin",
            USER_PIN,
            "--so-pin",
            SO_PIN,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield SoftHsm(conf)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@dataclass(frozen=True)
class TokenCa:
    """An issuing CA made by ``factory-svc ca init`` in the session's token, under a development root."""

    key_label: str
    chain_file: Path
    env: dict[str, str]  # FACTORY_CA_* for `serve` / load_settings
    init_output: str


async def init_token_ca(softhsm: SoftHsm, folder: Path, curve: str = "p256") -> TokenCa:
    """Run ``factory-svc ca init`` as a process: key in the token, certificate signed by a fresh root."""
    from factory_svc.ca.issuing import ROOT_CERT, ROOT_KEY, open_dev_ca
    from provkit.clock import now_utc
    from support.cli_process import run_module

    root_dir = folder / "offline-root"
    open_dev_ca(root_dir, now_utc)  # its root certificate and key stand in for an offline root
    label = softhsm.new_key_label()
    chain_file = folder / "issuing-chain.pem"
    env = softhsm.env(label, chain_file)
    code, out, err = await run_module(
        "factory_svc",
        "ca",
        "init",
        "--curve",
        curve,
        "--common-name",
        f"line 3 issuing CA {curve}",
        "--parent-chain",
        str(root_dir / ROOT_CERT),
        "--parent-key",
        str(root_dir / ROOT_KEY),
        env={**os.environ, **env},
    )
    assert code == 0, err
    return TokenCa(label, chain_file, env, out)
