"""The emulator run inside this process, queueing cloud-to-device messages through ``HubService.send_c2d``
(as its AMQP side does) for a test that then kills this process with SIGKILL.

    python c2d_sender.py DATA_DIR DPS_HOST HUB_HOST

prints ``ready`` once the emulator listens, then reads one JSON object a line from stdin,
``{"device": ..., "body": ..., "message_id": ...}``, and prints ``sent <message_id>`` once ``send_c2d``
returned (the message is committed then)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from azure_iot_emulator.app import Emulator
from azure_iot_emulator.config import EmulatorConfig
from azure_iot_emulator.hub.c2d import C2dMessage


async def main(data_dir: str, dps_host: str, hub_host: str) -> None:
    config = EmulatorConfig(data_dir=Path(data_dir), dps_host=dps_host, hub_hosts=(hub_host,)).validated()
    emulator = Emulator(config)
    await emulator.start()
    assert emulator.hub is not None
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        request = json.loads(line)
        message = C2dMessage(request["body"].encode(), message_id=request["message_id"])
        await emulator.hub.service.send_c2d(hub_host, request["device"], message)
        print("sent", request["message_id"], flush=True)
    await emulator.stop()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
