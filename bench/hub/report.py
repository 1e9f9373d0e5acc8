"""The hub benchmark's markdown section, from the measurements of :mod:`.measure`."""

from __future__ import annotations

from typing import Any

from . import stalls
from .loadgen import PAYLOAD
from .settings import CPU_RATIO_GOAL, MEMORY_GOAL_KIB, PER_DEVICE_GOAL_KIB, SCALE_GOAL_DEVICES, Settings


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def render(results: dict[str, dict[str, Any]], settings: Settings, notes: list[str], elapsed: float) -> str:
    lines: list[str] = []
    if not settings.is_full:
        lines += [f"Not the benchmark's configuration (a quick check): {settings}.", ""]
    lines += _ingest(results, settings)
    if settings.with_scale:
        lines += _scale(results, settings)
    lines.extend(notes)
    lines.append(f"Bench run time {elapsed:.0f} s.")
    return "\n".join(lines)


def _ingest(results: dict[str, dict[str, Any]], settings: Settings) -> list[str]:
    lines = [
        "### Telemetry ingest",
        "",
        f"Load: {settings.ingest_devices} devices, each its own TLS connection (client certificate), QoS 1, "
        f"{settings.ingest_window} messages in flight per device, {len(PAYLOAD)}-byte JSON body, "
        f"{settings.ingest_seconds:.0f} s; "
        "the load generator is one Python process beside the server on the same 2 cores.",
        "",
        "| server | telemetry ingest (acked msgs/s, best round) | all rounds | server CPU in the best round "
        "(incl. connects) |",
        "|---|---|---|---|",
    ]
    for name, data in results.items():
        lines.append(
            f"| {name} | {data['ingest']['rate']:,.0f} | "
            f"{', '.join(f'{rate:,.0f}' for rate in data['rounds'])} | "
            f"{data['ingest']['server_cpu_percent']:.0f} % |"
        )
    lines.append("")
    emu, mosq = results["emulator"], results.get("mosquitto")
    if mosq:
        ratio = emu["ingest"]["rate"] / mosq["ingest"]["rate"]
        verdict = "met" if ratio >= 0.25 else "NOT met"
        lines.append(
            f"Emulator ingest = {ratio:.0%} of Mosquitto's under the same generator "
            f"(goal >= 25 %: **{verdict}**)."
        )
        if mosq["ingest"]["server_cpu_percent"] < 80:
            lines.append(
                f"Mosquitto used {mosq['ingest']['server_cpu_percent']:.0f} % of a core in its best round: "
                "its rate is bounded by the Python load generator sharing the 2 cores, not by Mosquitto, "
                "so the ratio understates Mosquitto's own ceiling."
            )
    return lines


def _scale(results: dict[str, dict[str, Any]], settings: Settings) -> list[str]:
    devices, period = settings.scale_devices, settings.scale_period
    needed = devices / period
    lines = [
        "",
        f"### {devices:,} connected devices, one message every {period:.0f} s (measured, not extrapolated)",
        "",
        f"{devices:,} devices, each its own TLS connection with a client certificate, connect "
        f"({settings.scale_processes} load-generator processes, {len(settings.scale_sources)} source "
        f"addresses), then each publishes QoS 1 every {period:.0f} s (phases spread evenly) for "
        f"{settings.scale_seconds:.0f} s: {needed:,.0f} msgs/s expected.  Server memory from "
        "/proc/<pid>/status: VmRSS before the connects, with all devices connected, the highest sample "
        "during the window (every second), and VmHWM (peak) at the end.",
        "",
        "| server | connected | connect time | RSS before | RSS connected | RSS max in window | VmHWM "
        "| per device | msgs/s acked (expected) | acked / sent | unacked at end "
        "| ack latency p50 / p99 / max | server CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data in results.items():
        sc = data["scale"]
        per_device = (sc["connected_kib"] - sc["before_kib"]) / max(1, sc["connected"])
        lines.append(
            f"| {name} | {sc['connected']:,} / {sc['devices']:,} | {sc['connect_seconds']:.0f} s | "
            f"{mib(sc['before_kib'])} | {mib(sc['connected_kib'])} | {mib(sc['window_max_kib'])} | "
            f"{mib(sc['hwm_kib'])} | {per_device:.1f} KiB | {sc['rate']:,.0f} ({needed:,.0f}) | "
            f"{sc['acked']:,} / {sc['sent']:,} | {sc['unacked']:,} | "
            f"{sc['p50_ms']:,.1f} / {sc['p99_ms']:,.1f} / {sc['max_ms']:,.0f} ms | "
            f"{sc['cpu_percent']:.0f} % |"
        )
    lines.append("")
    sc = results["emulator"]["scale"]
    mosq = results.get("mosquitto")
    # Acks keep up when every message is acknowledged, nothing is outstanding at the end, and 99 % of
    # the acknowledgements arrive before the device's next message is due.
    all_acked = sc["unacked"] == 0 and sc["lost"] == 0 and sc["acked"] == sc["sent"]
    keeps_up = all_acked and sc["p99_ms"] < period * 1000
    rate_ok = sc["rate"] >= 0.95 * needed
    memory_ok = sc["hwm_kib"] <= MEMORY_GOAL_KIB
    all_connected = sc["connected"] == SCALE_GOAL_DEVICES
    met = keeps_up and rate_ok and memory_ok and all_connected
    timeline = sc["timeline"]
    worst = [max((b[1] for b in timeline[i : i + 10]), default=0.0) for i in range(0, len(timeline), 10)]
    lines.append(
        f"Emulator with {sc['connected']:,} connected devices: peak resident {mib(sc['hwm_kib'])} "
        f"(goal <= 1,024 MiB: {'within' if memory_ok else 'OVER'}); "
        f"{sc['rate']:,.0f} msgs/s acknowledged against {needed:,.0f} expected; "
        f"acks {'kept up' if keeps_up else 'did NOT keep up'} "
        f"({sc['acked']:,} of {sc['sent']:,} acknowledged, {sc['unacked']:,} outstanding after a "
        f"{settings.scale_grace:.0f} s grace, {sc['lost']} connections lost, p99 ack latency "
        f"{sc['p99_ms']:,.0f} ms; criterion: all acknowledged and p99 below the {period:.0f} s period).  "
        f"Worst ack latency per 10 s of the window: {', '.join(f'{w:,.0f}' for w in worst)} ms."
    )
    lines.append(stalls.sentence(sc["pauses"], sc))
    slow = [
        f"{name} {sum(1 for _, worst_ms in data['scale']['timeline'] if worst_ms > 1000)} of "
        f"{len(data['scale']['timeline'])}"
        for name, data in results.items()
    ]
    lines.append(
        "Seconds of the window (by send time) in which some ack took over 1 s: "
        + ", ".join(slow)
        + " (stalls that hit every server alike, e.g. the generators or the machine pausing, show up in "
        "both rows)."
    )
    lines.append(
        f"CPU during the window: emulator {sc['cpu_percent']:.0f} % of one core "
        f"({sc['cpu_ms_per_message']:.2f} ms per message), the two load generators together "
        f"{sc['loadgen_cpu_percent']:.0f} %"
        + (
            f"; Mosquitto {mosq['scale']['cpu_percent']:.0f} % ({mosq['scale']['cpu_ms_per_message']:.2f} ms "
            "per message)"
            if mosq
            else ""
        )
        + f".  Connect CPU per device: emulator {sc['connect_cpu_ms']:.1f} ms, load generator "
        f"{sc['loadgen_connect_cpu_ms']:.1f} ms (both sides of a TLS handshake with client certificate).  "
        "On a shared machine a server that gets less CPU than it needs falls behind and its ack latency "
        "grows; compare its CPU per message with the share of the 2 cores it got."
    )
    if sc["failures"]:
        lines.append(f"Connect failures (first few): {'; '.join(sc['failures'])}.")
    verdict = ("met" if met else "NOT met") if devices == SCALE_GOAL_DEVICES else "not assessed at this size"
    lines.append(
        f"Goal {SCALE_GOAL_DEVICES:,} connected devices at 5-second telemetry within 1 GiB resident: "
        f"**{verdict}**."
    )
    lines += _issue30_goals(results, devices)
    return lines


def _per_device_kib(sc: dict[str, Any]) -> float:
    return float(sc["connected_kib"] - sc["before_kib"]) / max(1, sc["connected"])


def _issue30_goals(results: dict[str, dict[str, Any]], devices: int) -> list[str]:
    """CPU per message against Mosquitto's in this run, and memory per connected device."""
    sc = results["emulator"]["scale"]
    at_size = devices == SCALE_GOAL_DEVICES
    lines = []
    mosq = results.get("mosquitto")
    if mosq:
        ratio = sc["cpu_ms_per_message"] / max(1e-9, mosq["scale"]["cpu_ms_per_message"])
        verdict = (
            ("met" if ratio <= CPU_RATIO_GOAL else "NOT met") if at_size else "not assessed at this size"
        )
        lines.append(
            f"Goal CPU per message <= {CPU_RATIO_GOAL:.0f}x Mosquitto's in the same run at "
            f"{SCALE_GOAL_DEVICES:,} devices: **{verdict}** ({ratio:.1f}x: {sc['cpu_ms_per_message']:.3f} "
            f"against {mosq['scale']['cpu_ms_per_message']:.3f} ms; both figures are a server's CPU over the "
            "window divided by the messages acknowledged, on a machine shared with other engineers' work)."
        )
    per_device = _per_device_kib(sc)
    verdict = ("met" if per_device <= PER_DEVICE_GOAL_KIB else "NOT met") if at_size else "not assessed"
    reference = f"; Mosquitto {_per_device_kib(mosq['scale']):.1f} KiB" if mosq else ""
    lines.append(
        f"Goal memory per connected device <= {PER_DEVICE_GOAL_KIB:.0f} KiB: **{verdict}** "
        f"({per_device:.1f} KiB{reference}; where it goes: the fleet section, `make bench-fleet`)."
    )
    return lines
