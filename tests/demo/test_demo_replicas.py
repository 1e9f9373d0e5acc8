"""``make up`` with ``--replicas 2``: PostgreSQL and two replicas of each service behind one address each;
a replica killed with SIGKILL, the other carries on behind the same address; everything (the cluster too)
is gone after Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from pathlib import Path

import pytest
from demo.test_demo_flow import _bindable, _cli, _demo, _env_from, _processes_under, _stack_args, _wait_for
from support import pgcluster
from support.emulator import free_port

from devprov_demo.balancer import Balancer


def _replica_port_base() -> int:
    """A free port whose replicas' ports (+1000, +2000) are free too."""
    while True:
        port = free_port("127.0.0.1")
        if port + 2000 < 65535 and all(_bindable(port + 1000 * n) for n in (1, 2)):
            return port



def _listener_pid(variable: str, port: int) -> int:
    """The process started with ``variable=port`` in its environment (a replica of the stack)."""
    wanted = f"{variable}={port}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no process with {variable}={port}")


def test_up_with_two_replicas_carries_on_when_one_is_killed(tmp_path):
    why = pgcluster.unavailable()
    if why is not None:
        pytest.skip(why)
    work = tmp_path / "up"
    args = _stack_args(work)
    for option in ("--factory-port", "--activation-port", "--crl-port"):
        args[args.index(option) + 1] = str(_replica_port_base())
    factory_port = int(args[args.index("--factory-port") + 1])
    proc = _demo("up", *args, "--replicas", "2")
    try:
        _wait_for(lambda: (work / "env.sh").exists(), 180, "env.sh", proc)
        env = _env_from(work / "env.sh")
        assert env["FACTORY_CLIENT_TARGET"].endswith(f":{factory_port}")  # the one address
        first = _cli(env, "device-client", "provision", str(uuid.uuid4()))
        assert first.returncode == 0, first.stdout + first.stderr
        os.kill(_listener_pid("FACTORY_SERVER_PORT", factory_port + 1000), signal.SIGKILL)
        for _ in range(3):  # every new connection lands on the replica that is left
            guid = str(uuid.uuid4())
            again = _cli(env, "device-client", "provision", guid)
            assert again.returncode == 0, again.stdout + again.stderr
            assert re.search(r"ACTIVATION CODE .*: (\S+)", again.stdout)
            listed = _cli(env, "factory-svc", "list", guid)
            assert listed.returncode == 0 and guid in listed.stdout
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "factory_svc replica 2" in output and "PostgreSQL: factory's state" in output
    assert _processes_under(work) == []
    cluster = re.search(r"PostgreSQL cluster \(removed at exit\)\W+(/\S+)", output)
    assert cluster is not None, output
    assert not Path(cluster.group(1)).exists()  # its cluster removed (other runs may have their own)


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
