"""The emulator as a real subprocess on fresh loopback addresses, for tests and benchmarks: every host on
Azure's ports of its own address (MQTT 8883, HTTPS 443), so its connection strings are Azure's shape
(the process handling itself is ``azure_iot_emulator.process.EmulatorProcess``).

    emu = EmulatorProcess(tmp_path / "emu", hubs=2)
    emu.start()            # waits for connection.json
    emu.dps_connection_string, emu.hub_connection_strings, emu.ca_pem, emu.id_scope, ...
    emu.restart()          # SIGTERM, then start again on the same addresses and data dir
    emu.stop()             # SIGTERM (graceful); emu.kill() is SIGKILL
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from conftest import free_loopback_address

from azure_iot_emulator import process


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_PORT_FLOOR = 10000
_handed_out: set[tuple[str, int]] = set()
_ports = random.Random()  # its own generator: a test seeding ``random`` must not make runs pick alike


def free_port(host: str) -> int:
    """A port free on ``host`` now, below the kernel's ephemeral range.

    A port the kernel picks for ``bind(0)`` is an ephemeral one, and between this call and the moment the
    test's server binds it, any outgoing connection of the run (a client, an SDK) may be given the same port
    as its source: the server then fails with "address in use" (seen in the demo tests).  Ports below the
    ephemeral range are never handed to outgoing connections; a port is not handed out twice in a run.
    """
    ceiling = _ephemeral_low()
    for _ in range(1000):
        port = _ports.randrange(_PORT_FLOOR, max(ceiling, _PORT_FLOOR + 1000))
        if (host, port) in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add((host, port))
        return port
    raise RuntimeError(f"no free port below {ceiling} on {host}")


def fresh_addresses(count: int, taken: tuple[str, ...] = ()) -> list[str]:
    """``count`` distinct loopback addresses with ports 8883 and 443 free, none of them in ``taken``."""
    hosts: list[str] = []
    while len(hosts) < count:
        host = free_loopback_address()
        if host not in taken and host not in hosts:
            hosts.append(host)
    return hosts


class EmulatorProcess(process.EmulatorProcess):
    def __init__(
        self,
        data_dir: Path | str,
        *,
        hubs: int = 2,
        dps_host: str | None = None,
        hub_hosts: list[str] | None = None,
        https_port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        dps_host = dps_host or free_loopback_address()
        hub_hosts = hub_hosts if hub_hosts is not None else fresh_addresses(hubs, (dps_host,))
        super().__init__(
            data_dir,
            dps_host=dps_host,
            hub_hosts=hub_hosts,
            https_port=https_port,
            extra_args=extra_args or (),
        )
