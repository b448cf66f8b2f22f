"""Rubin packets read in blocks (polars, broker.rubin_columns) give exactly what reading them
one by one (fastavro, validate.rubin_alert) gives: the same points, kept messages, dead
letters with the same reason and detail, and the same history left out (no services).

The packets are drawn at random (a fixed seed) with every fault the checks know, on the
small ``lsst.vtest`` schema of test_rubin_points.py and, when Rubin's schemas are fetched
(scripts/setup.sh does), on packets of the replay under Rubin's own 11.1 and 10.0.
"""
from __future__ import annotations

import io
import json
import re

import fastavro
import numpy as np
import pytest

import broker.rubin_columns as rc
import broker.validate as v
from schemas import Codec, HEADER, MAGIC, avro_block
from tests.unit.test_rubin_points import SID, TEST_SCHEMA, forced, packet, source

FAULTS = ("none", "none", "none", "no_object", "null_flux", "nan_time", "zero_error", "negative_flux",
          "band_w", "band_null", "ra", "future", "key", "tiny_flux", "object_from_diaobject",
          "template", "sci_err_zero")


def _live(rng, sid, t, fault):
    kw = {"band": str(rng.choice(list("ugrizy"))), "flux": float(rng.uniform(-500, 5000))}
    if fault == "null_flux":
        kw.update(science=None, flux=None)
    elif fault == "negative_flux":
        kw.update(science=-10.0)
    elif fault == "tiny_flux":
        kw.update(science=1e-12)          # a magnitude beyond 40: check_magnitudes refuses it
    elif fault == "template":
        kw.update(science=None, template=float(rng.uniform(100, 5000)))
    elif fault == "zero_error":
        kw.update(err=0.0)
    rec = source(sid, t, oid=None if fault in ("object_from_diaobject", "no_object") else 77, **kw)
    if fault == "nan_time":
        rec["midpointMjdTai"] = float("nan")
    elif fault == "band_w":
        rec["band"] = "w"
    elif fault == "band_null":
        rec["band"] = None
    elif fault == "ra":
        rec["ra"] = 400.0
    elif fault == "future":
        rec["midpointMjdTai"] = 99_000.0
    elif fault == "sci_err_zero":
        rec["scienceFluxErr"] = 0.0       # `scienceFluxErr or psfFluxErr`: the psf error is used
    return rec


def _history(rng, t):
    """Forced photometry and detections before (and a few after) ``t``, sharing visits, with
    every kind of bad history point."""
    times = np.round(t - rng.uniform(0.5, 300, size=int(rng.integers(0, 12))), 3).tolist()
    frc, prv = [], []
    for k, tt in enumerate(times):
        r = rng.random()
        kw = {"band": str(rng.choice(list("ugrizy")))}
        if r < 0.08:
            kw.update(science=None, flux=None)        # no_flux
        elif r < 0.14:
            kw.update(science=-3.0)                   # nonpositive_flux
        elif r < 0.18:
            kw.update(err=float("nan"))               # bad_value
        elif r < 0.22:
            kw.update(band="w")                       # bad_value
        elif r < 0.25:
            kw.update(science=1e-15)                  # a magnitude check_magnitudes refuses
        frc.append(forced(1000 + k, tt, **kw))
        if rng.random() < 0.3:                        # a detection of the same visit wins
            prv.append(source(2000 + k, tt, band="i", science=float(rng.uniform(100, 9000))))
    if rng.random() < 0.2:
        frc.append(forced(3000, t + 1.0))             # not_before_the_alert
    if rng.random() < 0.1:
        frc.append(dict(forced(3001, t - 2.0), diaForcedSourceId=-5))   # bad_value
    rng.shuffle(frc)
    return (prv or None) if rng.random() < 0.9 else None, (frc or None) if rng.random() < 0.9 else None


def _batch(rng, n):
    values, keys = [], []
    codec = Codec()
    codec.add_schema(SID, TEST_SCHEMA)
    for i in range(n):
        fault = str(rng.choice(FAULTS))
        t = 61_000.0 + float(rng.uniform(0, 500))
        live = _live(rng, 10_000 + i, t, fault)
        prv, frc = _history(rng, t)
        raw = codec.encode(packet(live, prv, frc, oid=None if fault == "no_object" else 77), schema_id=SID)
        values.append(raw)
        keys.append(b"78" if fault == "key" else b"77")
    return codec, values, keys


def _both(codec, values, keys, monkeypatch, max_mjd=62_000.0):
    """(block path, one-by-one path) of the same batch, and how many blocks were read."""
    read = []
    real = rc.read_packets
    monkeypatch.setattr(rc, "read_packets", lambda *a, **k: read.append(1) or real(*a, **k))
    ts = [1_700_000_000_000_000 + i for i in range(len(values))]
    blocks = v.validate_batch(codec, values, keys, max_mjd, ts)
    monkeypatch.setattr(v, "BLOCK_MIN_MESSAGES", 10**9)
    single = v.validate_batch(codec, values, keys, max_mjd, ts)
    monkeypatch.setattr(v, "BLOCK_MIN_MESSAGES", 4)
    return blocks, single, len(read)


def assert_same(a, b):
    for f in a.points.__dataclass_fields__:
        x, y = getattr(a.points, f), getattr(b.points, f)
        assert (x is None) == (y is None), f
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=f)     # bit for bit: same float64 arithmetic
    assert a.kept == b.kept

    def said(batch):   # fastavro's words name the buffer object's address: not ours to compare
        return {i: (r.reason, re.sub(r"0x[0-9a-f]+", "0x", r.detail)) for i, r in batch.rejected.items()}
    assert said(a) == said(b)
    assert a.history_skipped == b.history_skipped


@pytest.fixture(params=["one block", "three blocks on threads"])
def blocks(request, monkeypatch):
    """A batch read as one block, or cut into three read at once (avro_block.THREADS)."""
    if request.param != "one block":
        monkeypatch.setattr(avro_block, "THREADS", 3)
        monkeypatch.setattr(avro_block, "MIN_PART", 8)
    return request.param


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blocks_and_single_packets_give_the_same_batch(seed, monkeypatch, blocks):
    codec, values, keys = _batch(np.random.default_rng(seed), 300)
    parts = []
    one = avro_block.BlockReader._read_one
    monkeypatch.setattr(avro_block.BlockReader, "_read_one", lambda self, b: parts.append(len(b)) or one(self, b))
    mode = blocks
    blocks, single, n_read = _both(codec, values, keys, monkeypatch)
    assert n_read == 1                                  # the block path was taken
    assert parts == ([300] if mode == "one block" else [100, 100, 100])
    assert_same(blocks, single)
    reasons = {r.reason for r in single.rejected.values()}
    # the faults drawn reached the checks they were drawn for
    assert {"bad_id", "missing_value", "nonfinite_value", "nonpositive_error", "nonpositive_flux",
            "absurd_value", "future_time", "bad_key"} <= reasons
    assert set(single.history_skipped) == set(v.HISTORY_SKIPS)
    assert len(single.points) > 300


@pytest.mark.parametrize("damage", ["trailing", "truncated", "trailing_last", "garbage"])
def test_a_bad_body_sends_the_batch_one_by_one_with_its_reason(damage, monkeypatch, blocks):
    codec, values, keys = _batch(np.random.default_rng(7), 40)
    j = 39 if damage == "trailing_last" else 17
    if damage in ("trailing", "trailing_last"):
        values[j] = values[j] + b"\x02"
    elif damage == "truncated":
        values[j] = values[j][:-4]
    else:
        values[j] = values[j][:HEADER.size] + bytes(np.random.default_rng(1).integers(0, 256, 60, dtype=np.uint8))
    blocks, single, n_read = _both(codec, values, keys, monkeypatch)
    assert n_read == 0                                  # the block was refused as a whole
    assert_same(blocks, single)
    assert single.rejected[j].reason in ("bad_body", "truncated_frame")


def test_a_batch_of_compact_alerts_and_packets_keeps_message_order(monkeypatch):
    codec, values, keys = _batch(np.random.default_rng(11), 30)
    compact = Codec()
    alerts = []
    for i in range(10):
        rec = {"diaSourceId": 50_000 + i, "diaObjectId": 88, "midpointMjdTai": 61_000.0 + i,
               "scienceFlux": 4000.0, "scienceFluxErr": 20.0, "psfFlux": 900.0, "psfFluxErr": 20.0,
               "ra": 10.0, "dec": -20.0, "band": "g", "alertProducedUs": 5, "prvDiaSources": None}
        alerts.append(compact.encode(rec, "alert"))
    mixed_v = values[:10] + alerts[:5] + values[10:] + alerts[5:]
    mixed_k = keys[:10] + [b"88"] * 5 + keys[10:] + [b"88"] * 5
    blocks, single, n_read = _both(codec, mixed_v, mixed_k, monkeypatch)
    assert n_read == 1
    assert_same(blocks, single)
    assert blocks.kept == sorted(blocks.kept)


def test_block_reader_refuses_shifted_records_and_reads_the_rest():
    schema = TEST_SCHEMA
    parsed = fastavro.parse_schema(json.loads(json.dumps(schema)))
    recs = [packet(source(i, 61_000.0 + i), [source(100 + i, 60_990.0)], [forced(200 + i, 60_995.0)])
            for i in range(5)]
    bodies = []
    for r in recs:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, r)
        bodies.append(buf.getvalue())
    reader = avro_block.block_reader(schema, rc.COLUMNS)
    df = reader.read(bodies)
    assert df.height == 5 and df.get_column("diaSource").struct.field("diaSourceId").to_list() == list(range(5))
    assert df.get_column("prvDiaSources").to_list()[2][0]["diaSourceId"] == 102     # a reference, inlined
    assert reader.read(bodies[:2] + [bodies[2] + b"\x00"] + bodies[3:]) is None
    assert reader.read(bodies[:-1] + [bodies[-1] + b"\x00\x00"]) is None            # the sentinel sees it
    assert reader.read(bodies[:-1] + [bodies[-1][:-1]]) is None
    assert avro_block.read_long(avro_block.zigzag(-123456789012)) == (-123456789012, 6)


def test_schemas_whose_first_field_is_not_a_long_are_not_read_in_blocks():
    assert avro_block.block_reader({"type": "record", "name": "x", "fields": [
        {"name": "a", "type": "string"}]}) is None


def test_inlined_references_change_no_byte():
    inlined = avro_block.inline_references(TEST_SCHEMA)
    items = inlined["fields"][2]["type"][1]["items"]
    assert isinstance(items, dict) and items["type"] == "record" and items["name"] != "diaSource"
    rec = packet(source(1, 61_000.0), [source(2, 60_000.0)], None)
    a, b = io.BytesIO(), io.BytesIO()
    fastavro.schemaless_writer(a, fastavro.parse_schema(json.loads(json.dumps(TEST_SCHEMA))), rec)
    fastavro.schemaless_writer(b, fastavro.parse_schema(inlined), rec)
    assert a.getvalue() == b.getvalue()


# ---------------------------------------------------------------------------- with Rubin's schemas

@pytest.mark.parametrize("version", [(11, 1), (10, 0)], ids=["11.1", "10.0"])
def test_replayed_rubin_packets_read_the_same_both_ways(version, monkeypatch, blocks):
    from replay.rubin import RubinPackets
    from replay.stream import from_dataset, plan
    from schemas import rubin
    from tests.helpers import rubin_schemas
    from training import simulate as sim

    rubin_schemas(version)
    schema = rubin.load_schema(*version)
    codec = Codec()
    sid = rubin.schema_id(*version)
    codec.add_schema(sid, schema)
    ds = sim.simulate(6, 6, sim.SimulationConfig(survey="lsst", seed=21), workers=0)
    p = plan(from_dataset(ds, 61_000.0), detections_only=True)
    hdr = HEADER.pack(MAGIC, sid)
    keys, values = [], []
    for key, _mjd, body in RubinPackets(p, schema).records():
        keys.append(key)
        values.append(hdr + body)
    assert len(values) > 50
    blocks, single, n_read = _both(codec, values, keys, monkeypatch, max_mjd=None)
    assert n_read == 1 and not single.rejected
    assert_same(blocks, single)
    assert int(np.count_nonzero(single.points.kind == 1)) > len(values)     # history came along
