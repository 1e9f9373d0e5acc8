"""The README's first command, as processes: ``python -m devprov_demo run`` (the whole flow, with a
summary) and ``up`` driven by hand with the CLIs, each stack on its own loopback addresses and ports.

What the hub received is read from the emulator's own store, not from the demo's claims."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.emulator import free_port, fresh_addresses
from support.waiting import NotReached, until_sync

from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.store import Database

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (the stack's /metrics ports)."""
    while True:
        first = free_port("127.0.0.1")
        if first + count <= 65535 and all(_bindable(first + n) for n in range(1, count)):
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Azure's DPS answers a registration "202 assigning" and the device polls (the SDK after a fixed 2 s): the
# demo's default, run by test_demo_runs_the_whole_flow_and_summarises; the other demo runs have their
# registrations answered at once (the 202-then-poll path itself: tests/emulator/test_dps_async_assignment.py,
# tests/device/test_device_full_handover.py).
IMMEDIATE = ("--assignment-delay", "immediate")


def _stack_args(work_dir: Path, *, azure_flow: bool = False) -> list[str]:
    dps, hub1, hub2 = fresh_addresses(3)
    return [
        "--work-dir", str(work_dir),
        "--dps-host", dps,
        "--hub-host", hub1,
        "--hub-host", hub2,
        "--factory-port", str(free_port("127.0.0.1")),
        "--activation-port", str(free_port("127.0.0.1")),
        "--portal-port", str(free_port("127.0.0.1")),
        "--crl-port", str(free_port("127.0.0.1")),
        "--est-port", str(free_port("127.0.0.1")),
        "--metrics-port", str(_free_port_block(4)),
        *(() if azure_flow else IMMEDIATE),
    ]  # fmt: skip


def _demo(*args: str, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "devprov_demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


class Printed:
    """What a running ``devprov_demo`` process prints, gathered line by line by a thread (to wait for a line
    while the process keeps running)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in what was printed, once it is there."""
        return _wait_for(lambda: re.search(pattern, self.text), timeout, pattern, self.proc, self)

    def finish(self, timeout: float = 90) -> str:
        """Wait for the process to end; everything it printed."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return self.text


def _hub_messages(work_dir: Path) -> list:
    db = Database(work_dir / "emulator" / "emulator.db")
    try:
        store = TelemetryStore(db, lambda: datetime.now(UTC))
        return store.recent(limit=100_000)
    finally:
        db.close()


def _processes_under(work_dir: Path) -> list[str]:
    """Live processes whose command line or environment names the work directory (the demo's children:
    the emulator by its --data-dir, the services by their *_DATA_DIR), the demo itself excluded."""
    found = []
    marker = str(work_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"devprov_demo" in cmdline:
            continue
        if marker in cmdline or marker in environ:
            words = cmdline.split(b"\0")
            found.append(f"{entry.name}: {b' '.join(words).decode(errors='replace')}")
    return found


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, printed=None):
    def ended() -> str | None:
        if proc is None or proc.poll() is None:
            return None
        said = printed.finish() if printed is not None else ""
        return f"process ended ({proc.returncode}) waiting for {what}:\n{said[-8000:]}"

    try:
        return until_sync(predicate, what, timeout=timeout, interval=0.2, fail_if=ended)
    except NotReached:
        if proc is None:
            raise
        proc.kill()  # say what the process was doing
        output = printed.finish(30) if printed is not None else proc.communicate(timeout=30)[0]
        said = f"timed out waiting for {what}; the process printed:\n{output[-8000:]}"
        raise AssertionError(said) from None


def test_demo_runs_the_whole_flow_and_summarises(tmp_path):
    work = tmp_path / "demo"
    summary_file = tmp_path / "summary.json"
    proc = _demo(
        "run", *_stack_args(work, azure_flow=True), "--devices", "3", "--interval", "1", "--seconds", "8",
        "--summary-json", str(summary_file),
    )  # fmt: skip
    output, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, output
    # the default is Azure's flow: each registration answered "202 assigning", then assigned on a poll
    emulator_log = (work / "logs" / "emulator.log").read_text()
    assert emulator_log.count(": 202 assigning") == 3, emulator_log[-4000:]
    # The labels were printed: GUID and activation code for each device.
    codes = re.findall(r"[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", output)
    assert len(codes) == 3, output
    # off a terminal: what the counts mean, once, then a short status line every few seconds
    assert "acked: messages the hub acknowledged to the device" in output
    status = [line for line in output.splitlines() if re.match(r"\d\d:\d\d:\d\d 3 devices: ", line)]
    assert status and all(len(line) <= 120 and "acked " in line for line in status), output

    summary = json.loads(summary_file.read_text())
    assert summary["ok"] is True
    devices = summary["devices"]
    assert len(devices) == 3
    hubs_used = {d["chosen_hub"] for d in devices}
    assert len(hubs_used) == 2  # the OEM spread the fleet over both linked hubs
    received: dict[str, list] = {}
    for message in _hub_messages(work):
        received.setdefault(message.device_id, []).append(message)
    for device in devices:
        assert "REGISTERED" in device["states_reached"], device
        assert device["error"] is None, device
        assert device["assigned_hub"] == device["chosen_hub"]
        mine = received.get(device["guid"], [])
        assert mine, f"the hub received nothing from {device['guid']}"
        assert {m.hub for m in mine} == {device["chosen_hub"]}
        bodies = [json.loads(m.body) for m in mine]
        assert [b["seq"] for b in bodies] == list(range(1, len(bodies) + 1))  # in order, none missing
        assert device["hub_received"] == len(mine)
    assert _processes_under(work) == []


def test_ctrl_c_stops_the_demo_and_leaves_no_process(tmp_path):
    work = tmp_path / "demo"
    proc = _demo("run", *_stack_args(work), "--devices", "2", "--interval", "1")
    try:
        _wait_for(
            lambda: len({m.device_id for m in _hub_messages(work)}) == 2
            if (work / "emulator" / "emulator.db").exists()
            else False,
            150,
            "telemetry from both devices",
            proc,
        )
        assert len(_processes_under(work)) >= 3  # emulator, factory_svc, activation_svc
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output  # Ctrl-C: interrupted, as everywhere (after the summary)
    assert "every device registered" in output
    assert _processes_under(work) == []


def test_ctrl_c_during_make_demo_start_up_ends_quietly(tmp_path):
    """Ctrl-C while `make demo` starts the stack (the terminal's SIGINT reaches make, its shell and the
    demo): the demo stops what it started and exits 130, and make adds no "make: *** ... Error 1" line."""
    work = tmp_path / "demo"
    demo_args = " ".join(_stack_args(work))
    make = subprocess.Popen(
        ["make", "--no-print-directory", "-o", "install", "demo", f"DEMO_ARGS={demo_args} --devices 1"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    )
    try:
        _wait_for(lambda: (work / "emulator").exists(), 120, "the stack starting", make)
        os.killpg(make.pid, signal.SIGINT)
        output, _ = make.communicate(timeout=120)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
    assert "make: ***" not in output and "Traceback" not in output, output
    assert make.returncode in (0, -signal.SIGINT), output  # make itself was interrupted: quietly
    assert "stopped; state and logs kept in" in output
    assert _processes_under(work) == []


def _printed_metrics(output: str) -> dict[str, str]:
    """program -> its /metrics URL, as the stack printed them."""
    return dict(re.findall(r"metrics: (\w+) \(Prometheus\)\s+(http://\S+)", output))


def _sample(url: str, name: str, labels: str) -> float:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found = re.search(rf"^{name}{{{labels}}} (\S+)$", text, re.M)
    assert found, f"no {name}{{{labels}}} at {url}"
    return float(found.group(1))


def _env_from(env_file: Path) -> dict[str, str]:
    """The variables `source env.sh` would set (the file is ours: `export NAME=value`, shell-quoted)."""
    import shlex

    env = dict(os.environ)
    for line in env_file.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            words = shlex.split(value.replace('"$PATH"', env.get("PATH", "")))
            env[name] = words[0] if words else ""
    return env


def _cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env=env, input=stdin, capture_output=True, text=True, timeout=120)


SECRET_FILES = ("*.key", "*.sqlite3*", "*.db", "*.db-*", "connection.json")  # keys, SAS keys, codes, stores


def _modes_of(work: Path) -> dict[str, str]:
    """Every directory under ``work`` (itself included) and every file holding a secret, with its mode."""
    found = {".": oct(stat.S_IMODE(work.stat().st_mode))}
    for path in work.rglob("*"):
        if path.is_dir() or any(path.match(pattern) for pattern in SECRET_FILES):
            found[str(path.relative_to(work))] = oct(stat.S_IMODE(path.stat().st_mode))
    return found


def assert_private_modes(work: Path) -> None:
    """State directories 0700, files with secrets 0600, as each program created them (README: security)."""
    modes = _modes_of(work)
    wrong = {
        name: mode
        for name, mode in modes.items()
        if mode != ("0o700" if (work / name).is_dir() else "0o600")
    }
    assert not wrong, f"modes other than 0700 (directories) / 0600 (secrets): {wrong}"


def test_up_serves_the_manual_three_step_flow(tmp_path):
    work = tmp_path / "up"
    args = _stack_args(work)
    first = int(args[args.index("--metrics-port") + 1])
    metrics = {
        name: f"http://127.0.0.1:{first + n}/metrics"
        for n, name in enumerate(("factory", "activation", "portal", "emulator"))
    }
    proc = _demo("up", *args)
    device = None
    try:
        _wait_for(lambda: (work / "env.sh").exists(), 120, "env.sh", proc)
        env = _env_from(work / "env.sh")
        for name in ("FACTORY_CLIENT_TARGET", "ACTIVATION_CLIENT_TARGET", "DEVICE_CLIENT_ID_SCOPE"):
            assert env[name], name
        guid = str(uuid.uuid4())
        connection = json.loads((work / "emulator" / "connection.json").read_text())
        hubs = [h["host_name"] for h in connection["hubs"]]
        # Azure's shape, as `up` prints them: the bare host, its service REST API on 443
        for host, entry in zip(hubs, connection["hubs"], strict=True):
            assert entry["connection_string"].startswith(f"HostName={host};SharedAccessKeyName=")

        # The portal is up too, offering the linked hubs.
        url = re.search(r"portal listening on (\S+)", (work / "logs" / "portal.log").read_text()).group(1)
        with urllib.request.urlopen(url, timeout=30) as page:
            html = page.read().decode()
        assert all(hub in html for hub in hubs)

        # 1. factory: mint + enroll (disabled); the code is shown once
        provision = _cli(env, "device-client", "provision", guid)
        assert provision.returncode == 0, provision.stdout + provision.stderr
        code = re.search(r"ACTIVATION CODE .*: (\S+)", provision.stdout).group(1)

        # 2. OEM: activate with the sample metadata on the second hub (the code on standard input)
        hub = hubs[1]
        activate = _cli(
            env, "activation-svc", "activate", guid, "--metadata", str(work / "sample-metadata.json"),
            "--hub", hub, "--code-file", "-", stdin=code + "\n",
        )  # fmt: skip
        assert activate.returncode == 0, activate.stdout + activate.stderr

        # 3. first boot: the device reaches its hub and sends telemetry
        device = subprocess.Popen(
            ["device-client", "run", guid], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        messages = _wait_for(
            lambda: [m for m in _hub_messages(work) if m.device_id == guid], 60, "telemetry", device
        )
        assert messages[0].hub == hub

        # what the services and the emulator counted, on the /metrics ports given (the stack prints them)
        assert _sample(metrics["factory"], "devprov_enrollments_total", 'outcome="created"') == 1
        assert _sample(metrics["activation"], "devprov_activations_total", 'outcome="enrollment"') == 1
        assert _sample(metrics["emulator"], "iot_emulator_dps_registrations_total", 'result="assigned"') == 1
        assert _sample(metrics["portal"], "devprov_http_requests_total", 'route="/",status="200"') == 1
        # Every program made its own state (emulator, factory with its CA and CRL, activation, the device's
        # state, the stack's TLS files): directories 0700, keys and stores 0600.
        modes = _modes_of(work)
        made = ["emulator", "factory", "factory/ca", "factory/crl", "activation", f"devices/{guid}", "tls"]
        secrets = ["factory/codes.key", "factory/ca/issuing-ca.key", "emulator/connection.json", "tls/ca.key"]
        for name in [*made, *secrets, f"devices/{guid}/device.key", "factory/ledger.sqlite3"]:
            assert name in modes, sorted(modes)
        assert_private_modes(work)
        device.send_signal(signal.SIGTERM)
        assert device.wait(60) == 0
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
    finally:
        for p in (device, proc):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 130, output
    assert "source" in output and "activation-svc activate" in output
    assert _printed_metrics(output) == metrics
    assert f"HostName={hubs[0]};SharedAccessKeyName=iothubowner;" in output
    assert _processes_under(work) == []


def test_demo_in_group_mode_boots_the_fleet_through_the_allocation_webhook(tmp_path):
    """``--mode group``: no individual enrollment in DPS, one enrollment group, each device allocated by
    activation_svc's webhook (its audit) to the hub its OEM chose, and its telemetry at that hub."""
    work = tmp_path / "demo"
    summary_file = tmp_path / "summary.json"
    proc = _demo(
        "run", *_stack_args(work), "--mode", "group", "--webhook-port", str(free_port("127.0.0.1")),
        "--devices", "2", "--interval", "1", "--seconds", "5", "--summary-json", str(summary_file),
    )  # fmt: skip
    output, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, output
    assert re.search(r"provisioning mode\s+group", output), output
    summary = json.loads(summary_file.read_text())
    assert summary["ok"] is True
    devices = summary["devices"]
    # --assignment-delay immediate reached the emulator: each registration answered at once, none polled
    emulator_log = (work / "logs" / "emulator.log").read_text()
    assert emulator_log.count(": 200 assigned hub=") == len(devices) == 2, emulator_log[-4000:]
    assert ": 202 assigning" not in emulator_log and "DPS poll" not in emulator_log
    received = {m.device_id: m.hub for m in _hub_messages(work)}
    for device in devices:
        assert device["assigned_hub"] == device["chosen_hub"] == received[device["guid"]], device
    with sqlite3.connect(work / "emulator" / "emulator.db") as dps:
        assert dps.execute("SELECT count(*) FROM dps_enrollments").fetchone() == (0,)
        assert dps.execute("SELECT key FROM dps_groups").fetchall() == [("devprov-factory",)]
    with sqlite3.connect(work / "activation" / "audit.sqlite3") as audit:
        allocated = audit.execute(
            "SELECT device_id FROM audit WHERE action = 'allocate' AND outcome = 'ok'"
        ).fetchall()
    assert sorted(d for (d,) in allocated) == sorted(d["guid"] for d in devices)
    assert (work / "secrets" / "webhook.key").stat().st_mode & 0o777 == 0o600
    assert _processes_under(work) == []
