"""Crash points for the fault-injection tests: the production path is the same code.

A crash point is a named step boundary (``crash_point("enroll.after_dps_write")``).  It does nothing unless
the program was started with ``DEVPROV_CRASH_AT`` naming it, in which case the process kills itself with
SIGKILL there: no ``finally``, no flush, no graceful stop, exactly what a power cut or ``kill -9`` leaves.

``DEVPROV_CRASH_AT`` is a comma-separated list of ``<point>`` or ``<point>@<n>`` (crash the n-th time the
point is reached, counted from 1; default 1).  It is read once, at start-up, by each program's ``main``
(``arm_from_environment()``); nothing else reads the environment.  It is a test hook: the variable is
not a setting of the product and is not in the settings tables.

API: ``CrashPlan.parse(text)``, ``arm(plan)``, ``arm_from_environment(env=os.environ)``,
``crash_point(name)``, ``CRASH_ENV``.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

CRASH_ENV = "DEVPROV_CRASH_AT"
_POINT = re.compile(r"^[a-z0-9_.\-]+$")


@dataclass
class CrashPlan:
    """Which points kill the process, and on which hit; counts the hits of the armed points."""

    targets: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> CrashPlan:
        targets: dict[str, int] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, _, nth = item.partition("@")
            if not _POINT.match(name) or (nth and not nth.isdigit()) or nth == "0":
                raise ValueError(f"{CRASH_ENV}: {item!r} is not <point> or <point>@<n> (n >= 1)")
            targets[name] = int(nth or "1")
        return cls(targets)

    def reached(self, name: str) -> bool:
        """Count one hit of ``name``; true when this hit is the one to crash on."""
        nth = self.targets.get(name)
        if nth is None:
            return False
        self.hits[name] = self.hits.get(name, 0) + 1
        return self.hits[name] == nth


_plan = CrashPlan()


def arm(plan: CrashPlan) -> None:
    global _plan
    _plan = plan


def arm_from_environment(env: Mapping[str, str] | None = None) -> None:
    """Read ``DEVPROV_CRASH_AT`` once (a program's start-up); unset or empty arms nothing."""
    arm(CrashPlan.parse((os.environ if env is None else env).get(CRASH_ENV, "")))


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if the armed plan says so; otherwise nothing."""
    if _plan.targets and _plan.reached(name):
        os.kill(os.getpid(), signal.SIGKILL)
