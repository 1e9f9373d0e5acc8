"""The emulator as a real subprocess (``python -m azure_iot_emulator serve``) on fresh loopback
addresses, for tests and benchmarks.

    emu = EmulatorProcess(tmp_path / "emu", hubs=2)
    emu.start()            # waits for connection.json
    emu.dps_connection_string, emu.hub_connection_strings, emu.ca_pem, emu.id_scope, ...
    emu.restart()          # SIGTERM, then start again on the same addresses and data dir
    emu.stop()             # SIGTERM (graceful); emu.kill() is SIGKILL
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import free_loopback_address

START_TIMEOUT = 30.0


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmulatorProcess:
    def __init__(
        self,
        data_dir: Path | str,
        *,
        hubs: int = 2,
        dps_host: str | None = None,
        hub_hosts: list[str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.dps_host = dps_host or free_loopback_address()
        if hub_hosts is None:
            hub_hosts = []
            while len(hub_hosts) < hubs:
                host = free_loopback_address()
                if host != self.dps_host and host not in hub_hosts:
                    hub_hosts.append(host)
        self.hub_hosts: list[str] = list(hub_hosts)
        self.extra_args = list(extra_args or [])
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.connection: dict[str, Any] = {}
        self._dps_rest_port = _free_port(self.dps_host)
        self._hub_rest_port = _free_port(self.hub_hosts[0])

    # ----------------------------------------------------------------------------------- lifecycle
    @property
    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "azure_iot_emulator",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--dps-host",
            self.dps_host,
            "--dps-rest-port",
            str(self._dps_rest_port),
            "--hub-rest-port",
            str(self._hub_rest_port),
        ]
        for host in self.hub_hosts:
            cmd += ["--hub-host", host]
        return cmd + self.extra_args

    def start(self) -> EmulatorProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conn_file = self.data_dir / "connection.json"
        if conn_file.exists():
            conn_file.unlink()
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if conn_file.exists():
                try:
                    info = json.loads(conn_file.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == self.proc.pid:
                    self.connection = info
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"emulator did not start; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("emulator did not stop on SIGTERM") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> EmulatorProcess:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ----------------------------------------------------------------------------- connection facts
    @property
    def ca_path(self) -> Path:
        return Path(self.connection["ca_pem_path"])

    @property
    def ca_pem(self) -> str:
        return self.ca_path.read_text()

    @property
    def id_scope(self) -> str:
        return self.connection["id_scope"]

    @property
    def dps_connection_string(self) -> str:
        return self.connection["dps"]["connection_string"]

    @property
    def dps_rest_endpoint(self) -> str:
        return self.connection["dps"]["rest_endpoint"]

    @property
    def hub_connection_strings(self) -> list[str]:
        return [hub["connection_string"] for hub in self.connection["hubs"]]

    def hub_connection_string(self, host: str) -> str:
        return next(h["connection_string"] for h in self.connection["hubs"] if h["host_name"] == host)

    @property
    def default_hub(self) -> str:
        return self.connection["default_hub"]
