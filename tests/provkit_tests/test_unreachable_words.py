"""A service that cannot be used as configured, told as a person needs it (issue: forgetting
`source var/up/env.sh`): the CLIs try the connection by hand (provkit.channels.diagnose_connection) and say
why it fails - plaintext against TLS, a certificate they do not trust, a client certificate missing, no TLS
at all, nothing listening - with the hint to point the shell at the stack when its TLS is not configured;
and no line of gRPC's C core reaches the terminal (it printed "I1207 ... ssl_transport_security.cc:2563]
Handshake failed ...")."""

from __future__ import annotations

import os
import socket

import grpc
import pytest
from support.certs import TestCa
from support.cli_process import run_module

from provkit.channels import STACK_HINT

pytestmark = pytest.mark.slow

GUID = "3f2a9c1e-0000-4000-8000-000000000001"
HINT = f"  {STACK_HINT}"


def _env() -> dict[str, str]:
    """A shell that never sourced var/up/env.sh (and says nothing about gRPC's logging)."""
    prefixes = ("FACTORY_CLIENT_", "ACTIVATION_CLIENT_", "DEVICE_CLIENT_", "GRPC_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


@pytest.fixture
async def mtls_server(tmp_path):
    """A gRPC server on loopback that speaks TLS and wants a client certificate, as the stack's do."""
    pki = TestCa("services' TLS CA").server(tmp_path / "tls", ["127.0.0.1"])
    credentials = grpc.ssl_server_credentials(
        [(pki.key_path.read_bytes(), pki.cert_path.read_bytes())],
        root_certificates=pki.ca_pem.encode(),
        require_client_auth=True,
    )
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield f"127.0.0.1:{port}", pki
    await server.stop(None)


@pytest.fixture
async def plaintext_server():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_device_client_in_plaintext_against_the_factory_s_tls(tmp_path, mtls_server):
    target, _ = mtls_server
    code, out, err = await run_module(
        "device_client",
        "--state-root",
        str(tmp_path / "d"),
        "provision",
        GUID,
        "--target",
        target,
        env=_env(),
    )
    assert (code, out) == (5, "")
    assert err.splitlines() == [
        f"device-client: error: cannot reach the factory at {target} as configured: the service speaks TLS, "
        "but this client is set to connect in plaintext [FACTORY_UNAVAILABLE]",
        HINT,
    ]


@pytest.mark.parametrize(
    ("module", "prog", "service", "args"),
    [
        ("factory_svc", "factory-svc", "the factory", ["list", GUID]),
        ("activation_svc", "activation-svc", "the activation service", ["status", GUID]),
    ],
)
async def test_service_clients_without_the_stack_s_ca(mtls_server, module, prog, service, args):
    target, _ = mtls_server
    code, out, err = await run_module(module, *args, "--target", target, env=_env())
    assert (code, out) == (3, "")
    assert err.splitlines() == [
        f"{prog}: error: cannot reach {service} at {target} as configured: its certificate is not one "
        "this client trusts (unable to get local issuer certificate; trusted: the system's CAs: no CA file "
        "is set) [UNAVAILABLE]",
        HINT,
    ]


async def test_trusting_the_ca_but_without_a_client_certificate(mtls_server):
    target, pki = mtls_server
    code, _, err = await run_module(
        "factory_svc", "list", GUID, "--target", target, "--ca-file", str(pki.ca_path), env=_env()
    )
    assert code == 3
    assert err.splitlines() == [  # the trust is configured: no hint about the stack's settings
        f"factory-svc: error: cannot reach the factory at {target} as configured: the service hangs up "
        "after the TLS handshake: it wants a client certificate (mTLS), and none is set [UNAVAILABLE]"
    ]


async def test_tls_against_a_plaintext_server_and_nothing_listening(tmp_path, plaintext_server):
    ca = TestCa().server(tmp_path / "tls", ["127.0.0.1"]).ca_path
    code, _, err = await run_module(
        "factory_svc", "list", "--target", plaintext_server, "--ca-file", str(ca), env=_env()
    )
    assert code == 3
    assert err.splitlines() == [
        f"factory-svc: error: cannot reach the factory at {plaintext_server} as configured: the service does "
        "not speak TLS (a plaintext development server? then --insecure) [UNAVAILABLE]"
    ]
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{spare.getsockname()[1]}"  # bound, never listening: refused
        code, _, err = await run_module(
            "factory_svc", "list", "--target", closed, "--ca-file", str(ca), env=_env()
        )
    assert code == 3
    assert err.splitlines() == [
        f"factory-svc: error: cannot reach the factory at {closed} as configured: nothing accepts "
        "connections there (is the service running, and is this its address?) [UNAVAILABLE]"
    ]
