"""The servers under test, as processes on fresh loopback addresses: the emulator (the tests' process
harness, with the benchmark's devices registered before it starts) and Mosquitto (TLS with a server
certificate from the emulator's own PKI code), plus the one device certificate all devices present."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from azure_iot_emulator.hub.registry import DeviceSpec, HubRegistry
from azure_iot_emulator.pki import issue_server_certificate
from azure_iot_emulator.process import terminate
from azure_iot_emulator.store import Database

_TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from conftest import free_loopback_address  # noqa: E402 - needs the tests folder on the path
from support.certs import DeviceCert, TestCa  # noqa: E402
from support.emulator import EmulatorProcess  # noqa: E402

MQTT_PORT = 8883
MOSQUITTO = "/usr/sbin/mosquitto"


@dataclass(frozen=True)
class Target:
    """A running server as the load generators and the measurements see it."""

    name: str
    host: str
    hub: str
    ca: str
    cert: str
    key: str
    pid: int


def device_identity(directory: Path) -> DeviceCert:
    """The self-signed certificate every simulated device presents (registered by thumbprint)."""
    return TestCa().issue(directory, "bench-device", self_signed=True)


def start_emulator(
    directory: Path,
    device: DeviceCert,
    device_ids: list[str],
    thumbprints: Mapping[str, str] | None = None,
    pause_log: Path | None = None,
    *,
    wrapper: Sequence[str] = (),
    start_timeout: float = 30.0,
) -> tuple[EmulatorProcess, Target]:
    """The emulator as a real process with ``device_ids`` registered on its one hub beforehand, each by
    its own thumbprint in ``thumbprints`` or else by ``device``'s; ``pause_log``: where it records its
    collector pauses and loop stalls (``--pause-log``); ``wrapper``: the command that stands for the
    interpreter (valgrind and the interpreter, or the interpreter with ``-m cProfile -o FILE``)."""
    thumbprints = thumbprints or {}
    host = free_loopback_address()
    data = directory / "emulator-data"
    data.mkdir(parents=True)
    db = Database(data / "emulator.db")
    try:
        registry = HubRegistry(db, [host], lambda: datetime.now(UTC))
        with db.transaction():
            for device_id in device_ids:
                registry.create_device(
                    host,
                    DeviceSpec(
                        device_id=device_id, primary_thumbprint=thumbprints.get(device_id, device.sha1)
                    ),
                )
    finally:
        db.close()
    extra = ["--pause-log", str(pause_log)] if pause_log is not None else []
    emulator = _Wrapped(data, hub_hosts=[host], extra_args=extra, wrapper=wrapper).start(start_timeout)
    assert emulator.proc is not None
    target = Target(
        "emulator", host, host, str(emulator.ca_path), str(device.cert_path), str(device.key_path),
        emulator.proc.pid,
    )  # fmt: skip
    return emulator, target


class _Wrapped(EmulatorProcess):
    def __init__(self, data: Path, *, wrapper: Sequence[str], **options: Any) -> None:
        super().__init__(data, **options)
        self.wrapper = list(wrapper)

    @property
    def command(self) -> list[str]:
        command = super().command  # the interpreter first: the wrapper's command runs it
        return [*self.wrapper, *command[1:]] if self.wrapper else command


def find_mosquitto() -> tuple[str | None, str]:
    """Mosquitto's binary, installing Debian's package when we may; else None and why not."""
    found = shutil.which("mosquitto") or (MOSQUITTO if Path(MOSQUITTO).exists() else None)
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "mosquitto is not installed and apt-get is not usable here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["apt-get", *args], capture_output=True, env=env, timeout=300, check=False)

    install = apt("install", "-y", "-q", "mosquitto")
    if install.returncode != 0:
        apt("update", "-q")
        install = apt("install", "-y", "-q", "mosquitto")
    found = shutil.which("mosquitto") or (MOSQUITTO if Path(MOSQUITTO).exists() else None)
    if not found:
        return None, "apt-get install mosquitto failed: " + install.stderr.decode(errors="replace")[-200:]
    return found, ""


def start_mosquitto(
    binary: str, directory: Path, device: DeviceCert
) -> tuple[subprocess.Popen[bytes], Target]:
    host = free_loopback_address()
    (directory / "mosquitto-pki").mkdir(parents=True)
    pki = issue_server_certificate(directory / "mosquitto-pki", [host], datetime.now(UTC))
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {MQTT_PORT} {host}\n"
        f"cafile {pki.ca_path}\ncertfile {pki.cert_path}\nkeyfile {pki.key_path}\n"
        "require_certificate false\nallow_anonymous true\npersistence false\n"
        "max_inflight_messages 0\nmax_queued_messages 1000\nlog_dest none\n"
        # run as the current user (as root it would switch to `mosquitto`, which cannot read our temp dir)
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(host, MQTT_PORT, 10)
    except TimeoutError:
        terminate(proc)
        raise
    target = Target(
        "mosquitto", host, host, str(pki.ca_path), str(device.cert_path), str(device.key_path), proc.pid
    )
    return proc, target


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open")
