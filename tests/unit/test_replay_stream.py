"""Replay's pure logic: ids, positions, fluxes, survey-time order, history, selection, truth."""
from __future__ import annotations

import numpy as np
import pytest

from replay import stream as rs
from schemas import default_codec
from training.dataset import PARAM_FIELDS, Dataset
from training.photometry import mag_to_njy


def make_dataset(n_events: int = 4, n_points: int = 30, *, span: float = 100.0, seed: int = 0,
                 id0: int = 1_000_001, amplitude: float = 1.5) -> Dataset:
    """A small valid dataset: per event random distinct times in [0, span), a bump at t0.

    Events alternate PSPL (label 0, binary params NaN) and binary (label 1).
    """
    rng = np.random.default_rng(seed)
    times, mags, errs = [], [], []
    params = {k: np.full(n_events, np.nan) for k in PARAM_FIELDS}
    params["t0"] = rng.uniform(0.3 * span, 0.7 * span, n_events)
    params["tE"] = rng.uniform(0.05 * span, 0.2 * span, n_events)
    params["u0"] = rng.uniform(0.05, 0.5, n_events)
    params["baseline_mag"] = rng.uniform(17.0, 20.0, n_events)
    params["fs"] = rng.uniform(0.3, 1.0, n_events)
    label = (np.arange(n_events) % 2).astype(np.int8)
    for name, lo, hi in (("s", 0.5, 2.0), ("q", 1e-3, 1.0), ("alpha", 0.0, 6.28), ("rho", 1e-4, 1e-2),
                         ("dchi2", 10.0, 1e4)):
        params[name][label == 1] = rng.uniform(lo, hi, int(label.sum()))
    for i in range(n_events):
        t = np.sort(rng.choice(np.arange(0, span, span / (4 * n_points)), n_points, replace=False))
        bump = amplitude * np.exp(-0.5 * ((t - params["t0"][i]) / params["tE"][i]) ** 2)
        e = rng.uniform(0.01, 0.05, n_points)
        times.append(t)
        mags.append(params["baseline_mag"][i] - bump + rng.normal(0, e))
        errs.append(e)
    offsets = np.zeros(n_events + 1, np.int64)
    np.cumsum([len(t) for t in times], out=offsets[1:])
    mag = np.concatenate(mags).astype(np.float32)
    return Dataset(offsets=offsets, time=np.concatenate(times).astype(np.float64), mag=mag,
                   mag_err=np.concatenate(errs).astype(np.float32), mag_model=mag, mag_pspl=mag,
                   event_id=np.arange(id0, id0 + n_events, dtype=np.int64), label=label,
                   params=params, meta={"test": True})


@pytest.fixture
def ds():
    d = make_dataset()
    d.validate()
    return d


def test_source_id_formula_and_bounds():
    assert rs.source_ids([7], [3]).tolist() == [700003]
    assert rs.MAX_OBJECT_ID == 92_233_720_368_546
    top = rs.source_ids([rs.MAX_OBJECT_ID], [rs.MAX_POINTS_PER_EVENT - 1])[0]
    assert top == rs.MAX_OBJECT_ID * 100_000 + 99_999 <= 2**63 - 1
    with pytest.raises(rs.ReplayError, match="out of range"):
        rs.source_ids([rs.MAX_OBJECT_ID + 1], [0])
    with pytest.raises(rs.ReplayError, match="out of range"):
        rs.source_ids([-1], [0])
    with pytest.raises(rs.ReplayError, match="more than 100000 points"):
        rs.source_ids([1], [100_000])


def test_sky_positions_are_deterministic_and_in_the_field():
    ids = np.arange(1, 2001)
    ra, dec = rs.sky_positions(ids)
    ra2, dec2 = rs.sky_positions(ids)
    assert np.array_equal(ra, ra2) and np.array_equal(dec, dec2)
    assert np.all(np.abs(ra - 268.5) <= 1) and np.all(np.abs(dec + 29.0) <= 1)
    assert len(np.unique(ra)) == len(ids)
    # spread over the field, not bunched
    assert ra.std() > 0.4 and dec.std() > 0.4
    # pinned values: the formula (splitmix64 of the id) must not drift between versions
    r, d = rs.sky_positions([1_000_001, 0])
    assert r.tolist() == pytest.approx([269.097468540528, 269.2666216164273], abs=1e-12)
    assert d.tolist() == pytest.approx([-28.95937430839875, -28.436704968209494], abs=1e-12)


def test_fluxes_use_the_shared_conversion_and_baseline_template():
    mag = np.array([18.0, 17.0, 18.0])
    err = np.array([0.01, 0.02, 0.05])
    sci, sci_err, psf, psf_err = rs.fluxes(mag, err, np.full(3, 18.0))
    f, fe = mag_to_njy(mag, err)
    assert np.array_equal(sci, f) and np.array_equal(sci_err, fe) and np.array_equal(psf_err, fe)
    assert psf[0] == 0.0 and psf[2] == 0.0
    assert psf[1] == pytest.approx(mag_to_njy(17.0) - mag_to_njy(18.0))


def test_plan_is_in_survey_time_order_and_per_event_increasing(ds):
    lc = rs.from_dataset(ds, 61000.0)
    p = rs.plan(lc)
    assert p.n_alerts == len(ds.time)
    assert np.all(np.diff(p.mjd) >= 0)
    recs = [r for _, _, r in p.records()]
    assert [r["midpointMjdTai"] for r in recs] == p.mjd.tolist()
    by_obj: dict[int, list] = {}
    for r in recs:
        by_obj.setdefault(r["diaObjectId"], []).append(r)
    for i, eid in enumerate(ds.event_id.tolist()):
        rows = by_obj[eid]
        t, m, e = ds.event(i)
        assert [r["midpointMjdTai"] for r in rows] == (61000.0 + t).tolist()
        assert [r["diaSourceId"] for r in rows] == [eid * 100_000 + k for k in range(len(t))]
        sci, sci_err = mag_to_njy(m, e)
        assert [r["scienceFlux"] for r in rows] == sci.tolist()
        assert [r["psfFlux"] for r in rows] == (sci - mag_to_njy(ds.params["baseline_mag"][i])).tolist()
        assert {r["band"] for r in rows} == {"i"}
        assert len({(r["ra"], r["dec"]) for r in rows}) == 1
        assert all(r["prvDiaSources"] is None for r in rows)


def test_ties_break_by_event_order_then_point():
    d = make_dataset(3, 5)
    d.time = np.tile(np.arange(5, dtype=np.float64), 3)  # all three events observed together
    p = rs.plan(rs.from_dataset(d, 0.0))
    got = [(r["diaObjectId"], r["diaSourceId"] % 100_000) for _, _, r in p.records()]
    assert got == [(int(e), k) for k in range(5) for e in d.event_id]


@pytest.mark.parametrize("history", [0, 2])
def test_records_do_not_depend_on_the_chunk_size(ds, history):
    p = rs.plan(rs.from_dataset(ds, 61000.0), history=history)
    assert list(p.records(chunk=7)) == list(p.records())


def test_keys_are_decimal_object_ids(ds):
    for key, mjd, rec in rs.plan(rs.from_dataset(ds, 61000.0)).records():
        assert key == str(rec["diaObjectId"]).encode("ascii") and mjd == rec["midpointMjdTai"]


def test_every_record_encodes_with_the_codec(ds):
    codec = default_codec()
    for hist in (0, 3):
        p = rs.plan(rs.from_dataset(ds, 61000.0), history=hist)
        for (_, _, rec), (_, _, fast) in zip(p.records(), p.records(union_tuples=True)):
            rec["alertProducedUs"] = fast["alertProducedUs"] = 1
            data = codec.encode(rec, "alert")
            assert codec.decode_kind(data, "alert") == rec
            assert codec.encode(fast, "alert") == data       # the tuple notation: same bytes


def test_history_holds_previous_sent_points_oldest_first(ds):
    p = rs.plan(rs.from_dataset(ds, 61000.0), history=3)
    seen: dict[int, list] = {}
    for _, _, r in p.records():
        prev = seen.setdefault(r["diaObjectId"], [])
        want = [{k: v for k, v in q.items()
                 if k not in ("diaObjectId", "ra", "dec", "alertProducedUs", "prvDiaSources")}
                for q in prev[-3:]]
        assert r["prvDiaSources"] == want
        prev.append(r)


def test_detections_only_keeps_points_over_threshold_with_their_ids(ds):
    lc = rs.from_dataset(ds, 61000.0)
    full = {r["diaSourceId"]: r for _, _, r in rs.plan(lc).records()}
    p = rs.plan(lc, detections_only=True, snr_threshold=5.0, history=2)
    recs = [r for _, _, r in p.records()]
    expect = [sid for sid, r in full.items() if abs(r["psfFlux"]) / r["psfFluxErr"] >= 5.0]
    assert 0 < len(recs) < len(full)
    assert sorted(r["diaSourceId"] for r in recs) == sorted(expect)
    for r in recs:
        assert r == {**full[r["diaSourceId"]], "prvDiaSources": r["prvDiaSources"]}
        for q in r["prvDiaSources"]:   # history = previous *detections*
            assert abs(q["psfFlux"]) / q["psfFluxErr"] >= 5.0
            assert q["diaSourceId"] // 100_000 == r["diaObjectId"] and q["diaSourceId"] < r["diaSourceId"]


def test_head_limits_events_in_input_order(ds):
    lc = rs.from_dataset(ds, 61000.0).head(2)
    assert lc.object_id.tolist() == ds.event_id[:2].tolist()
    assert lc.n_points == int(ds.offsets[2])
    assert rs.from_dataset(ds, 0.0).head(None).n_events == ds.n_events


def test_truth_records_match_the_dataset(ds):
    lc = rs.from_dataset(ds, 61000.0)
    p = rs.plan(lc)
    truth = rs.truth_records(p, p.per_event_counts(), "run1")
    assert [t["diaObjectId"] for t in truth] == ds.event_id.tolist()
    for i, t in enumerate(truth):
        assert t["label"] == int(ds.label[i]) and t["n_points"] == int(ds.lengths()[i])
        assert t["t0"] == ds.params["t0"][i] and t["t0_mjd"] == 61000.0 + ds.params["t0"][i]
        assert t["first_mjd"] == 61000.0 + ds.event(i)[0][0]
        assert t["last_mjd"] == 61000.0 + ds.event(i)[0][-1]
        for k in ("s", "q", "alpha", "rho", "dchi2"):
            assert (t[k] is None) == (ds.label[i] == 0)
        on = ds.params["onset"][i]
        assert t["onset_mjd"] == (None if np.isnan(on) else 61000.0 + on)
        assert t["onset_index"] == (None if np.isnan(on) else int(ds.params["onset_index"][i]))
        assert t["run_id"] == "run1" and tuple(t) == rs.TRUTH_FIELDS
    default_codec().encode(truth[0], "truth")
    # part of a run: only events with alerts sent, n_points = sent so far
    k = p.n_alerts // 3
    part = rs.truth_records(p, np.bincount(p.event[:k], minlength=lc.n_events), "r")
    assert sum(t["n_points"] for t in part) == k


def test_validation_rejects_what_would_break_the_stream(ds):
    lc = rs.from_dataset(ds, 61000.0)
    lc.mjd = lc.mjd.copy()
    lc.mjd[3] = np.nan
    with pytest.raises(rs.ReplayError, match="non-finite"):
        lc.validate()
    lc = rs.from_dataset(ds, 61000.0)
    lc.mag = lc.mag[:-1]
    with pytest.raises(rs.ReplayError, match="mag has length"):
        lc.validate()
    lc = rs.from_dataset(ds, 61000.0)
    lc.object_id = lc.object_id.copy()
    lc.object_id[1] = lc.object_id[0]
    with pytest.raises(rs.ReplayError, match="not unique"):
        lc.validate()
    lc = rs.from_dataset(ds, 61000.0)
    lc.mjd = lc.mjd.copy()
    lc.mjd[5] = lc.mjd[4]
    with pytest.raises(rs.ReplayError, match="not strictly increasing"):
        lc.validate()
