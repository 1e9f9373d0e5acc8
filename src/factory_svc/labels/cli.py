"""``factory-svc labels``: a lot's labels, from its manifest and codes file (no call to the service).

    factory-svc labels LOT_DIR --portal-url URL [--format pdf|zpl|png|svg ...] [--paper a4|letter]
                       [--label-size WxH] [--sheet-margin MM] [--gap MM] [--zpl-dpi 203] [--png-dpi 300]
                       [--devices ID ...] [--unprinted] [--mark-printed] [--out DIR]

A label is made for each enrolled device whose code is in the lot's ``codes.csv`` (the last code there:
after ``rotate-code --codes-out LOT/codes.csv`` the new one); enrolled devices without one are named on
stderr (``enroll-batch --lot LOT --rotate-missing`` gives them one).  The files go to ``LOT/labels/`` (0700;
every file 0600: they carry the codes): ``labels-a4.pdf`` / ``labels-letter.pdf``, ``labels.zpl``,
``<device id>.png`` and ``<device id>.svg``, each written atomically.  ``--out DIR`` puts them elsewhere: a
directory it makes is 0700, one that exists keeps its mode (a shared print spool is the operator's to
guard; the files are 0600 all the same).  ``--mark-printed`` records in the
manifest, once the files are on disk, that these devices' labels are printed (with a digest of the code
printed, so a later rotation shows as a stale label in ``lot-status``).  Codes go to the files only, never
to standard output or a log.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from factory_svc.enrollment.codes_file import read_codes
from factory_svc.labels.render import (
    PAPERS,
    Label,
    LabelLayout,
    Sheet,
    pdf_sheet,
    png,
    portal_base,
    portal_url,
    svg,
    zpl,
)
from factory_svc.lots.manifest import LABELS, LotManifest, Printed, code_digest, load, locked, now_text
from litestore import private_directory
from provkit.devpki import write_private_file
from provkit.errors import InputError

COMMANDS = ("labels",)
FORMATS = ("pdf", "zpl", "png", "svg")


def _size(text: str) -> tuple[float, float]:
    width, _, height = text.lower().partition("x")
    try:
        return float(width), float(height)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not WIDTHxHEIGHT in millimetres (e.g. 63.5x38.1)"
        ) from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    labels = sub.add_parser(
        "labels",
        allow_abbrev=False,
        help="render a lot's labels (GUID, activation code, QR code to the portal): PDF, ZPL, PNG, SVG",
    )
    labels.add_argument("lot_dir", type=Path, help="the lot directory (factory-svc lot --out)")
    labels.add_argument(
        "--portal-url",
        required=True,
        help="the activation portal's base URL, e.g. https://activate.example.com (the QR code opens "
        "{portal}/?device=GUID#code=CODE)",
    )
    labels.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        help="pdf (a sheet), zpl (Zebra printers), png, svg (a file per label); repeatable; default pdf",
    )
    labels.add_argument("--paper", choices=sorted(PAPERS), default="a4", help="the PDF sheet's paper size")
    labels.add_argument(
        "--label-size", type=_size, default=(63.5, 38.1), metavar="WxH", help="in mm (default 63.5x38.1)"
    )
    labels.add_argument(
        "--sheet-margin", type=float, default=7.0, metavar="MM", help="PDF: page edge to labels"
    )
    labels.add_argument("--gap", type=float, default=2.5, metavar="MM", help="PDF: space between labels")
    labels.add_argument(
        "--zpl-dpi",
        type=int,
        choices=(203, 300, 600),
        default=203,
        metavar="DPI",
        help="the Zebra printer's resolution",
    )
    labels.add_argument("--png-dpi", type=int, default=300, metavar="DPI", help="PNG resolution")
    labels.add_argument("--devices", nargs="+", metavar="ID", help="only these devices of the lot")
    labels.add_argument("--unprinted", action="store_true", help="only devices with no current label printed")
    labels.add_argument(
        "--mark-printed", action="store_true", help="record in the manifest that these labels are printed"
    )
    labels.add_argument(
        "--out", type=Path, help="where the files go (default LOT_DIR/labels); an existing DIR keeps its mode"
    )


def chosen_labels(
    manifest: LotManifest, codes: dict[str, str], args: argparse.Namespace
) -> list[tuple[str, str]]:
    """(device id, code) of each label to render, in lot order; the enrolled devices without a code are named
    on stderr."""
    entries = manifest.in_order()
    if args.devices:
        wanted = {d.strip().lower() for d in args.devices}
        unknown = wanted - {e.device_id.lower() for e in entries}
        if unknown:
            raise InputError(f"not in lot {manifest.lot_id}: {' '.join(sorted(unknown))}")
        entries = [e for e in entries if e.device_id.lower() in wanted]
    chosen, without_code = [], []
    for entry in entries:
        if entry.enrolled is None:
            continue
        code = codes.get(entry.device_id)
        if code is None:
            without_code.append(entry.device_id)
            continue
        if not (args.unprinted and entry.label is not None and entry.label.code_digest == code_digest(code)):
            chosen.append((entry.device_id, code))
    if without_code:
        print(
            f"no code in {manifest.codes_path} for {len(without_code)} enrolled device(s), no label: "
            f"{' '.join(without_code)} (enroll-batch --lot {manifest.directory} --rotate-missing)",
            file=sys.stderr,
        )
    return chosen


def run(args: argparse.Namespace) -> int:
    base = portal_base(args.portal_url)
    formats = tuple(dict.fromkeys(args.formats or ["pdf"]))
    layout = LabelLayout(*args.label_size)
    sheet = Sheet(args.paper, args.sheet_margin, args.gap)
    sheet.grid(layout)  # a label that does not fit the paper: refused before anything is written
    with locked(args.lot_dir):
        manifest = load(args.lot_dir)
        codes = read_codes(manifest.codes_path) if manifest.codes_path.exists() else {}
        chosen = chosen_labels(manifest, codes, args)
        if not chosen:
            print(f"lot {manifest.lot_id}: no label to render (no enrolled device with a code)")
            return 1
        labels = [Label(device_id, code, portal_url(base, device_id, code)) for device_id, code in chosen]
        own = manifest.directory / LABELS
        out = args.out or own
        private_directory(out)  # what it makes is 0700
        if out.resolve() == own.resolve():
            os.chmod(out, 0o700)  # the lot's own: it holds the codes, whoever made it first
        written = []
        if "pdf" in formats:
            written.append(out / f"labels-{sheet.paper}.pdf")
            write_private_file(written[-1], pdf_sheet(labels, layout, sheet))
        if "zpl" in formats:
            written.append(out / "labels.zpl")
            write_private_file(written[-1], zpl(labels, layout, args.zpl_dpi))
        if "png" in formats:
            for label in labels:
                write_private_file(out / f"{label.device_id}.png", png(label, layout, args.png_dpi))
            written.append(out / "<device id>.png")
        if "svg" in formats:
            for label in labels:
                write_private_file(out / f"{label.device_id}.svg", svg(label, layout))
            written.append(out / "<device id>.svg")
        if args.mark_printed:
            by_id = manifest.by_id()
            at = now_text()
            for label in labels:
                by_id[label.device_id].label = Printed(at, formats, code_digest(label.code))
            manifest.save()
    print(f"lot {manifest.lot_id}: {len(labels)} label(s){', marked printed' if args.mark_printed else ''}")
    for path in written:
        print(f"  {path} (0600)")
    return 0
