"""Fixtures every test package may use."""

from __future__ import annotations

import contextlib
import errno
import random
import socket

import pytest

# The SDKs always dial port 8883 (MQTT) and 443 (HTTPS: service REST APIs, the DPS device API, MQTT over
# WebSockets), so every emulator in the tests gets its own loopback address instead of its own ports.
# Addresses are drawn at random from 127.0.0.0/8 (skipping 127.0.0.0/24, which people use by hand) and
# probed, so parallel test runs on one machine do not collide.
MQTT_PORT = 8883
HTTPS_PORT = 443
AMQP_PORT = 5671

pytest_plugins = ["support.dps_fixtures", "support.node_sdks", "support.softhsm"]


def _address_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                return False
            if exc.errno == errno.EACCES:  # 443 without the privilege: the emulator says how to get it
                return True
            raise
    return True


def free_loopback_address(ports: tuple[int, ...] = (MQTT_PORT, HTTPS_PORT, AMQP_PORT)) -> str:
    """A 127.x.y.z address on which ``ports`` are currently free."""
    rng = random.SystemRandom()
    for _ in range(200):
        host = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        if all(_address_is_free(host, port) for port in ports):
            return host
    raise RuntimeError(f"no free loopback address found for ports {ports}")


@pytest.fixture
def loopback_host() -> str:
    return free_loopback_address()


# The Python device SDK waits a fixed 2 s after a `202 assigning` before its first poll, so Azure's
# asynchronous registration (the emulator's default) costs every SDK registration 2 s.  The fixtures'
# emulators answer the register request with the result instead; the 202-then-poll flow keeps its own
# tests (tests/emulator/test_dps_async_assignment.py, the raw topics in test_mqtt_socket.py) and the
# device's whole story goes through it (tests/device/test_device_full_handover.py): they pass their own
# --assignment-delay.
IMMEDIATE_ASSIGNMENT = ["--assignment-delay", "immediate"]


@contextlib.contextmanager
def running_emulator(data_dir, extra_args: list[str] | None = None, *, hubs: int = 2, hub_args=None):
    """A started emulator subprocess (DPS + ``hubs`` hubs), stopped (killed if need be) on leaving;
    ``hub_args(hub_hosts)``: more arguments that name its hubs (chosen when it is created).  Registrations
    are answered at once unless ``extra_args`` give an ``--assignment-delay``."""
    from support.emulator import EmulatorProcess

    args = list(extra_args or [])
    if "--assignment-delay" not in args:
        args += IMMEDIATE_ASSIGNMENT
    emu = EmulatorProcess(data_dir, hubs=hubs, extra_args=args)
    if hub_args is not None:
        emu.extra_args += hub_args(emu.hub_hosts)
    emu.start()
    try:
        yield emu
    finally:
        try:
            emu.stop()
        finally:
            emu.kill()


@pytest.fixture
def emulator(tmp_path):
    """A real emulator subprocess (DPS + 2 hubs on fresh loopback addresses), stopped after the test.
    See tests/support/emulator.py for what it exposes."""
    with running_emulator(tmp_path / "emulator") as emu:
        yield emu


@pytest.fixture(scope="module")
def module_emulator(tmp_path_factory):
    """One emulator subprocess shared by a test module (tests must not depend on each other's data)."""
    with running_emulator(tmp_path_factory.mktemp("emulator") / "data") as emu:
        yield emu


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the whole test session (tests/support/pgcluster.py); the tests that
    use it skip, with the reason, only where Debian's server could not be installed."""
    from support import pgcluster

    why = pgcluster.unavailable()
    if why is not None:
        pytest.skip(why)
    with pgcluster.running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(pg_cluster):
    """The URL of a new empty database in the session's cluster, dropped after the test."""
    url = pg_cluster.create_database()
    yield url
    pg_cluster.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each backend of the services' stores in turn (dbstore.DatabaseUrl): SQLite files in a temporary
    directory, then a new database in the session's PostgreSQL cluster."""
    from dbstore import DatabaseUrl

    if request.param == "sqlite":
        return DatabaseUrl.sqlite(tmp_path / "db")
    return DatabaseUrl.parse(request.getfixturevalue("postgres_url"))


def pytest_sessionfinish(session, exitstatus):
    """The device SDK leaves operation-timeout timers (threading.Timer) behind for clients the tests have
    shut down; at interpreter exit they would fire into its already-closed executors and print tracebacks.
    Cancel the ones still waiting: their clients are gone."""
    import threading

    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()
