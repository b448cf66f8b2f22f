"""A Rubin packet becomes the broker's internal points, per band, with its history (no services).

The packets here are dicts shaped like ``lsst.v11_1.alert`` (field names and nullability as
Rubin's schema; only the fields the broker reads); the test schema below is a small Avro
schema named ``lsst.vtest.alert`` so the codec path (kind ``rubin`` by name) is exercised
without Rubin's files. Rubin's own sample packets go through the broker in
tests/integration/test_rubin_packets.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from broker import state as st
from broker.validate import append_outcomes, rubin_alert, validate_batch
from schemas import Codec
from training.photometry import njy_to_mag

NULL_FLOAT = ["null", "float"]
SOURCE_FIELDS = [
    {"name": "midpointMjdTai", "type": "double"}, {"name": "band", "type": ["null", "string"]},
    {"name": "psfFlux", "type": NULL_FLOAT}, {"name": "psfFluxErr", "type": NULL_FLOAT},
    {"name": "scienceFlux", "type": NULL_FLOAT}, {"name": "scienceFluxErr", "type": NULL_FLOAT},
    {"name": "ra", "type": "double"}, {"name": "dec", "type": "double"},
]
TEST_SCHEMA = {
    "type": "record", "name": "alert", "namespace": "lsst.vtest",
    "fields": [
        {"name": "diaSourceId", "type": "long"},
        {"name": "diaSource", "type": {"type": "record", "name": "diaSource", "fields": [
            {"name": "diaSourceId", "type": "long"}, {"name": "diaObjectId", "type": ["null", "long"]},
            {"name": "templateFlux", "type": NULL_FLOAT}, *SOURCE_FIELDS]}},
        {"name": "prvDiaSources", "type": ["null", {"type": "array", "items": "diaSource"}]},
        {"name": "prvDiaForcedSources", "type": ["null", {"type": "array", "items": {
            "type": "record", "name": "diaForcedSource", "fields": [
                {"name": "diaForcedSourceId", "type": "long"}, {"name": "diaObjectId", "type": "long"},
                *SOURCE_FIELDS]}}]},
        {"name": "diaObject", "type": ["null", {"type": "record", "name": "diaObject", "fields": [
            {"name": "diaObjectId", "type": "long"}, {"name": "ra", "type": "double"},
            {"name": "dec", "type": "double"}]}]},
    ]}
SID = 9101


def source(sid, t, band="r", flux=1000.0, err=10.0, science=5000.0, oid=None, template=None):
    return {"diaSourceId": sid, "diaObjectId": oid, "midpointMjdTai": t, "band": band,
            "psfFlux": flux, "psfFluxErr": err, "scienceFlux": science,
            "scienceFluxErr": None if science is None else err, "templateFlux": template,
            "ra": 268.5, "dec": -29.2}


def forced(fid, t, band="r", flux=900.0, err=12.0, science=4900.0, oid=77):
    return {"diaForcedSourceId": fid, "diaObjectId": oid, "midpointMjdTai": t, "band": band,
            "psfFlux": flux, "psfFluxErr": err, "scienceFlux": science,
            "scienceFluxErr": None if science is None else err, "ra": 268.5, "dec": -29.2}


def packet(live, prv=None, forced_=None, oid=77):
    return {"diaSourceId": live["diaSourceId"], "diaSource": live, "prvDiaSources": prv,
            "prvDiaForcedSources": forced_,
            "diaObject": None if oid is None else {"diaObjectId": oid, "ra": 268.5, "dec": -29.2}}


@pytest.fixture(scope="module")
def codec():
    c = Codec()
    c.add_schema(SID, TEST_SCHEMA)
    assert c.kind_of(SID) == "rubin"
    return c


def test_the_object_id_comes_from_the_diaobject_when_the_diasource_has_none():
    rec = rubin_alert(packet(source(1, 61000.0)))
    assert rec["diaObjectId"] == 77 and rec["diaSourceId"] == 1 and rec["band"] == "r"
    assert rubin_alert(packet(source(1, 61000.0, oid=55)))["diaObjectId"] == 55
    assert rubin_alert(packet(source(1, 61000.0), oid=None))["diaObjectId"] == -1


def test_brightness_from_science_flux_else_difference_plus_template_else_difference():
    assert rubin_alert(packet(source(1, 61000.0)))["scienceFlux"] == 5000.0
    r = rubin_alert(packet(source(1, 61000.0, science=None, template=3000.0)))
    assert r["scienceFlux"] == 4000.0 and r["scienceFluxErr"] == pytest.approx(10.0)
    r = rubin_alert(packet(source(1, 61000.0, science=None)))    # Rubin's 11.1 sample is like this
    assert r["scienceFlux"] == 1000.0 and r["scienceFluxErr"] == 10.0


def test_history_is_every_earlier_visit_once_a_detection_before_forced_photometry():
    live = source(10, 61010.0)
    prv = [source(5, 61005.0, flux=2000.0, science=6000.0)]
    frc = [forced(101, 61001.0), forced(105, 61005.0), forced(103, 61003.0, band="i")]
    hist = rubin_alert(packet(live, prv, frc))["prvDiaSources"]
    assert [(h["diaSourceId"], h["midpointMjdTai"], h["band"]) for h in hist] == \
        [(101, 61001.0, "r"), (103, 61003.0, "i"), (5, 61005.0, "r")]
    assert hist[2]["scienceFlux"] == 6000.0      # the detection's, as its own alert gave it
    assert [h["forced"] for h in hist] == [True, True, False]


def test_validate_batch_orders_history_then_the_alert_and_skips_bad_history(codec):
    live = source(10, 61010.0, band="i")
    frc = [forced(101, 61001.0), forced(102, 61002.0, science=None, flux=None),   # no flux
           forced(103, 61003.0, science=-5.0),                                      # nonpositive
           forced(104, 61012.0)]                                                     # after the alert
    raw = codec.encode(packet(live, None, frc), schema_id=SID)
    batch = validate_batch(codec, [raw], [b"77"], timestamps_us=[1_700_000_000_000_000])
    pts = batch.points
    assert not batch.rejected and batch.kept == [0, 0]
    assert list(pts.source_id) == [101, 10] and list(pts.kind) == [st.KIND_HISTORY, st.KIND_LIVE]
    # r forced photometry (the band byte's FORCED bit), then the i detection
    assert list(pts.band) == [2 | st.FORCED, 3] and list(pts.object_id) == [77, 77]
    assert pts.mag[1] == pytest.approx(njy_to_mag(5000.0), abs=1e-5)
    assert list(pts.produced_us) == [1_700_000_000_000_000] * 2    # the packet has no production time
    assert batch.history_skipped == {"no_flux": 1, "nonpositive_flux": 1, "not_before_the_alert": 1}


def test_a_packet_without_object_id_or_flux_is_a_dead_letter_with_the_reason(codec):
    no_oid = codec.encode(packet(source(1, 61000.0), oid=None), schema_id=SID)
    no_flux = codec.encode(packet(source(2, 61000.0, science=None, flux=None)), schema_id=SID)
    batch = validate_batch(codec, [no_oid, no_flux], [b"77", b"77"])
    assert {i: r.reason for i, r in batch.rejected.items()} == {0: "bad_id", 1: "missing_value"}
    assert "diaObject" in batch.rejected[0].detail and "psfFlux" in batch.rejected[1].detail
    assert len(batch.points) == 0


def test_history_that_the_state_has_is_counted_never_a_dead_letter(codec):
    raw = codec.encode(packet(source(10, 61010.0), [source(5, 61005.0)], None), schema_id=SID)
    batch = validate_batch(codec, [raw], [b"77"])
    rows = np.arange(len(batch.points))
    app, dup, dead, known = append_outcomes(st.HISTORY + st.APPENDED, rows, batch.points, batch.kept)
    assert (app, dup, dead, known) == (1, 0, [], 1)
    # the same history point refused for another reason is still not the alert's fault
    app, dup, dead, known = append_outcomes(st.CHANGED + st.DUPLICATE, rows, batch.points, batch.kept)
    assert (app, dup, dead, known) == (0, 1, [], 1)
