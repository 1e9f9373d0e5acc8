"""The stack wipes only a work directory it made itself, and one work directory holds one running stack: a
second ``up`` or ``run`` on it is refused before it touches anything."""

from __future__ import annotations

import os
import re
import signal
import stat
from pathlib import Path

import pytest
from demo.test_demo_flow import Printed, _cli, _demo, _env_from, _processes_under, _stack_args, _wait_for

from devprov_demo.stack import MARKER, Stack, StackConfig

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.mark.parametrize("fresh", [True, False])
def test_a_foreign_non_empty_directory_is_refused_and_kept(tmp_path, fresh):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(RuntimeError, match="not a stack's work directory"):
        Stack(StackConfig(work_dir=tmp_path)).start(fresh=fresh)
    assert precious.read_text() == "mine"
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("delay", ["soon", "-1", "3601", "nan", ""])
def test_an_assignment_delay_that_is_no_delay_is_refused_before_anything_starts(tmp_path, delay):
    with pytest.raises(ValueError, match=r"assignment[- ]delay must be 'immediate'"):
        StackConfig(work_dir=tmp_path, assignment_delay=delay)


def test_the_demo_command_refuses_an_assignment_delay_that_is_no_delay_and_creates_nothing(tmp_path):
    refused = _demo("run", "--work-dir", str(tmp_path / "demo"), "--assignment-delay", "soon")
    output, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2, output
    assert "assignment delay must be 'immediate' or seconds, not 'soon'" in output, output
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("delay", ["immediate", " Immediate", "0", "2.5"])
def test_an_assignment_delay_goes_to_the_emulator_as_given(tmp_path, delay):
    stack = Stack(StackConfig(work_dir=tmp_path, assignment_delay=delay))
    assert stack.emulator.extra_args[-2:] == ["--assignment-delay", delay]


def test_only_the_work_directory_is_private_not_the_parents_it_made(tmp_path):
    """As ``make demo`` makes var/demo in a fresh checkout: with replicas, run as root, the PostgreSQL
    server's user must pass through var/ to the cluster under var/demo."""
    work = tmp_path / "var" / "demo"
    umask = os.umask(0o022)  # a login shell's
    stack = Stack(StackConfig(work_dir=work))
    try:
        stack.claim()
        assert stat.S_IMODE(work.stat().st_mode) == 0o700
        assert stat.S_IMODE(work.parent.stat().st_mode) == 0o755
    finally:
        stack.stop()
        os.umask(umask)


def _snapshot(work: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under the work directory (mtime, size, and the bytes of the small ones: the CAs, keys,
    connection.json, env.sh), except what the running stack itself keeps writing: its logs and its
    SQLite files."""
    found = {}
    for path in sorted(work.rglob("*")):
        relative = path.relative_to(work)
        if path.is_dir() or relative.parts[0] == "logs" or ".sqlite3" in path.name or ".db" in path.name:
            continue
        info = path.stat()
        content = path.read_bytes() if info.st_size < 65536 else b""
        found[str(relative)] = (info.st_mtime_ns, info.st_size, content)
    return found


def test_a_second_stack_on_a_running_work_dir_is_refused_and_touches_nothing(tmp_path):
    work = tmp_path / "up"
    args = _stack_args(work)
    first = _demo("up", *args)
    printed = Printed(first)
    third = None
    try:
        printed.wait_for(r"Up\. Ctrl-C stops the stack")
        env = _env_from(work / "env.sh")
        before = _snapshot(work)
        assert {"tls/ca.pem", "tls/ca.key", "emulator/connection.json", "env.sh"} <= set(before)

        for second in (("up", *args), ("up", *args, "--fresh"), ("run", *args, "--devices", "1")):
            refused = _demo(*second)
            output, _ = refused.communicate(timeout=120)
            assert refused.returncode == 2, output
            assert f"a stack is already running on {work.resolve()} (pid {first.pid}" in output, output
            assert "devprov-demo up --work-dir" in output  # the first one's command
        assert _snapshot(work) == before

        # the first stack still serves, on the same CA and connection file: its suggested first step works
        guid = re.search(r"device-client provision (\S+)", printed.text).group(1)
        assert guid == "3f2a9c1e-0000-4000-8000-000000000001"
        provision = _cli(env, "device-client", "provision", guid)
        assert provision.returncode == 0, provision.stdout + provision.stderr

        first.kill()  # SIGKILL: its lock goes with it, and its children end with it
        printed.finish()
        _wait_for(lambda: _processes_under(work) == [], 60, "the killed stack's processes to end")
        third = _demo("up", *args)
        again = Printed(third)
        again.wait_for(r"Up\. Ctrl-C stops the stack")
        listed = _cli(_env_from(work / "env.sh"), "factory-svc", "list", guid)
        assert listed.returncode == 0 and guid in listed.stdout, listed.stdout + listed.stderr
        # The state was kept: ...0001 has its identity, so this stack suggests the next example device
        # (suggesting ...0001 again was IDENTITY_EXISTS), and that one provisions.
        suggested = re.search(r"device-client provision (\S+)", again.text).group(1)
        assert suggested == "3f2a9c1e-0000-4000-8000-000000000002"
        assert f"device-client run {suggested}" in again.text
        provision = _cli(_env_from(work / "env.sh"), "device-client", "provision", suggested)
        assert provision.returncode == 0, provision.stdout + provision.stderr
        third.send_signal(signal.SIGINT)
        assert third.wait(90) == 130, again.finish()  # Ctrl-C: interrupted, as everywhere
    finally:
        for proc in (first, third):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert _processes_under(work) == []
