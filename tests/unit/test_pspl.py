"""Pin the PSPL core (training/pspl.py): A(u) at known points and in its limits, the
derivatives, the closed-form fluxes (free and bounded blend) and the fit.

Golden values are computed independently of numpy, with the standard library's
``decimal`` at 50 significant digits from the exact binary value of each float input,
so the tolerances only have to cover the float64 evaluation. A(u) = (u^2 + 2) /
(u sqrt(u^2 + 4)) takes six correctly rounded operations (u u, + 2, + 4, sqrt, the
product, the quotient), each off by at most eps = 2^-53 = 1.1e-16 relative, and none of
them amplifies the error already there (the additions of positive terms, the root
halves it): at most 6 eps = 6.7e-16, hence ``rel=1e-15``. From (t0, ln u0, ln tE) a few
more operations come first (two exp, which numpy gets to within an ulp or so, the
difference, the quotient, u0^2 + tau^2), and A's relative change is at most that of u
(|d ln A / d ln u| <= 1), hence ``rel=4e-15`` there.
"""
from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest

from training import physics, pspl

getcontext().prec = 50
EPS = 2.0 ** -53


def A_exact(u: float) -> float:
    """A(u) at 50 digits, from the exact binary value of u, rounded to float once."""
    x = Decimal(u)
    return float((x * x + 2) / (x * (x * x + 4).sqrt()))


def A_exact_ln(t: float, t0: float, ln_u0: float, ln_tE: float) -> float:
    """A at (t0, ln u0, ln tE), all at 50 digits (exp included)."""
    tau = (Decimal(t) - Decimal(t0)) / Decimal(ln_tE).exp()
    u2 = (2 * Decimal(ln_u0)).exp() + tau * tau
    return float((u2 + 2) / (u2.sqrt() * (u2 + 4).sqrt()))


# ------------------------------------------------------------------ golden values of A(u)

@pytest.mark.parametrize("u, printed", [
    (1.0, 1.3416407864998738),     # 3 / sqrt(5)
    (0.1, 10.037461005722338),     # 2.01 / (0.1 sqrt(4.01))
])
def test_A_at_known_points(u, printed):
    assert A_exact(u) == pytest.approx(printed, rel=1e-16)
    assert pspl.magnification_u(u) == pytest.approx(A_exact(u), rel=1e-15)
    assert pspl.magnification_u(1.0) == pytest.approx(3.0 / math.sqrt(5.0), rel=1e-15)


@pytest.mark.parametrize("u", [1e-6, 1e-3, 0.05, 0.3, 0.5, 2.0, 3.0, 7.5, 40.0, 1e3])
def test_A_golden_values_over_decades(u):
    assert float(pspl.magnification_u(u)) == pytest.approx(A_exact(u), rel=1e-15)


@pytest.mark.parametrize("u", [10.0, 30.0, 100.0])
def test_A_far_from_the_lens_tends_to_1_plus_2_over_u4(u):
    """A - 1 = 2/u^4 (1 - 4/u^2 + 15/u^4 - ...) (expansion of (1 + 2x)(1 + 4x)^(-1/2),
    x = 1/u^2). A - 1 in float64 carries A's absolute error, at most 6 eps A (module
    doc), relative to 2/u^4: 3 eps u^4; the golden A, rounded to a float, half an ulp more."""
    excess = float(pspl.magnification_u(u)) - 1.0
    rounding = 3.0 * EPS * u ** 4 * 1.01
    assert excess == pytest.approx(2.0 / u ** 4, rel=4.0 / u ** 2 * 1.01 + rounding)
    assert excess == pytest.approx(2.0 / u ** 4 * (1.0 - 4.0 / u ** 2), rel=16.0 / u ** 4 + rounding)
    assert excess == pytest.approx(A_exact(u) - 1.0, abs=6.5 * EPS * 1.01)


@pytest.mark.parametrize("u", [1e-2, 1e-4, 1e-8])
def test_A_close_to_the_lens_goes_as_1_over_u(u):
    """u A = (u^2 + 2) / sqrt(u^2 + 4) = 1 + 3u^2/8 - 5u^4/128 + ..."""
    uA = u * float(pspl.magnification_u(u))
    assert uA == pytest.approx(1.0, rel=0.4 * u * u + 1e-15)
    assert uA == pytest.approx(1.0 + 3.0 * u * u / 8.0, rel=u ** 4 / 16 + 1e-15)


def test_A_of_t_and_of_the_log_parameters_against_golden_values():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t, t0 = rng.uniform(0, 1000), rng.uniform(0, 1000)
        ln_u0, ln_tE = rng.uniform(math.log(1e-4), math.log(5)), rng.uniform(math.log(0.5), math.log(2e3))
        exact = A_exact_ln(t, t0, ln_u0, ln_tE)
        assert float(pspl.magnification_ln(t, t0, ln_u0, ln_tE)) == pytest.approx(exact, rel=4e-15)
        u0, tE = math.exp(ln_u0), math.exp(ln_tE)
        assert float(pspl.magnification(np.array([t]), t0, u0, tE)[0]) == pytest.approx(exact, rel=4e-15)


def test_the_three_evaluations_agree_to_a_few_ulp_and_derivatives_share_A_bit_for_bit():
    """The module keeps three floating-point orders of the same formula (module doc): they
    must agree to rounding; the derivative routine's A is magnification_ln's exactly."""
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 1000, 700))
    theta = np.column_stack([rng.uniform(0, 1000, 60), rng.uniform(math.log(1e-6), math.log(20), 60),
                             rng.uniform(math.log(0.05), math.log(1e4), 60)])
    t0, lu0, lte = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
    A_ln = pspl.magnification_ln(t, t0, lu0, lte)
    A_t = np.stack([pspl.magnification(t, *row) for row in zip(theta[:, 0], np.exp(theta[:, 1]),
                                                                np.exp(theta[:, 2]))])
    A_rank = pspl._rank_magnification(t, theta)
    np.testing.assert_allclose(A_t, A_ln, rtol=4e-15)
    np.testing.assert_allclose(A_rank, A_ln, rtol=4e-15)
    A_d, *_ = pspl.magnification_ln_derivatives(t, t0, lu0, lte)
    assert np.array_equal(A_d, A_ln)
    out = tuple(np.empty(A_ln.shape) for _ in range(4))
    got = pspl.magnification_ln_derivatives(t, t0, lu0, lte, out=out)
    assert all(g is o for g, o in zip(got, out))
    for g, r in zip(got, pspl.magnification_ln_derivatives(t, t0, lu0, lte)):
        assert np.array_equal(g, r)


def test_physics_reexports_the_core():
    assert physics.pspl_magnification is pspl.magnification
    assert physics.pspl_magnification_u is pspl.magnification_u


# ------------------------------------------------------------------------- derivatives

@pytest.mark.parametrize("t0, u0, tE", [(500.0, 0.1, 30.0), (120.0, 0.003, 8.0), (700.0, 1.5, 200.0)])
def test_derivatives_against_central_finite_differences(t0, u0, tE):
    """Central differences with step h in t0 (h_t0 = 1e-5 tE) and in ln u0, ln tE (1e-5):
    truncation O(h^2) ~ 1e-10 and rounding ~ eps A / h ~ 1e-11 A, far inside the
    tolerance 1e-6 of the derivative's largest value (the derivatives cross zero, so a
    relative tolerance pointwise would be meaningless there)."""
    t = np.linspace(t0 - 4 * tE, t0 + 4 * tE, 801)
    p = np.array([t0, math.log(u0), math.log(tE)])
    _, *D = pspl.magnification_ln_derivatives(t, *p)
    for k, h in enumerate((1e-5 * tE, 1e-5, 1e-5)):
        up, down = p.copy(), p.copy()
        up[k] += h
        down[k] -= h
        fd = (pspl.magnification_ln(t, *up) - pspl.magnification_ln(t, *down)) / (2 * h)
        scale = np.max(np.abs(fd))
        assert scale > 0
        np.testing.assert_allclose(D[k], fd, rtol=0, atol=1e-6 * scale)


def test_dA_du_closed_form():
    """dA/du = -8 / (u^2 (u^2 + 4)^(3/2)): the factor the three derivatives share. Step
    h = 1e-4 u: truncation ~ (h/u)^2 = 1e-8 relative; rounding eps A / h, largest at u = 20
    where A' is smallest (~1e-8 relative)."""
    u = np.array([1e-3, 0.05, 0.5, 1.0, 3.0, 20.0])
    h = 1e-4 * u
    fd = (pspl.magnification_u(u + h) - pspl.magnification_u(u - h)) / (2 * h)
    np.testing.assert_allclose(-8.0 / (u * u * (u * u + 4) ** 1.5), fd, rtol=1e-6)


# ------------------------------------------------------------------------------ fluxes

def _sums(A, F, w):
    return (w.sum(-1), (w * A).sum(-1), (w * A * A).sum(-1), (w * F).sum(-1), (w * A * F).sum(-1),
            (w * F * F).sum(-1))


def _chi2(A, F, w, a, b):
    return float(np.sum(w * (F - a * A - b) ** 2))


def _curves(rng, n, a, b, noise=0.02):
    A = pspl.magnification_u(rng.uniform(0.05, 2.0, n))
    w = rng.uniform(0.5, 2.0, n) / noise ** 2
    return A, a * A + b + rng.normal(0, noise, n), w


@pytest.mark.parametrize("a, b", [(0.7, 0.3), (1.3, -0.3), (0.05, 0.95), (2.0, -1.0)])
def test_free_fluxes_match_weighted_lstsq(a, b):
    """b free: any positive source flux, negative blending included, is the weighted
    least-squares solution (numpy lstsq on sqrt(w) [A, 1])."""
    rng = np.random.default_rng(2)
    A, F, w = _curves(rng, 300, a, b)
    fa, fb, chi2 = pspl.fluxes(*(np.array([x]) for x in _sums(A, F, w)))
    sw = np.sqrt(w)
    (la, lb), *_ = np.linalg.lstsq(np.column_stack([A, np.ones_like(A)]) * sw[:, None], F * sw, rcond=None)
    assert fa[0] == pytest.approx(la, rel=1e-9) and fb[0] == pytest.approx(lb, rel=1e-9, abs=1e-12)
    assert chi2[0] == pytest.approx(_chi2(A, F, w, la, lb), rel=1e-8)


def test_free_fluxes_with_a_negative_optimum_fall_back_to_a_constant():
    rng = np.random.default_rng(3)
    A, F, w = _curves(rng, 200, -0.5, 2.0)          # flux falls where A rises: a < 0
    fa, fb, chi2 = pspl.fluxes(*(np.array([x]) for x in _sums(A, F, w)))
    mean = float(np.sum(w * F) / np.sum(w))
    assert fa[0] == 0.0 and fb[0] == pytest.approx(mean, rel=1e-12)
    assert chi2[0] == pytest.approx(_chi2(A, F, w, 0.0, mean), rel=1e-8)
    # A constant over the points: singular normal equations, the constant flux again
    fa, fb, _ = pspl.fluxes(*(np.array([x]) for x in _sums(np.ones(50), F[:50], w[:50])))
    assert fa[0] == 0.0 and fb[0] == pytest.approx(np.sum(w[:50] * F[:50]) / np.sum(w[:50]))


def _brute_force_bounded(A, F, w, kappa):
    """min of chi^2 over a >= 0, b >= -kappa a by search: for each a on a grid, chi^2 is a
    parabola in b whose best feasible b is max(-kappa a, (S_F - a S_A)/S_w); the grid in a
    is refined three times around its best point. Residuals summed directly."""
    Sw, SA, SF = w.sum(), (w * A).sum(), (w * F).sum()
    lo, hi = 0.0, 5.0 * float(F.max() / A.min())
    for _ in range(4):
        a = np.linspace(lo, hi, 2001)
        b = np.maximum(-kappa * a, (SF - a * SA) / Sw)
        chi = np.sum(w * (F[None, :] - a[:, None] * A[None, :] - b[:, None]) ** 2, axis=1)
        j = int(np.argmin(chi))
        step = a[1] - a[0]
        lo, hi = max(0.0, a[j] - 2 * step), a[j] + 2 * step
    return a[j], b[j], chi[j], step


@pytest.mark.parametrize("a, b, active", [
    (0.7, 0.3, "free"),                 # within the bound: the free optimum
    (1.0, 0.0, "free"),                 # no blend
    (2.0, -1.0, "b = -kappa a"),        # source fraction 2 > fs_max = 1.25
    (1.5, -0.6, "b = -kappa a"),
    (-0.05, 1.5, "a = 0"),              # anti-correlated (still positive): a constant flux
])
def test_bounded_fluxes_against_brute_force_search(a, b, active):
    kappa = 1.0 - 1.0 / 1.25
    rng = np.random.default_rng(4)
    A, F, w = _curves(rng, 250, a, b)
    fa, fb, chi2, flat = pspl.fluxes_bounded(*(np.array([x]) for x in _sums(A, F, w)), kappa)
    fa, fb, chi2 = float(fa[0]), float(fb[0]), float(chi2[0])
    ba, bb, bchi, step = _brute_force_bounded(A, F, w, kappa)
    assert fa >= 0 and fb >= -kappa * fa * (1 + 1e-12)
    assert chi2 == pytest.approx(_chi2(A, F, w, fa, fb), rel=1e-8)
    # no point the search found beats it (both chi^2 summed from the residuals; 1e-10:
    # the rounding of those sums), and it is the point the search homes in on (the chi^2
    # is flat at its minimum: the search resolves a to ~sqrt(rounding), not to its step)
    assert _chi2(A, F, w, fa, fb) <= bchi * (1 + 1e-10)
    assert fa == pytest.approx(ba, abs=1e-6 + 2 * step)
    assert fb == pytest.approx(bb, abs=1e-6 + 2 * step)
    assert bool(flat[0]) == (active == "a = 0")
    if active == "b = -kappa a":
        assert fb == pytest.approx(-kappa * fa, rel=1e-12)
    elif active == "free":
        la, lb, _ = pspl.fluxes(*(np.array([x]) for x in _sums(A, F, w)))
        assert fa == pytest.approx(float(la[0]), rel=1e-12) and fb == pytest.approx(float(lb[0]), rel=1e-12)


def test_bounded_fluxes_many_random_rows_against_brute_force():
    kappa = 1.0 - 1.0 / 1.25
    rng = np.random.default_rng(5)
    n = 0
    while n < 40:
        A, F, w = _curves(rng, 60, rng.uniform(-1, 3), rng.uniform(-2, 2), noise=rng.uniform(0.01, 0.5))
        if F.min() <= 0:            # fluxes of a star are positive (fluxes_bounded's premise)
            continue
        n += 1
        fa, fb, chi2, _ = pspl.fluxes_bounded(*(np.array([x]) for x in _sums(A, F, w)), kappa)
        fa, fb = float(fa[0]), float(fb[0])
        _, _, bchi, _ = _brute_force_bounded(A, F, w, kappa)
        assert fa >= 0 and fb >= -kappa * fa * (1 + 1e-12)
        assert _chi2(A, F, w, fa, fb) <= bchi * (1 + 1e-10)
        assert float(chi2[0]) == pytest.approx(bchi, rel=1e-8)


# -------------------------------------------------------------------------- 3x3 solves

def test_solve3_against_numpy_and_singular_systems():
    rng = np.random.default_rng(6)
    M = rng.normal(0, 1, (500, 3, 3)) + 3 * np.eye(3)
    v = rng.normal(0, 1, (500, 3))
    singular = np.zeros(500, bool)
    singular[::7] = singular[::11] = True
    # small integers, third row the sum of the other two: det is exactly 0 in floats
    M[::7, :2] = rng.integers(-3, 4, (len(M[::7]), 2, 3))
    M[::7, 2] = M[::7, 0] + M[::7, 1]
    M[::11] = 0.0
    x = np.stack(pspl.solve3([[M[:, i, j] for j in range(3)] for i in range(3)],
                             [v[:, i] for i in range(3)]), axis=1)
    np.testing.assert_allclose(x[~singular], np.linalg.solve(M[~singular], v[~singular][:, :, None])[:, :, 0],
                               rtol=1e-9, atol=1e-12)
    assert np.all(x[singular] == 0.0)
    for k in range(500):            # the scalar form (fit_pspl's): same numbers, None if singular
        got = pspl._solve3_scalar(M[k].tolist(), v[k].tolist())
        assert got is None if singular[k] else got == tuple(x[k])


# ---------------------------------------------------------------------------------- fit

T = np.sort(np.random.default_rng(7).uniform(0.0, 1000.0, 1200))


@pytest.mark.parametrize("true_params", [(412.3, 0.07, 33.0), None])
def test_fit_recovers_a_noiseless_pspl(true_params):
    """t0, u0, tE to 1e-4 relative and the fluxes to 1e-6, with per-point flux errors and
    the stopping tolerances tightened (the defaults stop at a chi^2 gain of 1e-2)."""
    t0, u0, tE, a, b = 412.3, 0.07, 33.0, 0.7, 0.3
    F = a * pspl.magnification(T, t0, u0, tE) + b
    sigma = 0.05 * F * math.log(10) / 2.5 * np.random.default_rng(8).uniform(0.5, 2.0, T.size)
    fit = pspl.fit_pspl(T, F, sigma, true_params=true_params, rtol=1e-12, atol=1e-12, max_iter=100)
    assert fit.t0 == pytest.approx(t0, rel=1e-4)
    assert fit.u0 == pytest.approx(u0, rel=1e-4)
    assert fit.tE == pytest.approx(tE, rel=1e-4)
    assert fit.source_flux == pytest.approx(a, abs=1e-6)
    assert fit.blend_flux == pytest.approx(b, abs=1e-6)
    assert fit.chi2 < 1e-6


def test_chi2_per_point_adds_up_to_the_fit_chi2():
    F = pspl.magnification(T, 500.0, 0.2, 20.0) + 0.02 * np.sin(T / 7.0)     # not a PSPL
    sigma = np.full(T.size, 0.01)
    fit = pspl.fit_pspl(T, F, sigma)
    per = fit.chi2_per_point(T, F, sigma)
    assert per.shape == T.shape and np.all(per >= 0)
    assert per.sum() == pytest.approx(fit.chi2, rel=1e-12)
    assert fit.chi2 > 100.0
    np.testing.assert_array_equal(per, fit.chi2_per_point(T, F, 0.01))        # scalar error
    np.testing.assert_allclose(per, ((F - fit.flux(T)) / sigma) ** 2, rtol=1e-12)
    cum = np.cumsum(per)
    assert np.all(np.diff(cum) >= 0) and cum[-1] == pytest.approx(fit.chi2, rel=1e-12)


def test_fit_refuses_too_few_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        pspl.fit_pspl(T[:3], np.ones(3), 0.1)


# --- several bands -----------------------------------------------------------------------
def test_fit_bands_recovers_a_noiseless_chromatic_pspl():
    """Three bands, each with its own source and blend flux (chromatic blending), one
    (t0, u0, tE): recovered to 1e-4 relative (tight stopping, as for the one-band fit)."""
    from training import pspl

    rng = np.random.default_rng(4)
    t = np.sort(rng.uniform(0, 300, 400))
    band = rng.integers(0, 3, 400)
    a_true, b_true = np.array([1000.0, 2500.0, 4000.0]), np.array([3000.0, 1500.0, 500.0])
    A = pspl.magnification(t, 150.0, 0.15, 25.0)
    F = a_true[band] * A + b_true[band]
    err = 0.01 * F
    fit = pspl.fit_pspl_bands(t, F, err, band, rtol=1e-12, atol=1e-12, max_iter=200)
    assert fit.t0 == pytest.approx(150.0, rel=1e-4) and fit.u0 == pytest.approx(0.15, rel=1e-4)
    assert fit.tE == pytest.approx(25.0, rel=1e-4)
    np.testing.assert_allclose(fit.source_flux, a_true, rtol=1e-4)
    np.testing.assert_allclose(fit.blend_flux, b_true, rtol=1e-4)
    assert fit.chi2 < 1e-6


def test_fit_bands_on_one_band_is_the_one_band_fit():
    """One band: the same optimum as fit_pspl (chi^2 within 0.1%, parameters within 1e-3)."""
    from training import pspl

    rng = np.random.default_rng(5)
    t = np.sort(rng.uniform(0, 500, 300))
    F = 800.0 * pspl.magnification(t, 210.0, 0.3, 40.0) + 200.0
    F = F + rng.normal(0, 10.0, t.size)
    one = pspl.fit_pspl(t, F, 10.0)
    many = pspl.fit_pspl_bands(t, F, np.full(t.size, 10.0), np.zeros(t.size, np.int64))
    assert many.chi2 == pytest.approx(one.chi2, rel=1e-3)
    assert (many.t0, many.u0, many.tE) == pytest.approx((one.t0, one.u0, one.tE), rel=1e-3)
