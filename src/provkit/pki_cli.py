"""devprov-pki: the operator's command for the suite's client CA and the parties' client certificates.

Every party that calls factory_svc or activation_svc presents a client certificate from the CA the
services trust (``*_SERVER_CLIENT_CA_FILE``) carrying its identity ``urn:devprov:<role>:<tenant>``
(provkit.parties); the services take the role and tenant from it and from nothing else.

    devprov-pki init-ca DIR [--name CN]              DIR/ca.pem + DIR/ca.key (0600); refuses to overwrite
    devprov-pki issue --ca-dir DIR --role ROLE --tenant TENANT [--name CN] [--days N] [--out PREFIX]
                                                     PREFIX.pem + PREFIX.key (default DIR/<role>-<tenant>)
    devprov-pki show CERT                            the party a certificate names, or why none

Roles: factory (the MES and the test bench running `device-client provision`), oem (an OEM's back office),
portal (the activation portal, tenant = the OEM it acts for), operator (whoever runs the services).
The CA here is a development-grade one (provkit.devpki); production brings certificates with the same
URI from its own PKI.

API: ``issue_party(authority, role, tenant, *, common_name=None, days=825) -> TlsPair``; ``main(argv)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mainkit.shell import CommandFailed, CommandParser
from provkit.cli_shell import EXIT_USAGE, Answer, run_cli
from provkit.context import Role
from provkit.devpki import DevTlsAuthority, TlsPair
from provkit.errors import ConfigurationError, InputError
from provkit.parties import PARTY_ROLES, UnrecognisedIdentity, caller_from_certificate, identity_uri


def issue_party(
    authority: DevTlsAuthority,
    role: Role | str,
    tenant: str,
    *,
    common_name: str | None = None,
    days: int = 825,
) -> TlsPair:
    """A client certificate naming the party ``urn:devprov:<role>:<tenant>`` (validated)."""
    uri = identity_uri(role, tenant)
    return authority.client_certificate(common_name or f"{role}-{tenant}", [uri], days=days)


def _load(ca_dir: Path) -> DevTlsAuthority:
    cert_pem, key_pem = (ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes()
    try:
        return DevTlsAuthority.load(cert_pem, key_pem)
    except ValueError as exc:  # not PEM, or a key that is not the certificate's
        raise InputError(str(exc)) from exc


def _init_ca(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    if (folder / "ca.pem").exists() or (folder / "ca.key").exists():
        raise CommandFailed(f"{folder} already holds a CA; not overwriting it")
    DevTlsAuthority.create(args.name).write(folder / "ca.pem", folder / "ca.key")
    print(f"client CA written: {folder / 'ca.pem'} (key {folder / 'ca.key'}, mode 0600)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise InputError(f"--days must be at least 1, got {args.days}")
    prefix: Path = args.out or args.ca_dir / f"{args.role}-{args.tenant}"
    pair = issue_party(_load(args.ca_dir), args.role, args.tenant, common_name=args.name, days=args.days)
    cert, key = prefix.with_name(prefix.name + ".pem"), prefix.with_name(prefix.name + ".key")
    pair.write(cert, key)
    print(f"{identity_uri(args.role, args.tenant)}: {cert} (key {key}, mode 0600)")
    return 0


def _show(args: argparse.Namespace) -> int:
    pem = args.cert.read_bytes()
    try:
        caller = caller_from_certificate(pem)
    except UnrecognisedIdentity:
        raise
    except ValueError as exc:  # not a PEM certificate
        raise InputError(str(exc)) from exc
    print(f"{caller.uri}  role={caller.role.value} tenant={caller.tenant}  {caller.identity}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="devprov-pki", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init-ca", help="create a client CA in DIR")
    init.add_argument("dir", type=Path, help="folder for ca.pem and ca.key (created)")
    init.add_argument("--name", default="devprov client CA", help="the CA's common name")
    init.set_defaults(run=_init_ca)
    issue = commands.add_parser("issue", help="issue a party's client certificate")
    issue.add_argument("--ca-dir", type=Path, required=True, help="folder holding ca.pem and ca.key")
    issue.add_argument(
        "--role", required=True, choices=[r.value for r in PARTY_ROLES], help="the party's role"
    )
    issue.add_argument("--tenant", required=True, help="factory site, OEM id, or the portal's OEM")
    issue.add_argument("--name", default=None, help="subject CN (for people; default <role>-<tenant>)")
    issue.add_argument("--days", type=int, default=825, metavar="DAYS", help="validity (default 825)")
    issue.add_argument("--out", type=Path, default=None, help="output prefix (writes PREFIX.pem/.key)")
    issue.set_defaults(run=_issue)
    show = commands.add_parser("show", help="the party a client certificate names")
    show.add_argument("cert", type=Path, help="the certificate (PEM)")
    show.set_defaults(run=_show)
    return parser


# What devprov-pki says for the failures it knows, before the suite's (provkit.cli_shell).
ANSWERS = (Answer.line((UnrecognisedIdentity, ConfigurationError, OSError), "{}", EXIT_USAGE),)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: int(args.run(args)), prog="devprov-pki", answers=ANSWERS)


if __name__ == "__main__":
    sys.exit(main())
