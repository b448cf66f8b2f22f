"""Features, scalers and the decision rule: pure numpy contracts the broker relies on."""
import json

import numpy as np
import pytest

from training import decision
from training.features import (CHANNELS, REFERENCE_POINTS, FeatureError, build_features,
                               build_features_batch, event_reference)
from training.scalers import ScalerError, TwoStageScaler


def _curve(n=60, seed=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.uniform(0.2, 3.0, n))
    err = rng.uniform(0.01, 0.1, n).astype(np.float32)
    mag = (19.0 + rng.normal(0, 1, n) * err - 2.0 * np.exp(-((t - t[n // 2]) / 10) ** 2)).astype(np.float32)
    return t, mag, err


def test_shape_channels_and_first_rows():
    t, mag, err = _curve()
    f = build_features(t, mag, err)
    assert f.shape == (len(t), len(CHANNELS)) and f.dtype == np.float32
    assert f[0, 0] == 0.0 and f[0, 2] == 0.0          # own reference, no previous point
    np.testing.assert_allclose(f[:, 1], err)
    np.testing.assert_allclose(f[1:, 2], np.log1p(np.diff(t)), rtol=1e-6)
    ref = np.median(mag[:REFERENCE_POINTS].astype(np.float64))
    np.testing.assert_allclose(f[REFERENCE_POINTS:, 0], ref - mag[REFERENCE_POINTS:], rtol=1e-6)
    assert build_features(t[:0], mag[:0], err[:0]).shape == (0, len(CHANNELS))


def test_causal_rows_depend_only_on_past():
    t, mag, err = _curve()
    full = build_features(t, mag, err)
    for n in (1, 3, REFERENCE_POINTS - 1, REFERENCE_POINTS, 30):
        assert np.array_equal(build_features(t[:n], mag[:n], err[:n]), full[:n])


@pytest.mark.parametrize("m", [REFERENCE_POINTS - 1, REFERENCE_POINTS, 25, 59])
def test_tail_window_equals_full_run_exactly(m):
    t, mag, err = _curve()
    full = build_features(t, mag, err)
    tail = build_features(t[m:], mag[m:], err[m:], reference=event_reference(mag), prev_time=t[m - 1])
    assert np.array_equal(full[m:], tail)


def test_event_reference_needs_k_points_and_bad_input():
    t, mag, err = _curve()
    assert event_reference(mag[:REFERENCE_POINTS - 1]) is None
    assert event_reference(mag) == float(np.median(mag[:REFERENCE_POINTS].astype(np.float64)))
    assert event_reference(mag.astype(np.float64)) == event_reference(mag)
    with pytest.raises(FeatureError):
        build_features(t, mag[:-1], err)
    with pytest.raises(FeatureError):
        build_features(t[::-1], mag, err)


def test_scaler_fit_transform_and_json_round_trip():
    rng = np.random.default_rng(1)
    x = rng.normal([1.0, 0.05, 0.5], [2.0, 0.01, 0.3], size=(500, 3))
    sc = TwoStageScaler.fit([x[:200], x[200:]], channels=CHANNELS)
    y = sc.transform(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.min(0), 0, atol=1e-6)
    np.testing.assert_allclose(y.max(0), 1, atol=1e-6)
    back = TwoStageScaler.from_json(sc.to_json())
    assert np.array_equal(back.transform(x), y) and back.channels == CHANNELS
    d = json.loads(sc.to_json())
    assert set(d) >= {"means", "scales", "mins", "maxs"}
    with pytest.raises(ScalerError):
        TwoStageScaler.from_json("{not json")
    with pytest.raises(ScalerError):
        TwoStageScaler.from_dict(dict(d, format_version=99))


def test_decision_rule():
    p = np.array([0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.2, 0.1])
    s = decision.score(p, smooth=3)
    np.testing.assert_allclose(s[:4], [0.1, 0.5, (0.1 + 1.8) / 3, 0.9])
    assert decision.first_trigger(p, 0.85, min_points=1, smooth=3) == 3
    assert decision.first_trigger(p, 0.85, min_points=6, smooth=3) == 5
    assert decision.first_trigger(p, 0.95, min_points=1, smooth=3) is None
    # event score: fires at threshold thr exactly when event_score >= thr
    for thr in (0.5, 0.85, 0.9, 0.95):
        fired = decision.first_trigger(p, thr, min_points=2, smooth=3) is not None
        assert fired == (decision.event_score(p, min_points=2, smooth=3) >= thr)
    r = decision.running_score(p, min_points=2, smooth=3)
    assert r[0] == -np.inf and np.all(np.diff(r[1:]) >= 0)
    neg = np.linspace(0, 1, 101)
    thr = decision.threshold_for_false_rate(neg, 0.05)
    assert np.mean(neg >= thr) <= 0.05 and np.mean(neg >= 0.94) > 0.05


# -- the batch form -------------------------------------------------------------------------

def _reference_features(time, mag, mag_err, reference=None, prev_time=None):
    """The formula written out point by point (Python medians): an independent reference."""
    t = np.asarray(time, dtype=np.float64)
    m = np.asarray(mag, dtype=np.float64)
    e = np.asarray(mag_err, dtype=np.float64)
    n = len(t)
    out = np.empty((n, 3), dtype=np.float64)
    for j in range(n):
        if reference is not None:
            ref = float(reference)
        else:
            v = sorted(m[:min(j + 1, REFERENCE_POINTS)].tolist())
            h = len(v) // 2
            ref = v[h] if len(v) % 2 else (v[h - 1] + v[h]) / 2.0
        out[j, 0] = ref - m[j]
        out[j, 1] = e[j]
        dt = (t[j] - t[j - 1]) if j else (0.0 if prev_time is None else t[0] - float(prev_time))
        out[j, 2] = dt
    out[:, 2] = np.log1p(out[:, 2])
    return out.astype(np.float32)


def _curves(seed, count, max_len=200):
    rng = np.random.default_rng(seed)
    out = []
    for n in rng.integers(0, max_len, count):
        t = 61000.0 + np.cumsum(rng.uniform(0.0, 5.0, n))    # repeated times (dt = 0) allowed
        mag = rng.uniform(12.0, 25.0, n).astype(np.float32)
        if n > 4 and rng.random() < 0.3:
            mag[: n // 2] = mag[0]                              # ties in the reference median
        err = rng.uniform(0.001, 1.0, n).astype(np.float32)
        out.append((t, mag, err))
    return out


def test_build_features_equals_pointwise_reference_exactly():
    for t, mag, err in _curves(0, 60):
        assert np.array_equal(build_features(t, mag, err), _reference_features(t, mag, err))


def test_batch_equals_build_features_exactly_ragged():
    curves = _curves(1, 50) + [_c for _c in _curves(2, 20, max_len=REFERENCE_POINTS + 2)]
    lens = np.array([len(c[0]) for c in curves])
    w = int(lens.max())
    rng = np.random.default_rng(3)
    # padding full of garbage (decreasing times, NaN): must be ignored
    t = rng.uniform(0, 1, (len(curves), w)) * -1e3
    mag = np.full((len(curves), w), np.nan, dtype=np.float32)
    err = np.full((len(curves), w), np.nan, dtype=np.float32)
    for i, (ti, mi, ei) in enumerate(curves):
        t[i, :len(ti)], mag[i, :len(ti)], err[i, :len(ti)] = ti, mi, ei
    with np.errstate(invalid="raise"):
        got = build_features_batch(t, mag, err, lengths=lens)
    assert got.shape == (len(curves), w, len(CHANNELS)) and got.dtype == np.float32
    for i, (ti, mi, ei) in enumerate(curves):
        n = len(ti)
        assert np.array_equal(got[i, :n], build_features(ti, mi, ei))
        assert np.array_equal(got[i, :n], _reference_features(ti, mi, ei))
        assert not got[i, n:].any()


def test_batch_tail_windows_equal_full_run_exactly():
    rng = np.random.default_rng(4)
    curves = [c for c in _curves(5, 80, max_len=300) if len(c[0]) > 120]
    width = 98                                  # receptive field + 1 new point, as the broker
    for w in (width, 1, 5):
        rows, refs, prevs, expect = [], [], [], []
        for t, mag, err in curves:
            m = int(rng.integers(REFERENCE_POINTS - 1, len(t) - w + 1))
            rows.append((t[m:m + w], mag[m:m + w], err[m:m + w]))
            refs.append(event_reference(mag))
            prevs.append(t[m - 1])
            expect.append(build_features(t, mag, err)[m:m + w])
            assert np.array_equal(expect[-1], _reference_features(t[m:m + w], mag[m:m + w], err[m:m + w],
                                                                   refs[-1], prevs[-1]))
        got = build_features_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                                   np.stack([r[2] for r in rows]), reference=np.array(refs),
                                   prev_time=np.array(prevs))
        for i, (ti, mi, ei) in enumerate(rows):
            assert np.array_equal(got[i], expect[i])
            assert np.array_equal(got[i], build_features(ti, mi, ei, reference=refs[i],
                                                         prev_time=prevs[i]))


def test_batch_bad_input():
    t = np.cumsum(np.ones((2, 5)), axis=1)
    mag = np.full((2, 5), 20.0)
    assert build_features_batch(t[:, :0], mag[:, :0], mag[:, :0]).shape == (2, 0, len(CHANNELS))
    with pytest.raises(FeatureError):
        build_features_batch(t[0], mag[0], mag[0])                      # 1-D
    with pytest.raises(FeatureError):
        build_features_batch(t, mag[:, :4], mag)
    with pytest.raises(FeatureError):
        build_features_batch(t, mag, mag, reference=np.zeros(3))
    with pytest.raises(FeatureError):
        build_features_batch(t, mag, mag, lengths=[2, 6])
    with pytest.raises(FeatureError):
        build_features_batch(t[:, ::-1], mag, mag)                      # decreasing
    with pytest.raises(FeatureError):
        build_features_batch(t, mag, mag, prev_time=np.array([0.0, 10.0]))  # after prev_time
    # a decreasing time inside the valid part still raises with lengths
    bad = t.copy()
    bad[1, 2] = 0.0
    with pytest.raises(FeatureError):
        build_features_batch(bad, mag, mag, lengths=[5, 4])
    assert build_features_batch(bad, mag, mag, lengths=[5, 2]).shape == (2, 5, 3)


# ----------------------------------------------------------------- feature set v2
def test_v2_channels_mean_the_same_at_any_depth():
    """snr is the flux above the band's reference in units of its error: a 0.5-mag
    brightening at 0.05 mag is z = (1 - 10^-0.2) / (0.4 ln10 0.05) = 8.0 (asinh 2.78);
    the same brightening at 0.5 mag is z = 0.8. log_mag_err is ln(err); the band one-hot."""
    from training.features import CHANNELS_V2, MIN_MAG_ERR

    t = np.arange(24.0) * 3
    mag = np.full(24, 20.0)
    mag[12:] -= 0.5
    band = np.array([1, 3] * 12, np.uint8)                    # g, i
    for err, z in ((0.05, 8.0), (0.5, 0.8)):
        f = build_features(t, mag, np.full(24, err), band=band, channels="v2")
        assert f.shape == (24, len(CHANNELS_V2))
        c = {name: f[:, k] for k, name in enumerate(CHANNELS_V2)}
        assert np.allclose(c["dmag"][12:], 0.5) and not c["dmag"][:12].any()
        assert np.allclose(np.sinh(c["snr"][12:]), z, rtol=2e-3) and not c["snr"][:12].any()
        assert np.allclose(c["log_mag_err"], np.log(err))
        assert np.array_equal(c["band_g"], (band == 1).astype(np.float32))
        assert np.array_equal(c["band_i"], (band == 3).astype(np.float32))
        assert not (c["band_u"].any() or c["band_r"].any() or c["band_z"].any() or c["band_y"].any())
    # an error of 0 is taken as MIN_MAG_ERR (no infinity); an unknown band code is all zeros
    f = build_features(t, mag, np.zeros(24), band=np.full(24, 9, np.uint8), channels="v2")
    assert np.isfinite(f).all() and np.allclose(f[:, 2], np.log(MIN_MAG_ERR)) and not f[:, 4:].any()
    assert not build_features(t, mag, np.full(24, 0.05), channels="v2")[:, 4:].any()  # no band


def test_v2_tail_windows_equal_the_full_run_exactly():
    from training.features import band_references

    rng = np.random.default_rng(8)
    t, mag, err = _curve(300, seed=8)
    band = rng.integers(0, 6, 300).astype(np.uint8)
    full = build_features(t, mag, err, band=band, channels="v2")
    refs = band_references(mag, band)
    m = 200                                     # every band has its K points by then
    assert not np.isnan(refs[:6]).any()        # 300 points over 6 bands: each has its K
    tail = build_features(t[m:], mag[m:], err[m:], band=band[m:], reference=refs, prev_time=t[m - 1],
                          channels="v2")
    assert np.array_equal(tail, full[m:])
    got = build_features_batch(t[None, m:], mag[None, m:], err[None, m:], reference=refs[None],
                               prev_time=np.array([t[m - 1]]), band=band[None, m:], channels="v2")
    assert np.array_equal(got[0], full[m:])


def test_unknown_feature_sets_are_refused_by_name():
    from training.features import feature_set

    t, mag, err = _curve(20)
    with pytest.raises(FeatureError, match="unknown feature set 'v9'"):
        build_features(t, mag, err, channels="v9")
    with pytest.raises(FeatureError, match="unknown feature channels"):
        feature_set(["dmag", "flux"])
    assert feature_set(list(CHANNELS)) == CHANNELS
