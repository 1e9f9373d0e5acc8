"""``make up`` with ``--replicas 2``: PostgreSQL and two replicas of each service behind one address each,
each replica's /metrics on its own port; a replica killed with SIGKILL is reported and the other carries on
behind the same address; the cluster is kept in the work directory, so a device minted before a restart is
still there after it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from demo.test_demo_flow import Printed, _bindable, _cli, _demo, _env_from, _processes_under, _stack_args
from support import pgcluster
from support.emulator import free_port

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


def _stop(printed: Printed) -> str:
    printed.proc.send_signal(signal.SIGINT)
    output = printed.finish()
    assert printed.proc.returncode == 130, output  # Ctrl-C: interrupted, as everywhere
    return output


@pytest.mark.slow
def test_up_with_two_replicas_keeps_its_state_and_reports_a_killed_replica(work_dir):
    why = pgcluster.unavailable()
    if why is not None:
        pytest.skip(why)
    work = work_dir
    args = _stack_args(work)
    for option in ("--factory-port", "--activation-port", "--crl-port", "--est-port"):
        args[args.index(option) + 1] = str(_replica_port_base())
    args[args.index("--metrics-port") + 1] = str(_replica_port_base(4))
    factory_port = int(args[args.index("--factory-port") + 1])
    guid = str(uuid.uuid4())
    printed = _up(work, args)
    try:
        env = _env_from(work / "env.sh")
        assert env["FACTORY_CLIENT_TARGET"].endswith(f":{factory_port}")  # the one address
        minted = _cli(env, "device-client", "provision", guid)
        assert minted.returncode == 0, minted.stdout + minted.stderr
        assert re.search(r"ACTIVATION CODE .*: (\S+)", minted.stdout)

        metrics = dict(re.findall(r"metrics: (\w+ replica \d) \(Prometheus\)\s+(http://\S+)", printed.text))
        assert set(metrics) == {f"{s} replica {n}" for s in ("factory", "activation") for n in (1, 2)}
        assert all(_answers(url) for url in metrics.values())  # each replica on its own port
        pid = int(printed.wait_for(r"factory_svc replica 1 \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGKILL)
        printed.wait_for(rf"factory_svc replica 1 \(pid {pid}\) died: killed by SIGKILL")
        assert _answers(metrics["factory replica 2"])
        assert not _answers(metrics["factory replica 1"])  # it is gone, and monitoring sees that
        again = _cli(env, "device-client", "provision", str(uuid.uuid4()))  # on the replica that is left
        assert again.returncode == 0, again.stdout + again.stderr
        output = _stop(printed)
    finally:
        if printed.proc.poll() is None:
            printed.proc.kill()
    assert "PostgreSQL: factory's state" in output
    assert _processes_under(work) == []  # the server included (its command line names its directory)
    cluster = re.search(r"PostgreSQL cluster \(kept; --fresh wipes it\)\W+(/\S+)", output)
    assert cluster is not None, output
    assert Path(cluster.group(1)) == work.resolve() / "postgres"
    assert (work / "postgres" / "data" / "PG_VERSION").exists()

    printed = _up(work, args)  # the same work directory: the same DPS, devices and services' state
    try:
        listed = _cli(_env_from(work / "env.sh"), "factory-svc", "list", guid)
        assert listed.returncode == 0 and guid in listed.stdout, listed.stdout + listed.stderr
        _stop(printed)
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
