"""Trigger schema v2: the fields a follow-up team reads (coordinates, deciding point, bands,
the causal PSPL estimate, summary), a v1 record upgraded, and both versions decoded."""
import math

import numpy as np
import pytest

from broker import state as st
from broker import trigger_fields as tf
from broker.cli_subscribe import format_trigger
from broker.triggers import Rule, trigger_at, trigger_record
from broker.validate import Points
from schemas import default_codec, samples
from training import pspl, psplfit

T0, U0, TE = 61050.0, 0.15, 25.0
BANDS = (1, 2, 3)                       # g r i
BASE = (19.2, 18.5, 18.1)               # baseline magnitudes
FS = (0.8, 0.6, 0.5)                    # source fractions


def pspl_curve(n, tmax, seed=3, err=0.02):
    """RECORD points of a simulated 3-band PSPL event observed MJD 60900..tmax."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(60900.0, tmax, n))
    b = rng.choice(len(BANDS), n)
    A = pspl.magnification(t, T0, U0, TE)
    F = 10 ** (-0.4 * np.array(BASE))[b] * (np.array(FS)[b] * A + 1 - np.array(FS)[b])
    r = np.zeros(n, st.RECORD)
    r["t"], r["id"], r["err"] = t, 5000 + np.arange(n), err
    r["mag"] = -2.5 * np.log10(F) + rng.normal(0, err, n)
    r["band"] = np.array(BANDS)[b]
    return r


def true_peak(band_code):
    k = BANDS.index(band_code)
    a0 = float(pspl.magnification_u(np.array([U0]))[0])
    return BASE[k] - 2.5 * math.log10(FS[k] * a0 + 1 - FS[k])


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_fit_recovers_a_whole_pspl_event(seed):
    r = pspl_curve(400, 61100.0, seed=seed)
    e = tf.fit_estimate(r)
    assert abs(e.t0 - T0) < 0.3                      # days (0.012 tE)
    assert abs(e.tE / TE - 1) < 0.07
    assert abs(e.u0 / U0 - 1) < 0.10
    assert e.peak_mjd == e.t0
    assert abs(e.peak_mag - true_peak(int(r["band"][-1]))) < 0.05
    assert 0.8 < e.chi2_dof < 1.25                   # a PSPL with Gaussian errors


def test_fit_before_the_peak_is_causal_and_still_close():
    """Triggers fire on the rise: 200 points up to 5 days (0.2 tE) before the peak, ten
    noise draws. Measured: |t0 error| 0.05-3.9 d (median 1.6), tE error -12%..+34%."""
    dt0, dte = [], []
    for seed in range(1, 11):
        e = tf.fit_estimate(pspl_curve(200, T0 - 5.0, seed=seed))
        dt0.append(abs(e.t0 - T0))
        dte.append(e.tE / TE - 1)
    assert max(dt0) < 5.0 and np.median(dt0) < 2.5   # days: within 0.2 tE, median 0.1 tE
    assert max(np.abs(dte)) < 0.4 and np.median(np.abs(dte)) < 0.2


def test_a_binary_like_deviation_raises_chi2_dof():
    r = pspl_curve(400, 61100.0)
    near = np.abs(r["t"] - (T0 + 3.0)) < 1.5         # a caustic-like bump after the peak
    r["mag"][near] -= 0.5
    assert tf.fit_estimate(r).chi2_dof > 3            # vs 0.8-1.25 without the bump


def test_failed_fit_is_none_and_the_trigger_says_so():
    assert tf.fit_estimate(pspl_curve(3, 61100.0)) is None          # too few points
    flat = pspl_curve(50, 61100.0)
    assert tf.estimate_at(flat, T0, float("nan"), TE) is None
    assert tf.estimate_at(flat, T0, U0, -1.0) is None
    rec = flat[2]
    pts = _points(flat[:3])
    t = trigger_at(7, rec, pts, [0, 1, 2], Rule("tdcnn", 0.8, 3, 1), 0.9, 2, "m", curve=(flat, 0))
    assert all(t[k] is None for k in ("t0", "u0", "tE", "peakMjdTai", "peakMag", "psplChi2Dof"))
    assert t["summary"].endswith("PSPL fit failed")
    codec = default_codec()
    rec2 = dict(t, triggerProducedUs=1)
    assert codec.decode_kind(codec.encode(rec2, "trigger"), "trigger") == rec2


def _points(recs, ra=268.12345, dec=-29.54321):
    n = len(recs)
    return Points(np.full(n, 7, np.int64), recs["id"].astype(np.int64), recs["t"].astype(np.float64),
                  recs["mag"], recs["err"], 1_000 + np.arange(n, dtype=np.int64), recs["band"],
                  np.full(n, ra), np.full(n, dec))


def test_trigger_at_v2_fields_and_causality():
    r = pspl_curve(300, 61100.0)
    g = 199                                          # the deciding point: index 199
    batch = r[g - 2:g + 3]                           # this batch: 197..201 (two after g)
    pts = _points(batch)
    rule = Rule("tdcnn", 0.8, 10, 5)
    t = trigger_at(7, r[g], pts, np.arange(len(batch)), rule, 0.93, g, "m-1", curve=(r, 0))
    assert (t["ra"], t["dec"]) == (268.12345, -29.54321)
    assert t["band"] == "ugrizy"[r["band"][g]]
    assert t["mag"] == pytest.approx(float(r["mag"][g])) and t["magErr"] == pytest.approx(0.02)
    assert t["nPoints"] == 200 and t["nBands"] == 3
    assert t["alertProducedUs"] == 1_002 and t["diaSourceId"] == int(r["id"][g])
    alone = tf.fit_estimate(r[:g + 1])               # only points 0..g: later ones ignored
    assert (t["t0"], t["u0"], t["tE"], t["peakMag"]) == (alone.t0, alone.u0, alone.tE, alone.peak_mag)
    assert t["summary"].startswith(f"binary candidate 7 at RA 268.12345 Dec -29.54321, "
                                   f"{t['band']}={t['mag']:.2f} (P=0.930 >= 0.800 after 200 points in 3 bands); "
                                   f"PSPL fit t0={t['t0']:.1f} u0={t['u0']:.3f} tE={t['tE']:.1f} d, peak")
    # the stored curve may start later (oldest points dropped): global indices still hold
    t2 = trigger_at(7, r[g], pts, np.arange(len(batch)), rule, 0.93, g, "m-1", curve=(r[50:], 50))
    assert t2["nBands"] == 3 and t2["t0"] == tf.fit_estimate(r[50:g + 1]).t0


def test_the_deciding_alert_outside_the_batch_takes_the_events_coordinates():
    r = pspl_curve(30, 61100.0)
    pts = _points(r[25:], ra=10.5, dec=-5.25)
    t = trigger_at(7, r[20], pts, np.arange(5), Rule("tdcnn", 0.5, 1, 1), 0.6, 20, "m")
    assert (t["ra"], t["dec"], t["alertProducedUs"]) == (10.5, -5.25, 0)
    assert t["t0"] is None and t["nBands"] is None      # no curve given: no estimate


def test_pspl_fit_trigger_uses_the_rules_own_fit():
    s = psplfit.new_state(1)[0]
    assert tf.params_from_fit_state(s) is None
    s["flags"] |= psplfit.HAS_FIT
    s["t_ref"], s["t0"], s["lu0"], s["lte"] = 60900.0, T0 - 60900.0, math.log(U0), math.log(TE)
    assert tf.params_from_fit_state(s) == pytest.approx((T0, U0, TE))
    r = pspl_curve(400, 61100.0)
    e = tf.estimate_at(r, *tf.params_from_fit_state(s))
    assert abs(e.peak_mag - true_peak(int(r["band"][-1]))) < 0.03
    assert 0.8 < e.chi2_dof < 1.25
    rule = Rule("pspl-fit", 13.2, 12, 1)
    t = trigger_at(9, r[-1], _points(r[-3:]), [0, 1, 2], rule, 15.04, 399, "pspl-fit/1-abc",
                   curve=(r, 0), fit_params=tf.params_from_fit_state(s))
    assert t["t0"] == pytest.approx(T0) and t["tE"] == pytest.approx(TE)
    assert "(D=15.0 >= 13.2 after 400 points in 3 bands)" in t["summary"]


def test_summary_line_exact():
    rec = {"diaObjectId": 16354442363231, "ra": 268.12345, "dec": -29.54321, "band": "r", "mag": 18.42,
           "rule": "tdcnn", "probability": 0.93, "threshold": 0.8, "nPoints": 57, "nBands": 3,
           "t0": 61234.5, "u0": 0.12, "tE": 23.4, "peakMjdTai": 61234.5, "peakMag": 16.9, "psplChi2Dof": 3.21}
    assert tf.summary_line(rec) == (
        "binary candidate 16354442363231 at RA 268.12345 Dec -29.54321, r=18.42 (P=0.930 >= 0.800 after "
        "57 points in 3 bands); PSPL fit t0=61234.5 u0=0.120 tE=23.4 d, peak r=16.9 at MJD 61234.5, "
        "chi2/dof 3.21")


def test_v1_outbox_record_is_produced_as_v2_with_nulls():
    """A trigger stored in the Redis outbox (JSON) before the upgrade is re-produced."""
    v1 = samples(2)[0]
    up = tf.as_latest({k: v for k, v in v1.items() if k != "triggerProducedUs"})
    new = [f for f in ("ra", "dec", "band", "mag", "magErr", "nBands", "t0", "u0", "tE",
                       "peakMjdTai", "peakMag", "psplChi2Dof")]
    assert all(up[f] is None for f in new)
    assert up["summary"] == ("binary candidate 1000001 at unknown position (P=0.973 >= 0.900 after "
                             "412 points); no PSPL estimate")
    codec = default_codec()
    rec = dict(up, triggerProducedUs=v1["triggerProducedUs"])
    sid, back = codec.decode(codec.encode(rec, "trigger"))
    assert sid == 4 and back == rec
    assert tf.as_latest(rec) == rec                  # a v2 record stays as it is


def test_subscribers_read_both_versions():
    codec = default_codec()
    v1, v2 = samples(2)[0], samples(4)[0]
    for sid, rec in ((2, v1), (4, v2)):
        assert codec.decode_kind(codec.encode(rec, schema_id=sid), "trigger") == rec
    old, new = format_trigger(v1), format_trigger(v2)
    assert "RA - Dec -" in old and "PSPL -" in old and "\n" not in old
    first, summary = new.split("\n")
    assert "RA 268.12345 Dec -29.54321" in first and "r 18.42+-0.03" in first
    assert "PSPL t0 61010.40 u0 0.120 tE 23.4 d peak 16.90 at MJD 61010.40" in first
    assert summary.strip() == v2["summary"]


def test_trigger_record_without_extra_is_still_a_valid_v2_record():
    rec = trigger_record(42, 4200012, Rule("tdcnn", 0.7, 10, 5), 0.81, 13, 61012.5, 1, "m-1")
    assert rec["t0"] is None and rec["summary"].endswith("no PSPL estimate")
