"""``make up`` with ``--replicas 2``: PostgreSQL and two replicas of each service behind one address each,
each replica's /metrics on its own port; a replica killed with SIGKILL is reported and the other carries on
behind the same address; the cluster is kept in the work directory, so a device minted before a restart is
still there after it.  In group mode (``--mode group``) the device registry is in that cluster and the
enrollment group's one webhook URL reaches whichever activation_svc replica is alive."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from demo.test_demo_flow import (
    Printed,
    _bindable,
    _cli,
    _demo,
    _env_from,
    _hub_messages,
    _processes_under,
    _stack_args,
    _wait_for,
)
from support import pgcluster
from support.emulator import free_port
from support.metrics import Scrape

from devprov_demo.balancer import Balancer
from devprov_demo.pgcluster import kept_cluster

pytestmark = pytest.mark.timeout(420)


def _replica_port_base(count: int = 1) -> int:
    """The first of ``count`` free ports whose replicas' ports (+1000, +2000) are free too."""
    while True:
        port = free_port("127.0.0.1")
        ports = [port + 1000 * n + k for n in (0, 1, 2) for k in range(count)]
        if max(ports) < 65535 and all(_bindable(p) for p in ports[1:]):
            return port


@pytest.fixture
def work_dir(tmp_path):
    """Where the stack keeps its state.  As root, the stack runs the PostgreSQL server as user postgres,
    which must pass through the work directory's parents (pytest's are root's alone): then a directory of
    our own that lets others through, as a checkout's var/ does."""
    if os.geteuid() != 0:
        yield tmp_path / "up"
        return
    base = Path(tempfile.mkdtemp(prefix="devprov-replicas-"))
    os.chmod(base, 0o711)
    try:
        yield base / "up"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status == 200 and b"devprov_" in response.read()
    except urllib.error.URLError:
        return False


def _up(work: Path, args: list[str]) -> Printed:
    printed = Printed(_demo("up", *args, "--replicas", "2"))
    printed.wait_for(r"Up\. Ctrl-C stops the stack")
    return printed


@contextlib.contextmanager
def _running(work: Path, args: list[str]) -> Iterator[Printed]:
    """``up --replicas 2`` for the block, stopped with Ctrl-C at its end (exit 130, as everywhere; killed
    when the block failed), leaving no process of the stack (PostgreSQL's server included: its command line
    names its directory).  ``.text`` holds all it printed."""
    printed = _up(work, args)
    try:
        yield printed
        printed.proc.send_signal(signal.SIGINT)
        output = printed.finish()
        assert printed.proc.returncode == 130, output
    finally:
        if printed.proc.poll() is None:
            printed.proc.kill()
    assert _processes_under(work) == []


@pytest.mark.slow
def test_the_kept_cluster_starts_again_on_its_data_after_its_server_was_killed(work_dir):
    why = pgcluster.unavailable()
    if why is not None:
        pytest.skip(why)
    work_dir.mkdir()
    os.chmod(work_dir, 0o711)  # as the stack does for the server's user when root
    top, log = work_dir / "postgres", work_dir / "postgres.log"
    with kept_cluster(top, log) as cluster:
        with psycopg.connect(cluster.database("kept"), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
        assert cluster.server is not None
        cluster.server.kill()  # SIGKILL: its postmaster.pid stays behind
        cluster.server.wait()
    assert (top / "data" / "postmaster.pid").exists()
    with kept_cluster(top, log) as cluster, psycopg.connect(cluster.database("kept")) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    assert stat.S_IMODE(top.stat().st_mode) == 0o700


async def test_the_balancer_skips_a_replica_that_refuses_connections():
    def backend(name: str):
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(name.encode() + await reader.read(5))
            await writer.drain()
            writer.close()

        return answer

    servers = [await asyncio.start_server(backend(n), "127.0.0.1", 0) for n in ("a", "b")]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    front = await asyncio.start_server(Balancer([("127.0.0.1", p) for p in ports]).handle, "127.0.0.1", 0)
    front_port = front.sockets[0].getsockname()[1]

    async def call() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        writer.write(b"hello")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer

    assert [await call() for _ in range(4)] == [b"ahello", b"bhello", b"ahello", b"bhello"]
    servers[0].close()
    await servers[0].wait_closed()
    assert [await call() for _ in range(3)] == [b"bhello"] * 3
    front.close()
    servers[1].close()


def _replicated_args(work: Path, *, webhook: bool = False) -> list[str]:
    """The stack's options with every replicated port's +1000 and +2000 free too (the webhook's with
    ``webhook``)."""
    args = _stack_args(work)
    for option in ("--factory-port", "--activation-port", "--crl-port", "--est-port"):
        args[args.index(option) + 1] = str(_replica_port_base())
    args[args.index("--metrics-port") + 1] = str(_replica_port_base(4))
    return [*args, "--mode", "group", "--webhook-port", str(_replica_port_base())] if webhook else args


def _allocated(metrics_url: str) -> float:
    """How many registrations the activation_svc replica with this /metrics allocated (its webhook's 200s)."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        scrape = Scrape(response.read().decode())
    return scrape.value("devprov_http_requests_total", route="/api/allocate", status="200")


def _boot(env: dict[str, str], work: Path, hub: str) -> str:
    """A new device through the whole flow by hand (provision, activate on ``hub``, run until its first
    message reached the hub; then stopped): its id."""
    guid = str(uuid.uuid4())
    minted = _cli(env, "device-client", "provision", guid)
    assert minted.returncode == 0, minted.stdout + minted.stderr
    code = re.search(r"ACTIVATION CODE .*: (\S+)", minted.stdout)
    assert code is not None, minted.stdout
    activated = _cli(
        env, "activation-svc", "activate", guid, "--metadata", str(work / "sample-metadata.json"),
        "--hub", hub, "--code-file", "-", stdin=code.group(1) + "\n",
    )  # fmt: skip
    assert activated.returncode == 0, activated.stdout + activated.stderr
    device = subprocess.Popen(
        ["device-client", "run", guid], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        messages = _wait_for(
            lambda: [m for m in _hub_messages(work) if m.device_id == guid], 120, "its telemetry", device
        )
        assert messages[0].hub == hub
        device.send_signal(signal.SIGTERM)
        assert device.wait(60) == 0
    finally:
        if device.poll() is None:
            device.kill()
    return guid


@pytest.mark.slow
def test_up_with_two_replicas_in_group_mode_survives_killed_replicas_and_keeps_its_state(work_dir):
    """One ``up --replicas 2 --mode group`` stack: each replica's /metrics on its own port; the factory
    replica killed is reported and the one left mints behind the same address; the webhook replica that
    allocated is killed and the one left allocates behind the same URL, the registry in the stack's
    PostgreSQL; stopped and started again on the same work directory, the kept cluster still has the
    device."""
    why = pgcluster.unavailable()
    assert why is None, why  # `make test` installs PostgreSQL (`make postgresql`)
    work = work_dir
    args = _replicated_args(work, webhook=True)
    factory_port = int(args[args.index("--factory-port") + 1])
    hubs = [args[i + 1] for i, option in enumerate(args) if option == "--hub-host"]
    with _running(work, args) as printed:
        env = _env_from(work / "env.sh")
        assert env["FACTORY_CLIENT_TARGET"].endswith(f":{factory_port}")  # the one address
        metrics = dict(re.findall(r"metrics: (\w+ replica \d) \(Prometheus\)\s+(http://\S+)", printed.text))
        assert set(metrics) == {f"{s} replica {n}" for s in ("factory", "activation") for n in (1, 2)}
        assert all(_answers(url) for url in metrics.values())  # each replica on its own port
        first = _boot(env, work, hubs[0])  # DPS called the one webhook URL; one replica answered

        pid = int(printed.wait_for(r"factory_svc replica 1 \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGKILL)
        printed.wait_for(rf"factory_svc replica 1 \(pid {pid}\) died: killed by SIGKILL")
        assert _answers(metrics["factory replica 2"])
        assert not _answers(metrics["factory replica 1"])  # it is gone, and monitoring sees that

        webhooks = {name: url for name, url in metrics.items() if name.startswith("activation")}
        served = [name for name, url in webhooks.items() if _allocated(url) == 1]
        assert len(served) == 1, served
        (left,) = set(webhooks) - set(served)
        number = served[0].rsplit(" ", 1)[1]
        pid = int(printed.wait_for(rf"activation_svc replica {number} \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGKILL)
        printed.wait_for(rf"activation_svc replica {number} \(pid {pid}\) died: killed by SIGKILL")

        # minted by the factory replica left, allocated by the webhook replica left, behind the same URLs
        second = _boot(env, work, hubs[1])
        assert _allocated(webhooks[left]) == 1

        database = re.search(r"PostgreSQL: activation's state\s+(postgresql://\S+)", printed.text)
        assert database is not None, printed.text
        with psycopg.connect(database.group(1)) as conn:
            rows = conn.execute("SELECT registration_id, assigned_hub FROM registry").fetchall()
        assert dict(rows) == {first: hubs[0], second: hubs[1]}
        assert not list((work / "activation").glob("registry.sqlite3*"))  # not the single stack's file
    output = printed.text
    assert "PostgreSQL: factory's state" in output
    cluster = re.search(r"PostgreSQL cluster \(kept; --fresh wipes it\)\W+(/\S+)", output)
    assert cluster is not None, output
    assert Path(cluster.group(1)) == work.resolve() / "postgres"
    assert (work / "postgres" / "data" / "PG_VERSION").exists()

    with _running(work, args):  # the same work directory: the same DPS, devices and services' state
        listed = _cli(_env_from(work / "env.sh"), "factory-svc", "list", first)
        assert listed.returncode == 0 and first in listed.stdout, listed.stdout + listed.stderr


@pytest.mark.slow
def test_demo_in_group_mode_with_two_replicas_boots_the_fleet_through_the_webhook(work_dir, tmp_path):
    why = pgcluster.unavailable()
    assert why is None, why
    work = work_dir
    summary_file = tmp_path / "summary.json"
    proc = _demo(
        "run", *_replicated_args(work, webhook=True), "--replicas", "2", "--devices", "2", "--interval", "1",
        "--seconds", "4", "--summary-json", str(summary_file),
    )  # fmt: skip
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert re.search(r"allocation webhook replica 2\s+https://", output), output
    devices = json.loads(summary_file.read_text())["devices"]
    received = {m.device_id: m.hub for m in _hub_messages(work)}
    for device in devices:
        assert device["assigned_hub"] == device["chosen_hub"] == received[device["guid"]], device
    assert _processes_under(work) == []
    with (
        kept_cluster(work / "postgres", work / "logs" / "postgres.log") as cluster,  # the stack's, kept
        psycopg.connect(cluster.database("activation")) as conn,
    ):
        rows = conn.execute("SELECT registration_id, assigned_hub FROM registry").fetchall()
    assert dict(rows) == {device["guid"]: device["chosen_hub"] for device in devices}
