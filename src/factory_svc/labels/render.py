"""Labels as bytes: the portal link a label's QR code opens, the layout, and one renderer per format.

The QR code encodes exactly ``{portal}/?device={guid}#code={code}``: the portal reads the device from the
query and the code from the fragment, which a browser never sends to a server (so the code reaches no
server log).  QR codes come from segno (one encoder for every format: the PDF draws its modules as
vector squares, the SVG nests segno's SVG, the PNG pastes segno's PNG); the PDF sheet is reportlab's, the
PNG is composed with Pillow; ZPL is plain text commands for the printer's own QR encoder (``^BQ``).

A label (``LabelLayout``, default 63.5 x 38.1 mm: 3 x 7 on A4, 3 x 6 on Letter with the default margins)
holds the QR code on the left and, on the right, the device GUID (in three lines) and the activation code
(in two), each set as large as the space allows.

API: ``portal_base(text)``, ``portal_url(base, device_id, code)``, ``Label``, ``LabelLayout``, ``Sheet``,
``pdf_sheet(labels, layout, sheet)``, ``zpl(labels, layout, dpi)``, ``svg(label, layout)``,
``png(label, layout, dpi)``, ``PAPERS``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape, quoteattr

import segno
from PIL import Image, ImageDraw, ImageFont
from reportlab.lib.pagesizes import A4, LETTER
from reportlab.lib.units import mm
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas

from provkit.errors import InputError

PAPERS = {"a4": A4, "letter": LETTER}  # points
QR_ERROR = "m"  # 15 % of the symbol may be scratched or smudged
QR_BORDER = 2  # modules of quiet zone inside the label's own white padding
_MM_PER_INCH = 25.4
_PT_PER_MM = 72 / _MM_PER_INCH
_SAFE_URL = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:/%@!$&'()*+,;=")


def portal_base(text: str) -> str:
    """The portal's base URL as a label links it: ``http(s)://host[:port][/path]``, no query, no fragment,
    no trailing slash (one is taken off); InputError otherwise."""
    base = text.strip().removesuffix("/")
    parts = urlsplit(base)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise InputError(f"--portal-url {text!r} is not an http(s) URL (e.g. https://activate.example.com)")
    if parts.query or parts.fragment or "?" in base or "#" in base:
        raise InputError(f"--portal-url {text!r} has a query or a fragment; the label adds its own")
    if not set(base) <= _SAFE_URL:
        bad = "".join(sorted(set(base) - _SAFE_URL))
        raise InputError(f"--portal-url {text!r} holds characters a label cannot carry: {bad!r}")
    return base


def portal_url(base: str, device_id: str, code: str) -> str:
    return f"{base}/?device={quote(device_id, safe='')}#code={quote(code, safe='-')}"


@dataclass(frozen=True)
class Label:
    device_id: str
    code: str
    url: str

    def device_lines(self) -> list[str]:
        """The GUID in three lines, broken after its dashes (``8-4-`` / ``4-4-`` / ``12``)."""
        groups = self.device_id.split("-")
        if len(groups) != 5:
            return [self.device_id]
        return [f"{groups[0]}-{groups[1]}-", f"{groups[2]}-{groups[3]}-", groups[4]]

    def code_lines(self) -> list[str]:
        groups = self.code.split("-")
        if len(groups) != 4:
            return [self.code]
        return [f"{groups[0]}-{groups[1]}-", f"{groups[2]}-{groups[3]}"]

    def qr(self) -> segno.QRCode:
        return segno.make_qr(self.url, error=QR_ERROR)


@dataclass(frozen=True)
class LabelLayout:
    width_mm: float = 63.5
    height_mm: float = 38.1
    padding_mm: float = 2.5  # white space inside the label's edge

    def __post_init__(self) -> None:
        if self.height_mm < 20 or self.width_mm < self.height_mm + 15:
            raise InputError(
                f"a label of {self.width_mm} x {self.height_mm} mm is too small: it needs at least 20 mm of "
                "height for the QR code and 15 mm more width than height for the text"
            )

    @property
    def qr_mm(self) -> float:
        return self.height_mm - 2 * self.padding_mm

    @property
    def text_x_mm(self) -> float:
        return self.padding_mm * 2 + self.qr_mm

    @property
    def text_width_mm(self) -> float:
        return self.width_mm - self.text_x_mm - self.padding_mm

    def blocks(self) -> list[tuple[str, float, float]]:
        """The text column from the top: (role, top in mm, height in mm); role is ``caption-device``,
        ``device``, ``caption-code`` or ``code``."""
        usable = self.height_mm - 2 * self.padding_mm
        caption = usable * 0.09
        device = usable * 0.42
        code = usable - 2 * caption - device - usable * 0.06
        top = self.padding_mm
        out = []
        for role, height in (("caption-device", caption), ("device", device)):
            out.append((role, top, height))
            top += height
        top += usable * 0.06
        for role, height in (("caption-code", caption), ("code", code)):
            out.append((role, top, height))
            top += height
        return out


@dataclass(frozen=True)
class Sheet:
    paper: str = "a4"
    margin_mm: float = 7.0  # the sheet's edge to the first label
    gap_mm: float = 2.5  # between two labels

    def grid(self, layout: LabelLayout) -> tuple[int, int]:
        width, height = (v / _PT_PER_MM for v in PAPERS[self.paper])
        columns = int((width - 2 * self.margin_mm + self.gap_mm) // (layout.width_mm + self.gap_mm))
        rows = int((height - 2 * self.margin_mm + self.gap_mm) // (layout.height_mm + self.gap_mm))
        if columns < 1 or rows < 1:
            raise InputError(
                f"a {layout.width_mm} x {layout.height_mm} mm label does not fit on {self.paper}"
            )
        return columns, rows


_CAPTIONS = {"caption-device": "DEVICE", "caption-code": "ACTIVATION CODE"}


def _lines(label: Label, role: str) -> list[str]:
    if role in _CAPTIONS:
        return [_CAPTIONS[role]]
    return label.device_lines() if role == "device" else label.code_lines()


def _fit(lines: Sequence[str], width: float, height: float, advance: float) -> float:
    """The font size (in the unit of ``width``) that fits ``lines`` in the box; ``advance`` is the font's
    width of the widest line at size 1."""
    return min(height / len(lines) / 1.15, width / max(advance, 1e-9))


# ------------------------------------------------------------------------------------------------- PDF
_PDF_FONTS = {
    "caption-device": "Helvetica",
    "caption-code": "Helvetica",
    "device": "Courier",
    "code": "Courier-Bold",
}


def _pdf_label(canvas: Canvas, label: Label, layout: LabelLayout, x: float, y: float) -> None:
    """One label with its lower left corner at (x, y) points."""
    qr = label.qr()
    size = qr.symbol_size(border=QR_BORDER)[0]
    module = layout.qr_mm * mm / size
    top = y + (layout.height_mm - layout.padding_mm) * mm
    left = x + layout.padding_mm * mm
    for row, line in enumerate(qr.matrix_iter(border=QR_BORDER)):
        start = None
        for column, dark in enumerate([*line, 0]):
            if dark and start is None:
                start = column
            elif not dark and start is not None:
                canvas.rect(
                    left + start * module, top - (row + 1) * module, (column - start) * module, module,
                    stroke=0, fill=1,
                )  # fmt: skip
                start = None
    text_left = x + layout.text_x_mm * mm
    width = layout.text_width_mm * mm
    for role, block_top, block_height in layout.blocks():
        lines = _lines(label, role)
        font = _PDF_FONTS[role]
        size = _fit(lines, width, block_height * mm, max(stringWidth(t, font, 1) for t in lines))
        canvas.setFont(font, size)
        for n, text in enumerate(lines):
            baseline = y + (layout.height_mm - block_top) * mm - (n + 1) * size * 1.15 + size * 0.25
            canvas.drawString(text_left, baseline, text)


def pdf_sheet(labels: Sequence[Label], layout: LabelLayout, sheet: Sheet) -> bytes:
    """The labels on as many sheets of ``sheet.paper`` as they need, a grid per page, centred."""
    page_width, page_height = PAPERS[sheet.paper]
    columns, rows = sheet.grid(layout)
    grid_width = (columns * layout.width_mm + (columns - 1) * sheet.gap_mm) * mm
    grid_height = (rows * layout.height_mm + (rows - 1) * sheet.gap_mm) * mm
    left, top = (page_width - grid_width) / 2, (page_height + grid_height) / 2
    out = io.BytesIO()
    canvas = Canvas(out, pagesize=(page_width, page_height), pageCompression=1)
    canvas.setTitle("Device labels")
    per_page = columns * rows
    for n, label in enumerate(labels):
        if n and n % per_page == 0:
            canvas.showPage()
        row, column = divmod(n % per_page, columns)
        x = left + column * (layout.width_mm + sheet.gap_mm) * mm
        y = top - (row + 1) * layout.height_mm * mm - row * sheet.gap_mm * mm
        _pdf_label(canvas, label, layout, x, y)
    canvas.showPage()
    canvas.save()
    return out.getvalue()


# ------------------------------------------------------------------------------------------------- ZPL
def zpl(labels: Sequence[Label], layout: LabelLayout, dpi: int = 203) -> bytes:
    """One ``^XA ... ^XZ`` format per label: the printer draws the QR code itself (``^BQN,2,m``, error
    correction M, automatic input mode) and the text in its scalable font (``^A0``)."""
    dots = dpi / _MM_PER_INCH
    out = []
    for label in labels:
        modules = label.qr().symbol_size(border=0)[0]
        magnification = max(1, min(10, int(layout.qr_mm * dots // (modules + 2 * QR_BORDER))))
        quiet = QR_BORDER * magnification
        fields = [
            "^XA",
            "^CI28",  # UTF-8
            f"^PW{round(layout.width_mm * dots)}",
            f"^LL{round(layout.height_mm * dots)}",
            "^LH0,0",
            f"^FO{round(layout.padding_mm * dots) + quiet},{round(layout.padding_mm * dots) + quiet}"
            f"^BQN,2,{magnification}^FD{QR_ERROR.upper()}A,{label.url}^FS",
        ]
        x = round(layout.text_x_mm * dots)
        for role, top, height in layout.blocks():
            lines = _lines(label, role)
            # ^A0 is proportional: a character is about 0.6 of the height wide
            size = _fit(lines, layout.text_width_mm * dots, height * dots, 0.62 * max(len(t) for t in lines))
            for n, text in enumerate(lines):
                y = round(top * dots + n * size * 1.15)
                fields.append(f"^FO{x},{y}^A0N,{round(size)},{round(size)}^FD{text}^FS")
        fields.append("^XZ")
        out.append("\n".join(fields))
    return ("\n".join(out) + "\n").encode()


# ------------------------------------------------------------------------------------------------- SVG
def svg(label: Label, layout: LabelLayout) -> bytes:
    """The label as an SVG document, sized in millimetres; segno's QR code nested in it."""
    qr = label.qr()
    module = layout.qr_mm / qr.symbol_size(border=QR_BORDER)[0]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{layout.width_mm}mm" height="{layout.height_mm}mm" '
        f'viewBox="0 0 {layout.width_mm} {layout.height_mm}">',
        f'<rect width="{layout.width_mm}" height="{layout.height_mm}" fill="#fff"/>',
        f'<g transform="translate({layout.padding_mm} {layout.padding_mm})">'
        f"{qr.svg_inline(scale=module, border=QR_BORDER)}</g>",
    ]
    for role, top, height in layout.blocks():
        lines = _lines(label, role)
        family = "Helvetica, Arial, sans-serif" if role in _CAPTIONS else "Courier New, monospace"
        weight = ' font-weight="bold"' if role == "code" else ""
        size = _fit(lines, layout.text_width_mm, height, 0.6 * max(len(t) for t in lines))
        for n, text in enumerate(lines):
            baseline = top + (n + 1) * size * 1.15 - size * 0.25
            parts.append(
                f'<text x="{layout.text_x_mm:.3f}" y="{baseline:.3f}" font-family={quoteattr(family)} '
                f'font-size="{size:.3f}"{weight}>{escape(text)}</text>'
            )
    parts.append("</svg>")
    return ('<?xml version="1.0" encoding="utf-8"?>\n' + "\n".join(parts) + "\n").encode()


# ------------------------------------------------------------------------------------------------- PNG
def png(label: Label, layout: LabelLayout, dpi: int = 300) -> bytes:
    """The label as a PNG at ``dpi``: segno's QR code (whole pixels per module) and the text beside it."""
    px = dpi / _MM_PER_INCH
    image = Image.new("L", (round(layout.width_mm * px), round(layout.height_mm * px)), 255)
    qr = label.qr()
    box = round(layout.qr_mm * px)
    scale = max(1, box // qr.symbol_size(border=QR_BORDER)[0])
    buffer = io.BytesIO()
    qr.save(buffer, kind="png", scale=scale, border=QR_BORDER)
    buffer.seek(0)
    with Image.open(buffer) as symbol:
        offset = round(layout.padding_mm * px) + (box - symbol.width) // 2
        image.paste(symbol.convert("L"), (offset, offset))
    draw = ImageDraw.Draw(image)
    x = round(layout.text_x_mm * px)
    for role, top, height in layout.blocks():
        lines = _lines(label, role)
        unit = ImageFont.load_default(size=100)
        advance = max(unit.getlength(t) for t in lines) / 100
        size = max(1, math.floor(_fit(lines, layout.text_width_mm * px, height * px, advance)))
        font = ImageFont.load_default(size=size)
        for n, text in enumerate(lines):
            draw.text((x, round(top * px + n * size * 1.15)), text, fill=0, font=font)
    out = io.BytesIO()
    image.save(out, format="PNG", dpi=(dpi, dpi))
    return out.getvalue()
