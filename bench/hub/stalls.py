"""What the emulator's pause log (``serve --pause-log``, ``azure_iot_emulator/pauses.py``) says about a
scale run: its garbage-collector pauses and event-loop stalls during the connects and during the window,
set beside the ack latency the load generators measured, so a reader sees whether pauses explain p99."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from azure_iot_emulator.pauses import read


def summarize(log: Path, sc: dict[str, Any]) -> dict[str, Any]:
    """Pauses of the scale run ``sc`` (:func:`hub.measure.scale`'s result), split at the window's start."""
    records = read(log)
    window_from, window_to = sc["window_from"], sc["window_to"]

    def phase(start: float, end: float) -> dict[str, Any]:
        inside = [r for r in records if start <= r["t"] <= end]
        gcs = [r for r in inside if r["kind"] == "gc"]
        full = [r for r in gcs if r["gen"] == 2]
        stalls = [r for r in inside if r["kind"] == "stall"]
        commits = [r["ms"] for r in inside if r["kind"] == "commit"]
        longest = max(gcs, key=lambda r: r["ms"], default=None)
        return {
            "full_collections": len(full),
            "full_ms": max((r["ms"] for r in full), default=0.0),
            "gc_ms": longest["ms"] if longest else 0.0,
            "gc_gen": longest["gen"] if longest else None,
            "stall_ms": max((r["ms"] for r in stalls), default=0.0),
            "stalls_over_100ms": sum(1 for r in stalls if r["ms"] >= 100),
            "commit_ms": max(commits, default=0.0),
            "commits_over_100ms": sum(1 for ms in commits if ms >= 100),
            "top_stalls": [
                (round(r["t"] - sc["go_wall"], 1), r["ms"], r.get("cpu_ms", 0.0))
                for r in sorted(stalls, key=lambda r: -r["ms"])[:3]
            ],
        }

    return {"connects": phase(sc["connects_from"], window_from), "window": phase(window_from, window_to)}


def sentence(summary: dict[str, Any], sc: dict[str, Any]) -> str:
    """One paragraph for BENCHMARKS.md: the pauses in the window against the worst acks."""
    win, con = summary["window"], summary["connects"]
    timeline = sc["timeline"]
    worst = sorted(range(len(timeline)), key=lambda i: -timeline[i][1])[:3]
    gc_text = (
        f"longest collection {win['gc_ms']:,.0f} ms (generation {win['gc_gen']}), "
        f"{win['full_collections']} full (generation 2) collection(s)"
        + (f", longest {win['full_ms']:,.0f} ms" if win["full_collections"] else "")
        if win["gc_gen"] is not None
        else "no collection of 1 ms or more"
    )
    stalls = (
        ", ".join(
            f"{ms:,.0f} ms ({cpu:,.0f} ms of it on CPU) at {at:.0f} s" for at, ms, cpu in win["top_stalls"]
        )
        or "none over 20 ms"
    )
    acks = ", ".join(f"{timeline[i][1]:,.0f} ms at {i} s" for i in worst)
    return (
        "Pauses of the emulator (its pause log: every collector pause by `gc.callbacks`, every event-loop "
        "stall by a 10 ms ticker's lateness, with the CPU its thread used meanwhile: the rest is waiting "
        "for a core on the shared machine): during the window "
        f"{gc_text}; longest loop stall {win['stall_ms']:,.0f} ms, {win['stalls_over_100ms']} stall(s) of "
        f"100 ms or more; the longest stalls {stalls} into the window, the worst acks (by send second) "
        f"{acks}; longest telemetry commit (on the loop, fsync included) {win['commit_ms']:,.0f} ms, "
        f"{win['commits_over_100ms']} of 100 ms or more.  During the connects: "
        f"{con['full_collections']} full collection(s), longest {con['full_ms']:,.0f} ms; longest loop "
        f"stall {con['stall_ms']:,.0f} ms."
    )
