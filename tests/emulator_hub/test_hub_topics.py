"""Hub topic parsing/building and the property bag codec."""

from __future__ import annotations

import urllib.parse

from hypothesis import given
from hypothesis import strategies as st

from azure_iot_emulator.hub import topics as t


def test_parse_username_of_the_device_sdk():
    name = t.parse_username(
        "127.0.0.2/dev-001/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0"
    )
    assert name == t.HubUsername("127.0.0.2", "dev-001", None, "2019-10-01")
    assert t.parse_username("0ne00000001/registrations/dev-001/api-version=2019-03-31") is None
    assert t.parse_username(None) is None
    assert t.parse_username("host//?api-version=1") is None


def test_sdk_telemetry_topic_decodes():
    topic = (
        "devices/dev-001/messages/events/%24.mid=id1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=hi%20there"
    )
    kind = t.classify_publish("dev-001", topic)
    assert kind == t.Telemetry(
        t.PropertyBag(
            {"messageId": "id1", "contentType": "application/json", "contentEncoding": "utf-8"},
            {"alert": "hi there"},
        )
    )
    assert t.classify_publish("dev-001", "devices/dev-001/messages/events/") == t.Telemetry(t.PropertyBag())
    assert t.classify_publish("dev-001", "devices/dev-001/messages/events") == t.Telemetry(t.PropertyBag())


def test_other_devices_topics_and_desired_writes_are_forbidden():
    for topic in (
        "devices/dev-002/messages/events/",
        "devices/dev-001/messages/devicebound/x",
        "$iothub/twin/PATCH/properties/desired/?$rid=1",
        "$iothub/twin/GET/",
        "$iothub/methods/res/abc/?$rid=1",
        "$iothub/methods/res/200/",
        "something/else",
    ):
        assert isinstance(t.classify_publish("dev-001", topic), t.Forbidden), topic


def test_twin_and_method_topics():
    assert t.classify_publish("d", "$iothub/twin/GET/?$rid=abc") == t.TwinGet("abc")
    assert t.classify_publish("d", "$iothub/twin/PATCH/properties/reported/?$rid=r1") == t.TwinReportedPatch(
        "r1"
    )
    assert t.classify_publish("d", "$iothub/methods/res/200/?$rid=7") == t.MethodResponse(200, "7")
    assert t.twin_response_topic(204, "r1", 5) == "$iothub/twin/res/204/?$rid=r1&$version=5"
    assert t.desired_patch_topic(4) == "$iothub/twin/PATCH/properties/desired/?$version=4"
    assert t.method_request_topic("reboot now", "1") == "$iothub/methods/POST/reboot%20now/?$rid=1"


def test_may_subscribe():
    assert t.may_subscribe("d", "$iothub/twin/res/#")
    assert t.may_subscribe("d", "devices/d/messages/devicebound/#")
    assert not t.may_subscribe("d", "devices/e/messages/devicebound/#")
    assert not t.may_subscribe("d", "#")


texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
app_keys = texts.filter(lambda k: k and k not in t.SYSTEM_PROPERTIES)


@given(
    st.dictionaries(st.sampled_from(sorted(t.SYSTEM_PROPERTIES.values())), texts),
    st.dictionaries(app_keys, texts, max_size=6),
)
def test_property_bag_roundtrip(system, application):
    bag = t.PropertyBag(system, application)
    assert t.decode_property_bag(t.encode_property_bag(bag)) == bag


@given(st.dictionaries(app_keys, texts, max_size=6))
def test_sdk_style_encoding_decodes(custom):
    # exactly what azure-iot-device does for custom properties
    encoded = urllib.parse.urlencode(sorted(custom.items()), quote_via=urllib.parse.quote)
    kind = t.classify_publish("dev", "devices/dev/messages/events/" + encoded)
    assert kind == t.Telemetry(t.PropertyBag({}, custom))


_PIECES = st.sampled_from(["devices/", "dev-1", "dev-12", "/messages/events", "/", "%24.ct=a", "x", "?"])


@given(st.sampled_from(["dev-1", "dev-12", "d"]), st.lists(_PIECES, max_size=6).map("".join))
def test_telemetry_topic_is_exactly_the_devices_events_topic_or_below_it(device_id, topic):
    """The fast test of the telemetry topic says yes for exactly the device's events topic and the
    topics one level below it (with their property bag), whatever else a topic is made of."""
    events = f"devices/{device_id}/messages/events"
    properties = t.telemetry_properties(device_id, topic)
    if topic == events or topic.startswith(events + "/"):
        assert properties == t.decode_property_bag(topic[len(events) + 1 :])
        assert t.classify_publish(device_id, topic) == t.Telemetry(properties)
    else:
        assert properties is None
        assert not isinstance(t.classify_publish(device_id, topic), t.Telemetry)
