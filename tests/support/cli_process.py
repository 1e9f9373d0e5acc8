"""Running the services' command lines as real processes in tests."""

from __future__ import annotations

import asyncio
import sys

from grpc_health.v1 import health_pb2, health_pb2_grpc

from provkit.channels import ChannelSecurity, create_channel
from support.waiting import until


async def run_module(
    module: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    stdin: str | None = None,
) -> tuple[int, str, str]:
    """``python -m module args...`` to completion (``stdin`` typed into it): (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    typed = stdin.encode() if stdin is not None else None
    out, err = await asyncio.wait_for(proc.communicate(typed), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def wait_serving(target: str, security: ChannelSecurity, what: str, timeout: float = 90.0) -> None:
    """Poll the gRPC health service until it answers SERVING (0.1 s apart), for up to ``timeout`` seconds:
    a loaded two-core machine can take tens of seconds to start a service with its imports."""
    async with create_channel(target, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except Exception:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        await until(serving, f"{what} healthy", timeout=timeout, interval=0.1)
