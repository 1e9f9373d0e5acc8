"""What `activation-svc` says before it calls anyone, run as a real process: each mistake a person makes at
the shell is one sentence and exit 2, a secret typed as an option is never echoed, Ctrl-C at the code
prompt (a real pseudo-terminal) ends it at once with exit 130 and no traceback."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from activation_svc.cli import activation_outcome
from devprov.v1 import activation_service_pb2 as apb

GUID = "3f2a9c1e-0000-4000-8000-000000000001"
CODE = "PF0E-0QJ5-KVKM-TGQ4"
# Nothing listens there: a command that got as far as calling would fail differently (exit 3).
TARGET = "127.0.0.1:9"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIVATION_CLIENT_")}
    env.update(ACTIVATION_CLIENT_TARGET=TARGET, ACTIVATION_CLIENT_INSECURE="true")
    return env


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "activation_svc.cli", *args],
        env=_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_a_code_given_as_an_option_is_refused_without_echoing_it() -> None:
    for argv in (["--code", CODE], [f"--code={CODE}"]):
        done = _cli("activate", GUID, *argv, "--metadata-json", "{}")
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.splitlines()[-1] == (
            "activation-svc activate: error: the activation code is never a command-line argument "
            "(it would stay in the shell history); type it at the prompt, "
            "or use --code-file FILE or ACTIVATION_CLIENT_CODE"
        )
        assert CODE not in done.stderr


def test_options_are_never_abbreviated(tmp_path: Path) -> None:
    done = _cli("activate", GUID, "--meta", str(tmp_path / "m.json"))
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("activation-svc: error: unrecognized arguments: --meta")


@pytest.mark.parametrize("command", ["activate", "deactivate", "status"])
@pytest.mark.parametrize("raw", ["not-a-guid", GUID[:-2]])
def test_what_is_not_a_guid_is_refused_before_the_code_is_asked_for(command: str, raw: str) -> None:
    done = _cli(command, raw, "--code-file", "-", stdin=CODE + "\n")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"activation-svc: error: the device id '{raw}' is not a GUID: expected 32 hex digits as 8-4-4-4-12, "
        f"like {GUID} [DEVICE_ID_NOT_A_GUID]\n"
    )


@pytest.mark.slow
def test_an_empty_code_is_refused_locally(tmp_path: Path) -> None:
    empty = tmp_path / "code.txt"
    empty.write_text("\n")
    for done in (_cli("activate", GUID, "--code-file", str(empty)), _cli("status", GUID, "--code-file", "-")):
        assert (done.returncode, done.stdout) == (2, "")
        assert (
            done.stderr
            == "activation-svc: error: the activation code is empty: "
            "type the code printed on the device's label\n"
        )


@pytest.mark.slow
def test_missing_files_are_named_in_a_sentence(tmp_path: Path) -> None:
    code_file = tmp_path / "code.txt"
    code_file.write_text(CODE)
    missing = tmp_path / "m.json"
    done = _cli("activate", GUID, "--metadata", str(missing), "--code-file", str(code_file))
    assert (done.returncode, done.stderr) == (
        2,
        f"activation-svc: error: the metadata file {missing} does not exist\n",
    )
    done = _cli("status", GUID, "--code-file", str(tmp_path / "nope.txt"))
    assert (done.returncode, done.stderr) == (
        2,
        f"activation-svc: error: the code file {tmp_path / 'nope.txt'} does not exist\n",
    )
    done = _cli("status", GUID, "--code-file", str(tmp_path))
    assert (done.returncode, done.stderr) == (
        2,
        f"activation-svc: error: the code file {tmp_path} is a directory, not a file\n",
    )


@pytest.mark.parametrize(
    "typed", ["1234", "X", "PF0E-0QJ5-KVKM", "PF0E-0QJ5-KVKM-TGQ4U", "PF0E-0QJ5-KVKM-TGQ!"]
)
@pytest.mark.parametrize("command", ["activate", "deactivate", "status"])
def test_what_cannot_be_a_code_is_refused_here_and_never_sent(command: str, typed: str) -> None:
    """Sent, it would count as a wrong attempt against the person's budget: refused before any call (exit
    2, not 3: nothing listens at TARGET, so a call would have failed differently)."""
    done = _cli(command, GUID, "--code-file", "-", stdin=typed + "\n")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "activation-svc: error: that is not an activation code: it has 16 letters and digits, printed in "
        "four groups like 7K3M-Q9XD-2HPA-W4RT (nothing was sent)\n"
    )


def test_status_asks_for_no_code() -> None:
    """The owner is answered on its identity alone: status calls without a code (here: nothing listens, 3)
    where it said "no activation code" (2); activate still needs one."""
    done = _cli("status", GUID)
    assert done.returncode == 3, done.stderr
    assert "code" not in done.stderr
    done = _cli("activate", GUID)
    assert (done.returncode, done.stderr) == (
        2,
        "activation-svc: error: no activation code: use --code-file, ACTIVATION_CLIENT_CODE or a terminal\n",
    )


def test_a_code_typed_loosely_is_still_a_code() -> None:
    """Case, spaces and the look-alike letters are forgiven (provkit.activation_code.normalise): such a code
    goes out, here to a target where nothing listens (exit 3)."""
    done = _cli("status", GUID, "--code-file", "-", stdin="pf0e 0qj5 kvkm tgq4\n")
    assert done.returncode == 3, done.stderr


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"tags": {"a b": 1}}', "tags.a b: keys must not contain spaces [METADATA_INVALID]\n"),
        (
            '{"tags": ',
            "the text: not valid JSON: Expecting value: line 1 column 10 (char 9) [METADATA_NOT_JSON]\n",
        ),
    ],
)
def test_metadata_is_checked_here_once_naming_the_file(tmp_path: Path, text: str, said: str) -> None:
    """Before: sent, refused by the service, printed twice (message and field violation) and named after
    the proto field metadata_json.  Now: checked before anything is sent or asked, one line naming the
    file."""
    metadata = tmp_path / "m.json"
    metadata.write_text(text)
    done = _cli("activate", GUID, "--metadata", str(metadata), "--code-file", "-", stdin=CODE + "\n")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"activation-svc: error: the metadata in {metadata} is refused: {said}"
    done = _cli("activate", GUID, "--metadata-json", text, "--code-file", "-", stdin=CODE + "\n")
    assert done.stderr == f"activation-svc: error: the metadata in --metadata-json is refused: {said}"
    assert "metadata_json" not in done.stderr


def test_every_twin_rule_broken_is_listed_once(tmp_path: Path) -> None:
    done = _cli(
        "activate", GUID, "--metadata-json", '{"tags": {"a b": 1, "$x": 2}}', "--code-file", "-", stdin=CODE
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 2, done.stderr
    assert lines[0].startswith(
        "activation-svc: error: the metadata in --metadata-json is refused: tags.a b: "
    )
    assert lines[1].startswith("  tags.$x: ")


def _read_until(fd: int, wanted: bytes, timeout: float = 30.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"never saw {wanted!r}; got {seen!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


def _read_rest(fd: int, timeout: float = 30.0) -> bytes:
    """Everything until the child closes the terminal (it exits), or ``timeout`` seconds."""
    rest = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        rest += chunk
    return rest


def _exit_status(pid: int, timeout: float = 30.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    return None


def test_ctrl_c_at_the_code_prompt_ends_it_with_one_line() -> None:
    """A real terminal: the command asks for the code (hidden input), the person presses Ctrl-C once."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pseudo-terminal
        # as a terminal's shell starts a command: Ctrl-C on (a background job's shell would ignore SIGINT,
        # and an ignored signal stays ignored across exec)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, [sys.executable, "-m", "activation_svc.cli", "activate", GUID], _env())
    status = None
    try:
        _read_until(fd, b"activation code: ")
        os.write(fd, b"\x03")  # the terminal's interrupt character: SIGINT to the foreground process
        rest = _read_rest(fd)
        status = _exit_status(pid)
    finally:
        if status is None:  # the test failed before the child ended: do not leave it behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None, f"still running after one Ctrl-C; it said {rest!r}"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130
    said = rest.decode().replace("\r\n", "\n").strip()
    assert said == "cancelled; nothing was sent"


@pytest.mark.parametrize(
    ("reply", "sentence"),
    [
        (
            apb.ActivateResponse(device_id=GUID, hub="hub-a", path=apb.ACTIVATION_PATH_ENROLLMENT),
            f"activated {GUID} on hub hub-a; the device will pick it up at its next registration.",
        ),
        (
            apb.ActivateResponse(
                device_id=GUID,
                hub="hub-a",
                registered_hub="hub-a",
                path=apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN,
            ),
            f"activated {GUID}; updated the live device's twin on hub hub-a.",
        ),
        (
            apb.ActivateResponse(
                device_id=GUID,
                hub="hub-b",
                registered_hub="hub-a",
                path=apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN,
            ),
            f"activated {GUID}; updated the live device's twin on hub hub-a. It is registered on hub hub-a "
            "and keeps using it until it registers again, then moves to hub hub-b.",
        ),
        (
            apb.ActivateResponse(
                device_id=GUID, hub="hub-a", path=apb.ACTIVATION_PATH_UNCHANGED, replayed=True
            ),
            f"{GUID} was already activated with this metadata on hub hub-a; nothing changed "
            "(an answer repeated for a retried request).",
        ),
        (
            apb.ActivateResponse(
                device_id=GUID,
                hub="hub-a",
                path=apb.ACTIVATION_PATH_UNCHANGED,
                metadata_change=apb.METADATA_CHANGE_KEPT,
            ),
            f"{GUID} was already activated on hub hub-a; nothing changed (metadata kept).",
        ),
        (
            apb.ActivateResponse(
                device_id=GUID,
                hub="hub-b",
                registered_hub="hub-a",
                path=apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN,
                metadata_change=apb.METADATA_CHANGE_KEPT,
            ),
            f"activated {GUID}; enabled the live device again on hub hub-a; metadata kept: its tags and "
            "desired properties are unchanged. It is registered on hub hub-a and keeps using it until it "
            "registers again, then moves to hub hub-b.",
        ),
        (
            apb.ActivateResponse(
                device_id=GUID,
                hub="hub-a",
                path=apb.ACTIVATION_PATH_ENROLLMENT,
                metadata_change=apb.METADATA_CHANGE_REPLACED,
            ),
            f"activated {GUID} on hub hub-a; the device will pick it up at its next registration; "
            "metadata replaced by the one sent.",
        ),
        (
            apb.ActivateResponse(
                device_id=GUID,
                hub="hub-a",
                registered_hub="hub-a",
                path=apb.ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN,
                metadata_change=apb.METADATA_CHANGE_CLEARED,
            ),
            f"activated {GUID}; updated the live device's twin on hub hub-a; metadata cleared: its tags and "
            "desired properties were removed.",
        ),
    ],
)
def test_activation_outcomes_are_sentences_without_service_jargon(reply, sentence: str) -> None:
    said = activation_outcome(reply)
    assert said == sentence
    assert not any(word in said for word in ("ENROLLMENT", "UNCHANGED", "HUB_TWIN", "path"))


@pytest.mark.slow
def test_activate_batch_never_writes_its_results_over_its_own_input(tmp_path: Path) -> None:
    shipment = tmp_path / "shipment.csv"
    text = f"guid,code\n{GUID},{CODE}\n"
    shipment.write_text(text)
    metadata = tmp_path / "meta.json"
    metadata.write_text('{"tags": {"site": "Lyon"}}')
    for results, what in (
        (shipment, "shipment"),
        (tmp_path / "." / "shipment.csv", "shipment"),
        (metadata, "metadata"),
    ):
        done = _cli("activate-batch", str(shipment), "--metadata", str(metadata), "--results", str(results))
        assert done.returncode == 2, done.stderr
        assert f"the results would be written over the {what} file" in done.stderr, done.stderr
    assert shipment.read_text() == text  # the codes are still there
    assert metadata.read_text() == '{"tags": {"site": "Lyon"}}'
