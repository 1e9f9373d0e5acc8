"""The hostile CSV files every entry point that reads one is tested with (tests/hostile/
test_hostile_csv_entry_points.py): ``SHAPES``, shipments (``activation_svc.batch.shipment``: ``activation-svc
activate-batch`` and the portal's ``/batch`` upload), and ``CODES_SHAPES``, codes files
(``factory_svc.enrollment.codes_file``: a lot's ``codes.csv`` as ``labels``, ``lot-status`` and
``enroll-batch --lot`` read it, and the ``--codes-out`` file of ``enroll-batch`` and ``rotate-code``).  A new
shape here is tried at every entry point of its kind; a new entry point that reads such a file joins that
test file.

Each shape is a whole file around one device that could be activated (``file(device_id, code)`` puts them
in): the file must be refused as a whole, naming what is wrong (``words``), and the device must stay as it
was.  The columns besides guid and code are fields of the tests' OEM template (tests/support/shipment.py).
"""

from __future__ import annotations

from dataclasses import dataclass

ROW = b"{guid},{code},"
VALID = b"tags.chassisNumber,tags.machineModel,desired.telemetryIntervalSeconds"
VALUES = b"VX200-20260001,VX-200,5"


@dataclass(frozen=True)
class HostileCsv:
    name: str
    value: bytes  # the file, with {guid} and {code} where the device's go
    words: str  # what the refusal says, at every entry point

    def file(self, device_id: str, code: str) -> bytes:
        return self.value.replace(b"{guid}", device_id.encode()).replace(b"{code}", code.encode())


SHAPES: tuple[HostileCsv, ...] = (
    HostileCsv("not-utf8", b"guid,code," + VALID + b"\n" + ROW + b"VX200-\xff\xfe,VX-200,5\n", "UTF-8"),
    HostileCsv("utf16", "guid,code\n{guid},{code}\n".encode("utf-16"), "UTF-8"),
    HostileCsv("utf8-encoded-surrogate", b"guid,code,tags.site.city\n" + ROW + b"\xed\xa0\x80\n", "UTF-8"),
    HostileCsv(
        "nul-in-a-cell", b"guid,code," + VALID + b"\n" + ROW + b"VX200-2026\x000001,VX-200,5\n", "U+0000"
    ),
    HostileCsv("escape-in-the-header", b"guid,code,\x1b[31mtags.site.city\n" + ROW + b"Lyon\n", "U+001B"),
    HostileCsv("delete-in-a-code", b"guid,code\n{guid},{code}\x7f\n", "U+007F"),
    HostileCsv(
        "unclosed-quote",
        b"guid,code," + VALID + b"\n" + ROW + b'"VX200-20260001,VX-200,5\n',
        "not readable CSV",
    ),
    HostileCsv("text-after-a-quote", b'guid,code\n{guid},"{code}"x\n', "not readable CSV"),
    HostileCsv(
        "a-column-twice", b"guid,code,tags.site.city,tags.site.city\n" + ROW + b"Lyon,Paris\n", "again"
    ),
    HostileCsv("guid-and-device-id", b"guid,device_id,code\n{guid},{guid},{code}\n", "again"),
    HostileCsv("an-unquoted-comma", b"guid,code,tags.site.city\n" + ROW + b"Lyon, Part-Dieu\n", "cells"),
    HostileCsv("a-column-not-in-the-template", b"guid,code,tags.colour\n" + ROW + b"red\n", "not a field"),
    HostileCsv(
        "an-unnamed-column", b"guid,code,,tags.site.city\n" + ROW + b",Lyon\n", "column 3 has no name"
    ),
    HostileCsv("no-code-column", b"guid,hub\n{guid},\n", "needs a 'guid' and a 'code'"),
    HostileCsv("header-only", b"guid,code\n", "no devices"),
    HostileCsv("empty", b"", "empty"),
    HostileCsv("a-cell-too-long", b"guid,code,tags.site.city\n" + ROW + b"L" * 5000 + b"\n", "longer than"),
)


def shape_id(shape: HostileCsv) -> str:
    return shape.name


# A codes file: its header, one good line for the device (``{guid}``, ``{code}``), then the hostile line; the
# whole file is refused (the good line too), naming the line, never echoing a code.
CODES_HEADER = b"device_id,outcome,delivery,activation_code,error\n"
GOOD_LINE = b"{guid},CREATED,LIVE,{code},\n"


def _codes(line: bytes) -> bytes:
    return CODES_HEADER + GOOD_LINE + line


CODES_SHAPES: tuple[HostileCsv, ...] = (
    # another file named by mistake (``--codes-out lot/manifest.json``): appending to it would spoil it
    HostileCsv(
        "no-header", b'{"format": "devprov-lot-manifest", "version": 1}\n' + GOOD_LINE, "not a codes file"
    ),
    HostileCsv("a-shipment", b"guid,code,hub\n{guid},{code},\n", "not a codes file"),
    HostileCsv("nul-in-a-device-id", _codes(b"dev\x00ice,,,,\n"), "U+0000"),
    HostileCsv("utf16", (CODES_HEADER + GOOD_LINE).decode().encode("utf-16"), "U+0000"),
    HostileCsv("escape-in-an-outcome", _codes(b"{guid},\x1b[2J,LIVE,{code},\n"), "U+001B"),
    HostileCsv("escape-in-an-error", _codes(b'{guid},,,,"REFUSED: \x1b]0;owned\x07"\n'), "U+001B"),
    HostileCsv("c1-control-in-a-device-id", _codes("{guid}\u009b,,,,\n".encode()), "U+009B"),
    HostileCsv("delete-in-a-code", _codes(b"{guid},ROTATED,LIVE,{code}\x7f,\n"), "U+007F"),
    HostileCsv("not-utf8-in-a-code", _codes(b"{guid},ROTATED,LIVE,\xff\xfe,\n"), "not UTF-8"),
    HostileCsv(
        "zpl-in-a-code", _codes(b"{guid},ROTATED,LIVE,^XA^FO0^FDowned^FS^XZ,\n"), "not an activation code"
    ),
    HostileCsv("unclosed-quote", _codes(b'{guid},ROTATED,LIVE,"{code},\n'), "not a codes file"),
    HostileCsv("text-after-a-quote", _codes(b'{guid},ROTATED,LIVE,"{code}"x,\n'), "not a codes file"),
    HostileCsv(
        "a-cell-too-large", _codes(b"{guid},ROTATED,LIVE," + b"7" * 200_000 + b",\n"), "not a codes file"
    ),
)
