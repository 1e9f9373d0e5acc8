"""``activation-svc portal``: serve the activation portal.

    activation-svc portal [--listen HOST:PORT] [--config FILE] [--target HOST:PORT]
                          [--insecure | --ca-file F --cert-file F --key-file F [--server-name N]]
                          [--tls-cert-file F --tls-key-file F] [--allow-non-loopback]

Options override the settings (ACTIVATION_PORTAL_*, ``[portal]`` in the TOML file; see
``activation_svc.portal.settings``), one setting each (``PORTAL_FLAGS``).  Once bound it prints one line to
standard output, ``portal listening on http://127.0.0.1:8080`` (https with a certificate; the real port
with ``:0``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from provkit.channels import CHANNEL_FLAGS, add_channel_arguments
from provkit.settings import FlagKeys

# The portal's settings (observability, cloud, the server) are imported when the portal runs: every other
# activation-svc command (activate-batch among them) starts without them.
if TYPE_CHECKING:
    from activation_svc.portal.settings import PortalSettings


def add_portal_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "portal", allow_abbrev=False, help="serve the activation web portal (a client of the service)"
    )
    cmd.add_argument("--config", type=Path, help="TOML settings file (or ACTIVATION_PORTAL_CONFIG)")
    cmd.add_argument("--listen", help="HOST:PORT to bind (default 127.0.0.1:8080; port 0 = any free)")
    cmd.add_argument("--allow-non-loopback", action="store_true", help="allow binding a non-loopback host")
    cmd.add_argument("--tls-cert-file", type=Path, help="serve HTTPS with this certificate (PEM chain)")
    cmd.add_argument("--tls-key-file", type=Path, help="... and this key")
    add_channel_arguments(cmd, target_help="activation service host:port (default 127.0.0.1:50052)")


def portal_flags() -> FlagKeys:
    """Which option sets which portal setting (keys under [portal]); --listen sets the host and the port."""
    from activation_svc.portal.settings import parse_listen

    return (
        CHANNEL_FLAGS
        | FlagKeys(
            {
                "listen": ("host", "port"),
                "allow_non_loopback": "allow_non_loopback",
                "tls_cert_file": "tls_cert_file",
                "tls_key_file": "tls_key_file",
            },
            convert={"listen": parse_listen},
        )
    ).within("portal")


def portal_settings(args: argparse.Namespace) -> PortalSettings:
    from activation_svc.portal.settings import load_portal_settings

    settings = load_portal_settings(config=args.config, flags=portal_flags().values(args))
    settings.check()
    return settings


def run_portal(args: argparse.Namespace) -> int:
    from activation_svc.portal.app import serve
    from provkit.grpc_server import run_service
    from provkit.logging import configure_logging

    settings = portal_settings(args)
    configure_logging(settings.log_level)
    run_service(serve(settings, on_started=lambda r: print(f"portal listening on {r.url}", flush=True)))
    return 0
