"""Message routes without sockets: the settings that declare them (refused at start-up with a message
naming the route and the problem), the routing decisions (fallback route included) and the notifications
the hub domain writes to the built-in endpoint, read back as the AMQP side reads them."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from azure_iot_emulator import cli
from azure_iot_emulator.config import build_config
from azure_iot_emulator.hub.eventhub.model import partition_of
from azure_iot_emulator.hub.part import HubPart
from azure_iot_emulator.hub.registry import DeviceSpec
from azure_iot_emulator.hub.routing import (
    RouteError,
    RouteSpec,
    build_routing,
    message_row,
    parse_route_flag,
)
from azure_iot_emulator.hub.telemetry import TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.store import Database
from mainkit.settings import SettingsError

HUBS = ("127.0.0.2", "127.0.0.3")


def test_route_flags_name_an_optional_hub_a_source_and_an_optional_condition():
    assert parse_route_flag("twins:TwinChangeEvents") == RouteSpec("twins", "TwinChangeEvents")
    assert parse_route_flag("127.0.0.3/hot:DeviceMessages:level = 'a:b'") == RouteSpec(
        "hot", "DeviceMessages", "level = 'a:b'", hub="127.0.0.3"
    )
    with pytest.raises(RouteError, match=r"\[HUB/\]NAME:SOURCE"):
        parse_route_flag("no-source")


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        (RouteSpec("a", "Telemetry"), "unknown source 'Telemetry'"),
        (RouteSpec("a", "ModuleLifecycleEvents"), "ModuleLifecycleEvents is not emulated"),
        (RouteSpec("a", "DeviceMessages", endpoint="storage"), "endpoint 'storage' is not emulated"),
        (RouteSpec("bad name", "DeviceMessages"), "1-64 letters"),
        (RouteSpec("a", "DeviceMessages", "level = "), "expected a literal"),
        (RouteSpec("a", "DeviceMessages", "$twin.tags.x = 1"), r"\$twin"),
        (RouteSpec("a", "DeviceMessages", "$enqueuedTime > '2024'"), r"\$enqueuedTime is not a system"),
        (RouteSpec("a", "DeviceMessages", hub="127.0.0.9"), "'127.0.0.9' is not one of the hubs"),
    ],
)
def test_a_route_the_emulator_cannot_take_is_refused_naming_it(route, problem):
    with pytest.raises(RouteError, match=problem):
        build_routing([route], None, HUBS)


def test_route_names_are_unique_per_hub_and_the_fallback_names_known_hubs():
    twice = [RouteSpec("a", "DeviceMessages"), RouteSpec("A", "TwinChangeEvents", hub="127.0.0.2")]
    with pytest.raises(RouteError, match=r"'A' is defined twice for hub 127\.0\.0\.2"):
        build_routing(twice, None, HUBS)
    with pytest.raises(RouteError, match="fallback route: nohub not among the hubs"):
        build_routing([], ["nohub"], HUBS)
    routing = build_routing([RouteSpec("a", "DeviceMessages", hub="127.0.0.2")], ["127.0.0.3"], HUBS)
    assert [r.name for r in routing["127.0.0.2"].routes] == ["a"] and not routing["127.0.0.2"].fallback
    assert routing["127.0.0.3"].routes == () and routing["127.0.0.3"].fallback


def test_settings_file_routes_and_the_fallback_route(tmp_path):
    settings = tmp_path / "emulator.toml"
    settings.write_text(
        'fallback_route = ["127.0.0.3"]\n'
        "[[routes]]\nname = \"twins\"\nsource = \"TwinChangeEvents\"\nhub = \"127.0.0.2\"\n"
        "[[routes]]\nname = \"off\"\nsource = \"DeviceMessages\"\nenabled = false\n"
    )
    config = build_config(settings, {}, env={})
    routing = config.routing()
    assert [(r.name, r.enabled) for r in routing["127.0.0.2"].routes] == [("twins", True), ("off", False)]
    assert [r.name for r in routing["127.0.0.3"].routes] == ["off"]
    assert (routing["127.0.0.2"].fallback, routing["127.0.0.3"].fallback) == (False, True)
    # Flags replace the file's routes; the environment takes a JSON array.
    given = {"routes": ["life:DeviceLifecycleEvents"], "fallback_route": "off"}
    flags = build_config(settings, given, env={})
    assert [r.name for r in flags.routes] == ["life"] and flags.fallback_route == ()
    env = build_config(None, {}, env={"IOT_EMULATOR_ROUTES": '[{"name": "c", "source": "DeviceMessages"}]'})
    assert env.routes == (RouteSpec("c", "DeviceMessages"),)
    settings.write_text('[[routes]]\nname = "x"\nsource = "TwinChangeEvents"\nendpoints = ["events"]\n')
    with pytest.raises(SettingsError, match=r"route 'x': unknown keys \['endpoints'\]"):
        build_config(settings, {}, env={})


def test_serve_refuses_a_bad_route_at_start_up_with_one_line(capsys):
    code = cli.main(["serve", "--route", "hot:DeviceMessages:temperature >", "--data-dir", "/nonexistent/x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "route 'hot': condition 'temperature >'" in err


def test_device_messages_follow_the_routes_and_the_fallback_route():
    alert = PropertyBag({"contentType": "application/json", "contentEncoding": "utf-8"}, {"level": "alert"})
    plain = PropertyBag({}, {"level": "info"})
    routing = build_routing(
        [
            RouteSpec("alerts", "DeviceMessages", "level = 'alert' AND $body.t > 30", hub="127.0.0.2"),
            RouteSpec("alerts", "DeviceMessages", "level = 'alert'", hub="127.0.0.3"),
            RouteSpec("twins", "TwinChangeEvents"),
        ],
        ["127.0.0.2"],
        HUBS,
    )
    with_fallback, without = routing["127.0.0.2"], routing["127.0.0.3"]
    hot, cold = message_row("d", alert, b'{"t": 31}'), message_row("d", alert, b'{"t": 3}')
    assert with_fallback.device_message(hot) and with_fallback.device_message(cold)  # route, then fallback
    assert without.device_message(hot) and not without.device_message(message_row("d", plain, b"x"))
    assert message_row("d", plain, b'{"t": 1}').get("$body") is None  # not declared JSON: no body
    assert message_row("d", alert, b"{not json")["$connectionDeviceId"] == "d"
    assert build_routing([], None, HUBS)["127.0.0.2"].all_device_messages


@pytest.fixture
def hub(tmp_path):
    """One hub part as the emulator wires it, with routes for twin changes and lifecycle events (the
    second hub: twin changes only, and device messages only when they are alerts)."""
    clock = [datetime(2026, 3, 1, 12, 0, tzinfo=UTC)]
    db = Database(tmp_path / "emulator.db")
    routing = build_routing(
        [
            RouteSpec("twins", "TwinChangeEvents"),
            RouteSpec("life", "DeviceLifecycleEvents", hub=HUBS[0]),
            RouteSpec("alerts", "DeviceMessages", "level = 'alert'", hub=HUBS[1]),
        ],
        [HUBS[0]],
        HUBS,
    )
    part = HubPart(db, HUBS, lambda: clock[0], dict, routing=routing)
    yield part
    db.close()


def events_of(part, hub: str, device_id: str):
    since = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(days=1)
    return part.eventhub.store.read(hub, partition_of(device_id, 4), 0, 100, since)


async def test_twin_changes_and_lifecycle_reach_the_built_in_endpoint_as_azure_describes_them(hub):
    service = hub.service
    service.put_device(HUBS[0], "dev-1", {"deviceId": "dev-1", "authentication": {"type": "sas"}}, None)
    etag = service.get_twin(HUBS[0], "dev-1")["etag"]
    patch = {"tags": {"site": "a"}, "properties": {"desired": {"fw": "2.0"}}}
    await service.update_twin(HUBS[0], "dev-1", patch, etag, replace_all=False)
    await service.patch_reported(HUBS[0], "dev-1", b'{"fw": "1.0"}')
    await service.update_twin(HUBS[0], "dev-1", {"tags": {"site": "b"}}, None, replace_all=True)
    service.delete_device(HUBS[0], "dev-1", None)
    events = events_of(hub, HUBS[0], "dev-1")
    kinds = [(e.source, e.application_properties["opType"]) for e in events]
    assert kinds == [
        ("deviceLifecycleEvents", "createDeviceIdentity"),
        ("twinChangeEvents", "updateTwin"),
        ("twinChangeEvents", "updateTwin"),
        ("twinChangeEvents", "replaceTwin"),
        ("deviceLifecycleEvents", "deleteDeviceIdentity"),
    ]
    created, desired, reported, replaced, deleted = events
    assert created.application_properties == {
        "hubName": HUBS[0],
        "deviceId": "dev-1",
        "operationTimestamp": "2026-03-01T12:00:00.0000000Z",
        "iothub-message-schema": "deviceLifecycleNotification",
        "opType": "createDeviceIdentity",
    }
    assert created.system_properties["contentType"] == "application/json"
    assert created.system_properties["userId"] == HUBS[0]
    body = json.loads(created.body)
    assert (body["deviceId"], body["version"], body["properties"]["desired"]["$version"]) == ("dev-1", 1, 1)
    assert desired.application_properties["iothub-message-schema"] == "twinChangeNotification"
    change = json.loads(desired.body)
    assert change["version"] == 2 and change["tags"] == {"site": "a"}
    assert change["properties"]["desired"]["fw"] == "2.0" and change["properties"]["desired"]["$version"] == 2
    assert "fw" in change["properties"]["desired"]["$metadata"]
    assert json.loads(reported.body)["properties"] == {
        "reported": {
            "fw": "1.0",
            "$metadata": {
                "fw": {"$lastUpdated": "2026-03-01T12:00:00.0000000Z"},
                "$lastUpdated": "2026-03-01T12:00:00.0000000Z",
            },
            "$version": 2,
        }
    }
    whole = json.loads(replaced.body)
    assert whole["tags"] == {"site": "b"} and whole["properties"]["reported"]["fw"] == "1.0"
    assert json.loads(deleted.body)["etag"] == whole["etag"]  # the twin as it was when deleted
    # Nothing the change did not report: device messages still go to the built-in endpoint (fallback).
    await service.ingest(HUBS[0], "dev-1", PropertyBag(), b"telemetry")
    assert events_of(hub, HUBS[0], "dev-1")[-1].source == "Telemetry"


async def test_a_hub_takes_only_the_sources_it_routes_and_no_route_drops_device_messages(hub):
    service, registry = hub.service, hub.registry
    registry.create_device(HUBS[1], DeviceSpec(device_id="dev-2"))  # no lifecycle route on this hub
    await service.patch_reported(HUBS[1], "dev-2", b'{"a": 1}')
    await service.ingest(HUBS[1], "dev-2", PropertyBag({}, {"level": "info"}), b"dropped")
    await service.ingest(HUBS[1], "dev-2", PropertyBag({}, {"level": "alert"}), b"routed")
    assert [(e.source, e.body) for e in events_of(hub, HUBS[1], "dev-2")][1:] == [("Telemetry", b"routed")]
    assert events_of(hub, HUBS[1], "dev-2")[0].source == "twinChangeEvents"
    # The dropped message is still the hub's record of what the device sent (REST extension, CLI).
    assert [m.body for m in hub.telemetry.recent(hub=HUBS[1], device_id="dev-2")] == [b"dropped", b"routed"]


async def test_a_refused_twin_change_writes_no_event(hub):
    service = hub.service
    hub.registry.create_device(HUBS[0], DeviceSpec(device_id="dev-3"))
    with pytest.raises(Exception, match="property name"):
        await service.patch_reported(HUBS[0], "dev-3", b'{"a.b": 1}')
    assert [e.application_properties["opType"] for e in events_of(hub, HUBS[0], "dev-3")] == [
        "createDeviceIdentity"
    ]


def test_a_data_dir_from_before_routes_keeps_its_messages_as_telemetry(tmp_path):
    """Schema version 2 adds ``hub_messages.source`` to a version-1 file; its messages are telemetry."""
    path = tmp_path / "emulator.db"
    old = sqlite3.connect(path)
    old.execute(
        """CREATE TABLE hub_messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, hub TEXT NOT NULL,
           device_id TEXT NOT NULL, enqueued_time TEXT NOT NULL, system_properties TEXT NOT NULL,
           application_properties TEXT NOT NULL, body BLOB NOT NULL)"""
    )
    old.execute(
        "INSERT INTO hub_messages (hub, device_id, enqueued_time, system_properties, application_properties,"
        " body) VALUES ('h', 'd', '2026-01-01T00:00:00.0000000Z', '{}', '{}', x'6f6c64')"
    )
    old.execute("PRAGMA user_version = 1")
    old.commit()
    old.close()
    db = Database(path)
    try:
        store = TelemetryStore(db, lambda: datetime(2026, 1, 2, tzinfo=UTC))
        assert [(m.body, m.source) for m in store.recent(hub="h")] == [(b"old", "Telemetry")]
        store.insert_event("h", "d", "twinChangeEvents", {}, {"opType": "updateTwin"}, b"{}")
        assert [m.body for m in store.recent(hub="h")] == [b"old"]  # the telemetry readers skip events
    finally:
        db.close()
