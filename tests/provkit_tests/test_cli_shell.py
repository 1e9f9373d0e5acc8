"""The one command-line shell (mainkit.shell, provkit.cli_shell), run as a user meets it: real processes
interrupted with SIGINT, piped into a reader that stops early, started with a bad setting."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.store import Database
from mainkit.shell import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, Answer, CommandFailed, run_command

GUID = "0a1b2c3d-0000-4000-8000-00000000cafe"


def _module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@pytest.fixture
def silent_service():
    """A TCP listener that accepts a connection and never answers: a call to it waits until interrupted."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(120)  # a bound on a broken test, not an assertion on time
        yield listener


@pytest.mark.parametrize(
    ("module", "args", "env"),
    [
        (
            "activation_svc",
            ["status", GUID, "--code-file", "{code}", "--insecure", "--target", "{target}", "--timeout=600"],
            {},
        ),
        (
            "device_client",
            ["--state-root", "{tmp}", "provision", GUID, "--target", "{target}"],
            {"DEVICE_CLIENT_FACTORY_TIMEOUT_S": "600"},
        ),
    ],
)
def test_ctrl_c_during_a_call_exits_130_without_a_traceback(tmp_path, silent_service, module, args, env):
    code = tmp_path / "code.txt"
    code.write_text("ABCD-EFGH-JKMN-PQRS\n")
    target = f"127.0.0.1:{silent_service.getsockname()[1]}"
    words = [a.format(code=code, target=target, tmp=tmp_path / "devices") for a in args]
    proc = subprocess.Popen(
        _module(module, *words),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        connection, _ = silent_service.accept()  # the command is inside its call now
        with connection:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.strip() == "interrupted" and "Traceback" not in err


def _telemetry(data_dir, count: int) -> None:
    store = TelemetryStore(Database(data_dir / "emulator.db"), lambda: datetime.now(UTC))
    body = b"x" * 1024
    store.append_many([("127.0.0.2", "dev-1", PropertyBag(), body) for _ in range(count)])


def test_a_listing_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    _telemetry(tmp_path, 300)  # ~300 KiB: far more than a pipe holds once the reader is gone
    listing = ["messages", "--device", "dev-1", "--data-dir", str(tmp_path), "--limit", "300"]
    proc = subprocess.Popen(
        _module("azure_iot_emulator", *listing),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        first = proc.stdout.readline()  # `| head -1`
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"127.0.0.2/dev-1" in first
    assert (proc.returncode, err) == (EXIT_BROKEN_PIPE, "")


def test_a_reader_gone_before_the_first_line_is_no_error_either(tmp_path):
    _telemetry(tmp_path, 3)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read
    try:
        done = subprocess.run(
            _module("azure_iot_emulator", "messages", "--device", "dev-1", "--data-dir", str(tmp_path)),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (EXIT_BROKEN_PIPE, "")


def test_a_configuration_error_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "ACTIVATION_SERVER_PORT": "eighty", "ACTIVATION_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        _module("activation_svc", "serve"), capture_output=True, text=True, env=env, timeout=120
    )
    assert (done.returncode, done.stderr) == (
        2,
        "activation-svc: error: ACTIVATION_SERVER_PORT / server.port must be an integer, got 'eighty' "
        "[SETTINGS_INVALID]\n",
    )

    env = {**os.environ, "DEVICE_CLIENT_TELEMETRY_INTERVAL_S": "soon"}
    done = subprocess.run(
        _module("device_client", "--state-root", str(tmp_path), "status", GUID),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (  # device-client's documented code for invalid settings
        8,
        "device-client: error: setting telemetry_interval_s: 'soon' is not a number [SETTINGS_INVALID]\n",
    )


class Refused(Exception):
    exit_code = 5
    reason = "NOT_TODAY"


def test_known_failures_are_answered_and_a_bug_is_one_line_with_its_traceback_logged(capsys, caplog):
    answers = (Answer.line(Refused, "refused: {}", None), Answer.line(KeyError, "no {}", 4))

    def refuse() -> int:
        raise Refused("not today")

    assert run_command(refuse, prog="tool", answers=answers) == 5
    assert capsys.readouterr().err == "tool: error: refused: not today [NOT_TODAY]\n"

    def missing() -> int:
        raise KeyError("key")

    assert run_command(missing, prog="tool", answers=answers) == 4
    assert capsys.readouterr().err == "tool: error: no 'key'\n"  # no reason, no bracket

    def failed() -> int:
        raise CommandFailed("nothing here", "NOT_FOUND", exit_code=1, hints=["try: tool make"])

    assert run_command(failed, prog="tool") == 1
    assert capsys.readouterr().err == "tool: error: nothing here [NOT_FOUND]\n  try: tool make\n"

    def bug() -> int:
        raise ZeroDivisionError("division by zero")

    with caplog.at_level(logging.ERROR, logger="tool"):
        assert run_command(bug, prog="tool", answers=answers) == 1
    assert capsys.readouterr().err == "tool: error: unexpected ZeroDivisionError: division by zero [BUG]\n"
    assert caplog.records[-1].exc_info is not None  # the traceback is in the log

    def broken_socket() -> int:  # a broken pipe that is not standard output is a failure like others
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command(broken_socket, prog="tool", answers=answers) == 1
    assert run_command(lambda: 3, prog="tool") == 3
    assert run_command(lambda: None, prog="tool") == 0
    token = str(uuid.uuid4())
    assert run_command(lambda: print(token) or 0, prog="tool") == 0
    assert token in capsys.readouterr().out
