"""The parties' identities for tests: the insecure-mode identities and party client certificates."""

from __future__ import annotations

from provkit.context import Role
from provkit.devpki import DevTlsAuthority, TlsPair
from provkit.pki_cli import issue_party

FACTORY_URI = "urn:devprov:factory:test"  # who an insecure test factory_svc takes its callers for
OEM_URI = "urn:devprov:oem:test"


def party(authority: DevTlsAuthority, role: Role, tenant: str = "test", cn: str | None = None) -> TlsPair:
    return issue_party(authority, role, tenant, common_name=cn)
