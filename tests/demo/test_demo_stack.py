"""The stack wipes only a work directory it made itself."""

from __future__ import annotations

import pytest

from devprov_demo.stack import MARKER, Stack, StackConfig


@pytest.mark.parametrize("fresh", [True, False])
def test_a_foreign_non_empty_directory_is_refused_and_kept(tmp_path, fresh):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(RuntimeError, match="not a stack's work directory"):
        Stack(StackConfig(work_dir=tmp_path)).start(fresh=fresh)
    assert precious.read_text() == "mine"
    assert not (tmp_path / MARKER).exists()
