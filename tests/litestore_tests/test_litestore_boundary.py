"""The emulator stays a separate program: loading it (and litestore, which it shares with the suite) pulls in
no package of the suite."""

from __future__ import annotations

import subprocess
import sys

SUITE = ("provkit", "factory_svc", "activation_svc", "device_client", "devprov_demo", "devprov")


def test_the_emulator_and_litestore_import_nothing_from_the_suite() -> None:
    probe = (
        "import sys, litestore, azure_iot_emulator.cli, azure_iot_emulator.app\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({SUITE!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
