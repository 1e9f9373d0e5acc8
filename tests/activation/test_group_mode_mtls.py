"""The allocation webhook with mTLS (``ACTIVATION_ALLOCATION_CLIENT_CA_FILE``, for a forwarder such as an
Azure Function in front of it): without a client certificate from that CA no TLS session, so nothing is
read or audited; with one, the function key is still required; with both, the device is allocated."""

from __future__ import annotations

import json
import ssl

import aiohttp
import pytest
from enrollment.provisioning_env import OemTls, activate_request, running_activation, running_factory
from group_env import KEY, META, Stack, runtime_context, sha256_of

from provkit.devpki import DevTlsAuthority

pytestmark = pytest.mark.slow


async def call(stack: Stack, body: dict, key: str, cert: tuple[str, str] | None) -> int:
    context = ssl.create_default_context(cafile=str(stack.tls.ca_file))
    if cert is not None:
        context.load_cert_chain(*cert)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(f"{stack.webhook}?code={key}", json=body) as response,
    ):
        return response.status


async def test_only_a_client_of_the_forwarders_ca_with_the_key_is_answered(tmp_path, module_emulator):
    tls = OemTls.create(tmp_path / "tls")
    forwarders = DevTlsAuthority.create()  # the CA of the forwarder's client certificates
    (tmp_path / "forwarders.pem").write_bytes(forwarders.ca_pem)
    forwarders.client_certificate("azure-function").write(tmp_path / "fwd.pem", tmp_path / "fwd.key")
    stranger = DevTlsAuthority.create()
    stranger.client_certificate("azure-function").write(tmp_path / "other.pem", tmp_path / "other.key")
    forwarder = (str(tmp_path / "fwd.pem"), str(tmp_path / "fwd.key"))
    other = (str(tmp_path / "other.pem"), str(tmp_path / "other.key"))

    stack = Stack(tmp_path, module_emulator, tls)
    env = {**stack.activation_env(), "ACTIVATION_ALLOCATION_CLIENT_CA_FILE": str(tmp_path / "forwarders.pem")}
    async with (
        running_activation(env, tls) as (app, activation),
        running_factory(stack.factory_env()) as (_, factory),
    ):
        stack.factory = factory
        device, code = await stack.enrolled()
        await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
        body = runtime_context(device.device_id, f"CN={device.device_id}", sha256_of(device), stack)

        for cert in (None, other):  # no client certificate, or one of another CA: no session at all
            with pytest.raises(aiohttp.ClientError):
                await call(stack, body, KEY, cert)
        assert stack.audit("") == [] and stack.audit(device.device_id) == []  # nothing read, nothing said
        assert (await app.dps.get(device.device_id)).registration_state is None

        assert await call(stack, body, "not-the-key-at-all-0000000000", forwarder) == 401
        assert await call(stack, body, KEY, forwarder) == 200
        assert stack.audit(device.device_id) == [("ok", f"hub={module_emulator.default_hub}")]
