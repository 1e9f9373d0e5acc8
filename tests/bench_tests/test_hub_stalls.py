"""The hub benchmarks' reading of the emulator's pause log (``bench/hub/stalls.py``): each record goes to
the phase it happened in (connects, window, neither), and the paragraph names the longest of each kind."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def stalls_module():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("hub.stalls")
    finally:
        sys.path.remove(str(BENCH))


def test_pauses_are_split_at_the_window_and_the_longest_are_named(tmp_path) -> None:
    stalls = stalls_module()
    go = 1_000.0
    run = {"connects_from": 900.0, "go_wall": go, "window_from": go, "window_to": go + 60, "timeline": []}
    run["timeline"] = [[10, 5.0], [10, 900.0], [10, 40.0]]
    records = [
        {"t": 950.0, "kind": "gc", "ms": 300.0, "gen": 2, "collected": 0},  # connects
        {"t": 950.1, "kind": "stall", "ms": 310.0, "cpu_ms": 300.0},
        {"t": 1_001.2, "kind": "gc", "ms": 4.0, "gen": 2, "collected": 0},  # window
        {"t": 1_001.3, "kind": "gc", "ms": 9.0, "gen": 1, "collected": 0},
        {"t": 1_001.9, "kind": "stall", "ms": 450.0, "cpu_ms": 12.0},
        {"t": 1_001.9, "kind": "commit", "ms": 430.0},
        {"t": 1_030.0, "kind": "stall", "ms": 25.0, "cpu_ms": 20.0},
        {"t": 1_070.0, "kind": "gc", "ms": 900.0, "gen": 2, "collected": 5},  # after the window: neither
    ]
    log = tmp_path / "pauses.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))

    summary = stalls.summarize(log, run)

    window, connects = summary["window"], summary["connects"]
    assert (window["full_collections"], window["full_ms"]) == (1, 4.0)
    assert (window["gc_ms"], window["gc_gen"]) == (9.0, 1)
    assert (window["stall_ms"], window["stalls_over_100ms"], window["commit_ms"]) == (450.0, 1, 430.0)
    assert window["top_stalls"] == [(1.9, 450.0, 12.0), (30.0, 25.0, 20.0)]
    assert (connects["full_collections"], connects["full_ms"], connects["stall_ms"]) == (1, 300.0, 310.0)
    text = stalls.sentence(summary, run)
    assert "450 ms (12 ms of it on CPU) at 2 s" in text
    assert "900 ms at 1 s" in text  # the worst ack, by send second
    assert "longest telemetry commit (on the loop, fsync included) 430 ms" in text
