"""The codes file: created 0600, appended, the last line with a code wins, a torn last line is dropped."""

from __future__ import annotations

import os
import stat

from factory_svc.enrollment.codes_file import HEADER, CodesFile, read_codes


def test_appends_keep_earlier_lines_and_the_last_code_of_a_device_wins(tmp_path):
    path = tmp_path / "codes.csv"
    first = CodesFile.open(path)
    first.append([("dev-a", "CREATED", "LIVE", "AAAA-AAAA-AAAA-AAAA", ""), ("dev-b", "", "", "", "BAD: no")])
    first.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = CodesFile.open(path)
    assert again.codes == {"dev-a": "AAAA-AAAA-AAAA-AAAA"}
    again.append(
        [("dev-a", "UNCHANGED", "LIVE", "", ""), ("dev-a", "ROTATED", "LIVE", "BBBB-BBBB-BBBB-BBBB", "")]
    )
    again.close()
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(HEADER) and len(lines) == 5  # one header, every line kept
    assert read_codes(path) == {"dev-a": "BBBB-BBBB-BBBB-BBBB"}


def test_a_line_torn_by_a_power_cut_is_ignored_and_the_next_starts_clean(tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text(
        ",".join(HEADER) + "\ndev-a,CREATED,LIVE,AAAA-AAAA-AAAA-AAAA,\ndev-b,CREATED,LIVE,CCCC-CC"
    )
    os.chmod(path, 0o644)
    codes = CodesFile.open(path)
    assert codes.codes == {"dev-a": "AAAA-AAAA-AAAA-AAAA"}
    codes.append([("dev-b", "UNCHANGED", "LIVE", "CCCC-CCCC-CCCC-CCCC", "")])
    codes.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # an older, more open file is closed down
    assert read_codes(path) == {"dev-a": "AAAA-AAAA-AAAA-AAAA", "dev-b": "CCCC-CCCC-CCCC-CCCC"}


def test_a_line_torn_inside_a_quoted_cell_does_not_swallow_the_lines_appended_after_it(tmp_path):
    # An error message with a comma is written quoted; a power cut in the middle of it leaves the quote open.
    # Had the torn line merely been ended, the open quote would take every later line into its cell.
    path = tmp_path / "codes.csv"
    path.write_text(
        ",".join(HEADER) + '\ndev-a,CREATED,LIVE,AAAA-AAAA-AAAA-AAAA,\ndev-b,,,,"DPS_REFUSED: no, not'
    )
    assert read_codes(path) == {"dev-a": "AAAA-AAAA-AAAA-AAAA"}
    codes = CodesFile.open(path)
    codes.append([("dev-c", "CREATED", "LIVE", "CCCC-CCCC-CCCC-CCCC", "")])
    codes.close()
    again = CodesFile.open(path)
    again.close()
    assert read_codes(path) == {"dev-a": "AAAA-AAAA-AAAA-AAAA", "dev-c": "CCCC-CCCC-CCCC-CCCC"}
    assert again.answers.keys() == {"dev-a", "dev-c"}
