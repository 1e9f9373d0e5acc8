"""Every hostile JSON shape (tests/support/hostile_json.py) against the JSON files activation_svc's programs
read: `activate-batch --metadata FILE` (checked before anything is sent) and a metadata template named in
the service's settings (checked at start-up).  Each is refused with a one-line error naming the file (and,
for a template, the tenant), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.hostile_json import SHAPES, Hostile, shape_id

from activation_svc.batch.cli import _metadata_file
from activation_svc.templates.schema import load_template
from provkit.errors import ConfigurationError

TEMPLATE_AROUND = (b'{"type": "object", "properties": {"tags": {"default": ', b"}}}")
METADATA_AROUND = (b'{"tags": {"k": ', b'}, "properties": {"desired": {}}}')


def _file(tmp_path: Path, shape: Hostile, around: tuple[bytes, bytes]) -> Path:
    path = tmp_path / "hostile.json"
    path.write_bytes(shape.body(lambda value: around[0] + value + around[1]))
    return path


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_a_batch_metadata_file_is_refused_before_anything_is_sent(tmp_path: Path, shape: Hostile) -> None:
    path = _file(tmp_path, shape, METADATA_AROUND)
    with pytest.raises(ConfigurationError) as refused:
        _metadata_file(path)
    message = str(refused.value)
    assert str(path) in message
    if shape.reason is not None and shape.utf8:
        assert f"[{shape.reason}]" in message


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_a_template_file_is_refused_at_start_up_naming_the_tenant(tmp_path: Path, shape: Hostile) -> None:
    path = _file(tmp_path, shape, TEMPLATE_AROUND)
    if shape.reason is None and not shape.whole:  # valid JSON in a keyword that takes anything: a template
        assert load_template("acme", path).tenant == "acme"
        return
    with pytest.raises(ConfigurationError, match="OEM tenant 'acme'"):
        load_template("acme", path)
