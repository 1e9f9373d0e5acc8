"""The party identity scheme (urn:devprov:<role>:<tenant>), the devprov-pki command that issues party
certificates, and docs/parties.md's copy of the access table."""

from __future__ import annotations

from pathlib import Path

import pytest

from provkit.authz import SUITE_POLICY
from provkit.context import Role
from provkit.devpki import DevTlsAuthority
from provkit.parties import UnrecognisedIdentity, caller_from_certificate, identity_uri, parse_identity_uri
from provkit.pki_cli import main

PARTIES_PAGE = Path(__file__).resolve().parents[2] / "docs" / "parties.md"  # linked from the README


def test_the_scheme_round_trips_and_refuses_what_is_not_a_party() -> None:
    assert identity_uri(Role.PORTAL, "acme") == "urn:devprov:portal:acme"
    assert parse_identity_uri("urn:devprov:factory:plant-1") == (Role.FACTORY, "plant-1")
    for bad in (
        "urn:devprov:internal:x",  # never from a certificate
        "urn:devprov:king:x",
        "urn:devprov:oem:",
        "urn:devprov:oem:Acme",
        "urn:devprov:oem:-acme",
        "urn:devprov:oem:acme:extra",
        "urn:other:oem:acme",
        "urn:devprov:oem:" + "a" * 64,
    ):
        with pytest.raises(UnrecognisedIdentity):
            parse_identity_uri(bad)


def test_devprov_pki_issues_party_certificates_the_server_reads(tmp_path: Path, capsys) -> None:
    assert main(["init-ca", str(tmp_path / "ca")]) == 0
    assert main(["init-ca", str(tmp_path / "ca")]) == 1  # never overwrites a CA
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert main(["issue", "--ca-dir", str(tmp_path / "ca"), "--role", "oem", "--tenant", "globex"]) == 0
    cert = tmp_path / "ca" / "oem-globex.pem"
    caller = caller_from_certificate(cert.read_bytes())
    assert (caller.role, caller.tenant, caller.identity.common_name) == (Role.OEM, "globex", "oem-globex")
    assert (tmp_path / "ca" / "oem-globex.key").stat().st_mode & 0o777 == 0o600
    authority = DevTlsAuthority.load(
        (tmp_path / "ca" / "ca.pem").read_bytes(), (tmp_path / "ca" / "ca.key").read_bytes()
    )
    assert authority.ca_pem == (tmp_path / "ca" / "ca.pem").read_bytes()
    capsys.readouterr()
    assert main(["show", str(cert)]) == 0
    assert "urn:devprov:oem:globex" in capsys.readouterr().out
    bad = ["issue", "--ca-dir", str(tmp_path / "ca"), "--role", "oem", "--tenant", "Not_Valid"]
    assert main(bad) == 2
    assert "tenant" in capsys.readouterr().err
    assert not (tmp_path / "ca" / "oem-Not_Valid.pem").exists()
    nameless = authority.client_certificate("nobody")
    (tmp_path / "nameless.pem").write_bytes(nameless.cert_pem)
    assert main(["show", str(tmp_path / "nameless.pem")]) == 2
    assert "no urn:devprov:" in capsys.readouterr().err


def test_the_docs_show_the_access_table_as_enforced() -> None:
    assert SUITE_POLICY.markdown() in PARTIES_PAGE.read_text()
