"""The crash-point hook itself: unarmed it does nothing; armed it kills the process with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from provkit.faults import CRASH_ENV, CrashPlan

pytestmark = pytest.mark.faults

_SCRIPT = """
from provkit import faults
faults.arm_from_environment()
for i in range(3):
    faults.crash_point("step")
    print(f"passed {i + 1}", flush=True)
"""


def _run(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env[CRASH_ENV] = env_value
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=False, timeout=60
    )


def test_unarmed_point_does_nothing() -> None:
    done = _run(None)
    assert done.returncode == 0 and done.stdout.split("\n")[:3] == ["passed 1", "passed 2", "passed 3"]


def test_armed_point_kills_on_the_nth_hit() -> None:
    done = _run("other,step@2")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.splitlines() == ["passed 1"]


@pytest.mark.parametrize("text", ["step@0", "step@x", "Step", "a b"])
def test_malformed_plan_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=CRASH_ENV):
        CrashPlan.parse(text)
