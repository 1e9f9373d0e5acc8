"""The ``migrate`` command both services have: each store's tables brought to this program's version."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from dbstore import DatabaseUrl


class Closable(Protocol):
    async def close(self) -> None: ...


def run_migrations(url: DatabaseUrl, stores: Sequence[tuple[str, Callable[[], Awaitable[Closable]]]]) -> int:
    """Open each store with its migrations applied, then close it; print one line per store."""

    async def go() -> None:
        for name, open_store in stores:
            store = await open_store()
            await store.close()
            print(f"{name}: migrated to this version at {url.redacted()}")

    asyncio.run(go())
    return 0


def add_migrate_command(sub: argparse._SubParsersAction[Any], config_variable: str) -> None:
    migrate = sub.add_parser(
        "migrate",
        allow_abbrev=False,
        help="bring the tables of the service's database to this version (required on PostgreSQL)",
    )
    migrate.add_argument("--config", type=Path, help=f"TOML settings file (or {config_variable})")
