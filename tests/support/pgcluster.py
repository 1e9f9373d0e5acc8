"""The tests' throwaway PostgreSQL cluster (``devprov_demo.pgcluster``), and why it may be unavailable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import psycopg

from devprov_demo.pgcluster import Cluster, running_cluster
from devprov_demo.pgcluster import unavailable as _unavailable

REPO = Path(__file__).resolve().parents[2]

__all__ = ["Cluster", "database_away", "running_cluster", "unavailable"]


def unavailable() -> str | None:
    """Why no cluster can be started here; ``make postgresql`` writes its reason into the venv."""
    return _unavailable(REPO / ".venv" / "postgresql-unavailable")


@contextlib.contextmanager
def database_away(cluster: Cluster, url: str) -> Iterator[None]:
    """The database of ``url`` unreachable while inside: its open connections ended and new ones refused
    (as after the server went down, for that database only); reachable again on leaving."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    try:
        yield
    finally:
        with psycopg.connect(cluster.url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
