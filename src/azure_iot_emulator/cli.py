"""iot-emulator (python -m azure_iot_emulator): `serve` runs the emulator; `monitor` and `messages` read
telemetry (from the IoT Hub half)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from azure_iot_emulator import logs
from azure_iot_emulator.config import DEFAULT_DATA_DIR, FLAGS, build_config
from azure_iot_emulator.connection_info import CONNECTION_FILE, ConnectionInfo
from azure_iot_emulator.hub import cli as hub_cli
from mainkit.settings import SettingsError
from mainkit.shell import EXIT_FAILURE, EXIT_USAGE, Answer, CommandFailed, CommandParser, run_command

log = logging.getLogger("azure_iot_emulator")


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = CommandParser(prog="iot-emulator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the local DPS + IoT Hub emulator")
    serve.add_argument("--config", type=Path, help="TOML or JSON settings file (flags win)")
    serve.add_argument("--data-dir", type=Path, help=f"state directory (default {DEFAULT_DATA_DIR})")
    serve.add_argument("--dps-host", help="DPS global device endpoint host name / IP (default localhost)")
    serve.add_argument(
        "--hub-host",
        action="append",
        dest="hub_hosts",
        metavar="HOST",
        help="a linked IoT hub host name / IP, repeatable; the first is the default hub "
        "(default 127.0.0.2 and 127.0.0.3)",
    )
    serve.add_argument(
        "--mqtt-port", type=int, metavar="PORT", help="MQTT/TLS port (default 8883, the SDK's fixed port)"
    )
    serve.add_argument(
        "--https-port", type=int, metavar="PORT",
        help="HTTPS port of every host: its service REST API, the DPS device API, MQTT over WebSockets "
        "(default 443 as on Azure, so connection strings name the bare host; it needs root or "
        "CAP_NET_BIND_SERVICE; another port, 0 = any, goes into the connection strings: HostName=host:port)",
    )
    serve.add_argument(
        "--amqp-port", type=int, metavar="PORT",
        help="AMQP/TLS port of every hub: its built-in Event Hub-compatible endpoint and cloud-to-device "
        "sends (default 5671 as on Azure)",
    )
    serve.add_argument(
        "--hub-partitions", type=int, metavar="N",
        help="partitions of each hub's built-in endpoint (default 4; fixed once the hub exists)",
    )
    serve.add_argument(
        "--hub-retention-days", type=float, metavar="DAYS",
        help="how long the built-in endpoint keeps telemetry (default 1, at most 7)",
    )
    serve.add_argument(
        "--assignment-delay", metavar="SECONDS|immediate",
        help="DPS registration: seconds until a polled operation is assigned (default 1, Azure's "
        "202-then-poll flow); 'immediate' answers the register request with the final result",
    )
    serve.add_argument(
        "--allocation-webhook-timeout", type=float, metavar="SECONDS",
        help="DPS custom allocation: seconds to wait for the webhook's answer (default 10, at most 25)",
    )
    serve.add_argument(
        "--allocation-webhook-ca", type=Path, metavar="PEM",
        help="DPS custom allocation: CA certificates trusted for https webhooks, besides the system's",
    )
    serve.add_argument(
        "--azure-quotas", action="store_true", default=None,
        help="enforce Azure's rate quotas for one unit (DPS operations, registrations, polling: 429 with "
        "retry-after; hub device-to-cloud rate per --hub-tier)",
    )
    serve.add_argument("--hub-tier", help="F1, S1 (default), S2 or S3: the device-to-cloud rate with quotas")
    serve.add_argument(
        "--c2d-default-ttl", type=float, metavar="SECONDS",
        help="cloud-to-device messages without an expiry live this long (default 3600, at most 172800)",
    )
    serve.add_argument(
        "--c2d-max-delivery-count", type=int, metavar="N",
        help="a cloud-to-device message sent N times without a PUBACK is dropped (default 10, 1-100)",
    )
    serve.add_argument(
        "--stalled-peer-timeout", type=float, metavar="SECONDS",
        help="a peer that does not read what it is sent (over 256 KiB queued for it, reading from it paused) "
        "is dropped after SECONDS (default 60), or at once past 16 MiB queued",
    )
    serve.add_argument(
        "--route", action="append", dest="routes", metavar="[HUB/]NAME:SOURCE[:CONDITION]",
        help="a message route to the built-in endpoint, repeatable (replaces the settings file's routes): "
        "SOURCE DeviceMessages, TwinChangeEvents, DeviceLifecycleEvents or DeviceConnectionStateEvents, "
        "CONDITION a routing query (default true), HUB one hub (default every hub); none: device messages "
        "only, as Azure",
    )
    serve.add_argument(
        "--fallback-route", metavar="on|off|HUB,...",
        help="where the fallback route (device messages no route takes -> built-in endpoint) is enabled: "
        "on (every hub, default), off, or the hubs named",
    )
    serve.add_argument("--ready-file", type=Path, help="written with the connection.json path when ready")
    serve.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics (off)")
    serve.add_argument(
        "--pause-log", type=Path, metavar="FILE",
        help="append every garbage-collector pause and event-loop stall to FILE as JSON lines (off)",
    )
    serve.set_defaults(func=run_serve)
    hub_cli.add_commands(sub, DEFAULT_DATA_DIR)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    import uvloop

    from azure_iot_emulator.app import Emulator, PrivilegedPortError  # heavy imports only for serve
    from azure_iot_emulator.longlived import LongLivedObjects
    from azure_iot_emulator.mqtt.accept_any import LayoutError

    config = build_config(args.config, FLAGS.values(args))
    logs.configure(config.log_level)
    _raise_open_file_limit()

    async def main() -> int:
        # This process is the emulator's alone: its long-lived objects may leave the collector's walks.
        emulator = Emulator(config, long_lived=LongLivedObjects())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            info = await emulator.start()
        except PrivilegedPortError as exc:
            raise CommandFailed(str(exc), exit_code=EXIT_FAILURE) from None
        except LayoutError as exc:  # this Python's ssl cannot be given the client-certificate hook
            raise CommandFailed(f"cannot set up TLS: {exc}", exit_code=EXIT_FAILURE) from None
        except OSError as exc:
            raise CommandFailed(f"cannot listen: {exc}", exit_code=EXIT_FAILURE) from None
        _print_summary(info, config.data_dir)
        await stop.wait()
        log.info("stopping")
        await emulator.stop()
        return 0

    # libuv's event loop: its transports, timers and callbacks cost a fraction of asyncio's own in the
    # per-message path of thousands of device connections (see BENCHMARKS.md, IoT Hub emulator).
    return uvloop.run(main())


def _raise_open_file_limit() -> None:
    """Every connected device is a socket: lift the soft descriptor limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as exc:  # pragma: no cover - platform dependent
        log.warning("cannot raise the open-file limit: %s", exc)


def _print_summary(info: ConnectionInfo, data_dir: Path) -> None:
    lines = [
        "Azure IoT emulator ready",
        f"  ID scope:            {info['id_scope']}",
        f"  DPS device endpoint: {info['global_endpoint']} (MQTT/TLS port {info['mqtt_port']}, "
        f"HTTPS port {info['https_port']})",
        f"  DPS service:         {info['dps']['rest_endpoint']}",
        f"  CA certificate:      {info['ca_pem_path']}",
    ]
    for hub in info["hubs"]:
        lines.append(f"  IoT hub:             {hub['host_name']} (service {hub['rest_endpoint']})")
        if hub.get("eventhub_endpoint"):
            lines.append(f"    built-in endpoint: {hub['eventhub_endpoint']} (entity {hub['eventhub_name']})")
    if info.get("metrics_url"):
        lines.append(f"  Metrics:             {info['metrics_url']}")
    lines.append(f"  Connection strings (with keys): {(data_dir / CONNECTION_FILE).resolve()}")
    print("\n".join(lines), flush=True)


# What iot-emulator says for the failures it knows (anything else is a bug: mainkit.shell).
ANSWERS = (Answer.line(SettingsError, "invalid configuration: {}", EXIT_USAGE),)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: int(args.func(args) or 0), prog="iot-emulator", answers=ANSWERS)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["json", "main"]
