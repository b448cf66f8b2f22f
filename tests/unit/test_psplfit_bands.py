"""The PSPL-fit rule on multi-band light curves (training/psplfit.py): each band has its
own source and blend flux, the bands share (t0, u0, tE)."""
from __future__ import annotations

import numpy as np
import pytest

from training import pspl, psplfit

P = psplfit.Params()
BASE = {1: 20.3, 2: 19.4, 3: 18.6, 4: 18.1}          # g r i z: colour offsets 0.5 .. 2.2 mag
ACHROMATIC = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
CHROMATIC = {1: 0.9, 2: 0.6, 3: 0.4, 4: 0.75}         # source fraction per band


def cadence(rng, nights=200, bands=(1, 2, 3), per_night=3):
    """A visit run of ``per_night`` points a night (80% of the nights), each night in one
    band drawn at random: consecutive points are mostly of one band, as a survey that
    changes filter between nights (the band-blind rule's error scale then misses the
    colour steps)."""
    t, b = [], []
    for d in range(nights):
        if rng.random() < 0.2:
            continue
        band = bands[rng.integers(len(bands))]
        for v in range(per_night):
            t.append(d + 0.1 + 0.08 * v + rng.uniform(0, 0.02))
            b.append(band)
    return np.array(t), np.array(b, dtype=np.uint8)


def curve(rng, t, band, A, fs=ACHROMATIC, err=0.04, noise=True):
    """(t, mag, err, band): source fraction fs[band] at baseline magnitude BASE[band]."""
    base = np.array([BASE[k] for k in band])
    f = np.array([fs[k] for k in band])
    m = base - 2.5 * np.log10(f * A + 1.0 - f)
    if noise:
        m = m + rng.normal(0, err, len(t))
    return t, m.astype(np.float32), np.full(len(t), err, np.float32), band


def bumped(t, A, centre, height=1.5, width=0.6):
    """A short achromatic bump on the magnification (a caustic-crossing-like anomaly):
    peak flux x (1 + height), about 1 mag for height 1.5, over a few points."""
    return A * (1.0 + height * np.exp(-0.5 * ((t - centre) / width) ** 2))


def multiband_events(n, seed=4):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        bands = (1, 2, 3) if k % 2 else (1, 2, 3, 4)
        t, b = cadence(rng, nights=int(rng.integers(60, 200)), bands=bands, per_night=int(rng.integers(1, 4)))
        t0, tE = rng.uniform(0.3, 0.7) * t[-1], rng.uniform(8, 30)
        A = pspl.magnification(t, t0, rng.uniform(0.05, 0.5), tE)
        if k % 3 == 0:
            A = bumped(t, A, t0 + rng.uniform(-0.3, 0.3) * tE)
        out.append(curve(rng, t, b, A, CHROMATIC if k % 2 else ACHROMATIC))
    return out


def test_one_band_through_the_band_path_is_the_one_band_rule():
    """A curve with one band code (any code) is the 3-tuple curve: the same arithmetic (one
    band: K = 1), so the same bits. In a group with multi-band events its row goes through
    the band-mask path (K > 1): the masks are exact 0/1 and the other bands add exact
    zeros, so its bits are still the same (asserted exactly; a tolerance would hide a
    cross-row leak)."""
    rng = np.random.default_rng(7)
    t = np.sort(rng.choice(np.arange(0, 200, 0.5), 300, replace=False))
    A = bumped(t, pspl.magnification(t, 100.0, 0.2, 25.0), 104.0)
    _, m, e, _ = curve(rng, t, np.full(len(t), 3, np.uint8), A)
    one = psplfit.run_curves([(t, m, e)], P)[0]
    assert psplfit.first_trigger(one, P.threshold) is not None          # a curve that does something
    for code in (0, 3, 5, 200):                                         # 200: the unknown-band slot
        four = psplfit.run_curves([(t, m, e, np.full(len(t), code, np.uint8))], P)[0]
        assert np.array_equal(four, one)
    mixed = psplfit.run_curves([(t, m, e, np.full(len(t), 2, np.uint8))] + multiband_events(3), P)[0]
    assert np.array_equal(mixed, one)


def test_constant_source_in_several_bands_never_fires_the_blind_rule_would():
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        t, b = cadence(rng, bands=(1, 2, 3, 4))
        c = curve(rng, t, b, np.ones(len(t)))
        s = psplfit.run_curves([c], P)[0]
        assert psplfit.first_trigger(s, P.threshold) is None
        assert not np.any(s >= P.refit_level)
        blind = psplfit.run_curves([c[:3]], P)[0]                     # the colours as one band
        assert psplfit.event_score(blind) > 100 * P.threshold


def test_error_scale_is_per_band():
    rng = np.random.default_rng(5)
    t, b = cadence(rng, bands=(1, 2, 3), per_night=1)                 # band changes at most points
    _, m, e, _ = curve(rng, t, b, np.ones(len(t)))
    st, _ = psplfit.advance(psplfit.new_state(2), [(t, m, e, b), (t, m, e)], [0, 0], P,
                            stop_when_triggered=False)
    assert 0.99 <= st["scale"][0] < 1.3          # the noise (errors right: 1)
    assert st["scale"][1] > 5                    # one band: the colour steps


@pytest.mark.parametrize("fs", [ACHROMATIC, CHROMATIC])
def test_noiseless_multiband_pspl_fits_exactly(fs):
    rng = np.random.default_rng(8)
    curves = []
    for t0, u0, tE in [(100, 0.05, 15), (60, 0.3, 30), (150, 0.8, 60), (190, 0.1, 20)]:
        t, b = cadence(rng, bands=(1, 2, 3, 4), per_night=2)
        curves.append(curve(rng, t, b, pspl.magnification(t, t0, u0, tE), fs, noise=False))
    for s in psplfit.run_curves(curves, P):
        assert psplfit.first_trigger(s, P.threshold) is None
        assert np.isfinite(s).any() and np.all(s[np.isfinite(s)] < 1.0)


def test_chromatic_blending_does_not_fire_a_bump_does():
    for seed in (1, 2, 3, 4):
        rng = np.random.default_rng(seed)
        t, b = cadence(rng)
        t0, tE = rng.uniform(80, 120), rng.uniform(12, 35)
        A = pspl.magnification(t, t0, rng.uniform(0.05, 0.4), tE)
        chrom = curve(rng, t, b, A, CHROMATIC)
        centre = t0 + 0.3 * tE
        anom = curve(rng, t, b, bumped(t, A, centre), CHROMATIC)
        s_chrom, s_anom = psplfit.run_curves([chrom, anom], P)
        assert psplfit.first_trigger(s_chrom, P.threshold) is None
        j = psplfit.first_trigger(s_anom, P.threshold)
        assert j is not None and centre - 1.5 <= t[j] <= centre + 3.0   # at the bump, not before


def test_batch_composition_and_chunking_do_not_change_a_multiband_event():
    curves = multiband_events(7)
    together = psplfit.run_curves(curves, P)
    assert any(psplfit.first_trigger(s, P.threshold) is not None for s in together)
    for i in (0, 3, 5):
        assert np.array_equal(psplfit.run_curves([curves[i]], P)[0], together[i])     # bit for bit
    # point by point in uneven chunks (a band first seen in a later chunk), state packed between
    i = 3
    t, m, e, b = curves[i]
    st = psplfit.new_state(1)
    got = []
    cuts = [0, 1, 2, 13, 25, 26, 90, 91, 92, 200, len(t)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        hi = min(hi, len(t))
        if hi <= lo:
            continue
        st, res = psplfit.advance(st, [(t[:hi], m[:hi], e[:hi], b[:hi])], [0], P,
                                  stop_when_triggered=False, record=True)
        st = np.frombuffer(psplfit.pack_state(st), dtype=psplfit.STATE).copy()
        got.append(res[0].stats)
    assert np.array_equal(np.concatenate(got), together[i])


def test_band_references_survive_dropped_points():
    t, m, e, b = multiband_events(2, seed=11)[1]
    st, _ = psplfit.advance(psplfit.new_state(1), [(t[:40], m[:40], e[:40], b[:40])], [0], P,
                            stop_when_triggered=False)
    ref = st["m_ref"][0].copy()
    for k in np.unique(b[:40]):
        assert ref[k] == m[np.flatnonzero(b == k)[0]]
        assert (int(st["seen"][0]) >> int(k)) & 1
    # the store dropped the 30 oldest points since: the references stay those of the first points
    st, res = psplfit.advance(st, [(t[30:60], m[30:60], e[30:60], b[30:60])], [30], P,
                              stop_when_triggered=False, record=True)
    assert int(st[0]["n_done"]) == 60 and len(res[0].stats) == 20
    for k in np.unique(b[:40]):
        assert st["m_ref"][0][k] == ref[k]


def test_v1_state_is_refused_with_its_version():
    v1 = np.dtype([("version", "u1"), ("flags", "u1"), ("reserved", "<u2"), ("n_done", "<u4"),
                   ("n_restart", "<u4"), ("n_refit", "<u4"), ("t_ref", "<f8"), ("m_ref", "<f8"),
                   ("t0", "<f8"), ("lu0", "<f8"), ("lte", "<f8"), ("a", "<f8"), ("b", "<f8"),
                   ("lam", "<f8"), ("scale", "<f8"), ("last", "<f8"), ("best", "<f8")])
    old = np.zeros(1, dtype=v1)
    old["version"], old["n_done"] = 1, 57
    with pytest.raises(psplfit.PsplFitError, match="version 1, this code reads 2"):
        psplfit.unpack_state(old.tobytes())
    assert psplfit.FORMAT_VERSION == 2 and psplfit.Params().version.startswith("pspl-fit/2-")


def test_band_codes_must_match_the_points():
    t = np.arange(20.0)
    with pytest.raises(psplfit.PsplFitError):
        psplfit.run_curves([(t, np.full(20, 19.0), np.full(20, 0.05), np.zeros(19, np.uint8))], P)


def test_leverage_block_form_is_the_full_information_matrix():
    """The statistic's leverage terms (block elimination over the bands' 2x2 flux blocks and
    the 3x3 Schur complement) against the dense (3 + 2K)-square information matrix of
    (t0, ln u0, ln tE, a_1, b_1, ...): with g = I x, g' I^-1 h = x_g' I x_h. Bands: three
    with many points, one with two (only b free: its a row is the identity), one absent."""
    rng = np.random.default_rng(2)
    n = 150
    t = np.sort(rng.uniform(0, 100, n))
    slot = rng.choice([1, 2, 3], n)
    slot[[40, 90]] = 4
    A = pspl.magnification(t, 50.0, 0.2, 15.0)
    fs = np.array([0, 0.9, 0.6, 0.4, 0.8])[slot]
    F = fs * A + 1 - fs
    m = -2.5 * np.log10(F) + rng.normal(0, 0.02, n)
    bands = np.array([1, 2, 3, 4, 5])
    R = psplfit._Rows(t[None], m[None], np.full((1, n), 0.02), np.array([n]), slot=slot[None], bands=bands)
    K = len(bands)
    th = (np.array([51.0]), np.array([np.log(0.25)]), np.array([np.log(14.0)]))
    Pt = psplfit._Point(R, th, np.full((1, K), 0.6), np.full((1, K), 0.4), np.array([1.0]), P)
    assert not Pt.flat[0] and list(R.few[0]) == [False, False, False, True, True]
    reg = psplfit._reg
    a = Pt.a[0]
    Sw, SA, SAA = Pt.S["w"], Pt.S["A"], Pt.S["AA"]
    N = 3 + 2 * K
    I = np.zeros((N, N))
    I[:3, :3] = sum(a[k] ** 2 * Pt.DD[k] for k in range(K))
    I[np.arange(3), np.arange(3)] = reg(np.diag(I[:3, :3]))
    for k in range(K):
        ia, ib = 3 + 2 * k, 4 + 2 * k
        few, empty = R.few[0, k], R.cnt[0, k] == 0
        I[:3, ia] = I[ia, :3] = 0.0 if few else a[k] * Pt.DA[k]
        I[:3, ib] = I[ib, :3] = a[k] * Pt.Dv[k]
        I[ia, ia] = 1.0 if few else reg(SAA[k])
        I[ia, ib] = I[ib, ia] = 0.0 if few else SA[k]
        I[ib, ib] = 1.0 if empty else reg(Sw[k])
    Q = 5
    x = rng.normal(size=(N, Q + 1)) / np.sqrt(np.abs(np.diag(I)))[:, None]
    x[[3 + 2 * k for k in range(K) if R.few[0, k]]] = 0.0       # a_k is not free there
    G = I @ x
    corr, shift = psplfit._leverage(R, Pt, G[None, :3], G[None, 3::2], G[None, 4::2])
    want_corr = np.einsum("jq,jq->q", x[:, :Q], G[:, :Q])
    want_shift = x[:, :Q].T @ G[:, Q]
    assert np.allclose(corr[0], want_corr, rtol=1e-6, atol=1e-9 * np.abs(want_corr).max())
    assert np.allclose(shift[0], want_shift, rtol=1e-6, atol=1e-6 * np.abs(want_shift).max())


def test_a_singular_system_does_not_change_the_other_rows_solutions():
    """One singular matrix in a stack: the others keep the bits of their own solve (a
    fallback for the whole stack made an event's fit depend on its group's other events)."""
    rng = np.random.default_rng(4)
    M = rng.normal(size=(5, 3, 3)) + 3 * np.eye(3)
    V = rng.normal(size=(5, 3, 2))
    M[2] = 0.0                                           # singular
    got = psplfit._solve_rows(M, V, lambda i: np.full((3, 2), -7.0))
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(got[i], np.linalg.solve(M[i], V[i]))
    np.testing.assert_array_equal(got[2], np.full((3, 2), -7.0))
    clean = np.delete(M, 2, axis=0), np.delete(V, 2, axis=0)
    np.testing.assert_array_equal(np.delete(got, 2, axis=0), psplfit._solve_rows(*clean, None))
