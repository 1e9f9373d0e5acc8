"""The emulator as a child process (``python -m azure_iot_emulator serve``), for the demo, tests and benches.

    emu = EmulatorProcess(data_dir, dps_host="127.0.0.1", hub_hosts=["127.0.0.2", "127.0.0.3"])
    emu.start()            # waits until this process has written connection.json (HTTPS on 443 unless
                           # https_port=... chose another port; 443 needs root or CAP_NET_BIND_SERVICE)
    emu.dps_connection_string, emu.hub_connection_strings, emu.ca_pem, emu.id_scope, ...
    emu.restart()          # SIGTERM, then start again on the same addresses and data directory
    emu.stop()             # SIGTERM (graceful); emu.kill() is SIGKILL

On Linux the child gets SIGTERM when its parent dies, so an interrupted parent never leaves it behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from azure_iot_emulator.connection_info import CONNECTION_FILE, ConnectionInfo, read_connection_info
from litestore import private_directory

START_TIMEOUT = 30.0


def _exit_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: deliver SIGTERM to this process when the process that started it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn(
    command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` with stdout and stderr appended to ``log_path``, in its own process group (a
    terminal's Ctrl-C reaches only the parent, which stops its children in order), ended with its parent.
    ``env`` is the child's whole environment (default: this process's)."""
    private_directory(log_path.parent)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=_exit_with_parent if sys.platform.startswith("linux") else None,
        )


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code; raises nothing."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class EmulatorProcess:
    def __init__(
        self,
        data_dir: Path | str,
        *,
        dps_host: str,
        hub_hosts: Sequence[str],
        https_port: int | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.dps_host = dps_host
        self.hub_hosts: list[str] = list(hub_hosts)
        self.requested_https_port = https_port
        self.extra_args = list(extra_args)
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._connection: ConnectionInfo | None = None

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
        ]
        if self.requested_https_port is not None:
            cmd += ["--https-port", str(self.requested_https_port)]
        for host in self.hub_hosts:
            cmd += ["--hub-host", host]
        return cmd + self.extra_args

    @property
    def connection_file(self) -> Path:
        return self.data_dir / CONNECTION_FILE

    def start(self, timeout: float = START_TIMEOUT) -> EmulatorProcess:
        private_directory(self.data_dir)
        self.connection_file.unlink(missing_ok=True)
        self.proc = spawn(self.command, self.log_path)
        deadline = time.monotonic() + timeout
        while True:
            info = read_connection_info(self.connection_file)
            if info is not None and info["pid"] == self.proc.pid:
                self._connection = info
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the emulator did not start; its log:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("the emulator did not stop on SIGTERM") from None

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
    def connection(self) -> ConnectionInfo:
        if self._connection is None:
            raise RuntimeError("the emulator has not started: no connection facts yet")
        return self._connection

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
    def global_endpoint(self) -> str:
        return self.connection["global_endpoint"]

    @property
    def https_port(self) -> int:
        """The HTTPS port of every host (443 unless chosen): service REST APIs, the DPS device API, MQTT over
        WebSockets."""
        return self.connection["https_port"]

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

    def eventhub_connection_string(self, host: str) -> str:
        """The Event Hub-compatible connection string of the hub ``host``'s built-in endpoint."""
        return next(
            h.get("eventhub_connection_string", "") for h in self.connection["hubs"] if h["host_name"] == host
        )

    @property
    def default_hub(self) -> str:
        return self.connection["default_hub"]
