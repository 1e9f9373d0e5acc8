"""``provkit.channels.read_input``: the files a person names to a command (certificates, CSRs, metadata,
device id lists, shipments) are read as UTF-8 whatever the locale, and never more than a bound of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from provkit.channels import MAX_INPUT_BYTES, read_input
from provkit.errors import InputError


def test_a_file_within_the_bound_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "metadata.json"
    path.write_bytes(b"x" * 16)
    assert read_input(path, "metadata file", max_bytes=16) == "x" * 16


def test_a_file_past_the_bound_is_refused_with_its_size_not_read_into_memory(tmp_path: Path) -> None:
    small = tmp_path / "ids.txt"
    small.write_bytes(b"x" * 17)
    with pytest.raises(InputError, match=r"the device id file .*ids.txt is larger than 16 bytes"):
        read_input(small, "device id file", max_bytes=16)
    huge = tmp_path / "backup.img"  # a wrong path to a large file: sparse, read only up to the bound
    with huge.open("wb") as handle:
        handle.truncate(64 * MAX_INPUT_BYTES)
    with pytest.raises(InputError, match=f"is larger than {MAX_INPUT_BYTES:,} bytes"):
        read_input(huge, "certificate file")


def test_a_utf8_file_is_read_as_utf8_under_a_locale_that_is_not(tmp_path: Path) -> None:
    path = tmp_path / "metadata.json"
    path.write_text('{"tags": {"site": "Zürich"}}', encoding="utf-8")
    script = "import sys; from pathlib import Path; from provkit.channels import read_input; "
    script += "print(ascii(read_input(Path(sys.argv[1]), 'metadata file')))"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", script, str(path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ascii('{"tags": {"site": "Zürich"}}')


def test_a_file_that_is_not_utf8_is_refused_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_bytes(b"\xff\xfe-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(InputError, match=r"the certificate file .*cert.pem is not text \(UTF-8\)"):
        read_input(path, "certificate file")
