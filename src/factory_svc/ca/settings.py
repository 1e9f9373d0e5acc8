"""The issuing CA's settings (the ``ca.*`` keys, FACTORY_CA_*; their table is ``factory_svc.settings``'s) and
the CA they name.

``ca_settings(source) -> CaSettings``: the file backend (``ca.chain_file`` + ``ca.key_file``, or neither:
the development CA) or the pkcs11 backend (``ca.chain_file`` + the token: ``pkcs11_settings(source)``, the
PIN from the environment or a file only).  ``open_ca(settings, clock) -> IssuingCA``: the CA those settings
name, for anything holding ``ca`` and ``dev_ca_dir`` (``ConfiguredCa``: ``FactorySettings`` does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from factory_svc.ca.issuing import IssuingCA, load_chain, load_configured_ca, open_dev_ca
from factory_svc.ca.pkcs11_signer import DEBIAN_SOFTHSM2, Pkcs11Signer, TokenRef
from provkit.clock import Clock
from provkit.settings import Secret, SettingsError, SettingsSource


class CaBackend(enum.Enum):
    FILE = "file"
    PKCS11 = "pkcs11"


DEFAULT_KEY_LABEL = "devprov-issuing-ca"


@dataclass(frozen=True)
class Pkcs11Settings:
    token: TokenRef
    pin: Secret


@dataclass(frozen=True)
class CaSettings:
    chain_file: Path | None = None  # None (file backend only): the development CA in <data_dir>/ca
    key_file: Path | None = None
    key_passphrase: Secret | None = None
    pkcs11: Pkcs11Settings | None = None  # set: the pkcs11 backend (the key stays in the token)


class ConfiguredCa(Protocol):
    """What ``open_ca`` reads of a program's settings."""

    @property
    def ca(self) -> CaSettings: ...

    @property
    def dev_ca_dir(self) -> Path: ...


def pkcs11_settings(source: SettingsSource, section: str = "ca") -> Pkcs11Settings:
    """The token, key label and PIN (PIN from the environment or a file only, never an argument)."""
    token = source.text(f"{section}.pkcs11_token")
    if not token:
        name = source.env_name(section + ".pkcs11_token")
        raise SettingsError(f"{name} is required for the pkcs11 backend")
    pin = source.secret(f"{section}.pkcs11_pin")
    if pin is None:
        name = source.env_name(section + ".pkcs11_pin")
        raise SettingsError(f"the token PIN is required: set {name} or {name}_FILE")
    module = source.path(f"{section}.pkcs11_module", DEBIAN_SOFTHSM2) or DEBIAN_SOFTHSM2
    label = source.text(f"{section}.pkcs11_key_label", DEFAULT_KEY_LABEL) or DEFAULT_KEY_LABEL
    return Pkcs11Settings(TokenRef(module, token, label), pin)


def ca_settings(source: SettingsSource) -> CaSettings:
    backend_name = (source.text("ca.backend", "file") or "file").lower()
    try:
        backend = CaBackend(backend_name)
    except ValueError:
        raise SettingsError(f"FACTORY_CA_BACKEND must be 'file' or 'pkcs11', not {backend_name!r}") from None
    chain, key = source.path("ca.chain_file"), source.path("ca.key_file")
    if backend is CaBackend.PKCS11:
        if chain is None:
            raise SettingsError("the pkcs11 backend needs FACTORY_CA_CHAIN_FILE (written by 'ca init')")
        if key is not None:
            raise SettingsError("FACTORY_CA_KEY_FILE is for the file backend; pkcs11 keys stay in the token")
        return CaSettings(chain, None, None, pkcs11_settings(source))
    if (chain is None) != (key is None):
        raise SettingsError("FACTORY_CA_CHAIN_FILE and FACTORY_CA_KEY_FILE go together")
    return CaSettings(chain, key, source.secret("ca.key_passphrase"))


def open_ca(settings: ConfiguredCa, clock: Clock) -> IssuingCA:
    ca = settings.ca
    if ca.pkcs11 is not None and ca.chain_file is not None:
        chain = load_chain(ca.chain_file)
        signer = Pkcs11Signer.open(ca.pkcs11.token, ca.pkcs11.pin.reveal())
        try:
            return IssuingCA(chain[0], signer, chain)
        except BaseException:
            signer.close()
            raise
    if ca.chain_file is not None and ca.key_file is not None:
        passphrase = ca.key_passphrase.reveal() if ca.key_passphrase else None
        return load_configured_ca(ca.chain_file, ca.key_file, passphrase)
    return open_dev_ca(settings.dev_ca_dir, clock)
