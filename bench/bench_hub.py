"""IoT Hub emulator benchmark: telemetry ingest (QoS 1 over TLS) vs Mosquitto, memory per device.

One load generator (a small asyncio MQTT 3.1.1 client, run in its own process so it does not share the
server's interpreter) drives both servers identically: N simulated devices, each on its own TLS
connection, publishing `devices/{id}/messages/events/` with QoS 1 and a window of in-flight messages;
the rate is acknowledged messages per second.  Memory: the server's resident set before and after N
idle devices connect, divided by N.

Run alone: `python bench/bench_hub.py` (or through `make bench`).  Bounded to well under two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TITLE = "IoT Hub emulator: telemetry ingest vs Mosquitto, memory per connected device"

INGEST_DEVICES = 50
INGEST_WINDOW = 8
INGEST_SECONDS = 6.0
INGEST_ROUNDS = 2
IDLE_DEVICES = 2000
TARGET_DEVICES = 10_000
PAYLOAD = json.dumps({"temperature": 21.5, "humidity": 40, "status": "ok", "seq": 0}).encode()
MQTT_PORT = 8883


# ------------------------------------------------------------------------------------------- MQTT client
def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    out = bytearray([first])
    length = len(body)
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes(out) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    multiplier, length = 1, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


class Device:
    def __init__(self, host: str, device_id: str, hub: str, context: ssl.SSLContext) -> None:
        self.host, self.device_id, self.hub, self.context = host, device_id, hub, context
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, MQTT_PORT, ssl=self.context, server_hostname=self.host
        )
        username = f"{self.hub}/{self.device_id}/?api-version=2019-10-01"
        body = _string("MQTT") + bytes([4, 0x80]) + struct.pack("!H", 600) + _string(self.device_id)
        body += _string(username)
        self.writer.write(_packet(0x10, body))
        first, rest = await _read_packet(self.reader)
        if first >> 4 != 2 or rest[1] != 0:
            raise ConnectionError(f"CONNACK refused rc={rest[1] if len(rest) > 1 else '?'}")

    async def publish_loop(self, deadline: float, window: int) -> int:
        assert self.reader and self.writer
        topic = _string(f"devices/{self.device_id}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8")
        in_flight = 0
        acked = 0
        next_id = 1
        loop = asyncio.get_running_loop()
        while True:
            while in_flight < window and loop.time() < deadline:
                self.writer.write(_packet(0x32, topic + struct.pack("!H", next_id) + PAYLOAD))
                next_id = next_id % 65535 + 1
                in_flight += 1
            if in_flight == 0:
                return acked
            first, _ = await _read_packet(self.reader)
            if first >> 4 == 4:
                in_flight -= 1
                acked += 1

    async def close(self) -> None:
        if self.writer:
            with contextlib.suppress(Exception):
                self.writer.write(_packet(0xE0, b""))
                self.writer.close()
                await self.writer.wait_closed()


def _client_context(ca_path: str, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_path)
    if cert:
        context.load_cert_chain(cert, key)
    return context


async def _loadgen(args: argparse.Namespace) -> dict:
    context = _client_context(args.ca, args.cert, args.key)
    devices = [Device(args.host, f"{args.prefix}{i:05d}", args.hub, context) for i in range(args.devices)]
    started = time.perf_counter()
    semaphore = asyncio.Semaphore(50)

    async def connect(device: Device) -> None:
        async with semaphore:
            await device.connect()

    await asyncio.gather(*(connect(d) for d in devices))
    connect_seconds = time.perf_counter() - started
    result: dict = {"connected": len(devices), "connect_seconds": connect_seconds}
    if args.mode == "idle":
        print(json.dumps(result), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    else:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        counts = await asyncio.gather(*(d.publish_loop(begin + args.seconds, args.window) for d in devices))
        elapsed = loop.time() - begin
        result.update(acked=sum(counts), seconds=elapsed, rate=sum(counts) / elapsed)
        print(json.dumps(result), flush=True)
    await asyncio.gather(*(d.close() for d in devices))
    return result


# ------------------------------------------------------------------------------------------------ helpers
def _free_loopback() -> str:
    rng = random.SystemRandom()
    for _ in range(200):
        host = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((host, MQTT_PORT))
            except OSError:
                continue
        return host
    raise RuntimeError("no free loopback address")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open")


@dataclass
class Target:
    name: str
    host: str
    hub: str
    ca: str
    cert: str | None
    key: str | None
    pid: int


def _run_loadgen(target: Target, mode: str, devices: int, prefix: str) -> subprocess.Popen:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--loadgen",
        "--mode",
        mode,
        "--host",
        target.host,
        "--hub",
        target.hub,
        "--ca",
        target.ca,
        "--devices",
        str(devices),
        "--prefix",
        prefix,
        "--seconds",
        str(INGEST_SECONDS),
        "--window",
        str(INGEST_WINDOW),
    ]
    if target.cert:
        command += ["--cert", target.cert, "--key", target.key or ""]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ingest(target: Target) -> dict:
    proc = _run_loadgen(target, "ingest", INGEST_DEVICES, "ingest-")
    out, _ = proc.communicate(timeout=90)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed against {target.name}")
    return json.loads(out.strip().splitlines()[-1])


def _idle_memory(target: Target, devices: int) -> dict:
    time.sleep(0.5)
    before = _rss_kib(target.pid)
    proc = _run_loadgen(target, "idle", devices, "idle-")
    assert proc.stdout and proc.stdin
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"idle load generator failed against {target.name}")
    info = json.loads(line)
    time.sleep(1.0)
    after = _rss_kib(target.pid)
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(timeout=30)
    return {
        "devices": devices,
        "before_kib": before,
        "after_kib": after,
        "per_device_kib": (after - before) / devices,
        "connect_seconds": info["connect_seconds"],
    }


# ---------------------------------------------------------------------------------------------- servers
def _make_pki(directory: Path, hosts: list[str]) -> tuple[str, str, str, str, str, str]:
    """CA + server certificate (SANs: hosts) + one self-signed device certificate; returns paths and the
    device certificate's SHA-1 thumbprint."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench CA"))
        .issuer_name(name("bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(name("bench server"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(h)) for h in hosts]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    dev_key = ec.generate_private_key(ec.SECP256R1())
    dev = (
        x509.CertificateBuilder()
        .subject_name(name("bench-device"))
        .issuer_name(name("bench-device"))
        .public_key(dev_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(dev_key, hashes.SHA256())
    )
    paths = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": server.public_bytes(serialization.Encoding.PEM),
        "server.key": key_pem(server_key),
        "device.pem": dev.public_bytes(serialization.Encoding.PEM),
        "device.key": key_pem(dev_key),
    }
    for file_name, data in paths.items():
        (directory / file_name).write_bytes(data)
        if file_name.endswith(".key"):
            (directory / file_name).chmod(0o600)
    thumb = dev.fingerprint(hashes.SHA1()).hex().upper()  # Azure's thumbprint
    return (
        str(directory / "ca.pem"),
        str(directory / "server.pem"),
        str(directory / "server.key"),
        str(directory / "device.pem"),
        str(directory / "device.key"),
        thumb,
    )


def _ensure_mosquitto() -> tuple[str | None, str]:
    path = shutil.which("mosquitto") or (
        ("/usr/sbin/mosquitto") if Path("/usr/sbin/mosquitto").exists() else None
    )
    if path:
        return path, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "mosquitto is not installed and apt-get is not usable here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = subprocess.run(
        ["apt-get", "install", "-y", "-q", "mosquitto"],
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )
    if install.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300, check=False)
        install = subprocess.run(
            ["apt-get", "install", "-y", "-q", "mosquitto"],
            capture_output=True,
            env=env,
            timeout=300,
            check=False,
        )
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not path:
        return None, "apt-get install mosquitto failed: " + install.stderr.decode(errors="replace")[-200:]
    return path, ""


def _start_mosquitto(
    binary: str, directory: Path, host: str, ca: str, cert: str, key: str
) -> subprocess.Popen:
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {MQTT_PORT} {host}\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        "require_certificate false\nallow_anonymous true\npersistence false\n"
        "max_inflight_messages 0\nmax_queued_messages 1000\nlog_dest none\n"
        # run as the current user (as root it would switch to `mosquitto`, which cannot read our temp dir)
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(host, MQTT_PORT, 10)
    return proc


def _start_emulator(
    directory: Path, host: str, device_thumb: str, devices: list[str]
) -> tuple[subprocess.Popen, str]:
    """The emulator as a real process with `devices` pre-registered (thumbprint auth, one shared cert)."""
    from datetime import UTC, datetime

    from azure_iot_emulator.hub.registry import DeviceSpec, HubRegistry
    from azure_iot_emulator.store import Database

    data = directory / "emulator-data"
    data.mkdir()
    db = Database(data / "emulator.db")
    registry = HubRegistry(db, [host], lambda: datetime.now(UTC))
    with db.transaction():
        for device_id in devices:
            registry.create_device(host, DeviceSpec(device_id=device_id, primary_thumbprint=device_thumb))
    db.close()
    dps_host = _free_loopback()
    command = [
        sys.executable,
        "-m",
        "azure_iot_emulator",
        "serve",
        "--data-dir",
        str(data),
        "--dps-host",
        dps_host,
        "--hub-host",
        host,
    ]
    log = (directory / "emulator.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    connection = data / "connection.json"
    while not connection.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("emulator did not start: " + (directory / "emulator.log").read_text()[-500:])
        time.sleep(0.1)
    return proc, str(json.loads(connection.read_text())["ca_pem_path"])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ report
async def run() -> str:
    return await asyncio.to_thread(_run_sync)


def _run_sync() -> str:
    """Both servers run side by side; ingest is measured in interleaved rounds (emulator, Mosquitto,
    emulator, Mosquitto) and the best round of each is reported, so background load on the shared
    machine hits both alike; then memory with idle devices, one server at a time."""
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        directory = Path(tmp)
        emu_host, mosq_host = _free_loopback(), _free_loopback()
        ca, cert, key, dev_cert, dev_key, thumb = _make_pki(directory, [emu_host, mosq_host])
        notes: list[str] = []
        ids = [f"ingest-{i:05d}" for i in range(INGEST_DEVICES)] + [
            f"idle-{i:05d}" for i in range(IDLE_DEVICES)
        ]
        processes: list[subprocess.Popen] = []
        try:
            emulator, emu_ca = _start_emulator(directory, emu_host, thumb, ids)
            processes.append(emulator)
            targets = [Target("emulator", emu_host, emu_host, emu_ca, dev_cert, dev_key, emulator.pid)]
            binary, why = _ensure_mosquitto()
            if binary is None:
                notes.append(f"Mosquitto column skipped: {why}.")
            else:
                mosquitto = _start_mosquitto(binary, directory, mosq_host, ca, cert, key)
                processes.append(mosquitto)
                targets.append(
                    Target("mosquitto", mosq_host, mosq_host, ca, dev_cert, dev_key, mosquitto.pid)
                )
            rounds: dict[str, list[dict]] = {t.name: [] for t in targets}
            for _ in range(INGEST_ROUNDS):
                for target in targets:
                    rounds[target.name].append(_ingest(target))
            results = {
                t.name: {
                    "ingest": max(rounds[t.name], key=lambda r: r["rate"]),
                    "rounds": [r["rate"] for r in rounds[t.name]],
                    "memory": _idle_memory(t, IDLE_DEVICES),
                }
                for t in targets
            }
        finally:
            for proc in processes:
                _stop(proc)
    notes.append(
        f"Machine load average (1 min) before the run: {load_before:.2f} on {os.cpu_count()} CPUs "
        "(the machine is shared; rates vary between runs, the ratio is taken within one run)."
    )
    return _report(results, notes, time.monotonic() - started)


def _report(results: dict[str, dict], notes: list[str], elapsed: float) -> str:
    emu = results["emulator"]
    mosq = results.get("mosquitto")
    lines = [
        f"Load: {INGEST_DEVICES} devices, each its own TLS connection (client certificate), QoS 1, "
        f"{INGEST_WINDOW} messages in flight per device, {len(PAYLOAD)}-byte JSON body, "
        f"{INGEST_SECONDS:.0f} s; "
        "the load generator is one Python process beside the server on the same 2 cores.",
        "",
        "| server | telemetry ingest (acked msgs/s, best round) | all rounds | RSS per idle connected device "
        "| connect time for "
        f"{IDLE_DEVICES} devices |",
        "|---|---|---|---|---|",
    ]
    for name, data in results.items():
        lines.append(
            f"| {name} | {data['ingest']['rate']:,.0f} | "
            f"{', '.join(f'{rate:,.0f}' for rate in data['rounds'])} | "
            f"{data['memory']['per_device_kib']:.1f} KiB | "
            f"{data['memory']['connect_seconds']:.1f} s |"
        )
    lines.append("")
    if mosq:
        ratio = emu["ingest"]["rate"] / mosq["ingest"]["rate"]
        verdict = "met" if ratio >= 0.25 else "NOT met"
        lines.append(
            f"Emulator ingest = {ratio:.0%} of Mosquitto's under the same generator "
            f"(goal >= 25 %: {verdict})."
        )
    mem = emu["memory"]
    projected_mib = (mem["before_kib"] + mem["per_device_kib"] * TARGET_DEVICES) / 1024
    lines.append(
        f"Emulator memory: {mem['before_kib'] / 1024:.0f} MiB idle, +{mem['per_device_kib']:.1f} KiB per "
        f"connected device measured with {mem['devices']} devices; linear extrapolation to "
        f"{TARGET_DEVICES:,} devices: "
        f"~{projected_mib:,.0f} MiB (goal <= 1024 MiB: {'met' if projected_mib <= 1024 else 'NOT met'}; "
        "extrapolated, not measured at 10,000)."
    )
    rate_needed = TARGET_DEVICES / 5
    enough = "enough" if emu["ingest"]["rate"] >= rate_needed else "NOT enough"
    lines.append(
        f"10,000 devices at one message per 5 s need {rate_needed:,.0f} msgs/s; measured emulator ingest "
        f"{emu['ingest']['rate']:,.0f} msgs/s ({enough})."
    )
    lines.extend(notes)
    lines.append(f"Bench run time {elapsed:.0f} s.")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loadgen", action="store_true")
    parser.add_argument("--mode", choices=("ingest", "idle"), default="ingest")
    parser.add_argument("--host")
    parser.add_argument("--hub")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--devices", type=int, default=INGEST_DEVICES)
    parser.add_argument("--prefix", default="ingest-")
    parser.add_argument("--seconds", type=float, default=INGEST_SECONDS)
    parser.add_argument("--window", type=int, default=INGEST_WINDOW)
    args = parser.parse_args()
    if args.loadgen:
        asyncio.run(_loadgen(args))
    else:
        print(asyncio.run(run()))


if __name__ == "__main__":
    _main()
