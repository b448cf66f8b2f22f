"""The wire codec: every sample round-trips; each kind of bad frame fails specifically."""
import json
import struct

import fastavro
import pytest

import schemas
from schemas import (BadBody, BadMagicByte, Codec, CodecError, TruncatedFrame, UnknownSchemaId,
                     WrongKind)
from tests.helpers import mock_alert


@pytest.fixture(scope="module")
def codec():
    return Codec()


def all_sample_ids():
    return [int(i) for i in schemas.registry()["schemas"]]


@pytest.mark.parametrize("sid", all_sample_ids())
def test_every_sample_round_trips(codec, sid):
    recs = schemas.samples(sid)
    assert recs, f"no samples shipped for schema id {sid}"
    for rec in recs:
        data = codec.encode(rec, schema_id=sid)
        assert data[0] == 0 and struct.unpack(">I", data[1:5])[0] == sid
        got_sid, got = codec.decode(data)
        assert got_sid == sid and got == rec


def test_every_field_has_a_doc_and_optional_fields_default_null():
    for sid in all_sample_ids():
        schema = schemas.load_schema_json(sid)
        stack = [schema]
        while stack:
            rec = stack.pop()
            for f in rec["fields"]:
                assert f.get("doc"), f"schema {sid}: field {f['name']} has no doc"
                t = f["type"]
                if isinstance(t, list):
                    assert t[0] == "null" and "default" in f and f["default"] is None
                    t = t[1]
                if isinstance(t, dict) and t.get("type") == "array" and isinstance(t["items"], dict):
                    stack.append(t["items"])


def test_namespace_and_path_carry_the_version():
    reg = schemas.registry()
    for sid, path in reg["schemas"].items():
        kind, major, minor, fname = path.split("/")
        ns = schemas.load_schema_json(int(sid))["namespace"]
        assert ns == f"ulens.{kind}.v{major}_{minor}"
        assert fname.startswith(ns)
    assert set(reg["latest"]) == {"alert", "trigger", "truth"}


def test_latest_pointer_is_used_for_encoding(codec):
    data = codec.encode(mock_alert(), "alert")
    assert struct.unpack(">I", data[1:5])[0] == schemas.registry()["latest"]["alert"]


def test_wrong_magic_byte(codec):
    data = bytearray(codec.encode(mock_alert()))
    data[0] = 7
    with pytest.raises(BadMagicByte, match="magic byte is 7"):
        codec.decode(bytes(data))


def test_unknown_schema_id(codec):
    data = bytearray(codec.encode(mock_alert()))
    data[1:5] = struct.pack(">I", 999)
    with pytest.raises(UnknownSchemaId, match="999"):
        codec.decode(bytes(data))


@pytest.mark.parametrize("cut", [0, 3, 5, 12, -1])
def test_truncated(codec, cut):
    data = codec.encode(mock_alert())
    with pytest.raises((TruncatedFrame, BadBody)):
        codec.decode(data[:cut])


def test_truncated_header_is_truncated_frame(codec):
    with pytest.raises(TruncatedFrame, match="shorter than the 5-byte header"):
        codec.decode(b"\x00\x00")


def test_trailing_bytes(codec):
    with pytest.raises(BadBody, match="trailing bytes"):
        codec.decode(codec.encode(mock_alert()) + b"\x00\x01")


def test_wrong_kind(codec):
    trig = schemas.samples(codec.schema_id("trigger"))[0]
    with pytest.raises(WrongKind):
        codec.decode_kind(codec.encode(trig, "trigger"), "alert")


def test_encode_rejects_a_record_that_does_not_fit(codec):
    rec = mock_alert()
    del rec["diaObjectId"]
    with pytest.raises(CodecError, match="does not match schema"):
        codec.encode(rec)


def test_errors_are_value_errors():
    for cls in (BadMagicByte, UnknownSchemaId, TruncatedFrame, BadBody, WrongKind):
        assert issubclass(cls, CodecError) and issubclass(cls, ValueError)


def test_decoding_garbage_never_raises_anything_but_codec_errors(codec):
    import random
    rnd = random.Random(7)
    for _ in range(2000):
        n = rnd.randint(0, 80)
        data = bytes([0, 0, 0, 0, 1]) + bytes(rnd.getrandbits(8) for _ in range(n))
        try:
            codec.decode(data)
        except CodecError:
            pass


# ---------------------------------------------------------------------------- run-time schemas

def _schema(ns: str, name: str, extra: str = "x") -> dict:
    return {"type": "record", "name": name, "namespace": ns, "doc": "test",
            "fields": [{"name": extra, "type": "long", "doc": "a field"}]}


@pytest.mark.parametrize("schema, kind", [
    (_schema("lsst.v11_1", "alert"), "rubin"),
    ({"type": "record", "name": "lsst.v10_0.alert", "fields": []}, "rubin"),   # full name in "name"
    (_schema("ulens.alert.v1_0", "alert"), "alert"),
    (_schema("ulens.trigger.v1_0", "trigger"), "trigger"),
])
def test_kind_of_schema_by_full_name(schema, kind):
    assert schemas.kind_of_schema(schema) == kind


@pytest.mark.parametrize("schema", [_schema("lsst.v11_1", "diaSource"), _schema("ztf", "alert"), {}, "long"])
def test_kind_of_schema_refuses_other_schemas(schema):
    with pytest.raises(CodecError, match="neither a Rubin alert packet"):
        schemas.kind_of_schema(schema)


def test_add_schema_makes_an_id_known_and_keeps_ids_immutable():
    c = Codec()
    s = _schema("lsst.v99_1", "alert")
    assert not c.known(9901)
    c.add_schema(9901, s)
    c.add_schema(9901, s)                                    # the same schema again: fine
    c.add_schema(9901, fastavro.parse_schema(s))             # already parsed: the same
    assert c.known(9901) and c.kind_of(9901) == "rubin"
    data = c.encode({"x": 5}, schema_id=9901)
    assert data[:5] == b"\x00" + struct.pack(">I", 9901)
    assert c.decode(data) == (9901, {"x": 5})
    assert c.decode_kinds(data, ("alert", "rubin")) == ("rubin", {"x": 5})
    with pytest.raises(CodecError, match="already known with another schema"):
        c.add_schema(9901, _schema("lsst.v99_1", "alert", extra="y"))
    with pytest.raises(CodecError, match="already known with another schema"):
        c.add_schema(1, s)                                   # a registry id
    c.add_schema(9902, _schema("lsst.v99_2", "alert"), kind="alert")   # an explicit kind wins
    assert c.kind_of(9902) == "alert"
    assert not Codec().known(9901)                           # per codec, not global


def test_resolver_is_asked_once_per_unknown_id():
    asked = []

    def resolver(sid):
        asked.append(sid)
        return _schema("lsst.v77_0", "alert") if sid == 7700 else None

    c = Codec(resolver=resolver)
    other = Codec()
    other.add_schema(7700, _schema("lsst.v77_0", "alert"))
    data = other.encode({"x": 1}, schema_id=7700)
    assert c.decode(data) == (7700, {"x": 1}) and c.decode(data) == (7700, {"x": 1})
    assert c.kind_of(7700) == "rubin"
    bad = b"\x00" + struct.pack(">I", 4242) + b"\x02"
    for _ in range(3):
        with pytest.raises(UnknownSchemaId, match="4242"):
            c.decode(bad)
    assert asked == [7700, 4242]
    c.decode(c.encode(mock_alert()))                         # registry ids never ask
    assert asked == [7700, 4242]


def test_a_failing_resolver_is_asked_again_later():
    calls = {"n": 0}

    def resolver(sid):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("registry away")
        return _schema("lsst.v77_0", "alert")

    other = Codec()
    other.add_schema(7700, _schema("lsst.v77_0", "alert"))
    data = other.encode({"x": 3}, schema_id=7700)
    c = Codec(resolver=resolver)
    with pytest.raises(ConnectionError):
        c.decode(data)
    assert c.decode(data) == (7700, {"x": 3}) and calls["n"] == 2


def test_decode_kinds_names_the_kind_or_refuses():
    c = Codec()
    alert = c.encode(mock_alert())
    kind, rec = c.decode_kinds(alert, ("rubin", "alert"))
    assert kind == "alert" and rec["diaObjectId"] == mock_alert()["diaObjectId"]
    assert c.decode_kinds(alert, "alert")[0] == "alert"
    with pytest.raises(WrongKind, match="expected trigger or truth"):
        c.decode_kinds(alert, ("trigger", "truth"))
