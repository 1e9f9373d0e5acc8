"""The twin query subset (pure): what is supported answers exactly, everything else is refused with a
message naming the problem."""

from __future__ import annotations

import re

import pytest

from azure_iot_emulator.hub.query import QueryError, parse_query

TWINS = [
    {"deviceId": "a", "status": "enabled", "tags": {"site": "north", "line": 1},
     "properties": {"reported": {"fw": "1.0", "temp": 20.5}, "desired": {}}},
    {"deviceId": "b", "status": "enabled", "tags": {"site": "north", "line": 2},
     "properties": {"reported": {"fw": "2.0", "temp": 31}, "desired": {}}},
    {"deviceId": "c", "status": "disabled", "tags": {"site": "south"},
     "properties": {"reported": {"fw": "2.0"}, "desired": {}}},
    {"deviceId": "d", "status": "enabled", "tags": {},
     "properties": {"reported": {"fw": None, "temp": "hot"}, "desired": {}}},
]


def ids(query: str) -> list[str]:
    return [row["deviceId"] for row in parse_query(query).run(TWINS)]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT * FROM devices", ["a", "b", "c", "d"]),
        ("select * from DEVICES where tags.site = 'north'", ["a", "b"]),
        ('SELECT * FROM devices WHERE tags.site = "north" AND properties.reported.temp > 25', ["b"]),
        ("SELECT * FROM devices WHERE properties.reported.temp >= 20.5", ["a", "b"]),  # 'hot' is no number
        ("SELECT * FROM devices WHERE tags.line != 1", ["b"]),  # missing tags.line: not compared
        ("SELECT * FROM devices WHERE tags.site = 'south' OR status = 'enabled' AND tags.line = 2",
         ["b", "c"]),
        ("SELECT * FROM devices WHERE (tags.site = 'south' OR status = 'enabled') AND NOT tags.line = 2",
         ["a"]),  # c and d have no tags.line: NOT of undefined is undefined
        ("SELECT * FROM devices WHERE NOT tags.line = 2 OR tags.site = 'south'", ["a", "c"]),
        ("SELECT * FROM devices WHERE properties.reported.fw IN ['2.0', '3.0']", ["b", "c"]),
        ("SELECT * FROM devices WHERE IS_DEFINED(tags.line)", ["a", "b"]),
        ("SELECT * FROM devices WHERE NOT IS_DEFINED(tags.site)", ["d"]),
        ("SELECT * FROM devices WHERE properties.reported.fw = null", ["d"]),
        ("SELECT * FROM devices WHERE tags.site = 'NORTH'", []),  # values are case-sensitive
    ],
)
def test_where(query, expected):
    assert ids(query) == expected


def test_count_projection_and_group_by():
    assert parse_query("SELECT COUNT() AS n FROM devices WHERE status = 'enabled'").run(TWINS) == [{"n": 3}]
    assert parse_query("SELECT COUNT() FROM devices").run(TWINS) == [{"$1": 4}]
    grouped = parse_query(
        "SELECT properties.reported.fw AS fw, COUNT() AS numberOfDevices FROM devices "
        "GROUP BY properties.reported.fw"
    ).run(TWINS)
    assert grouped == [
        {"fw": "1.0", "numberOfDevices": 1},
        {"fw": "2.0", "numberOfDevices": 2},
        {"fw": None, "numberOfDevices": 1},
    ]
    by_site = parse_query("SELECT tags.site, COUNT() FROM devices GROUP BY tags.site").run(TWINS)
    assert by_site == [{"site": "north", "$2": 2}, {"site": "south", "$2": 1}, {"$2": 1}]
    assert parse_query("SELECT deviceId, tags.site FROM devices WHERE tags.line = 1").run(TWINS) == [
        {"deviceId": "a", "site": "north"}
    ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "empty"),
        ("SELECT * FROM devices.modules", "only FROM devices"),
        ("SELECT * FROM devices ORDER BY deviceId", "ORDER BY"),
        ("SELECT TOP 5 * FROM devices", "expected"),
        ("SELECT * FROM devices WHERE tags.x LIKE 'a%'", "comparison operator"),
        ("SELECT * FROM devices WHERE STARTSWITH(deviceId, 'a')", "comparison operator"),
        ("SELECT * FROM devices WHERE tags.x = ", "literal"),
        ("SELECT * FROM devices WHERE (tags.x = 1", "')'"),
        ("SELECT * FROM devices WHERE tags.x = 1;", "unsupported syntax"),
        ("SELECT * FROM devices GROUP BY tags.x", "SELECT * cannot be grouped"),
        ("SELECT tags.x FROM devices GROUP BY tags.x", "COUNT()"),
        ("SELECT tags.x, COUNT() FROM devices", "GROUP BY"),
        ("SELECT tags.y, COUNT() FROM devices GROUP BY tags.x", "must be grouped"),
        ("SELECT AVG(properties.reported.temp) FROM devices", "expected"),
        ("DELETE FROM devices", "SELECT"),
        ("SELECT * FROM devices WHERE deviceId = 'it''s'", "unsupported syntax"),
    ],
)
def test_unsupported_or_malformed_is_a_clear_error(query, message):
    with pytest.raises(QueryError, match=re.escape(message)):
        parse_query(query)
