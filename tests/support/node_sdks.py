"""Microsoft's Node.js SDKs as the tests' second, independent client of the emulator (registered in
tests/conftest.py).

The ``node_sdks`` fixture installs the exact versions pinned in tests/node/package-lock.json from the npm
registry (``npm ci``) into ``.venv/node/`` (ignored, removed by ``make clean``), once per lock file, and runs
the small scripts of tests/node/ with them.  Without ``node`` and ``npm`` (``make node`` installs Debian's
``nodejs`` and ``npm``; why it could not is in ``.venv/node-unavailable``) or with a Node.js older than the
SDKs' dependencies need, the tests that use it skip and say why.  Node.js trusts the emulator's CA through
``NODE_EXTRA_CA_CERTS``, exactly as a user's program would.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "node"
CACHE = REPO / ".venv" / "node"
UNAVAILABLE_NOTE = REPO / ".venv" / "node-unavailable"
MIN_NODE_MAJOR = 20  # the SDKs' @azure/* dependencies declare engines node >= 20
INSTALL_TIMEOUT = 900.0


class NodeScriptError(AssertionError):
    """A script failed outright (not an error answer of the service, which is part of its output)."""


@dataclass(frozen=True)
class NodeSdks:
    node: str
    modules: Path

    def environment(self, ca_file: Path, secrets: Mapping[str, str]) -> dict[str, str]:
        return {
            **os.environ,
            "NODE_PATH": str(self.modules),
            "NODE_EXTRA_CA_CERTS": str(ca_file),
            **secrets,
        }

    async def run(
        self,
        script: str,
        *args: str,
        payload: Mapping[str, Any] | None = None,
        ca_file: Path,
        secrets: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> Any:
        """Run ``tests/node/<script>`` with ``args`` and the JSON ``payload``; its one JSON answer."""
        command = [self.node, str(SCRIPTS / script), *args, json.dumps(payload or {})]
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environment(ca_file, secrets or {}),
            cwd=SCRIPTS,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            what = f"did not finish in {timeout} s"
        else:
            what = f"exited {proc.returncode}" if proc.returncode != 0 else ""
        if what:
            raise NodeScriptError(f"{script} {' '.join(args)} {what}:\n{err.decode(errors='replace')}")
        return json.loads(out.decode().strip().splitlines()[-1])


ScriptClient = Callable[..., Awaitable[Any]]


def node_client(node_sdks: NodeSdks, emulator: Any, script: str, secrets: Mapping[str, str]) -> ScriptClient:
    """``await call(command, **payload)``: one run of ``tests/node/<script>`` against ``emulator``."""

    async def call(command: str, **payload: object) -> Any:
        return await node_sdks.run(
            script, command, payload=payload, ca_file=emulator.ca_path, secrets=secrets
        )

    return call


def dps_client(node_sdks: NodeSdks, emulator: Any) -> ScriptClient:
    """``dps_service.js`` (azure-iot-provisioning-service) with the emulator's DPS connection string."""
    secrets = {"DPS_CONNECTION_STRING": emulator.dps_connection_string}
    return node_client(node_sdks, emulator, "dps_service.js", secrets)


def hub_client(node_sdks: NodeSdks, emulator: Any, hub: str) -> ScriptClient:
    """``hub_service.js`` (azure-iothub) with the connection string of the emulator's ``hub``."""
    secrets = {"HUB_CONNECTION_STRING": emulator.hub_connection_string(hub)}
    return node_client(node_sdks, emulator, "hub_service.js", secrets)


def eventhub_client(node_sdks: NodeSdks, emulator: Any, hub: str) -> ScriptClient:
    """``eventhub_read.js`` (@azure/event-hubs) on the built-in endpoint of the emulator's ``hub``."""
    secrets = {"EVENTHUB_CONNECTION_STRING": emulator.eventhub_connection_string(hub)}
    return node_client(node_sdks, emulator, "eventhub_read.js", secrets)


def _why_unavailable() -> str | None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if path is None)
        why = UNAVAILABLE_NOTE.read_text().strip() if UNAVAILABLE_NOTE.exists() else "`make node` has not run"
        return f"{missing} not found ({why}); `make node` installs Debian's nodejs and npm"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < MIN_NODE_MAJOR:
        return f"node {version or '(unknown version)'} is older than {MIN_NODE_MAJOR}, which the SDKs need"
    return None


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((SCRIPTS / name).read_bytes())
    return digest.hexdigest()


def install() -> NodeSdks:
    """``npm ci`` of the pinned SDKs into the cache, unless it already holds this lock file's install (a
    file lock keeps concurrent test runs of one checkout from installing over each other)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = CACHE / "installed.sha256"
    wanted = _lock_digest()
    with (CACHE / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == wanted and (CACHE / "node_modules").is_dir()):
            stamp.unlink(missing_ok=True)
            for name in ("package.json", "package-lock.json"):
                shutil.copyfile(SCRIPTS / name, CACHE / name)
            npm = shutil.which("npm")
            assert npm is not None
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                cwd=CACHE,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"npm ci of tests/node/package-lock.json failed:\n{result.stderr[-3000:]}")
            stamp.write_text(wanted)
    node = shutil.which("node")
    assert node is not None
    return NodeSdks(node, CACHE / "node_modules")


@pytest.fixture(scope="session")
def node_sdks() -> Iterator[NodeSdks]:
    why = _why_unavailable()
    if why is not None:
        pytest.skip(why)
    yield install()
