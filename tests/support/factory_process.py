"""factory_svc as a real process (``factory-svc serve``) for the fault tests: started with a crash point
armed or none (``DEVPROV_CRASH_AT``), killed, restarted on the same data directory and database; and its
``enroll-batch`` command run against it (or against another address: a balancer, another replica)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from provkit.channels import ChannelSecurity, create_channel
from provkit.faults import CRASH_ENV
from support.cli_process import run_module, wait_serving
from support.emulator import free_port


class FactoryProcess:
    """factory_svc as a real process on its own port, restartable on one data dir."""

    def __init__(self, settings: dict[str, str], log: Path) -> None:
        self.port = free_port("127.0.0.1")
        self.target = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **settings, "FACTORY_SERVER_PORT": str(self.port)}
        self.env.pop(CRASH_ENV, None)
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, crash_at: str = "") -> None:
        env = {**self.env, CRASH_ENV: crash_at} if crash_at else self.env
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "factory_svc.cli", "serve", env=env, stdout=log, stderr=log
            )
        await wait_serving(self.target, ChannelSecurity(insecure=True), "factory-svc serve")

    async def killed(self) -> int:
        """Wait for the process to end (it kills itself at its crash point); its exit status."""
        assert self.process is not None
        try:
            return await asyncio.wait_for(self.process.wait(), 120)
        except TimeoutError:
            raise AssertionError(
                f"factory-svc still runs after 120 s; its log ends:\n{self.log_tail()}"
            ) from None

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else "(no log)"

    async def kill(self) -> int:
        """kill -9 now (no shutdown, nothing flushed); its exit status."""
        assert self.process is not None
        self.process.kill()
        return await self.killed()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 30)

    @asynccontextmanager
    async def stub(self) -> AsyncIterator[pb_grpc.FactoryServiceStub]:
        async with create_channel(self.target, ChannelSecurity(insecure=True)) as channel:
            yield pb_grpc.FactoryServiceStub(channel)

    async def batch(
        self, certs: Path, codes: Path, *extra: str, crash_at: str = "", target: str = ""
    ) -> tuple[int, str]:
        """``factory-svc enroll-batch --dir certs --codes-out codes extra...`` against this process (or
        ``target``): (exit status, stderr)."""
        env = {**self.env, "FACTORY_CLIENT_INSECURE": "true", "FACTORY_CLIENT_TARGET": target or self.target}
        if crash_at:
            env[CRASH_ENV] = crash_at
        code, _out, err = await run_module(
            "factory_svc.cli", "enroll-batch", "--dir", str(certs), "--codes-out", str(codes), *extra,
            env=env, timeout=180,
        )  # fmt: skip
        return code, err
