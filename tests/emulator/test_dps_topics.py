"""DPS topics against the device SDK's own topic functions: what the SDK builds we parse, what we build
the SDK parses (rid echoed exactly, integer retry-after, status code)."""

from __future__ import annotations

from azure.iot.device.provisioning.pipeline import mqtt_topic_provisioning as sdk
from hypothesis import given, settings
from hypothesis import strategies as st

from azure_iot_emulator.dps import topics

rids = st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=30).filter(lambda t: "\x00" not in t))


@given(rids, st.text(min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_sdk_request_topics_parse(rid, operation_id):
    assert topics.classify(sdk.get_register_topic_for_publish(rid)) == topics.Register(rid)
    assert topics.classify(sdk.get_query_topic_for_publish(rid, operation_id)) == topics.Poll(
        rid, operation_id
    )


@given(rids, st.sampled_from([200, 202, 400, 401, 404, 429, 500]), st.none() | st.integers(0, 60))
@settings(max_examples=200, deadline=None)
def test_our_response_topics_parse_in_the_sdk(rid, status, retry_after):
    topic = topics.response_topic(status, rid, retry_after)
    assert sdk.is_dps_response_topic(topic)
    assert int(sdk.extract_status_code_from_dps_response_topic(topic)) == status
    props = sdk.extract_properties_from_dps_response_topic(topic)
    assert props["rid"] == rid
    if retry_after is not None:
        assert int(props["retry-after"], 10) == retry_after
    else:
        assert "retry-after" not in props
    assert topic.count("$") == 2  # "$dps" and "$rid" only: the SDK splits on "$"


def test_username_and_foreign_topics():
    parsed = topics.parse_username("0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=x")
    assert parsed == topics.DpsUsername("0ne00000001", "dev-1")
    assert topics.parse_username("hub.local/dev-1/?api-version=2019-10-01") is None
    assert topics.parse_username(None) is None
    for topic in ("devices/dev-1/messages/events/", "$dps/registrations/PUT/iotdps-register/", "$dps/x"):
        assert topics.classify(topic) is None
