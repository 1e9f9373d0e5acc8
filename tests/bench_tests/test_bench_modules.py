"""Every benchmark (``bench/bench_<name>.py``) loads as ``make bench`` loads it and offers what the runner
calls (``TITLE``, ``run``): a benchmark whose imports broke is found here, not at the end of a long run."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_runner", BENCH / "__main__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUNNER = _runner()


@pytest.mark.parametrize("name", sorted(RUNNER.available()))
def test_a_benchmark_loads_as_the_runner_loads_it_and_has_a_title_and_a_run(name: str) -> None:
    path = dict(RUNNER.available())[name]
    saved = list(sys.path)
    try:
        module = RUNNER.load(name, path)
    finally:
        sys.path[:] = saved  # a benchmark puts bench/ and tests/ on the path: not this process's business
    assert isinstance(module.TITLE, str) and module.TITLE
    assert inspect.iscoroutinefunction(module.run)
