"""The services' ``migrate`` command and their start-up check, as processes, on PostgreSQL: a service
refuses to serve on a database whose tables are not at its version (saying to run migrate, never printing
the password), ``migrate`` brings them there (and again finds nothing to do), a newer version is refused."""

from __future__ import annotations

import base64
import os
from urllib.parse import urlsplit

import psycopg
import pytest
from support.cli_process import run_module

pytestmark = pytest.mark.slow


def connection_string(host: str) -> str:
    key = base64.b64encode(b"k" * 32).decode()
    return f"HostName={host};SharedAccessKeyName=owner;SharedAccessKey={key}"

SERVICES = [
    ("factory_svc", "FACTORY", ["ledger", "enrollment outbox"]),
    ("activation_svc", "ACTIVATION", ["audit"]),
]


@pytest.mark.parametrize(("module", "prefix", "stores"), SERVICES)
async def test_serve_refuses_until_migrated_and_migrate_is_repeatable(
    postgres_url, tmp_path, module, prefix, stores
):
    env = {
        **os.environ,
        f"{prefix}_DATABASE_URL": postgres_url,
        f"{prefix}_DATA_DIR": str(tmp_path / "data"),
        f"{prefix}_SERVER_INSECURE": "true",
        f"{prefix}_SERVER_PORT": "0",
        # a cloud that is never reached: the database is checked before anything outside is opened
        f"{prefix}_CLOUD_DPS_CONNECTION_STRING": connection_string("dps.invalid"),
        f"{prefix}_CLOUD_HUB_CONNECTION_STRINGS": connection_string("hub.invalid"),
    }
    password = urlsplit(postgres_url).password
    code, out, err = await run_module(module, "serve", env=env)
    assert code == 2, (out, err)
    assert "run this service's `migrate` command" in err and password not in err + out
    for _ in range(2):
        code, out, err = await run_module(module, "migrate", env=env)
        assert code == 0, err
        assert [line.split(":")[0] for line in out.splitlines()] == stores
        assert password not in out + err
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_versions SET version = version + 1 WHERE store = %s", (stores[0],))
    code, out, err = await run_module(module, "migrate", env=env)
    assert code == 2 and "newer than version" in err


async def test_the_portal_beside_a_service_on_postgresql_refuses_an_unmigrated_database(postgres_url):
    """The portal keeps its per-address limits in the service's database: it checks the schema too."""
    env = {
        **os.environ,
        "ACTIVATION_DATABASE_URL": postgres_url,
        "ACTIVATION_PORTAL_INSECURE": "true",
        "ACTIVATION_PORTAL_PORT": "0",
    }
    code, out, err = await run_module("activation_svc", "portal", env=env)
    assert code == 2, (out, err)
    assert "run this service's `migrate` command" in err and urlsplit(postgres_url).password not in err + out
