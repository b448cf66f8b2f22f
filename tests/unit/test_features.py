"""Features, scalers and the decision rule: pure numpy contracts the broker relies on."""
import json

import numpy as np
import pytest

from training import decision
from training.features import (CHANNELS, REFERENCE_POINTS, FeatureError, build_features,
                               event_reference)
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
