"""replay.rubin: Rubin packets from a plan (no Kafka). The Avro writer against fastavro's,
then, with Rubin's fetched schemas, every packet of a simulated LSST dataset: bytes, units,
the 365-day history, forced photometry, the diaObject counts, ids."""
from __future__ import annotations

import io
import random

import fastavro
import numpy as np
import pytest

from replay import rubin as rr
from replay.stream import ReplayError, from_dataset, plan
from schemas import rubin
from tests.helpers import rubin_schemas
from training import simulate as sim
from training.photometry import njy_to_mag

START = 60_000.0


def _flat_schema():
    return {"type": "record", "name": "flat", "namespace": "t", "fields": [
        {"name": "a", "type": "long"}, {"name": "n1", "type": ["null", "float"], "default": None},
        {"name": "b", "type": ["null", "double"], "default": None},
        {"name": "c", "type": ["null", "string"], "default": None}, {"name": "d", "type": "int"},
        {"name": "e", "type": ["null", "boolean"], "default": None},
        {"name": "f", "type": "float"}, {"name": "n2", "type": ["null", "long"], "default": None},
        {"name": "n3", "type": ["null", "int"], "default": None}]}


def test_flat_record_writes_fastavros_bytes():
    schema = _flat_schema()
    parsed = fastavro.parse_schema(schema)
    names = ("f", "a", "b", "c", "d", "e")
    w = rr.FlatRecord(schema, names)
    rnd = random.Random(3)
    for _ in range(500):
        vals = (rnd.uniform(-1e6, 1e6), rnd.choice([0, 1, -1, 63, 64, -65, 2**62, -2**63, 2**63 - 1]),
                rnd.choice([None, rnd.uniform(-1e9, 1e9)]), rnd.choice([None, "", "r", "ü" * 70]),
                rnd.randint(-2**31, 2**31 - 1), rnd.choice([None, True, False]))
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, dict(zip(names, vals)))
        assert w.encode(vals) == buf.getvalue()


def test_flat_record_refuses_what_it_cannot_write():
    schema = _flat_schema()
    with pytest.raises(ReplayError, match="flat.d is required"):
        rr.FlatRecord(schema, ("a", "f"))
    with pytest.raises(ReplayError, match="no field 'zz'"):
        rr.FlatRecord(schema, ("a", "d", "f", "zz"))
    with pytest.raises(ReplayError, match="is required and got None"):
        rr.FlatRecord(schema, ("a", "d", "f")).encode((None, 1, 1.0))


def test_zigzag_is_avros_long():
    parsed = fastavro.parse_schema("long")
    for n in (0, -1, 1, 63, -64, 64, 300, -2**63, 2**63 - 1, 123456789012345):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, n)
        assert rr.zigzag(n) == buf.getvalue()


# ---------------------------------------------------------------------------- with Rubin's schemas

@pytest.fixture(scope="module")
def lsst():
    return sim.simulate(3, 3, sim.SimulationConfig(survey="lsst", seed=8), workers=0)


def _packets(ds, version, window=rr.WINDOW_DAYS):
    rubin_schemas(version)
    schema = rubin.load_schema(*version)
    p = plan(from_dataset(ds, START), detections_only=True)
    parsed = fastavro.parse_schema(schema)
    out = []
    for key, mjd, body in rr.RubinPackets(p, schema, window_days=window).records():
        buf = io.BytesIO(body)
        rec = fastavro.schemaless_reader(buf, parsed, None)
        assert buf.tell() == len(body)
        again = io.BytesIO()
        fastavro.schemaless_writer(again, parsed, rec)
        assert again.getvalue() == body                 # what fastavro itself would write
        out.append((key, mjd, rec, body))
    return p, out


@pytest.mark.parametrize("version", rubin.SUPPORTED, ids=lambda v: f"{v[0]}.{v[1]}")
@pytest.mark.parametrize("window", [rr.WINDOW_DAYS, 20.0], ids=["365d", "20d"])
def test_packets_carry_the_datasets_photometry_and_history(lsst, version, window):
    ds = lsst
    p, out = _packets(ds, version, window)
    assert len(out) == int(ds.detected.sum()) > 0
    assert [m for _, m, _, _ in out] == sorted(m for _, m, _, _ in out)            # send order
    ids = [r["diaSource"]["diaSourceId"] for _, _, r, _ in out]
    assert len(set(ids)) == len(ids)
    mjd_all = START + ds.time
    for key, mjd, r, _ in out:
        src = r["diaSource"]
        oid = src["diaObjectId"]
        e = int(np.flatnonzero(ds.event_id == oid)[0])
        a, b = int(ds.offsets[e]), int(ds.offsets[e + 1])
        k = src["diaSourceId"] - oid * 100_000                  # the point's index in its event
        g = a + k
        assert key == str(oid).encode() and r["diaSourceId"] == src["diaSourceId"]
        assert ds.detected[g] and src["midpointMjdTai"] == mjd == mjd_all[g]
        assert src["band"] == "ugrizy"[ds.band[g]]
        # units: nJy, the dataset's own float32 fluxes; scienceFlux back to the magnitude
        assert src["psfFlux"] == ds.diff_flux[g] and src["psfFluxErr"] == ds.diff_flux_err[g]
        assert src["scienceFlux"] == ds.sci_flux[g] and src["scienceFluxErr"] == ds.sci_flux_err[g]
        if ds.sci_flux[g] > 0:
            assert njy_to_mag(src["scienceFlux"]) == pytest.approx(float(ds.mag[g]), abs=2e-5)
        assert src["templateFlux"] == pytest.approx(float(ds.sci_flux[g]) - float(ds.diff_flux[g]), rel=1e-6)
        assert src["snr"] >= 5.0 and src["isNegative"] == (ds.diff_flux[g] < 0)
        assert src["timeProcessedMjdTai"] > src["midpointMjdTai"]
        # prvDiaSources: every earlier detection within the window, oldest first
        window_pts = [j for j in range(a, g) if mjd_all[g] - mjd_all[j] <= window]
        want = [oid * 100_000 + j - a for j in window_pts if ds.detected[j]]
        prv = r["prvDiaSources"]
        assert [q["diaSourceId"] for q in prv] == want
        assert all(mjd - q["midpointMjdTai"] <= window for q in prv)
        assert [q["midpointMjdTai"] for q in prv] == sorted(q["midpointMjdTai"] for q in prv)
        # prvDiaForcedSources: every earlier visit within the window, detected or not
        fs = r["prvDiaForcedSources"]
        assert [q["midpointMjdTai"] for q in fs] == [mjd_all[j] for j in window_pts]
        assert [q["psfFlux"] for q in fs] == [ds.diff_flux[j] for j in window_pts]
        assert len({q["diaForcedSourceId"] for q in fs}) == len(fs)
        assert all(q["diaObjectId"] == oid and q["visit"] == round(q["midpointMjdTai"] * 86400) for q in fs)
        # diaObject: detections so far, per band
        obj = r["diaObject"]
        so_far = [j for j in range(a, g + 1) if ds.detected[j]]
        assert obj["diaObjectId"] == oid and obj["nDiaSources"] == len(so_far)
        for bi, bn in enumerate("ugrizy"):
            assert obj[f"{bn}_psfFluxNdata"] == sum(1 for j in so_far if ds.band[j] == bi)
        assert obj["firstDiaSourceMjdTai"] == mjd_all[so_far[0]] and obj["lastDiaSourceMjdTai"] == mjd
        assert r["cutoutDifference"] is None and r["ssSource"] is None
    if window < 365:                                   # the window did cut something
        assert any(len(r["prvDiaForcedSources"]) < r["diaSource"]["diaSourceId"] % 100_000
                   for _, _, r, _ in out)


def test_packets_are_deterministic(lsst):
    _, one = _packets(lsst, (11, 1))
    _, two = _packets(lsst, (11, 1))
    assert [b for *_, b in one] == [b for *_, b in two]


def test_non_rubin_bands_are_refused(lsst):
    rubin_schemas((11, 1))
    lc = from_dataset(lsst, START)
    lc.band = np.where(lc.band == "i", "F146", lc.band)
    with pytest.raises(ReplayError, match="Rubin packets carry bands u g r i z y; the input has F146"):
        rr.RubinPackets(plan(lc, detections_only=True), rubin.load_schema(11, 1))
