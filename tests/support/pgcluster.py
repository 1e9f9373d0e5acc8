"""The tests' throwaway PostgreSQL cluster (``devprov_demo.pgcluster``), and why it may be unavailable."""

from __future__ import annotations

from pathlib import Path

from devprov_demo.pgcluster import Cluster, running_cluster
from devprov_demo.pgcluster import unavailable as _unavailable

REPO = Path(__file__).resolve().parents[2]

__all__ = ["Cluster", "running_cluster", "unavailable"]


def unavailable() -> str | None:
    """Why no cluster can be started here; ``make postgresql`` writes its reason into the venv."""
    return _unavailable(REPO / ".venv" / "postgresql-unavailable")
