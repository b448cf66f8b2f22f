"""The rekey stage's pure parts: the object id of a packet and the route of a message."""
from __future__ import annotations

import pytest

import config as cfg
from broker.rekey import Keyed, object_id_of, route
from broker.validate import Rejected
from schemas import Codec
from tests.helpers import mock_alert
from tests.rubin_schema import rubin_packet, rubin_schema

RUBIN_ID = 4242


@pytest.fixture(scope="module")
def codec():
    c = Codec()
    c.add_schema(RUBIN_ID, rubin_schema())
    return c


def test_object_id_from_dia_object_when_dia_source_has_none(codec):
    rec = rubin_packet(77, 1, 60000.0)
    assert rec["diaSource"]["diaObjectId"] is None
    assert object_id_of("rubin", rec) == 77
    assert object_id_of("rubin", rubin_packet(78, 1, 60000.0, in_source=True)) == 78
    assert object_id_of("rubin", rubin_packet(None, 1, 60000.0)) is None
    assert object_id_of("alert", {"diaObjectId": 5}) == 5


def test_route(codec):
    r = route(codec, codec.encode(rubin_packet(77, 1, 60001.5), schema_id=RUBIN_ID))
    assert r == Keyed(b"77", 60001.5)
    r = route(codec, codec.encode(rubin_packet(None, 2, 60001.5), schema_id=RUBIN_ID))
    assert isinstance(r, Rejected) and r.reason == "no_object_id"
    assert route(codec, b"\x01\x00\x00\x00\x01xx").reason == "bad_magic_byte"
    assert route(codec, b"\x00\x00\x00\x10\x00").reason == "unknown_schema_id"
    assert route(codec, codec.encode(rubin_packet(77, 1, 6e4), schema_id=RUBIN_ID)[:-3]).reason \
        in ("truncated_frame", "bad_body")
    alert = mock_alert(diaObjectId=9)
    assert route(codec, codec.encode(alert, "alert")).key == b"9"


def test_group_prefix_and_source_connection(tmp_path, monkeypatch):
    conf = tmp_path / "c.yaml"
    conf.write_text("""
kafka: {security_protocol: SASL_SSL, sasl_mechanism: SCRAM-SHA-512, sasl_username: alice,
        ssl_ca_location: /tmp/ca.pem}
consumer: {group_prefix_user: true}
rekey:
  group_prefix_user: true
  source: {bootstrap_servers: "rubin:9094", security_protocol: SASL_SSL,
           sasl_mechanism: SCRAM-SHA-512, sasl_username: bob-int}
""")
    s = cfg.load(conf, env={})
    assert s.consumer_group() == "alice-ulens-broker"
    assert s.consumer_group("alice-x") == "alice-x"
    assert s.rekey_group() == "bob-int-ulens-rekey"
    monkeypatch.setenv("ULENS_KAFKA_SASL_PASSWORD", "pw-ours")
    ours = s.kafka.client_config()
    assert ours["sasl.mechanism"] == "SCRAM-SHA-512" and ours["ssl.ca.location"] == "/tmp/ca.pem"
    monkeypatch.delenv("ULENS_REKEY_SASL_PASSWORD", raising=False)
    with pytest.raises(cfg.ConfigError, match="ULENS_REKEY_SASL_PASSWORD"):
        s.rekey_source_config()
    monkeypatch.setenv("ULENS_REKEY_SASL_PASSWORD", "pw-rubin")
    src = s.rekey_source_config()
    assert src == {"bootstrap.servers": "rubin:9094", "security.protocol": "SASL_SSL",
                   "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "bob-int",
                   "sasl.password": "pw-rubin"}
