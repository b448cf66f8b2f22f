"""Survey profiles (training.survey) and events simulated through them: the error model
against the LSST overview paper, what a visit measures, the schedules, the classes
sharing every draw but the lens, and the profiles' validation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from training import simulate as sim
from training import survey as sv
from training.photometry import mag_to_njy
from training.simulate import SimulationConfig


# --- the error model ------------------------------------------------------------------
def test_random_error_is_the_overview_papers():
    """Ivezic et al. 2019 eq. (5), i band (gamma 0.039), m5 = 24.0. The expected values are
    the formula evaluated independently (helper's table); 1e-6 is far below any rounding
    that matters and far above float64 noise."""
    m = np.array([18.0, 20.0, 22.0, 23.0, 24.0])
    want = [0.002145, 0.007052, 0.033736, 0.081112, 0.200000]
    np.testing.assert_allclose(sv.sigma_rand(m, 24.0, 0.039), want, atol=1e-6)
    # with the 0.005 mag floor in quadrature (the paper's sigma_1): 0.005441 .. 0.200062
    tot = np.sqrt(0.005 ** 2 + sv.sigma_rand(m, 24.0, 0.039) ** 2)
    np.testing.assert_allclose(tot, [0.005441, 0.008644, 0.034105, 0.081266, 0.200062], atol=1e-6)


def test_flux_error_is_a_five_sigma_detection_at_m5_and_has_the_floor():
    f5 = mag_to_njy(23.0)
    # at m5 the random error is 1/5 of the flux: a 5-sigma detection (the definition of m5)
    assert sv.lsst_flux_error(f5, 23.0, 0.039, 0.0) / f5 == pytest.approx(0.2, rel=1e-12)
    # bright: the floor dominates (0.005 mag = 0.4605% of the flux)
    f = mag_to_njy(14.0)
    assert sv.lsst_flux_error(f, 23.0, 0.039, 0.005) / f == pytest.approx(0.005 / sv.MAG_PER_FRACTION, rel=1e-2)
    # fractional error = sqrt(sigma_rand^2 + floor^2) at every magnitude
    m = np.linspace(15, 25, 11)
    got = sv.lsst_flux_error(mag_to_njy(m), 23.5, 0.039, 0.005) / mag_to_njy(m)
    np.testing.assert_allclose(got, np.sqrt(sv.sigma_rand(m, 23.5, 0.039) ** 2
                                            + (0.005 / sv.MAG_PER_FRACTION) ** 2), rtol=1e-12)


def test_roman_errors_match_the_crowded_field_medians_they_were_set_to():
    """roman.yaml's background is chosen so that F146 errors match the GULLS medians (0.008
    mag at 20.5, 0.036 at 22.5, 0.19 at 24.5): within 15% (they are bin medians)."""
    prof = sv.load_profile("roman")
    for m, want in ((20.5, 0.0079), (22.5, 0.036), (24.5, 0.19)):
        f = mag_to_njy(m)
        got = sv.MAG_PER_FRACTION * sv.flux_error(prof, "F146", f, np.nan) / f
        assert got == pytest.approx(want, rel=0.15), (m, got)


# --- colours ---------------------------------------------------------------------------
def test_source_fraction_differs_between_bands_only_when_colours_differ():
    prof = sv.load_profile("lsst")
    src, bl = sv.band_magnitudes(prof, 20.0, 0.6, 0.7, 0.7, 1.5)
    fs = mag_to_njy(src) / (mag_to_njy(src) + mag_to_njy(bl))
    np.testing.assert_allclose(fs, 0.6, rtol=1e-12)                      # same colour: same fs
    src, bl = sv.band_magnitudes(prof, 20.0, 0.6, 0.5, 2.2, 1.5)        # blue source, red blend
    fs = dict(zip(prof.band_names, mag_to_njy(src) / (mag_to_njy(src) + mag_to_njy(bl))))
    assert fs["i"] == pytest.approx(0.6) and fs["g"] > fs["i"] > fs["z"]
    # the reference band's total is the baseline magnitude
    ref = prof.band_names.index("i")
    assert -2.5 * math.log10(mag_to_njy(src[ref]) + mag_to_njy(bl[ref])) + 31.4 == pytest.approx(20.0)
    src, bl = sv.band_magnitudes(prof, 20.0, 1.0, 0.5, 2.2, 1.5)        # no blend
    assert np.all(np.isinf(bl)) and np.all(mag_to_njy(bl) == 0)


def test_redder_with_more_extinction():
    off0 = sv.colour_offsets(0.8, 0.0, ("g", "i", "z"))
    off1 = sv.colour_offsets(0.8, 1.0, ("g", "i", "z"))
    assert off1[0] - off0[0] == pytest.approx(0.945) and off1[1] == 0 and off1[2] < off0[2]


# --- what a visit measures ---------------------------------------------------------------
def test_a_constant_source_has_difference_fluxes_consistent_with_zero_in_every_band():
    """No magnification: psfFlux/psfFluxErr is N(0, 1) in every band (pooled over events,
    each with its own template draw); 3,000+ visits per band: the mean within 0.1 and the
    sd within 10% of 1 (about 5 standard errors)."""
    prof = sv.load_profile("lsst")
    z = {b: [] for b in prof.band_names}
    for e in range(150):
        rng = np.random.default_rng([77, e])
        v = sv.visits(prof, rng, 500.0, 30.0)
        src, bl = sv.band_magnitudes(prof, 19.5, 0.7, 0.8, 1.4, 1.2)
        obs = sv.observe(prof, rng, v, np.ones(len(v.time)), src, bl)
        for j, b in enumerate(prof.band_names):
            m = v.band == j
            z[b].append(obs.diff_flux[m] / obs.diff_flux_err[m])
    for b, parts in z.items():
        x = np.concatenate(parts)
        assert len(x) > 1000, (b, len(x))
        assert abs(x.mean()) < 0.1 and abs(x.std() - 1.0) < 0.1, (b, x.mean(), x.std())
        assert np.mean(np.abs(x) >= 5) < 1e-3                          # no false alerts to speak of


def test_science_flux_is_the_template_plus_the_difference_and_detections_follow_the_rule():
    prof = sv.load_profile("lsst")
    rng = np.random.default_rng(3)
    v = sv.visits(prof, rng, 200.0, 20.0)
    c = float(v.time[len(v.time) // 6])                                # a visit of the first season
    A = 1 + 5 * np.exp(-0.5 * ((v.time - c) / 20.0) ** 2)
    src, bl = sv.band_magnitudes(prof, 19.0, 0.5, 0.8, 1.4, 1.2)
    o = sv.observe(prof, rng, v, A, src, bl)
    np.testing.assert_allclose(o.sci_flux - o.diff_flux, o.template[v.band], rtol=1e-12)
    assert np.array_equal(o.detected, np.abs(o.diff_flux) >= 5 * o.diff_flux_err)
    assert np.all(o.diff_flux_err > o.sci_flux_err)                   # the template's noise
    assert o.detected[np.abs(v.time - c) < 10].mean() > 0.9 and o.detected[np.abs(v.time - c) > 200].mean() < 0.01


# --- schedules ---------------------------------------------------------------------------
def test_lsst_schedule_seasons_pairs_and_bands():
    prof = sv.load_profile("lsst")
    v = sv.visits(prof, np.random.default_rng(11), 0.0, 10.0)
    t = v.time
    assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < prof.duration_days
    doy = np.mod(t, 365.25)
    assert np.all((doy >= prof.season_start_day) & (doy < prof.season_start_day + prof.season_days + 1))
    # ~70 visits a season (234 nights / 4 x 0.63 observed x ~1.9 visits)
    per_year = len(t) / 3
    assert 50 < per_year < 90, per_year
    gaps = np.diff(t) * 1440
    pairs = np.isclose(gaps, prof.pair_gap_min)
    assert pairs.mean() > 0.35                                           # most nights are pairs
    first, second = v.band[:-1][pairs], v.band[1:][pairs]
    names = prof.band_names
    assert all(names[b] in sv.PAIRS[names[a]] for a, b in zip(first, second))
    assert np.all(first != second) or names.index("y") in first          # two filters (y+y allowed)
    share = np.bincount(v.band, minlength=6) / len(t)
    assert share[names.index("u")] < 0.1 and share[names.index("y")] < 0.15 and share[names.index("r")] > 0.15


def test_roman_schedule_cadence_window_and_colour_visits():
    prof = sv.load_profile("roman")
    v = sv.visits(prof, np.random.default_rng(1), 60.0, 10.0)         # first season: days 40-112
    assert v.time.min() >= 40.0 and v.time.max() <= 112.0
    assert abs(v.time.min() - 40.0) < 1e-9 and v.time.max() <= 60.0 + 60.0
    steps = np.round(np.diff(v.time) * 1440, 6)
    assert set(steps) == {15.0}
    colour = v.band == prof.band_names.index("F087")
    assert 0.015 < colour.mean() < 0.025                                  # one visit in 48 (12 h / 15 min)
    assert len(sv.visits(prof, np.random.default_rng(1), 800.0, 10.0).time) == 0   # between seasons


# --- events through a survey ---------------------------------------------------------------
@pytest.mark.parametrize("survey", ["lsst", "roman"])
def test_pspl_and_binary_share_every_draw_but_the_lens(survey, monkeypatch):
    """With one random stream for both classes (event_rng without its class), a PSPL event
    and a binary get the same parameters but the lens', the same visits, templates and noise
    deviates: only the magnification differs."""
    monkeypatch.setattr(sim, "event_rng", lambda seed, kind, index: np.random.default_rng([seed, 9, index]))
    cfg = SimulationConfig(survey=survey, seed=3)
    p = sim.simulate_event(sim.PSPL, 4, cfg)
    b = sim.simulate_event(sim.BINARY, 4, cfg)
    names = list(sim.PARAM_FIELDS)
    for k in ("t0", "tE", "u0", "baseline_mag", "fs"):
        assert p["params"][names.index(k)] == b["params"][names.index(k)], k
    for k in ("time", "band", "m5", "source_mag", "blend_mag"):
        np.testing.assert_array_equal(p[k], b[k], err_msg=k)
    # the same noise deviates: (measured - model) / error is the same draw
    zp = (p["sci_flux"].astype(np.float64) - 10 ** ((31.4 - p["mag_model"]) / 2.5)) / p["sci_flux_err"]
    zb = (b["sci_flux"].astype(np.float64) - 10 ** ((31.4 - b["mag_model"]) / 2.5)) / b["sci_flux_err"]
    np.testing.assert_allclose(zp, zb, atol=2e-3)          # float32 fluxes: ~1e-7 relative of the flux


def test_survey_dataset_round_trip_and_summary(tmp_path):
    ds = sim.simulate(4, 4, SimulationConfig(survey="lsst", seed=2), workers=0)
    assert ds.meta["survey"]["name"] == "lsst" and ds.meta["bands"] == list("ugrizy")
    assert ds.source_mag.shape == (8, 6) and not ds.derived
    p = ds.save(tmp_path / "s.npz")
    from training import dataset
    back = dataset.load(p)
    for k in ("time", "band", "sci_flux", "diff_flux", "detected", "mag", "source_mag"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ds, k), err_msg=k)
    # the magnitude is the broker's conversion of the stored float32 flux
    from broker.validate import magnitudes
    pos = back.sci_flux > 0
    mag, _ = magnitudes(back.sci_flux[pos].astype(np.float64), back.sci_flux_err[pos].astype(np.float64))
    np.testing.assert_array_equal(mag, back.mag[pos])
    b = back.label == 1
    on = back.params["onset_index"][b]
    assert np.all((on >= 0) == (back.params["dchi2"][b] >= sim.ONSET_DCHI2))
    line = sim.summary(back)
    assert "visits per event" in line and "detections per event" in line and "dchi2 >= 160" in line


def test_onset_is_the_first_visit_a_pspl_of_the_visits_so_far_cannot_fit():
    from training.detectability import onset

    t = np.arange(8.0)
    causal = np.array([0, 0, 1, 5, 20, 170, 300, 400.0])      # best PSPL of visits 0..n
    calls = []

    def fit_first(n):
        calls.append(n)
        return causal[n - 1]

    # hindsight terms: their running sum bounds the causal chi2 from above (reaches 160 at 2)
    hind = np.array([50, 60, 60, 10, 10, 10, 10, 10.0])
    assert onset(t, hind, fit_first, 160.0) == 5
    assert min(calls) >= 3 and len(calls) <= 5                  # searched from the bound, bisected
    assert onset(t, np.ones(8), fit_first, 160.0) == -1          # the whole curve: chi2 8 < 160
    assert onset(t, hind, lambda n: 100.0, 160.0) == -1          # no PSPL fit ever fails


def test_onset_never_asks_for_a_fit_of_fewer_than_four_visits():
    """An outlier on the first visit puts the hindsight bound at visit 0; the fitter takes
    4 points at least (seen in a 16,000-event lsst simulation: 'needs at least 4 points,
    got 3')."""
    from training.detectability import onset

    t = np.arange(8.0)

    def fit_first(n):
        assert n >= 4, n
        return [0, 0, 0, 0, 0, 200, 300, 400.0][n - 1]

    assert onset(t, np.array([500, 1, 1, 1, 1, 1, 1, 1.0]), fit_first, 160.0) == 5
    assert onset(t[:3], np.array([500, 1, 1.0]), fit_first, 160.0) == -1   # too few visits


def test_onset_on_a_binary_is_at_its_anomaly_not_on_the_baseline():
    """A noise-free binary with its caustic late in a dense, precise light curve: the
    whole curve's PSPL misses the early points a little at each, so its running chi^2
    passes 160 early; the onset (the visits so far cannot be fitted) is at the anomaly."""
    from training import detectability, physics

    t = np.linspace(0, 200, 2000)
    A = physics.binary_magnification(t, 100.0, 0.1, 20.0, 1.0, 0.5, 1.0, 0.01)
    F = physics.flux(A, 0.8)
    sigma = physics.mag_err_to_flux_err(F, 0.003)
    fit = detectability.detectability(t, F, 0.003, true_params=(100.0, 0.1, 20.0))
    hind = fit.chi2_per_point(t, F, sigma)
    i = detectability.onset(t, hind, lambda n: detectability.fit_pspl(t[:n], F[:n], sigma[:n],
                                                                       true_params=(100.0, 0.1, 20.0)).chi2, 160.0)
    assert i > 0 and t[i] > t[np.flatnonzero(np.cumsum(hind) >= 160)[0]]
    dev = np.abs(F / (fit.source_flux * physics.pspl_magnification(t, fit.t0, fit.u0, fit.tE) + fit.blend_flux) - 1)
    assert t[i] >= t[np.argmax(dev > 0.003)] - 15.0              # not long before the deviation shows


# --- profiles ----------------------------------------------------------------------------
def test_every_shipped_profile_loads(tmp_path):
    assert {"thesis", "lsst", "roman"} <= set(sv.profile_names())
    for n in sv.profile_names():
        assert sv.load_profile(n).name == n


@pytest.mark.parametrize("text, message", [
    ("name: x\nkind: nightly\nbands: {i: {m5: 23}}\nrevisit_min_nights: 5\nrevisit_max_nights: 3\n",
     "revisit_min_nights"),
    ("name: x\nkind: nightly\nbands: {w: {m5: 23}}\n", "unknown band 'w'"),
    ("name: x\nkind: nightly\nbands: {i: {m5: 23, depth: 3}}\n", "unknown key bands.i.depth"),
    ("name: x\nkind: nightly\ncadense: 3\nbands: {i: {m5: 23}}\n", "unknown key cadense"),
    ("name: x\nkind: nightly\nnight_loss: 1.5\nbands: {i: {m5: 23}}\n", "night_loss = 1.5 is out of range"),
    ("name: x\nkind: weekly\n", "kind must be one of"),
    ("name: x\nkind: continuous\nbands: {F146: {zeropoint: 27}}\nreference_band: F146\nseason_starts: '1'\n",
     "needs zeropoint and exposure_s"),
])
def test_a_bad_profile_is_an_error_that_names_it(tmp_path, text, message):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    sv.load_profile.cache_clear()
    with pytest.raises(ValueError, match=message) as info:
        sv.load_profile(str(f))
    assert str(f) in str(info.value)
    with pytest.raises(sv.SurveyError, match="unknown survey 'nope'"):
        sv.load_profile("nope")
