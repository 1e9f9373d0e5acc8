"""Debian's ``zbarimg`` (zbar-tools): an independent QR decoder the label tests read images back with.  When
it is missing (``make zbar`` installs it), the tests that need it skip with the reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def zbar_unavailable() -> str | None:
    """Why QR images cannot be decoded here (None: they can)."""
    if shutil.which("zbarimg"):
        return None
    note = REPO / ".venv" / "zbar-tools-unavailable"
    why = note.read_text().strip() if note.exists() else "`make zbar` has not run"
    return f"zbarimg is missing ({why}); `make zbar` installs Debian's zbar-tools"


def decode_qr(image: Path) -> list[str]:
    """Every QR code zbarimg finds in ``image``, as text."""
    done = subprocess.run(
        ["zbarimg", "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 4), f"zbarimg failed on {image}: {done.stderr}"  # 4: no symbol found
    return done.stdout.splitlines()
