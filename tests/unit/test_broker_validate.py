"""Validation of decoded alerts: every reason, and valid alerts pass (no services)."""
import io
import json
import math

import fastavro
import numpy as np
import pytest

from broker.validate import (Rejected, check_magnitudes, DEAD_LETTER_MAX_BYTES, dead_letter, magnitudes,
                             validate_batch)
from schemas import HEADER, default_codec, load_schema_json
from tests.helpers import mock_alert
from training.photometry import mag_to_njy

CODEC = default_codec()


def enc(rec):
    return CODEC.encode(rec, "alert")


def key(rec):
    return str(rec["diaObjectId"]).encode()


def one(value, k):
    points, kept, rejected = validate_batch(CODEC, [value], [k])
    return points, rejected.get(0)


def test_valid_alert_passes_with_float32_magnitudes():
    rec = mock_alert()
    points, bad = one(enc(rec), key(rec))
    assert bad is None and len(points) == 1
    assert (points.object_id[0], points.source_id[0], points.time[0], points.produced_us[0]) == (
        rec["diaObjectId"], rec["diaSourceId"], rec["midpointMjdTai"], rec["alertProducedUs"])
    assert points.mag.dtype == np.float32 and points.mag_err.dtype == np.float32
    assert points.mag[0] == pytest.approx(31.4 - 2.5 * math.log10(rec["scienceFlux"]), rel=1e-6)


def test_magnitudes_round_trip_the_replay_fluxes_bit_exactly():
    rng = np.random.default_rng(0)
    mag = rng.uniform(12, 25, 10_000).astype(np.float32)
    err = rng.uniform(0.001, 0.5, 10_000).astype(np.float32)
    flux, ferr = mag_to_njy(mag, err)
    m2, e2 = magnitudes(flux, ferr)
    assert np.array_equal(m2, mag) and np.array_equal(e2, err)


def _missing_field_frame():
    schema = load_schema_json(CODEC.schema_id("alert"))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "scienceFluxErr"]
    rec = {k: v for k, v in mock_alert().items() if k != "scienceFluxErr"}
    buf = io.BytesIO()
    buf.write(HEADER.pack(0, CODEC.schema_id("alert")))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), rec)
    return buf.getvalue()


@pytest.mark.parametrize("make,reason", [
    (lambda: (b"\x00\x01", b"1"), "truncated_frame"),
    (lambda: (b"not avro at all, clearly", b"1"), "bad_magic_byte"),
    (lambda: (HEADER.pack(0, 999) + enc(mock_alert())[5:], b"1000001"), "unknown_schema_id"),
    (lambda: (_missing_field_frame(), b"1000001"), "truncated_frame"),  # body ends early
    (lambda: (enc(mock_alert()) + b"xx", b"1000001"), "bad_body"),
    (lambda: (enc(mock_alert(scienceFlux=float("nan"))), b"1000001"), "nonfinite_value"),
    (lambda: (enc(mock_alert(midpointMjdTai=float("inf"))), b"1000001"), "nonfinite_value"),
    (lambda: (enc(mock_alert(scienceFluxErr=-1.0)), b"1000001"), "nonpositive_error"),
    (lambda: (enc(mock_alert(psfFluxErr=0.0)), b"1000001"), "nonpositive_error"),
    (lambda: (enc(mock_alert(scienceFlux=0.0)), b"1000001"), "nonpositive_flux"),
    (lambda: (enc(mock_alert(scienceFlux=-5.0)), b"1000001"), "nonpositive_flux"),
    (lambda: (enc(mock_alert(diaSourceId=-1)), b"1000001"), "bad_id"),
    (lambda: (enc(mock_alert()), None), "bad_key"),
    (lambda: (enc(mock_alert()), b"42"), "bad_key"),
    (lambda: (enc(mock_alert(midpointMjdTai=2460000.5)), b"1000001"), "absurd_value"),
    (lambda: (enc(mock_alert(dec=-100.0)), b"1000001"), "absurd_value"),
    (lambda: (enc(mock_alert(band="Q")), b"1000001"), "absurd_value"),
    (lambda: (enc(mock_alert(scienceFlux=1e-9)), b"1000001"), "absurd_value"),
    (lambda: (enc(mock_alert(scienceFluxErr=1e12)), b"1000001"), "absurd_value"),
])
def test_each_problem_has_its_reason(make, reason):
    value, k = make()
    points, bad = one(value, k)
    assert len(points) == 0 and isinstance(bad, Rejected), bad
    assert bad.reason == reason and bad.detail


def test_wrong_kind():
    trig = json.loads(json.dumps(__import__("schemas").samples(CODEC.schema_id("trigger"))[0]))
    _, bad = one(CODEC.encode(trig, "trigger"), b"1")
    assert bad.reason == "wrong_kind"


def test_batch_keeps_the_good_around_the_bad():
    good = [mock_alert(diaSourceId=i, midpointMjdTai=61000.0 + i) for i in range(5)]
    values = [enc(good[0]), b"junk", enc(good[1]), enc(mock_alert(scienceFlux=float("nan"))),
              enc(good[2]), enc(good[3]), enc(good[4])]
    keys = [key(good[0])] * len(values)
    points, kept, rejected = validate_batch(CODEC, values, keys)
    assert kept == [0, 2, 4, 5, 6] and sorted(rejected) == [1, 3]
    assert list(points.source_id) == [0, 1, 2, 3, 4]


def test_check_magnitudes_vectorised():
    out = check_magnitudes(np.array([20, 50, 20], np.float32), np.array([0.1, 0.1, 0.0], np.float32))
    assert out[0] is None and out[1].reason == "absurd_value" and out[2].reason == "absurd_value"


def test_dead_letter_keeps_the_original_message_and_says_where_it_came_from():
    d = dead_letter(b"42", b"body", [("trace", b"abc")], "bad_body", "x", "alerts", 3, 17, "g")
    h = dict(d.headers)
    assert (d.key, d.value) == (b"42", b"body")
    assert h["trace"] == b"abc" and h["dlq.reason"] == b"bad_body"
    assert h["dlq.source.topic"] == b"alerts" and h["dlq.source.partition"] == b"3"
    assert h["dlq.source.offset"] == b"17" and h["dlq.consumer.group"] == b"g"
    assert not any(k.endswith((".truncated", ".dropped")) for k in h)


def _size(d) -> int:
    return len(d.key or b"") + len(d.value or b"") + sum(len(k) + len(v) for k, v in d.headers)


@pytest.mark.parametrize("key_len,value_len,n_headers", [
    (10, 3_000_000, 0), (2_000_000, 10, 0), (2_000_000, 2_000_000, 3), (10, 10, 5_000)])
def test_dead_letter_too_big_is_cut_to_a_prefix_that_says_how_long_it_was(key_len, value_len, n_headers):
    import hashlib

    rng = np.random.default_rng(key_len + value_len)
    key, value = rng.bytes(key_len), rng.bytes(value_len)
    original = [(f"h{i}", b"v" * 100) for i in range(n_headers)]
    d = dead_letter(key, value, original, "bad_magic_byte", "x" * 5000, "alerts", 0, 9, "g")
    h = dict(d.headers)
    assert _size(d) <= DEAD_LETTER_MAX_BYTES
    for got, orig, name in ((d.key, key, "key"), (d.value, value, "value")):
        assert got == orig[:len(got)] and len(got) > 0
        if got != orig:
            assert int(h[f"dlq.{name}.truncated"]) == len(orig)
            assert h[f"dlq.{name}.sha256"] == hashlib.sha256(orig).hexdigest().encode()
        else:
            assert f"dlq.{name}.truncated" not in h
    kept = [k for k, _ in d.headers if k.startswith("h")]
    assert kept == [k for k, _ in original[:len(kept)]]
    assert int(h.get("dlq.headers.dropped", b"0")) == n_headers - len(kept)
    assert h["dlq.reason"] == b"bad_magic_byte" and h["dlq.source.offset"] == b"9"


def test_dead_letter_of_a_message_without_key_or_value():
    d = dead_letter(None, None, None, "bad_key", "no key", "alerts", 0, 1, "g")
    assert d.key is None and d.value is None and dict(d.headers)["dlq.reason"] == b"bad_key"