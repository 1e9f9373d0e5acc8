"""What the benchmarks read of the machine they run on (one place, so every section counts alike).

``cores()``: the CPUs this process may run on (its affinity: ``taskset``, a container's cpuset), which is what
a CPU-bound ceiling divides by; ``os.cpu_count()`` counts the machine's, which the process may not have.
``cpu_seconds(pid=None)``: user + system CPU seconds a process (None: this one) has used so far.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_seconds(pid: int | None = None) -> float:
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
