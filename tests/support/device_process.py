"""`device-client` as its own process (``python -m device_client``), as the device tests of several folders
run it: started with an environment, and its ``status --json`` read back."""

from __future__ import annotations

import asyncio
import json
import sys


async def device_client(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "device_client",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def device_status(env: dict[str, str], guid: str) -> dict:
    """What ``device-client status GUID --json`` says about the device."""
    proc = await device_client(env, "status", guid, "--json")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)
