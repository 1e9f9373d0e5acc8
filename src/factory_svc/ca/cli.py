"""``factory-svc ca``: create the issuing CA in a PKCS#11 token, and show the configured issuing CA.

    factory-svc ca init [--config FILE] [--token LABEL] [--key-label LABEL] [--module PATH]
                        [--curve p256|p384] [--common-name CN] [--organization O] [--validity-days N]
                        [--parent-chain FILE --parent-key FILE] [--chain-out FILE]
    factory-svc ca show [--config FILE]

``init`` generates the key pair inside the token (non-extractable, sensitive), makes the issuing CA's
certificate (signed by the parent CA given as files, e.g. an offline root brought in for the ceremony, or
self-signed without one), writes the chain (issuing CA first, root last) to ``--chain-out`` or
FACTORY_CA_CHAIN_FILE, and prints the certificate.  Token, label and module default to the settings
(FACTORY_CA_PKCS11_*); the PIN comes only from FACTORY_CA_PKCS11_PIN or FACTORY_CA_PKCS11_PIN_FILE.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from factory_svc.ca.issuing import (
    ISSUING_LIFETIME,
    IssuingCA,
    certificate_pem,
    issuing_ca_certificate,
    load_chain,
    load_key_file,
)
from factory_svc.ca.pkcs11_signer import CURVES, Pkcs11Signer, create_issuing_key
from factory_svc.ca.settings import ConfiguredCa, open_ca, pkcs11_settings
from factory_svc.ca.signer import FileSigner
from factory_svc.errors import CaConfigError
from provkit.clock import now_utc
from provkit.settings import FlagKeys, SettingsError, SettingsSource

# The settings keys the options of ``ca init`` set (over FACTORY_CA_* and the settings file).
CA_FLAGS = FlagKeys(
    {
        "token": "ca.pkcs11_token",
        "key_label": "ca.pkcs11_key_label",
        "module": "ca.pkcs11_module",
        "chain_out": "ca.chain_file",
    }
)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="the issuing CA: create it in a PKCS#11 token, or show it")
    actions = ca.add_subparsers(dest="ca_command", required=True)
    init = actions.add_parser("init", help="generate the issuing key in a token and certify it")
    init.add_argument("--config", type=Path, help="TOML settings file (or FACTORY_CONFIG)")
    init.add_argument("--token", help="token label (default: FACTORY_CA_PKCS11_TOKEN)")
    init.add_argument("--key-label", help="key label (default: FACTORY_CA_PKCS11_KEY_LABEL)")
    init.add_argument("--module", type=Path, help="PKCS#11 module (default: FACTORY_CA_PKCS11_MODULE)")
    init.add_argument("--curve", choices=sorted(CURVES), default="p256", help="the issuing key's curve")
    init.add_argument("--common-name", default="devprov issuing CA", help="the CA certificate's CN")
    init.add_argument("--organization", default="devprov", help="the CA certificate's O")
    init.add_argument(
        "--validity-days",
        type=int,
        metavar="DAYS",
        default=ISSUING_LIFETIME.days,
        help="the CA certificate's lifetime",
    )
    init.add_argument("--parent-chain", type=Path, help="the parent CA's chain (PEM, parent first)")
    init.add_argument("--parent-key", type=Path, help="the parent CA's key (PEM)")
    init.add_argument("--chain-out", type=Path, help="chain file to write (default: FACTORY_CA_CHAIN_FILE)")
    show = actions.add_parser("show", help="show the configured issuing CA")
    show.add_argument("--config", type=Path, help="TOML settings file (or FACTORY_CONFIG)")


def describe(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"ECDSA P-{key.curve.key_size}"
    else:
        kind = f"{type(key).__name__.lstrip('_')} {getattr(key, 'key_size', '?')} bits"
    return (
        f"subject     {cert.subject.rfc4514_string()}\n"
        f"issuer      {cert.issuer.rfc4514_string()}\n"
        f"serial      {cert.serial_number:X}\n"
        f"key         {kind}\n"
        f"valid       {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}\n"
        f"sha256      {cert.fingerprint(hashes.SHA256()).hex().upper()}"
    )


def _init(args: argparse.Namespace) -> int:
    source = SettingsSource.located("FACTORY", config=args.config, flags=CA_FLAGS.values(args))
    settings = pkcs11_settings(source)
    ref = settings.token
    chain_out = source.path("ca.chain_file")
    if chain_out is None:
        raise SettingsError("give --chain-out or FACTORY_CA_CHAIN_FILE: where the CA chain goes")
    if chain_out.exists():
        raise CaConfigError(f"{chain_out} exists; the chain of another CA is never overwritten")
    if (args.parent_chain is None) != (args.parent_key is None):
        raise SettingsError("--parent-chain and --parent-key go together")
    parent = None
    if args.parent_chain is not None:
        parent_chain = load_chain(args.parent_chain)
        parent = IssuingCA(parent_chain[0], FileSigner(load_key_file(args.parent_key, None)), parent_chain)
    create_issuing_key(ref, settings.pin.reveal(), args.curve)
    signer = Pkcs11Signer.open(ref, settings.pin.reveal())
    try:
        cert = issuing_ca_certificate(
            args.common_name,
            args.organization,
            signer,
            parent,
            now_utc(),
            timedelta(days=args.validity_days),
        )
        chain = (cert, *(parent.chain if parent else ()))
        IssuingCA(cert, signer, chain)  # the same checks `serve` makes
    finally:
        signer.close()
    chain_out.parent.mkdir(parents=True, exist_ok=True)
    chain_out.write_text("".join(certificate_pem(c) for c in chain))
    print(describe(cert))
    print(f"token       {ref.token_label} key label {ref.key_label} (non-extractable)")
    print(f"chain       {chain_out} ({len(chain)} certificate(s))")
    return 0


def _show(settings: ConfiguredCa) -> int:
    ca = open_ca(settings, now_utc)
    try:
        print(describe(ca.certificate))
        if settings.ca.pkcs11 is not None:
            token = settings.ca.pkcs11.token
            print(f"key         PKCS#11 token {token.token_label}, label {token.key_label}")
        else:
            print(f"key         file ({settings.ca.key_file or settings.dev_ca_dir})")
        print(f"chain       {len(ca.chain)} certificate(s), root {ca.chain[-1].subject.rfc4514_string()}")
    finally:
        ca.close()
    return 0


def run(args: argparse.Namespace, load_settings: Callable[[Path | None], ConfiguredCa]) -> int:
    """``ca init``, or ``ca show`` of the program's settings (``load_settings(--config)``: all of them, so
    ``show`` refuses what ``serve`` would)."""
    return _init(args) if args.ca_command == "init" else _show(load_settings(args.config))
