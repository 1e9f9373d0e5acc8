"""``activation-svc activate-batch SHIPMENT.csv``: a whole shipment activated through the service.

    activation-svc activate-batch shipment.csv [--metadata FILE] [--hub HOST] [--results FILE]
                                  [--concurrency N] [--timeout S] [--target ... TLS options as `activate`]

The CSV (``activation_svc.batch.shipment``): ``guid``, ``code``, optional ``hub`` and the OEM template's
fields as columns (asked from the service: GetMetadataTemplate), or ``--metadata FILE`` for every row.
A progress bar on standard error; one result row per device in ``--results`` (default
``<shipment>.results.csv``, written as rows finish; never the shipment or the metadata file itself); a
summary line at the end.  The rows' request ids are derived from the rows, so running the same file again
after a crash or Ctrl-C finishes what is left and repeats nothing (rows done before answer ``replayed``).
Exit status: 0 every row activated or already active, 1 some row refused or not sent (see the result
file), 2 bad usage or an unusable file, 3 the service unreachable, 130 interrupted (the rows finished so
far are in the result file).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from activation_svc.batch.shipment import (
    ACTIVATED,
    ALREADY,
    MAX_ROWS,
    NOT_SENT,
    REFUSED,
    ResultWriter,
    RowResult,
    ShipmentError,
    activate_rows,
    check_metadata_json,
    read_shipment,
)
from activation_svc.templates.fields import parse_template_json, template_fields
from devprov.v1 import activation_service_pb2 as pb
from devprov.v1 import activation_service_pb2_grpc as pb_grpc
from provkit.channels import (
    CHANNEL_FLAGS,
    add_channel_arguments,
    channel_security,
    create_channel,
    read_input,
)
from provkit.cli_shell import EXIT_REFUSED, add_timeout
from provkit.settings import SettingsSource, device_id_policy

DEFAULT_TARGET = "127.0.0.1:50052"
MAX_CONCURRENCY = 64


def add_batch_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "activate-batch",
        allow_abbrev=False,
        help="activate every device of a shipment CSV (guid, code, hub, ...)",
    )
    cmd.add_argument("shipment", type=Path, help="CSV: guid, code, optional hub, the template's fields")
    cmd.add_argument(
        "--metadata", type=Path, help="one metadata JSON file for every row (no template columns)"
    )
    cmd.add_argument("--hub", default="", help="hub for rows that name none (default: the service's)")
    cmd.add_argument("--results", type=Path, help="result CSV (default: <shipment>.results.csv)")
    cmd.add_argument(
        "--concurrency",
        type=int,
        default=8,
        metavar="N",
        help=f"activations in flight (1-{MAX_CONCURRENCY})",
    )
    add_timeout(cmd)
    add_channel_arguments(cmd, target_help="host:port (or ACTIVATION_CLIENT_TARGET)")


def _metadata_file(path: Path) -> str:
    """The metadata file's text, checked as JSON here (hostile input stops before anything is sent)."""
    text = read_input(path, "metadata file")
    check_metadata_json(text, f"the metadata file {path}")
    return text


def _summary(results: list[RowResult], total: int, where: Path) -> str:
    counts = Counter(r.outcome for r in results)
    parts = [f"{counts[o]} {o}" for o in (ACTIVATED, ALREADY, REFUSED, NOT_SENT) if counts[o]]
    replayed = sum(1 for r in results if r.replayed)
    head = f"{len(results)} of {total} rows: " + (", ".join(parts) or "none done")
    if replayed:
        head += f" ({replayed} answered from an earlier run)"
    return f"{head}; results in {where}"


def _results_path(args: argparse.Namespace) -> Path:
    """Where the results go: never over the shipment (its codes) or the metadata file the run reads."""
    path: Path = args.results or args.shipment.with_name(args.shipment.name + ".results.csv")
    for what, read in (("shipment", args.shipment), ("metadata", args.metadata)):
        if read is not None and path.resolve() == read.resolve():
            raise ShipmentError(f"the results would be written over the {what} file {read}: --results FILE")
    return path


async def _run(args: argparse.Namespace, source: SettingsSource, text: str, metadata: str | None) -> int:
    target = source.text("target", DEFAULT_TARGET) or DEFAULT_TARGET
    results_path = _results_path(args)
    console = Console(stderr=True)
    async with create_channel(target, channel_security(source)) as channel:
        stub = pb_grpc.ActivationServiceStub(channel)
        template = await stub.GetMetadataTemplate(pb.GetMetadataTemplateRequest(), timeout=args.timeout)
        schema = parse_template_json(template.schema_json)
        rows = read_shipment(
            text,
            template_fields(schema) if schema is not None else None,
            metadata_json=metadata,
            default_hub=args.hub,
            device_ids=device_id_policy(source),
        )
        writer = ResultWriter.open(results_path)
        done: list[RowResult] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        try:
            with Progress(*columns, console=console, transient=False) as bar:
                task = bar.add_task(args.shipment.name, total=len(rows))

                def finished(result: RowResult) -> None:
                    writer.write(result)
                    done.append(result)
                    bar.advance(task)
                    if not result.succeeded:
                        bar.console.print(
                            f"line {result.line} {result.device_id}: {result.outcome} {result.reason}"
                        )

                await activate_rows(
                    stub,
                    rows,
                    concurrency=args.concurrency,
                    call_timeout=args.timeout,
                    on_result=finished,
                )
        finally:
            writer.close()
            console.print(_summary(done, len(rows), results_path))
    return 0 if all(r.succeeded for r in done) else EXIT_REFUSED


def run_batch(args: argparse.Namespace) -> int:
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise ShipmentError(f"--concurrency takes 1 to {MAX_CONCURRENCY}, got {args.concurrency}")
    source = SettingsSource("ACTIVATION_CLIENT", flags=CHANNEL_FLAGS.values(args))
    text = read_input(args.shipment, "shipment file", max_bytes=MAX_ROWS * 1024)  # the most rows, ample cells
    metadata = _metadata_file(args.metadata) if args.metadata is not None else None
    _results_path(args)  # refused before anyone is called
    return asyncio.run(_run(args, source, text, metadata))


__all__ = ["add_batch_command", "run_batch"]
