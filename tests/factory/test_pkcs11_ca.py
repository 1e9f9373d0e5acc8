"""The ``pkcs11`` CA backend against SoftHSM2: ``ca init`` makes the issuing key inside the token, the key
cannot be exported, the factory signs with it (P-256 and P-384), and a wrong or missing PIN is a clear
start-up error."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from factory_env import FACTORY_URI, make_csr, make_key, verify_chain
from pkcs11 import Attribute, ObjectClass
from support.cli_process import run_module
from support.softhsm import SoftHsm, init_token_ca

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.ca.pkcs11_signer import TokenRef, open_session
from factory_svc.errors import CaConfigError
from factory_svc.settings import load_settings
from provkit.settings import SettingsError

pytestmark = pytest.mark.timeout(120)


def _env(tmp_path: Path, ca_env: dict[str, str]) -> dict[str, str]:
    return {
        "FACTORY_DATA_DIR": str(tmp_path / "data"),
        "FACTORY_SERVER_INSECURE": "true",
        "FACTORY_SERVER_PORT": "0",
        "FACTORY_SERVER_INSECURE_IDENTITY": FACTORY_URI,
        **ca_env,
    }


@pytest.mark.slow
@pytest.mark.parametrize(("curve", "size"), [("p256", 256), ("p384", 384)])
async def test_ca_init_then_the_factory_signs_with_the_token_key(
    tmp_path: Path, softhsm: SoftHsm, curve: str, size: int
) -> None:
    from factory_env import running_factory

    token_ca = await init_token_ca(softhsm, tmp_path, curve)
    assert f"ECDSA P-{size}" in token_ca.init_output
    assert softhsm.pin not in token_ca.init_output
    chain = x509.load_pem_x509_certificates(token_ca.chain_file.read_bytes())
    assert len(chain) == 2 and chain[0].issuer == chain[1].subject
    issuing_key = chain[0].public_key()
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey) and issuing_key.curve.key_size == size

    settings = load_settings(env=_env(tmp_path, token_ca.env))
    async with running_factory(settings) as factory:
        guid = str(uuid.uuid4())
        reply = await factory.stub.MintCertificate(
            pb.MintCertificateRequest(device_id=guid, csr_pem=make_csr(make_key("p256"), guid))
        )
    leaf, issuing, _root = verify_chain(reply.certificate.certificate_chain_pem)
    assert issuing == chain[0]
    assert leaf.issuer == issuing.subject

    code, out, err = await run_module(
        "factory_svc", "ca", "show", env={**os.environ, **_env(tmp_path, token_ca.env)}
    )
    assert code == 0, err
    assert f"label {token_ca.key_label}" in out and chain[0].subject.rfc4514_string() in out


async def test_the_issuing_key_cannot_leave_the_token(tmp_path: Path, softhsm: SoftHsm) -> None:
    token_ca = await init_token_ca(softhsm, tmp_path)
    ref = TokenRef(softhsm.module, softhsm.token, token_ca.key_label)
    with open_session(ref, softhsm.pin) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=token_ca.key_label)
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.TOKEN] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            key[Attribute.VALUE]  # the private scalar: refused by the token


@pytest.mark.slow
async def test_ca_init_refuses_a_label_already_in_use(tmp_path: Path, softhsm: SoftHsm) -> None:
    token_ca = await init_token_ca(softhsm, tmp_path)
    env = {**os.environ, **softhsm.env(token_ca.key_label, tmp_path / "second-chain.pem")}
    code, _out, err = await run_module("factory_svc", "ca", "init", env=env)
    assert code == 2
    assert f"already holds a key labelled {token_ca.key_label!r}" in err
    assert not (tmp_path / "second-chain.pem").exists()


@pytest.mark.slow
async def test_a_wrong_pin_is_a_clear_start_up_error(tmp_path: Path, softhsm: SoftHsm) -> None:
    token_ca = await init_token_ca(softhsm, tmp_path)
    pin_file = tmp_path / "pin"
    pin_file.write_text("not-the-pin\n")
    env = _env(tmp_path, softhsm.env(token_ca.key_label, token_ca.chain_file, pin_file=pin_file))
    code, out, err = await run_module("factory_svc", "serve", env={**os.environ, **env}, timeout=60)
    assert code == 2
    assert f"PKCS#11 token {softhsm.token!r} refused the PIN (wrong PIN)" in err
    assert "not-the-pin" not in out + err


def test_the_pin_comes_from_the_environment_or_a_file_only(tmp_path: Path, softhsm: SoftHsm) -> None:
    env = _env(tmp_path, softhsm.env("any", tmp_path / "chain.pem"))
    del env["FACTORY_CA_PKCS11_PIN"]
    with pytest.raises(SettingsError, match="FACTORY_CA_PKCS11_PIN or FACTORY_CA_PKCS11_PIN_FILE"):
        load_settings(env=env)


@pytest.mark.slow
async def test_a_missing_key_label_is_a_clear_start_up_error(tmp_path: Path, softhsm: SoftHsm) -> None:
    from factory_svc.app import FactoryApp

    token_ca = await init_token_ca(softhsm, tmp_path)
    env = _env(tmp_path, softhsm.env("no-such-key", token_ca.chain_file))
    with pytest.raises(CaConfigError, match="holds no private key labelled 'no-such-key'"):
        await FactoryApp.open(load_settings(env=env))


@pytest.mark.slow
async def test_a_slow_token_signs_off_the_event_loop(tmp_path: Path, softhsm: SoftHsm) -> None:
    """The token's answer is held back until the event loop itself lets it go: were the signature made on
    the loop's thread, the loop could never get there and the signature would fail."""
    import asyncio
    import threading

    from factory_svc.app import open_ca
    from factory_svc.mint.service import MintPolicy, leaf_builder
    from provkit.clock import now_utc

    token_ca = await init_token_ca(softhsm, tmp_path)
    ca = open_ca(load_settings(env=_env(tmp_path, token_ca.env)), now_utc)
    try:
        external = ca.signer._external  # type: ignore[attr-defined]
        token_sign = external.sign_digest
        asked, answer = threading.Event(), threading.Event()
        threads: list[str] = []

        def slow_token(digest: bytes) -> bytes:
            threads.append(threading.current_thread().name)
            asked.set()
            assert answer.wait(30), "the event loop was blocked while the token signed"
            return token_sign(digest)

        external.sign_digest = slow_token
        key = make_key("p256")
        guid = str(uuid.uuid4())
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        now = now_utc()
        builder = leaf_builder(guid, key.public_key(), now, now + MintPolicy().default_validity, aki)
        signing = asyncio.create_task(ca.sign(builder))
        assert await asyncio.to_thread(asked.wait, 30)  # the loop runs while the token works
        answer.set()
        leaf = await signing
    finally:
        ca.close()
    assert threads and threads[0].startswith("pkcs11-signer")
    leaf.verify_directly_issued_by(ca.certificate)
