"""Labels from a lot directory (`factory-svc labels` as a real process): the PDF sheet on A4 and Letter read
back with pypdf, the ZPL's structure, every PNG's QR code decoded by zbarimg (an independent decoder) to the
exact portal URL, the SVGs parsed; files 0600 in a 0700 directory, no code on standard output; printing marks
the manifest.  The lot manifest refuses what is not one (the shared hostile-JSON list among it)."""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import stat
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pypdf
import pytest
from support.cli_process import run_module
from support.hostile_json import SHAPES, Hostile, shape_id
from support.zbar import decode_qr, zbar_unavailable

from factory_svc.enrollment.codes_file import CodesFile, read_codes
from factory_svc.labels import cli as labels_cli
from factory_svc.labels.render import LabelLayout, Sheet, portal_base, portal_url
from factory_svc.lots import manifest as lot_manifest
from factory_svc.lots.line import code_column
from factory_svc.lots.manifest import DeviceEntry, Enrolled, LotManifest, code_digest, now_text
from provkit.activation_code import new_code
from provkit.errors import InputError

PORTAL = "https://activate.example.com"
A4_POINTS, LETTER_POINTS = (595.2756, 841.8898), (612.0, 792.0)

_cli = functools.partial(run_module, "factory_svc.cli", timeout=120)


def _lot(folder: Path, count: int, without_code: int = 0) -> tuple[LotManifest, dict[str, str]]:
    """A lot directory as `lot --enroll` leaves it: ``count`` devices minted and enrolled, all but the last
    ``without_code`` with a code in codes.csv."""
    manifest = LotManifest(folder, "LINE-LABELS", "server", count)
    folder.mkdir(mode=0o700)
    codes: dict[str, str] = {}
    for index in range(count):
        device_id = str(uuid.uuid4())
        manifest.devices[index] = DeviceEntry(
            index, device_id, f"{index:032X}", {"chain": f"{device_id}/chain.pem"}, now_text(),
            Enrolled(now_text(), "CREATED", "LIVE"),
        )  # fmt: skip
        if index < count - without_code:
            codes[device_id] = new_code()
    manifest.save()
    file = CodesFile.open(manifest.codes_path)
    file.append([(device_id, "CREATED", "LIVE", code, "") for device_id, code in codes.items()])
    file.close()
    return manifest, codes


def test_the_qr_link_is_exactly_the_portal_with_the_device_in_the_query_and_the_code_in_the_fragment():
    device_id, code = "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "7K3M-Q9XD-2HPA-W4RT"
    assert portal_url(portal_base("https://activate.example.com/"), device_id, code) == (
        "https://activate.example.com/?device=1b4e28ba-2fa1-11d2-883f-0016d3cca427#code=7K3M-Q9XD-2HPA-W4RT"
    )
    assert (
        portal_url("http://127.0.0.1:8443/oem", "a b", "c&d")
        == "http://127.0.0.1:8443/oem/?device=a%20b#code=c%26d"
    )
    for bad in ("ftp://x.example", "activate.example.com", "https://x.example/?a=1", "https://x.example/#f",
                "https://x.example/a^b", "https://x.example/a~b", "https:///path"):  # fmt: skip
        with pytest.raises(InputError):
            portal_base(bad)


def test_sheets_hold_a_grid_of_labels_sized_for_the_paper():
    layout = LabelLayout()
    assert Sheet("a4").grid(layout) == (3, 7)
    assert Sheet("letter").grid(layout) == (3, 6)
    assert Sheet("a4", margin_mm=0, gap_mm=0).grid(LabelLayout(70, 37)) == (3, 8)
    with pytest.raises(InputError):
        LabelLayout(30, 30)  # no room for the text
    with pytest.raises(InputError):
        Sheet("letter").grid(LabelLayout(250, 40))


@pytest.mark.slow
async def test_labels_in_every_format_decode_to_the_portal_url_and_printing_marks_the_manifest(tmp_path):
    if why := zbar_unavailable():
        pytest.skip(why)
    lot = tmp_path / "lot"
    manifest, codes = _lot(lot, 23, without_code=3)
    labelled = [e.device_id for e in manifest.in_order()][:20]
    env = dict(os.environ)

    code, out, err = await _cli(
        "labels", str(lot), "--portal-url", PORTAL + "/", "--format", "pdf", "--format", "zpl",
        "--format", "png", "--format", "svg", "--mark-printed", env=env,
    )  # fmt: skip
    assert code == 0, err
    assert "20 label(s), marked printed" in out
    assert "no code in" in err and all(e.device_id in err for e in manifest.in_order()[20:])
    assert not any(c in out or c in err for c in codes.values())  # the codes go to the files only
    labels = lot / "labels"
    assert stat.S_IMODE(labels.stat().st_mode) == 0o700
    files = sorted(labels.iterdir())
    assert len(files) == 2 + 2 * 20
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}

    # every PNG's QR code, read by zbarimg, is exactly the device's portal link with its current code
    for device_id in labelled:
        expected = f"{PORTAL}/?device={device_id}#code={codes[device_id]}"
        assert decode_qr(labels / f"{device_id}.png") == [expected]

    a4 = pypdf.PdfReader(labels / "labels-a4.pdf")
    assert len(a4.pages) == 1  # 21 to a sheet
    assert [round(float(v), 2) for v in a4.pages[0].mediabox[2:]] == [round(v, 2) for v in A4_POINTS]
    text = a4.pages[0].extract_text()
    for device_id in labelled:
        assert device_id.rsplit("-", 1)[1] in text and codes[device_id][-4:] in text

    zpl = (labels / "labels.zpl").read_text()
    formats = re.findall(r"\^XA(.*?)\^XZ", zpl, re.DOTALL)
    assert len(formats) == 20 == zpl.count("^XA") == zpl.count("^XZ")
    for device_id, body in zip(labelled, formats, strict=True):
        qr = re.findall(r"\^BQN,2,(\d+)\^FDMA,([^\^]*)\^FS", body)
        assert qr == [(qr[0][0], f"{PORTAL}/?device={device_id}#code={codes[device_id]}")]
        assert 1 <= int(qr[0][0]) <= 10 and "^PW508" in body and "^LL304" in body  # 63.5 x 38.1 mm at 203 dpi
        assert device_id.split("-")[0] in body and codes[device_id].split("-")[3] in body

    for device_id in labelled:
        root = ET.parse(labels / f"{device_id}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("width") == "63.5mm"
        texts = "".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
        assert device_id in texts and codes[device_id] in texts
        assert root.find(".//{http://www.w3.org/2000/svg}path") is not None  # segno's QR modules

    marked = lot_manifest.load(lot)
    for entry in marked.in_order():
        if entry.device_id in labelled:
            assert entry.state.value == "printed" and entry.label.code_digest == code_digest(
                codes[entry.device_id]
            )
            assert entry.label.formats == ("pdf", "zpl", "png", "svg")
        else:
            assert entry.state.value == "enrolled" and entry.label is None

    # Letter: 18 to a sheet; only what is not printed yet: nothing
    code, out, err = await _cli("labels", str(lot), "--portal-url", PORTAL, "--paper", "letter", env=env)
    assert code == 0, err
    letter = pypdf.PdfReader(labels / "labels-letter.pdf")
    assert len(letter.pages) == math.ceil(20 / 18)
    assert [float(v) for v in letter.pages[1].mediabox[2:]] == list(LETTER_POINTS)
    code, out, err = await _cli("labels", str(lot), "--portal-url", PORTAL, "--unprinted", env=env)
    assert code == 1 and "no label to render" in out

    # bad input: refused, nothing written
    before = {f.name: f.stat().st_mtime_ns for f in labels.iterdir()}
    code, out, err = await _cli("labels", str(lot), "--portal-url", "https://a.example/?x=1", env=env)
    assert code == 2 and "has a query or a fragment" in err
    code, out, err = await _cli("labels", str(tmp_path), "--portal-url", PORTAL, env=env)
    assert code == 2 and "is not a lot directory" in err
    code, out, err = await _cli("labels", str(lot), "--portal-url", PORTAL, "--devices", "nope", env=env)
    assert code == 2 and "not in lot LINE-LABELS: nope" in err
    assert {f.name: f.stat().st_mtime_ns for f in labels.iterdir()} == before


def test_a_rotated_code_makes_the_printed_label_stale_and_unprinted_renders_it_again(tmp_path):
    manifest, codes = _lot(tmp_path / "lot", 2)
    first, second = manifest.in_order()
    first.label = lot_manifest.Printed(now_text(), ("pdf",), code_digest(codes[first.device_id]))
    second.label = lot_manifest.Printed(now_text(), ("pdf",), code_digest(codes[second.device_id]))
    manifest.save()
    rotated = CodesFile.open(manifest.codes_path)
    rotated.append([(second.device_id, "ROTATED", "LIVE", new_code(), "")])
    rotated.close()
    current = read_codes(manifest.codes_path)
    assert [code_column(e, current) for e in lot_manifest.load(manifest.directory).in_order()] == [
        "printed",
        "stale",
    ]
    parser = argparse.ArgumentParser()
    labels_cli.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["labels", str(tmp_path / "lot"), "--portal-url", PORTAL, "--unprinted"])
    chosen = labels_cli.chosen_labels(lot_manifest.load(manifest.directory), current, args)
    assert [device_id for device_id, _ in chosen] == [second.device_id]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_a_manifest_that_is_not_one_is_refused(tmp_path, shape: Hostile):
    manifest, _ = _lot(tmp_path / "lot", 1)
    good = manifest.path.read_bytes()
    body = shape.body(lambda value: good.replace(b'"LINE-LABELS"', value, 1))
    manifest.path.write_bytes(body)
    with pytest.raises(InputError) as refused:
        lot_manifest.load(manifest.directory)
    assert str(manifest.path) in str(refused.value)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ((b'"version": 1', b'"version": 2'), "this factory-svc reads version 1"),
        ((b'"format": "devprov-lot-manifest"', b'"format": "x"'), "is not a lot manifest"),
        ((b'"chain": "', b'"chain": "../../'), "leaves the lot directory"),
        ((b'"index": 0', b'"index": "0"'), "devices[0].index is not an integer"),
    ],
)
def test_a_manifest_of_another_version_or_leaving_its_directory_is_refused(tmp_path, change, says):
    manifest, _ = _lot(tmp_path / "lot", 1)
    manifest.path.write_bytes(manifest.path.read_bytes().replace(*change))
    with pytest.raises(InputError, match=re.escape(says)):
        lot_manifest.load(manifest.directory)


NOT_PATH_SAFE = ["d\x00x", "a\\b", "x\ny", "Upper-case", "a/b", ".", "..", ""]


@pytest.mark.parametrize("device_id", NOT_PATH_SAFE, ids=repr)
def test_a_minted_device_whose_id_a_path_could_misread_is_refused(tmp_path, device_id):
    manifest, _ = _lot(tmp_path / "lot", 1)
    manifest.devices[0].device_id = device_id
    manifest.save()
    says = f"devices[0].device_id is not a device id: {device_id!r}"
    with pytest.raises(InputError, match=re.escape(says)):
        lot_manifest.load(manifest.directory)


def test_an_item_the_factory_refused_keeps_the_id_asked_for_and_the_lot_still_loads(tmp_path):
    """What `lot` records for a refused item (``_Writer.refused``): the id as given in --ids, any text."""
    manifest, _ = _lot(tmp_path / "lot", 1)
    manifest.devices[1] = DeviceEntry(1, "../not an id", error="INVALID_ARGUMENT: DEVICE_ID_NOT_A_GUID")
    manifest.save()
    loaded = lot_manifest.load(manifest.directory)
    assert [(e.device_id, e.state.value) for e in loaded.in_order()][1] == ("../not an id", "mint-failed")
    loaded.devices[1].enrolled = Enrolled(now_text(), "CREATED", "LIVE")  # never minted, yet enrolled
    loaded.save()
    with pytest.raises(InputError, match=re.escape("devices[1] was never minted")):
        lot_manifest.load(manifest.directory)


def test_a_torn_line_of_a_codes_file_does_not_keep_the_others_from_being_read(tmp_path):
    """A power cut in the middle of a line, inside a character of a refusal's message: the line before it
    and the lines after it (appended by the next run) are read."""
    manifest, codes = _lot(tmp_path / "lot", 1)
    with manifest.codes_path.open("ab") as file:
        file.write("other,,,,REFUSED: the device id is not a GUID: 'x…'".encode()[:-2])
    later = CodesFile.open(manifest.codes_path)  # cuts the torn line off
    later.append([("next", "CREATED", "LIVE", new_code(), "")])
    later.close()
    assert sorted(read_codes(manifest.codes_path)) == sorted([*codes, "next"])


@pytest.mark.parametrize("existing", [0o755, 0o750], ids=["spool-755", "spool-750"])
def test_labels_out_to_an_existing_directory_keeps_its_mode_and_a_new_one_or_the_lots_own_is_0700(
    tmp_path, existing
):
    manifest, _ = _lot(tmp_path / "lot", 1)
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chmod(spool, existing)  # a print spool the printing host reads: not the command's to close
    fresh = tmp_path / "new" / "labels"
    own = manifest.directory / "labels"
    own.mkdir(mode=0o755)  # made more open by someone: the lot's own is closed down again
    os.chmod(own, 0o755)
    for out in (spool, fresh, None):
        extra = ["--out", str(out)] if out is not None else []
        args = ["labels", str(manifest.directory), "--portal-url", PORTAL, "--format", "zpl", *extra]
        assert labels_cli.run(_parsed(args)) == 0
    assert stat.S_IMODE(spool.stat().st_mode) == existing
    assert stat.S_IMODE((spool / "labels.zpl").stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(own.stat().st_mode) == 0o700


def _parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    labels_cli.add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)
