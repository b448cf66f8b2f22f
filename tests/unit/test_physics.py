"""Pin the physics: PSPL golden values, the binary geometry against VBMicrolensing
called point by point, limits where a binary lens becomes a single lens, and the
detectability fit."""
import math

import numpy as np
import pytest

from training import detectability, physics


# ------------------------------------------------------------------------------ PSPL

@pytest.mark.parametrize("u, expected", [
    (1.0, 3.0 / math.sqrt(5.0)),                        # 1.3416407865
    (0.1, 2.01 / (0.1 * math.sqrt(4.01))),              # 10.0374610...
    (0.5, 2.25 / (0.5 * math.sqrt(4.25))),
    (3.0, 11.0 / (3.0 * math.sqrt(13.0))),
])
def test_pspl_golden_values(u, expected):
    assert physics.pspl_magnification_u(u) == pytest.approx(expected, rel=1e-14)


def test_pspl_known_numbers_and_limits():
    assert physics.pspl_magnification_u(1.0) == pytest.approx(1.3416407864998738, rel=1e-14)
    # far away A -> 1 + 2/u^4; close in A -> 1/u
    assert physics.pspl_magnification_u(100.0) - 1 == pytest.approx(2e-8, rel=1e-3)
    assert physics.pspl_magnification_u(1e-4) * 1e-4 == pytest.approx(1.0, rel=1e-6)


def test_pspl_light_curve_uses_u_of_t():
    t = np.array([400.0, 420.0, 380.0, 460.0])
    A = physics.pspl_magnification(t, t0=400.0, u0=0.2, tE=20.0)
    u = np.sqrt(0.2 ** 2 + ((t - 400.0) / 20.0) ** 2)
    np.testing.assert_allclose(A, (u * u + 2) / (u * np.sqrt(u * u + 4)), rtol=1e-14)
    assert A[1] == A[2]                                   # symmetric about t0
    assert A[0] == pytest.approx(physics.pspl_magnification_u(0.2), rel=1e-15)


def test_flux_and_magnitudes():
    A = np.array([1.0, 2.0, 10.0])
    F = physics.flux(A, fs=0.6)
    np.testing.assert_allclose(F, [1.0, 1.6, 6.4])
    m = physics.flux_to_mag(F, 20.0)
    assert m[0] == 20.0
    assert m[2] == pytest.approx(20.0 - 2.5 * math.log10(6.4))
    sig = physics.mag_err_to_flux_err(F, 0.05)
    np.testing.assert_allclose(sig, F * 0.05 * math.log(10) / 2.5)


# ---------------------------------------------------------------------------- binary

BINARY = dict(t0=500.0, u0=0.08, tE=30.0, s=1.1, q=0.4, alpha=1.0, rho=0.02)


def test_trajectory_matches_vbmicrolensing_frame():
    import VBMicrolensing
    vbm = VBMicrolensing.VBMicrolensing()
    t = np.linspace(440.0, 560.0, 13)
    p = BINARY
    _, y1, y2 = vbm.BinaryLightCurve([math.log(p["s"]), math.log(p["q"]), p["u0"], p["alpha"],
                                      math.log(p["rho"]), math.log(p["tE"]), p["t0"]], t)
    # derived independently: tau along -(cos a, sin a), u0 perpendicular
    tau = (t - p["t0"]) / p["tE"]
    e_motion = np.array([-math.cos(p["alpha"]), -math.sin(p["alpha"])])
    e_perp = np.array([math.sin(p["alpha"]), -math.cos(p["alpha"])])
    expected = p["u0"] * e_perp[:, None] + tau[None, :] * e_motion[:, None]
    np.testing.assert_allclose(y1, expected[0], atol=1e-12)
    np.testing.assert_allclose(y2, expected[1], atol=1e-12)
    m1, m2 = physics.source_trajectory(t, p["t0"], p["u0"], p["tE"], p["alpha"])
    np.testing.assert_allclose(m1, expected[0], atol=1e-12)
    np.testing.assert_allclose(m2, expected[1], atol=1e-12)
    # closest approach to the origin (centre of mass) is u0, at t0
    r = np.hypot(expected[0], expected[1])
    assert r.min() == pytest.approx(p["u0"], rel=1e-12) and t[np.argmin(r)] == p["t0"]


def test_binary_light_curve_against_vbm_point_by_point():
    p = BINARY
    t = np.linspace(440.0, 560.0, 241)           # crosses the caustic
    A = physics.binary_magnification(t, **p, tol=1e-3)
    y1, y2 = physics.source_trajectory(t, p["t0"], p["u0"], p["tE"], p["alpha"])
    ref = physics.binary_magnification_pointwise(y1, y2, p["s"], p["q"], p["rho"], tol=1e-3)
    assert A.max() > 5.0                         # really a caustic crossing
    np.testing.assert_allclose(A, ref, rtol=1e-9)


def test_binary_against_independent_finite_source_call():
    """BinaryMag (the older contour integrator, its own accuracy argument) agrees."""
    import VBMicrolensing
    vbm = VBMicrolensing.VBMicrolensing()
    p = BINARY
    t = np.linspace(470.0, 530.0, 25)
    A = physics.binary_magnification(t, **p, tol=1e-4)
    y1, y2 = physics.source_trajectory(t, p["t0"], p["u0"], p["tE"], p["alpha"])
    ref = np.array([vbm.BinaryMag(p["s"], p["q"], a, b, p["rho"], 1e-5) for a, b in zip(y1, y2)])
    np.testing.assert_allclose(A, ref, rtol=1e-3)


def test_lens_positions_put_heavier_lens_left_of_centre_of_mass():
    """A wide binary is two point lenses at the documented positions."""
    import VBMicrolensing
    vbm = VBMicrolensing.VBMicrolensing()
    s, q = 40.0, 0.25
    z1, z2 = physics.lens_positions(s, q)
    assert z1 == pytest.approx(-8.0) and z2 == pytest.approx(32.0)
    m1, m2 = 1 / (1 + q), q / (1 + q)
    for z, m in ((z1, m1), (z2, m2)):
        u = 0.3 / math.sqrt(m)                     # 0.3 away, in that lens' own Einstein radius
        assert vbm.BinaryMag0(s, q, z, 0.3) == pytest.approx(physics.pspl_magnification_u(u),
                                                             rel=3e-3)


def test_tiny_mass_ratio_approaches_pspl():
    t = np.linspace(300.0, 700.0, 801)
    kw = dict(t0=500.0, u0=0.1, tE=25.0, alpha=2.0, rho=1e-3)
    A_bin = physics.binary_magnification(t, s=1.3, q=1e-8, **kw, tol=1e-4)
    A_pspl = physics.pspl_magnification(t, 500.0, 0.1, 25.0)
    np.testing.assert_allclose(A_bin, A_pspl, rtol=2e-4)


def test_wide_binary_approaches_pspl_of_the_heavier_lens():
    s, q = 50.0, 0.5
    z1, _ = physics.lens_positions(s, q)
    m1 = 1 / (1 + q)
    # trajectory along the binary axis (alpha = 0: y1 = -tau, y2 = -u0), passing the
    # heavier lens at distance 0.15 (centre-of-mass frame)
    t0, u0, tE = 500.0, 0.15, 20.0
    t = np.linspace(t0 - 3 * tE, t0 + 3 * tE, 301) + z1 * tE   # around the heavier lens
    A_bin = physics.binary_magnification(t, t0, u0, tE, s, q, 0.0, 1e-3, tol=1e-4)
    y1, y2 = physics.source_trajectory(t, t0, u0, tE, 0.0)
    u = np.hypot(y1 - z1, y2) / math.sqrt(m1)
    np.testing.assert_allclose(A_bin, physics.pspl_magnification_u(u), rtol=2e-3)


def test_tol_zero_is_refused():
    with pytest.raises(ValueError, match="Tol"):
        physics.binary_magnification(np.array([0.0]), 0.0, 0.1, 10.0, 1.0, 0.5, 0.0, 0.01, tol=0)


# ---------------------------------------------------------------------- detectability

EPOCHS = np.linspace(0.0, 1000.0, 1500)
KEEP = np.random.default_rng(3).random(1500) >= 0.2
T = EPOCHS[KEEP]


def test_fit_on_a_pspl_curve_returns_chi2_zero():
    F = physics.flux(physics.pspl_magnification(T, 412.3, 0.07, 33.0), fs=0.7)
    for guess in ((412.3, 0.07, 33.0), (380.0, 0.4, 60.0), None):
        fit = detectability.detectability(T, F, 0.05, true_params=guess)
        assert fit.chi2 < 1e-4, guess
        assert fit.t0 == pytest.approx(412.3, abs=1e-3)
        assert fit.u0 == pytest.approx(0.07, rel=1e-3)
        assert fit.tE == pytest.approx(33.0, rel=1e-3)
        assert fit.source_flux == pytest.approx(0.7, rel=1e-3)
        assert fit.blend_flux == pytest.approx(0.3, rel=1e-3)


def test_fit_handles_blending_beyond_the_prior():
    F = physics.flux(physics.pspl_magnification(T, 600.0, 0.3, 80.0), fs=0.2)
    fit = detectability.detectability(T, F, 0.1)
    assert fit.chi2 < 1e-3 and fit.source_flux == pytest.approx(0.2, rel=1e-3)


def test_binary_indistinguishable_from_pspl_has_dchi2_near_zero():
    kw = dict(t0=500.0, u0=0.2, tE=40.0, rho=0.01)
    for s, q, alpha in ((1.2, 1e-6, 0.7), (10.0, 1e-3, math.pi / 2)):
        A = physics.binary_magnification(T, s=s, q=q, alpha=alpha, **kw)
        F = physics.flux(A, 0.8)
        fit = detectability.detectability(T, F, 0.05, true_params=(500.0, 0.2, 40.0))
        assert fit.chi2 < 1.0, (s, q, fit)


def test_caustic_crossing_binary_has_large_dchi2():
    A = physics.binary_magnification(T, 500.0, 0.05, 30.0, 1.0, 0.5, 1.0, 0.01)
    F = physics.flux(A, 0.9)
    fit = detectability.detectability(T, F, 0.05, true_params=(500.0, 0.05, 30.0))
    assert fit.chi2 > 1000.0
    # chi2 reported is that of the model it returns
    sig = physics.mag_err_to_flux_err(F, 0.05)
    assert fit.chi2 == pytest.approx(float(np.sum(((F - fit.flux(T)) / sig) ** 2)), rel=1e-9)


def test_fit_is_no_worse_than_scipy_least_squares():
    """A reference multi-start fit with scipy never beats ours by more than 1%."""
    from scipy.optimize import least_squares
    rng = np.random.default_rng(7)
    for _ in range(2):
        s, q, u0, alpha = rng.uniform(0.6, 1.6), rng.uniform(0.1, 1), rng.uniform(0.01, 0.4), \
            rng.uniform(0, 2 * np.pi)
        t0, tE, rho = rng.uniform(300, 700), rng.uniform(10, 100), rng.uniform(0.01, 0.1)
        F = physics.flux(physics.binary_magnification(T, t0, u0, tE, s, q, alpha, rho), 0.8)
        sig = physics.mag_err_to_flux_err(F, 0.05)
        ours = detectability.detectability(T, F, 0.05, true_params=(t0, u0, tE)).chi2

        def resid(p):
            A = physics.pspl_magnification(T, p[0], math.exp(p[1]), math.exp(p[2]))
            X = np.stack([A, np.ones_like(A)], 1) / sig[:, None]
            c = np.linalg.lstsq(X, F / sig, rcond=None)[0]
            return X @ c - F / sig
        bounds = ([-np.inf, math.log(1e-5), math.log(0.1)], [np.inf, math.log(10), math.log(1e4)])
        best = min(float(np.sum(least_squares(resid, [a, math.log(b), math.log(c)],
                                              bounds=bounds).fun ** 2))
                   for a in (t0, T[np.argmax(F)]) for b in (0.02, 0.3) for c in (tE,))
        assert ours <= best * 1.01 + 0.1, (ours, best)
