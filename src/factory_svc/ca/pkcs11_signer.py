"""The ``pkcs11`` CA signer: the issuing key lives in a PKCS#11 token (an HSM, or SoftHSM2 for tests).

The key is generated inside the token (``create_issuing_key``): CKA_SENSITIVE true, CKA_EXTRACTABLE
false, CKA_TOKEN true, labelled; afterwards it is found by that label and only ever asked to sign
(CKM_ECDSA over a digest computed here).  The PIN is handed in by the caller (read from a file or the
environment by the settings) and never logged.  ECDSA P-256 and P-384 keys.

One session is opened at start-up and kept, and a lock makes sure only one thread uses it at a time.  A
token may take milliseconds (a network HSM, a busy one): asyncio code signs on the signer's own thread
(``thread``, used by ``IssuingCA.sign``), so the event loop never waits for the token; synchronous callers
(the CLI, start-up) sign on their own thread under the same lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from factory_svc.ca.signer import CaPublicKey, ExternalSignature
from factory_svc.errors import CaConfigError

DEBIAN_SOFTHSM2 = Path("/usr/lib/softhsm/libsofthsm2.so")
CURVES = {"p256": "secp256r1", "p384": "secp384r1"}


@dataclass(frozen=True)
class TokenRef:
    """Where the issuing key is: the PKCS#11 module, the token's label and the key's label."""

    module: Path
    token_label: str
    key_label: str


def _load_library(module: Path) -> Any:
    if not module.is_file():
        raise CaConfigError(f"the PKCS#11 module {module} does not exist")
    try:
        return pkcs11.lib(str(module))
    except (RuntimeError, OSError) as exc:  # python-pkcs11 raises RuntimeError for a foreign library
        raise CaConfigError(f"cannot load the PKCS#11 module {module}: {exc}") from exc


def open_session(ref: TokenRef, pin: str, *, rw: bool = False) -> Any:
    """A logged-in user session on the token; clear errors for a missing token and a refused PIN."""
    library = _load_library(ref.module)
    try:
        token = library.get_token(token_label=ref.token_label)
    except pkcs11.NoSuchToken:
        raise CaConfigError(f"no PKCS#11 token labelled {ref.token_label!r} in {ref.module}") from None
    except pkcs11.MultipleTokensReturned:
        raise CaConfigError(f"more than one PKCS#11 token is labelled {ref.token_label!r}") from None
    try:
        return token.open(rw=rw, user_pin=pin)
    except pkcs11.UserAlreadyLoggedIn:  # login is per process: another session of ours holds it
        return token.open(rw=rw)
    except pkcs11.PinIncorrect:
        raise CaConfigError(f"PKCS#11 token {ref.token_label!r} refused the PIN (wrong PIN)") from None
    except pkcs11.PinLocked:
        raise CaConfigError(f"the user PIN of PKCS#11 token {ref.token_label!r} is locked") from None
    except pkcs11.PKCS11Error as exc:
        raise CaConfigError(
            f"cannot log in to PKCS#11 token {ref.token_label!r}: {type(exc).__name__}"
        ) from None


def _public_key(key: Any) -> ec.EllipticCurvePublicKey:
    loaded = serialization.load_der_public_key(encode_ec_public_key(key))
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise CaConfigError("the token's issuing key is not an EC key")
    return loaded


def _find(session: Any, object_class: ObjectClass, label: str) -> Any:
    try:
        return session.get_key(object_class=object_class, key_type=KeyType.EC, label=label)
    except pkcs11.NoSuchKey:
        return None
    except pkcs11.MultipleObjectsReturned:
        raise CaConfigError(f"more than one key in the token is labelled {label!r}") from None


def create_issuing_key(ref: TokenRef, pin: str, curve: str) -> ec.EllipticCurvePublicKey:
    """Generate the issuing key pair inside the token (never extractable); refuses an existing label."""
    if curve not in CURVES:
        raise CaConfigError(f"unsupported curve {curve!r}; choose one of {', '.join(CURVES)}")
    with open_session(ref, pin, rw=True) as session:
        if _find(session, ObjectClass.PRIVATE_KEY, ref.key_label) is not None:
            raise CaConfigError(f"the token already holds a key labelled {ref.key_label!r}")
        parameters = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[curve])}, local=True
        )
        public, _private = parameters.generate_keypair(
            store=True,
            label=ref.key_label,
            public_template={Attribute.VERIFY: True},
            private_template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.PRIVATE: True,
            },
        )
        return _public_key(public)


@dataclass
class Pkcs11Signer:
    """``CaSigner`` over a token's private key (``open`` finds it by label and logs in)."""

    session: Any
    private_key: Any
    _external: ExternalSignature = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _thread: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11-signer")
        public = _find(self.session, ObjectClass.PUBLIC_KEY, self.private_key.label)
        if public is None:
            raise CaConfigError(f"the token has no public key labelled {self.private_key.label!r}")
        try:
            self._external = ExternalSignature(_public_key(public), self._sign_digest)
        except ValueError as exc:
            raise CaConfigError(str(exc)) from exc

    @classmethod
    def open(cls, ref: TokenRef, pin: str) -> Pkcs11Signer:
        session = open_session(ref, pin)
        try:
            key = _find(session, ObjectClass.PRIVATE_KEY, ref.key_label)
            if key is None:
                raise CaConfigError(
                    f"PKCS#11 token {ref.token_label!r} holds no private key labelled {ref.key_label!r}"
                )
            return cls(session, key)
        except BaseException:
            session.close()
            raise

    def _sign_digest(self, digest: bytes) -> bytes:
        with self._lock:
            return bytes(self.private_key.sign(digest, mechanism=Mechanism.ECDSA))

    @property
    def thread(self) -> Executor:
        return self._thread

    @property
    def public_key(self) -> CaPublicKey:
        return self._external.public_key

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return self._external.sign_certificate(builder)

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return self._external.sign_crl(builder)

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # signatures under way finish first
        with self._lock:
            self.session.close()
