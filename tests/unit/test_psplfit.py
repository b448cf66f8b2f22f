"""The classical PSPL-fit rule (training/psplfit.py): behaviour and determinism."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from training import detectability, physics, psplfit

P = psplfit.Params()


def pspl_curve(t, t0, u0, tE, fs, base=19.0):
    return physics.flux_to_mag(physics.flux(physics.pspl_magnification(t, t0, u0, tE), fs), base)


def caustic_binary(alpha=0.6):
    """s = 1, q = 0.5, u0 = 0.1: the source enters the resonant caustic at t ~ 91 d
    (index 183); before that the curve is a PSPL (measured: the best PSPL fit to the
    noise-free points up to index 182 has chi^2 < 4 under 0.05 mag errors)."""
    t = np.arange(0.0, 200.0, 0.5)
    A = physics.binary_magnification(t, 100.0, 0.1, 30.0, 1.0, 0.5, alpha, 0.01)
    mag = physics.flux_to_mag(physics.flux(A, 0.9), 19.0)
    return t, mag


def causal_departure(t, mag, stop, err=0.05, start=60, chi2_max=4.0, guess=(100.0, 0.1, 30.0)):
    """First index n where the noise-free points 0..n are no longer a PSPL: the best PSPL
    chi^2 of a prefix cannot fall when points are added, so the smallest fitted chi^2 over
    the prefixes n..stop bounds the prefix n's from above (a local minimum of one fit cannot
    fake a departure); the first n where that bound exceeds chi2_max."""
    F = 10 ** (-0.4 * (mag - mag[0]))
    fits = np.array([detectability.detectability(t[:n + 1], F[:n + 1], err, true_params=guess).chi2
                     for n in range(start, stop + 1)])
    bound = np.minimum.accumulate(fits[::-1])[::-1]
    over = np.flatnonzero(bound > chi2_max)
    return start + int(over[0]) if len(over) else None


def test_noiseless_pspl_never_triggers():
    rng = np.random.default_rng(3)
    curves = []
    for t0, u0, tE, fs in [(100, 0.01, 10, 1.0), (100, 0.3, 40, 0.5), (5, 0.1, 30, 0.8),
                           (195, 0.05, 25, 0.7), (60, 1.0, 80, 1.0), (120, 0.002, 15, 0.6),
                           (100, 0.5, 100, 0.9)]:
        t = np.sort(rng.choice(np.arange(0, 200, 0.5), 300, replace=False))
        curves.append((t, pspl_curve(t, t0, u0, tE, fs).astype(np.float32), np.full(len(t), 0.05, np.float32)))
    stats = psplfit.run_curves(curves, P)
    for s in stats:
        assert psplfit.first_trigger(s, P.threshold) is None
        assert np.all(s[np.isfinite(s)] < 1.0)       # far from any threshold


def test_caustic_crossing_triggers_after_it_begins_and_not_before_departure():
    t, mag = caustic_binary()
    err = np.full(len(t), 0.05)
    cross = int(np.argmax(np.abs(np.diff(mag)))) + 1      # first point inside the caustic
    dep = causal_departure(t, mag, cross + 3)
    assert dep is not None and abs(dep - cross) <= 1
    # noise-free
    s = psplfit.run_curves([(t, mag.astype(np.float32), err.astype(np.float32))], P)[0]
    j = psplfit.first_trigger(s, P.threshold)
    assert j is not None and j >= max(dep, cross) and j <= cross + 4
    # with noise, several realisations: never before the departure, soon after the crossing
    rng = np.random.default_rng(11)
    for _ in range(3):
        noisy = (mag + rng.normal(0, 0.05, len(t))).astype(np.float32)
        s = psplfit.run_curves([(t, noisy, err.astype(np.float32))], P)[0]
        j = psplfit.first_trigger(s, P.threshold)
        assert j is not None and dep <= j <= cross + 6


def _noisy_events(n, seed=5):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        t = np.sort(rng.choice(np.arange(0, 200, 0.5), int(rng.integers(60, 330)), replace=False))
        t0, tE = rng.uniform(40, 160), rng.uniform(8, 40)
        m = pspl_curve(t, t0, rng.uniform(0.01, 0.5), tE, rng.uniform(0.5, 1))
        if k % 3 == 0:    # a bump near the peak: an anomaly
            c = t0 + rng.uniform(-0.3, 0.3) * tE
            m = m - 0.6 * np.exp(-0.5 * ((t - c) / 1.5) ** 2)
        out.append((t, (m + rng.normal(0, 0.05, len(t))).astype(np.float32), np.full(len(t), 0.05, np.float32)))
    return out


def test_batch_composition_and_chunking_do_not_change_an_event():
    curves = _noisy_events(7)
    together = psplfit.run_curves(curves, P)
    for i in (0, 3, 5):
        alone = psplfit.run_curves([curves[i]], P)[0]
        assert np.array_equal(alone, together[i])    # bit for bit
    # point by point in uneven chunks, with a stop-and-resume from the packed state
    i = 3
    t, m, e = curves[i]
    st = psplfit.new_state(1)
    got = []
    cuts = [0, 1, 25, 26, 90, 91, 92, 200, len(t)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        b = min(b, len(t))
        if b <= a:
            continue
        st, res = psplfit.advance(st, [(t[:b], m[:b], e[:b])], [0], P, stop_when_triggered=False,
                                  record=True)
        st = np.frombuffer(psplfit.pack_state(st), dtype=psplfit.STATE).copy()
        got.append(res[0].stats)
    assert np.array_equal(np.concatenate(got), together[i])


def test_stored_curve_with_dropped_points_is_processed_from_the_state():
    t, m, e = _noisy_events(1, seed=9)[0]
    full = psplfit.run_curves([(t, m, e)], P)[0]
    st = psplfit.new_state(1)
    st, _ = psplfit.advance(st, [(t[:40], m[:40], e[:40])], [0], P, stop_when_triggered=False)
    # the store dropped the 10 oldest points since: the curve now starts at index 10
    st, res = psplfit.advance(st, [(t[10:50], m[10:50], e[10:50])], [10], P, stop_when_triggered=False,
                              record=True)
    assert int(st[0]["n_done"]) == 50 and len(res[0].stats) == 10
    assert np.all(np.isfinite(res[0].stats) | np.isneginf(res[0].stats))
    assert full.shape == (len(t),)


def test_online_stops_after_firing_offline_goes_on():
    curves = _noisy_events(6)
    offline = psplfit.run_curves(curves, P)
    st, res = psplfit.advance(psplfit.new_state(len(curves)), curves, np.zeros(len(curves), int), P)
    for s_off, r, s in zip(offline, res, st):
        j = psplfit.first_trigger(s_off, P.threshold)
        assert r.fire == j
        if j is not None:
            assert r.fire_stat == pytest.approx(s_off[j])
            assert s["flags"] & psplfit.TRIGGERED and s["n_done"] == j + 1
    assert any(r.fire is not None for r in res) and any(r.fire is None for r in res)


def test_state_round_trip_and_version():
    s = psplfit.new_state(2)
    s["t0"] = [1.5, 2.5]
    raw = psplfit.pack_state(s[1:])
    assert len(raw) == psplfit.STATE.itemsize
    back = psplfit.unpack_state(raw)
    assert back["t0"] == 2.5 and back["version"] == psplfit.FORMAT_VERSION
    assert psplfit.unpack_state(None)["n_done"] == 0
    with pytest.raises(psplfit.PsplFitError):
        psplfit.unpack_state(raw[:-1])
    assert psplfit.Params(threshold=99.0).version == P.version          # the threshold is not in it
    assert psplfit.Params(window_max=16).version != P.version
    assert P.version.startswith("pspl-fit/2-")


@pytest.mark.parametrize("kw", [{"window_min": 8, "window_max": 4}, {"threshold": 5.0},
                                {"min_points": 3}, {"robust_c": 0.0}, {"fs_max": 0.5},
                                {"restart_growth": 1.0}])
def test_params_validation(kw):
    with pytest.raises(psplfit.PsplFitError):
        psplfit.Params(**kw)


def test_windows_are_powers_of_two():
    assert P.windows == (2, 4, 8, 16, 32)
    assert dataclasses.replace(P, window_min=1).windows == (1, 2, 4, 8, 16, 32)
    assert dataclasses.replace(P, window_min=3, window_max=20).windows == (4, 8, 16)
