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
