"""The point-source point-lens (PSPL) core: the magnification and its derivatives, the
closed-form source and blend fluxes, and the least-squares PSPL fit.

Every PSPL computation of the package goes through this module: ``training.physics``
re-exports :func:`magnification` and :func:`magnification_u` (as ``pspl_magnification``
and ``pspl_magnification_u``: the simulator's PSPL events); ``training.detectability``
is :func:`fit_pspl` applied to a noise-free binary curve (the dataset's ``dchi2``);
``training.psplfit`` (the classical rule's robust point-by-point fit) takes the
magnification with derivatives, :func:`fluxes_bounded` and :func:`solve3` from here.

Magnification (Paczynski 1986, ApJ 304, 1)
------------------------------------------
A point source at a projected distance u (in Einstein radii) from a point lens is
magnified by::

    A(u) = (u^2 + 2) / (u sqrt(u^2 + 4)),

A -> 1 + 2/u^4 far from the lens and A ~ 1/u close to it. On a straight trajectory
at constant speed::

    u(t)^2 = u_0^2 + tau^2,   tau = (t - t_0) / t_E

(``t0``: time of closest approach, days; ``u0``: impact parameter, Einstein radii;
``tE``: Einstein time, days). The fits work in (t_0, ln u_0, ln t_E), with::

    dA/du = -8 / (u^2 (u^2 + 4)^(3/2)),
    du/dt_0 = -tau / (u t_E),   du/dln u_0 = u_0^2 / u,   du/dln t_E = -tau^2 / u,

so the three derivatives share the factor (dA/du) / u (:func:`magnification_ln_derivatives`).

The formula is evaluated three ways, each in the floating-point order its callers have
always used, so that the simulated datasets, the models trained on them and the rule's
statistics stay bit-identical. They agree to rounding (tests/unit/test_pspl.py), but
not bit for bit: on random parameters 15% (from u) and 32% (the ranking's) of the values
differ from :func:`magnification_ln` by 1 to 3 ulp, enough to move a fit's iterations and
so its last digits. The three:

* :func:`magnification_u`, :func:`magnification`: from u (u = sqrt(u_0^2 + tau^2) first,
  then u^2 = u u): the simulator's PSPL curves and the fitted model ``PsplFit.flux``;
* :func:`magnification_ln`, :func:`magnification_ln_derivatives`: from u^2 = u_0^2 +
  tau^2 itself, at (t_0, ln u_0, ln t_E): every iteration of both fits;
* ``_rank_magnification``: tau = (t - t_0) exp(-ln t_E) and one root sqrt(u^2 (u^2 + 4)),
  the cheapest, for ranking the starts of :func:`fit_pspl` (the starts it picked are what
  the datasets' ``dchi2`` were computed from).

Fluxes (variable projection: Golub & Pereyra 1973, SIAM J. Numer. Anal. 10, 413)
--------------------------------------------------------------------------------
The model in flux is ``F(t) = a A(t; t0, u0, tE) + b`` (``a`` source flux, ``b`` blend
flux). They enter linearly, so for any (t_0, u_0, t_E) the weighted least-squares fluxes
(weights w = 1/sigma_F^2) are closed-form in the sums S_w = sum w, S_A = sum w A,
S_AA = sum w A^2, S_F = sum w F, S_AF = sum w A F, S_FF = sum w F^2::

    det = S_AA S_w - S_A^2,   a = (S_AF S_w - S_A S_F) / det,   b = (S_AA S_F - S_A S_AF) / det

and only the three non-linear parameters are iterated. A source flux cannot be negative:
a >= 0. chi^2 is a convex quadratic in (a, b), so the constrained optimum is the free one
when that is feasible, else the optimum on the boundary a = 0 (a constant flux,
b = S_F / S_w). :func:`fluxes` leaves b free, so a fitted source fraction a/(a+b) above 1
("negative blending") is allowed, as in survey fits (``fit_pspl``, detectability).
:func:`fluxes_bounded` bounds it, a/(a+b) <= fs_max, i.e. b >= -kappa a with
kappa = 1 - 1/fs_max (the classical rule, ``training.psplfit``: the bound removes the
rising-wing degeneracy u_0 -> large, a -> inf, b -> -inf); where the free optimum
breaks it, the optimum is the better of the two boundaries, a = 0 and b = -kappa a
(there chi^2(a) = S_FF - 2 a (S_AF - kappa S_F) + a^2 (S_AA - 2 kappa S_A + kappa^2 S_w)).
The two share the normal equations and the rule for a = 0; they write chi^2 differently
(expanded in a and b; S_FF - a S_AF - b S_F, valid at an optimum), each as its fit has
always done, because the fits' steps are accepted on those chi^2 values.

The fit (:func:`fit_pspl`)
-------------------------
Weighted least squares in flux of one light curve over (t_0, ln u_0, ln t_E):

1. starts: the given (t0, u0, tE) when known (the truth, for ``detectability``), the
   time of the brightest point and of the brightest point well away from it, crossed
   with a few u0 values and tE values (the given tE and a width estimate from the curve,
   each times 1/2, 1, 2); ranked by chi^2 on every k-th point (about 400), all in one
   numpy pass;
2. Levenberg-Marquardt from 3 starts together (the best start of each start time, then
   the next best overall) on about 400 points (every k-th), then from the best of them
   on all points, with the Kaufman Jacobian of the variable projection problem (Kaufman
   1975, BIT 15, 49). The work over the points is numpy (model, derivatives and their
   weighted sums, for all starts at once); the 3x3 algebra per start is plain Python
   (faster than numpy on a handful of numbers).

``flux_err`` is one value per point or a scalar. The chi^2 returned is recomputed from
the residuals of the returned model on all points; ``PsplFit.chi2_per_point`` gives its
terms point by point (their running sum is the chi^2 of the best PSPL accumulated over
the epochs). Checked against scipy ``least_squares`` from 60 starts per curve on 150
baseline binaries: within 1% in 149 (median relative difference 1e-6); one event cut by
the window edge (only its rise observed, a degenerate PSPL fit) came out 12% higher. See also
tests/unit/test_physics.py and tests/unit/test_pspl.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# bounds of the fit_pspl iterations
LN_U0_MIN, LN_U0_MAX = np.log(1e-6), np.log(20.0)
LN_TE_MIN, LN_TE_MAX = np.log(0.05), np.log(1e4)
# the fit_pspl start grid
U0_GRID = (0.003, 0.02, 0.08, 0.25, 0.8)
TE_SCALES = (0.5, 1.0, 2.0)
MIN_FIT_POINTS = 4              # fit_pspl_bands refuses fewer (3 parameters and a flux pair)


# ----------------------------------------------------------------------- magnification
def _paczynski(u, u2, root, out=None):
    """A from u, u^2 and sqrt(u^2 + 4), each computed by the caller (see the callers for
    why each computes them its own way); ``out``: array to write A into."""
    if out is None:     # the operator lets numpy reuse a temporary's buffer for A
        return (u2 + 2.0) / (u * root)
    return np.divide(u2 + 2.0, u * root, out=out)


def magnification_u(u: np.ndarray) -> np.ndarray:
    """Point-source point-lens magnification A(u) = (u^2 + 2) / (u sqrt(u^2 + 4))."""
    u = np.asarray(u, dtype=np.float64)
    u2 = u * u
    return _paczynski(u, u2, np.sqrt(u2 + 4.0))


def magnification(t: np.ndarray, t0: float, u0: float, tE: float) -> np.ndarray:
    """PSPL magnification at times ``t``: u(t) = sqrt(u0^2 + ((t - t0)/tE)^2).

    u is taken first and then squared again inside :func:`magnification_u`, which rounds
    differently from using u0^2 + tau^2 itself; this is how the simulator's PSPL curves
    and ``PsplFit.flux`` have always been computed, so the datasets stay bit-identical.
    """
    tau = (np.asarray(t, dtype=np.float64) - t0) / tE
    return magnification_u(np.sqrt(u0 * u0 + tau * tau))


def _geometry(t, t0, ln_u0, ln_tE):
    """u0, tE, tau and u^2 = u0^2 + tau^2 at (t0, ln u0, ln tE) (broadcast together)."""
    u0 = np.exp(ln_u0)
    tE = np.exp(ln_tE)
    tau = (t - t0) / tE
    return u0, tE, tau, u0 * u0 + tau * tau


def magnification_ln(t, t0, ln_u0, ln_tE) -> np.ndarray:
    """A at (t0, ln u0, ln tE), from u^2 = u0^2 + tau^2 (the fits' arithmetic: module doc).
    Any broadcastable shapes: rows of times against column vectors of parameters."""
    _, _, _, u2 = _geometry(t, t0, ln_u0, ln_tE)
    return _paczynski(np.sqrt(u2), u2, np.sqrt(u2 + 4.0))


def magnification_ln_derivatives(t, t0, ln_u0, ln_tE, out=None):
    """(A, dA/dt0, dA/dln u0, dA/dln tE) at (t0, ln u0, ln tE), broadcast as in
    :func:`magnification_ln` (same A, bit for bit). ``out``: four arrays of the broadcast
    shape to write them into (saves a copy when the caller stacks them)."""
    u0, tE, tau, u2 = _geometry(t, t0, ln_u0, ln_tE)
    u = np.sqrt(u2)
    root = np.sqrt(u2 + 4.0)
    A = _paczynski(u, u2, root, out=None if out is None else out[0])
    # g = (dA/du) / u, times du/dt0 * u = -tau/tE, du/dln u0 * u = u0^2, du/dln tE * u = -tau^2
    g = -8.0 / (u2 * u * root * (u2 + 4.0))
    # Without out: operators, not np.multiply(..., out=None), so that numpy reuses the
    # temporaries' buffers for the results (no new allocation: faster on big rows).
    if out is None:
        d_t0 = g * (-tau / tE)
        d_ln_u0 = g * (u0 * u0)
        g *= tau
        return A, d_t0, d_ln_u0, g * -tau
    np.multiply(g, -tau / tE, out=out[1])
    np.multiply(g, u0 * u0, out=out[2])
    g *= tau
    np.multiply(g, -tau, out=out[3])
    return tuple(out)


def _rank_magnification(t, theta):
    """A (K, N) for rows theta (K, 3) = (t0, ln u0, ln tE): the start ranking's arithmetic
    (module doc), one root and no division by tE."""
    tau = (t - theta[:, 0:1]) * np.exp(-theta[:, 2:3])
    u2 = np.exp(2.0 * theta[:, 1:2]) + tau * tau
    return (u2 + 2.0) / np.sqrt(u2 * (u2 + 4.0))


# ------------------------------------------------------------------------------ fluxes
def _flux_normal(S_w, S_A, S_AA, S_F, S_AF):
    """The 2x2 normal equations of (a, b): det and the numerators of a and b (a = num_a /
    det, b = num_b / det when det > 0). Plain arithmetic: floats or numpy arrays."""
    return S_AA * S_w - S_A * S_A, S_AF * S_w - S_A * S_F, S_AA * S_F - S_A * S_AF


def _chi2_fluxes(a, b, S_w, S_A, S_AA, S_F, S_AF, S_FF):
    """chi^2 = sum w (F - a A - b)^2 expanded in the sums: valid for any (a, b)."""
    return S_FF - 2 * a * S_AF - 2 * b * S_F + a * a * S_AA + 2 * a * b * S_A + b * b * S_w


def fluxes(S_w, S_A, S_AA, S_F, S_AF, S_FF):
    """Closed-form weighted fluxes with a >= 0 and b free, and their chi^2 (clipped at 0
    against rounding): numpy arrays (one entry per start, say), broadcast together.
    Where the free optimum has a <= 0, or the normal equations are singular (A constant
    over the points), the optimum is the constant flux a = 0, b = S_F / S_w."""
    with np.errstate(divide="ignore", invalid="ignore"):
        det, num_a, num_b = _flux_normal(S_w, S_A, S_AA, S_F, S_AF)
        a = num_a / det
        b = num_b / det
    flat = ~(a > 0) | ~(det > 0)
    if flat.any():      # constrained optimum on the boundary a = 0: a constant flux
        a = np.where(flat, 0.0, a)
        b = np.where(flat, S_F / S_w, b)
    return a, b, np.maximum(_chi2_fluxes(a, b, S_w, S_A, S_AA, S_F, S_AF, S_FF), 0.0)


def fluxes_bounded(S_w, S_A, S_AA, S_F, S_AF, S_FF, kappa):
    """Closed-form fluxes per row under a >= 0 and b >= -kappa a (source fraction
    a/(a+b) <= fs_max, kappa = 1 - 1/fs_max): the free optimum when feasible, else the
    better of the two boundaries (b = -kappa a; a = 0, a constant flux). The fluxes are a
    star's, positive, so b = S_F / S_w >= 0 on a = 0 and needs no clip there.
    Returns (a, b, chi2, flat); chi2 = S_FF - a S_AF - b S_F, which holds at each of the
    three optima (a shorter form than :func:`fluxes`' expansion; each keeps the arithmetic
    its fit has always used); flat: a = 0."""
    det, num_a, num_b = _flux_normal(S_w, S_A, S_AA, S_F, S_AF)
    detok = det > 0
    sdet = np.where(detok, det, 1.0)
    a = num_a / sdet
    b = num_b / sdet
    free = detok & (a > 0) & (b >= -kappa * a)
    # on b = -kappa a: chi2(a) = S_FF - 2 a (S_AF - kappa S_F) + a^2 den
    den = S_AA - 2.0 * kappa * S_A + kappa * kappa * S_w
    denok = den > 0
    ab = (S_AF - kappa * S_F) / np.where(denok, den, 1.0)
    okb = denok & (ab > 0)
    ab = np.where(okb, ab, 0.0)
    bf = S_F / np.where(S_w > 0, S_w, 1.0)
    chi_b = S_FF - ab * (S_AF - kappa * S_F)
    chi_f = S_FF - bf * S_F
    use_b = okb & (chi_b < chi_f)
    a_out = np.where(free, a, np.where(use_b, ab, 0.0))
    b_out = np.where(free, b, np.where(use_b, -kappa * ab, bf))
    chi = np.where(free, S_FF - a * S_AF - b * S_F, np.where(use_b, chi_b, chi_f))
    return a_out, b_out, chi, ~(a_out > 0)


# ------------------------------------------------------------------------- 3x3 solves
def _cramer3(M, v):
    """Cramer's rule for M x = v without the division: (det, x det, y det, z det).
    Plain arithmetic on the nine entries: floats or numpy arrays (stacked systems)."""
    (a, b, c), (d, e, f), (g, h, i) = M
    co0, co1, co2 = e * i - f * h, f * g - d * i, d * h - e * g
    det = a * co0 + b * co1 + c * co2
    return (det,
            v[0] * co0 + b * (f * v[2] - v[1] * i) + c * (v[1] * h - e * v[2]),
            a * (v[1] * i - f * v[2]) + v[0] * (f * g - d * i) + c * (d * v[2] - v[1] * g),
            a * (e * v[2] - v[1] * h) + b * (v[1] * g - d * v[2]) + v[0] * (d * h - e * g))


def solve3(M, v):
    """Stacked 3x3 systems by Cramer's rule, elementwise numpy (each system's result
    depends only on its own entries): ``M`` nested 3x3 lists of arrays, ``v`` 3 arrays.
    Returns (x, y, z); 0 for every component of a system that is singular or whose
    solution is not finite."""
    with np.errstate(invalid="ignore", over="ignore"):
        det, nx, ny, nz = _cramer3(M, v)
    ok = (det != 0) & np.isfinite(det)
    det = np.where(ok, det, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        x, y, z = nx / det, ny / det, nz / det
    ok &= np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    return np.where(ok, x, 0.0), np.where(ok, y, 0.0), np.where(ok, z, 0.0)


def _solve3_scalar(M, v):
    """One 3x3 system of Python floats (nested lists): (x, y, z), None when singular."""
    det, nx, ny, nz = _cramer3(M, v)
    if not det or det != det:
        return None
    return nx / det, ny / det, nz / det


# --------------------------------------------------------------------------------- fit
@dataclass(frozen=True)
class PsplFit:
    """Result of :func:`fit_pspl`: the best PSPL ``F = a A(t; t0, u0, tE) + b``."""
    t0: float
    u0: float
    tE: float
    source_flux: float   # a, in the units of the fitted flux
    blend_flux: float    # b, in the units of the fitted flux
    chi2: float          # sum over the points of chi2_per_point
    n_iter: int          # Levenberg-Marquardt iterations (both passes)

    def flux(self, t: np.ndarray) -> np.ndarray:
        return self.source_flux * magnification(t, self.t0, self.u0, self.tE) + self.blend_flux

    def chi2_per_point(self, t: np.ndarray, flux: np.ndarray, flux_err) -> np.ndarray:
        """Each point's term of this PSPL's chi^2, (F_i - F_model(t_i))^2 / sigma_i^2
        (``flux_err`` a scalar or one value per point, as for :func:`fit_pspl`).

        ``np.cumsum`` of it is the chi^2 of this (the whole curve's best) PSPL over the
        first n points, which bounds the best PSPL of those n points alone from above.
        On the points it was fitted to, the sum is ``chi2`` up to rounding (``chi2`` is a
        dot product: the same terms, summed in another order).
        """
        w = 1.0 / np.square(np.asarray(flux_err, dtype=np.float64))
        return w * np.square(np.asarray(flux, dtype=np.float64) - self.flux(t))


def _start_grid(t, F, true_params):
    """Starting (t0, ln u0, ln tE) rows for the coarse pass."""
    i_peak = int(np.argmax(F))
    t_peak = float(t[i_peak])
    base = float(np.median(F))
    # Width estimate: half the span of the points above half the peak excess.
    excess = F - base
    half = np.flatnonzero(excess >= 0.5 * excess[i_peak])
    width = float(t[half[-1]] - t[half[0]]) / 2 if half.size > 1 else 0.0
    step = float((t[-1] - t[0]) / max(t.size - 1, 1))
    tE_est = max(width, 2 * step, 1.0)
    t0s = [t_peak]
    far = np.abs(t - t_peak) > 2 * tE_est
    if far.any():
        j = int(np.flatnonzero(far)[np.argmax(F[far])])
        if excess[j] > 0.1 * excess[i_peak]:
            t0s.append(float(t[j]))
    tEs = [tE_est]
    u0s = list(U0_GRID)
    if true_params is not None:
        t0_true, u0_true, tE_true = (float(x) for x in true_params)
        t0s.append(t0_true)
        tEs.append(tE_true)
        u0s.append(max(u0_true, 1e-4))
    tE_all = sorted({x * k for x in tEs for k in TE_SCALES})
    grid = np.array(np.meshgrid(t0s, np.log(u0s), np.log(tE_all), indexing="ij"))
    return grid.reshape(3, -1).T.copy()


def _pick_starts(starts, chi2, n):
    """Indices of the starts to refine: the best one for each start time (so that every
    peak hypothesis is refined), then the next best overall, n in all."""
    order = np.argsort(chi2, kind="stable")
    picked = []
    for t0 in dict.fromkeys(starts[order, 0].tolist()):
        if len(picked) < n:
            picked.append(int(order[np.flatnonzero(starts[order, 0] == t0)[0]]))
    for i in order.tolist():
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    return picked


def _sums(t, F, w, theta):
    """Per start (rows of theta): Python lists of the weighted sums one LM step needs.

    Returns G (K x 4 x 4 of sum w x x^T), S1 (K x 4 of sum w x), SF (K x 4 of sum w x F)
    for x = [dA/dt0, dA/dln u0, dA/dln tE, A].
    """
    X = np.empty((theta.shape[0], 4, t.size))
    magnification_ln_derivatives(t, theta[:, 0:1], theta[:, 1:2], theta[:, 2:3],
                                 out=(X[:, 3], X[:, 0], X[:, 1], X[:, 2]))
    Xw = X * w
    return (np.matmul(Xw, X.transpose(0, 2, 1)).tolist(), Xw.sum(axis=2).tolist(),
            (Xw @ F).tolist())


def _step_quantities(G, S1, SF, sw, sf, sff):
    """Scalar algebra of one start: fluxes, chi^2, VarPro Gauss-Newton matrix and gradient
    (Python floats: :func:`fluxes` for one start, without numpy's per-call cost)."""
    saa, sa, saf = G[3][3], S1[3], SF[3]
    det, num_a, num_b = _flux_normal(sw, sa, saa, sf, saf)
    a = num_a / det if det > 0 else 0.0
    if a > 0:
        b = num_b / det
    else:               # constrained optimum on the boundary a = 0: a constant flux
        a, b = 0.0, sf / sw
    chi2 = max(_chi2_fluxes(a, b, sw, sa, saa, sf, saf, sff), 0.0)
    if a == 0.0:
        return a, b, chi2, None, None
    hA = [G[i][3] for i in range(3)]
    h1 = S1[:3]
    a2 = a * a
    H = [[a2 * (G[i][j] - (sw * hA[i] * hA[j] - sa * (hA[i] * h1[j] + h1[i] * hA[j])
                           + saa * h1[i] * h1[j]) / det) for j in range(3)] for i in range(3)]
    grad = [a * (SF[i] - a * hA[i] - b * h1[i]) for i in range(3)]
    return a, b, chi2, H, grad


def _levenberg_marquardt(t, F, w, theta, max_iter, rtol, atol, stop_below=None):
    """Refine the rows of theta (K,3) together; returns (theta, a, b, chi2, iterations)."""
    sw, sf, sff = float(w.sum()), float(w @ F), float(w @ (F * F))
    theta, cur, it = _lm_loop(lambda th: [_step_quantities(*g, sw, sf, sff)
                                          for g in zip(*_sums(t, F, w, th))],
                              theta, max_iter, rtol, atol, stop_below)
    a = np.array([c[0] for c in cur])
    b = np.array([c[1] for c in cur])
    chi2 = np.array([c[2] for c in cur])
    return theta, a, b, chi2, it


def _lm_loop(evaluate, theta, max_iter, rtol, atol, stop_below=None):
    """Levenberg-Marquardt over the rows of theta (K,3) = (t0, ln u0, ln tE) together.
    ``evaluate(rows)`` gives, per row, (fluxes a, fluxes b, chi2, H, grad): the projected
    problem's Gauss-Newton matrix and gradient (None where the source flux is 0). A step
    is kept only if chi^2 falls; t0 moves at most 2 tE and ln u0, ln tE at most 1.5 a
    step; a row stops when its chi^2 improves by less than max(rtol chi^2, atol), when
    its damping passes 1e7, or from step 3 when it is far behind the best row; all stop
    once a row's chi^2 is below ``stop_below`` (a caller that only asks whether the best
    chi^2 reaches a threshold: the answer is then no). Returns (theta, the rows' last
    quantities, iterations)."""
    theta = theta.copy()
    K = theta.shape[0]
    cur = evaluate(theta)
    lam = [1e-3] * K
    active = [c[3] is not None for c in cur]
    it = 0
    for it in range(1, max_iter + 1):
        idx = [k for k in range(K) if active[k]]
        if not idx or (stop_below is not None and min(c[2] for c in cur) < stop_below):
            break
        trial = theta[idx].copy()
        for row, k in enumerate(idx):
            _, _, _, H, grad = cur[k]
            l = lam[k]
            Hd = [[H[i][j] + (l * max(H[i][i], 1e-12) if i == j else 0.0) for j in range(3)]
                  for i in range(3)]
            delta = _solve3_scalar(Hd, grad) or (0.0, 0.0, 0.0)
            tE_now = float(np.exp(theta[k, 2]))
            trial[row, 0] += min(max(delta[0], -2 * tE_now), 2 * tE_now)
            trial[row, 1] = min(max(trial[row, 1] + min(max(delta[1], -1.5), 1.5), LN_U0_MIN),
                                LN_U0_MAX)
            trial[row, 2] = min(max(trial[row, 2] + min(max(delta[2], -1.5), 1.5), LN_TE_MIN),
                                LN_TE_MAX)
        new = evaluate(trial)
        for row, k in enumerate(idx):
            old_chi2, nq = cur[k][2], new[row]
            if nq[2] < old_chi2 and nq[3] is not None:
                theta[k] = trial[row]
                cur[k] = nq
                lam[k] = max(lam[k] * 0.2, 1e-9)
                if old_chi2 - nq[2] <= max(rtol * nq[2], atol):
                    active[k] = False
            else:
                lam[k] *= 10.0
                if lam[k] > 1e7:
                    active[k] = False
        if it >= 3:     # drop starts far behind the best one
            best = min(c[2] for c in cur)
            for k in idx:
                if cur[k][2] > 1.5 * best + 50.0:
                    active[k] = False
    return theta, cur, it


def fit_pspl(t: np.ndarray, flux: np.ndarray, flux_err, true_params=None, n_refine: int = 3,
             max_iter: int = 30, rtol: float = 1e-5, atol: float = 1e-2,
             coarse_points: int = 400, rank_points: int = 400, coarse_iter: int = 10,
             stop_below: float | None = None) -> PsplFit:
    """Best PSPL fit (weighted least squares in flux) of one light curve.

    ``t`` must be increasing; ``flux_err`` a scalar or one value per point.
    ``true_params`` = (t0, u0, tE) adds the truth (or any guess) to the starts.
    The starts are ranked on every k-th point (about ``rank_points`` points); ``n_refine``
    of them (the best of each start time, then the best overall) are refined on about
    ``coarse_points`` points, and the best of those on all points, each until
    its chi^2 improves by less than max(``rtol`` chi^2, ``atol``) (100 times that on the
    subsample) or after ``max_iter`` iterations (``coarse_iter`` on the subsample).
    The chi^2 returned is recomputed from the residuals. ``stop_below``: stop refining
    once the chi^2 on all points is below it (then the result is a fit under that chi^2,
    not the best one: for a caller that asks "can a PSPL fit these points to < x?").
    """
    t = np.ascontiguousarray(t, dtype=np.float64)
    F = np.ascontiguousarray(flux, dtype=np.float64)
    w = np.broadcast_to(1.0 / np.square(np.asarray(flux_err, dtype=np.float64)), F.shape)
    w = np.ascontiguousarray(w)
    if t.size < 4:
        raise ValueError(f"a PSPL fit needs at least 4 points, got {t.size}")
    starts = _start_grid(t, F, true_params)
    r = max(1, -(-t.size // rank_points))
    tr, Fr, wr = t[::r], F[::r], w[::r]
    A = _rank_magnification(tr, starts)
    wFr = wr * Fr
    _, _, chi2 = fluxes(float(wr.sum()), A @ wr, (A * A) @ wr, float(wFr.sum()), A @ wFr,
                        float(wFr @ Fr))
    theta = starts[_pick_starts(starts, chi2, n_refine)]
    k = max(1, -(-t.size // coarse_points))
    ts, Fs, ws = t[::k], F[::k], w[::k]
    n_iter = 0
    if k > 1:
        theta, _, _, chi2, n_iter = _levenberg_marquardt(ts, Fs, ws, theta, coarse_iter,
                                                         100 * rtol, 100 * atol)
        theta = theta[[int(np.argmin(chi2))]]
    theta, a, b, chi2, it = _levenberg_marquardt(t, F, w, theta, max_iter, rtol, atol, stop_below)
    j = int(np.argmin(chi2))
    t0, u0, tE = float(theta[j, 0]), float(np.exp(theta[j, 1])), float(np.exp(theta[j, 2]))
    model = a[j] * magnification(t, t0, u0, tE) + b[j]
    chi2_final = float(w @ np.square(F - model))
    return PsplFit(t0=t0, u0=u0, tE=tE, source_flux=float(a[j]), blend_flux=float(b[j]),
                   chi2=chi2_final, n_iter=n_iter + it)


# ------------------------------------------------------------------------- several bands
@dataclass(frozen=True)
class PsplBandsFit:
    """Result of :func:`fit_pspl_bands`: one (t0, u0, tE), a source and a blend flux per
    band code (``source_flux[b]``; 0 where the light curve has no point in band b)."""
    t0: float
    u0: float
    tE: float
    source_flux: np.ndarray
    blend_flux: np.ndarray
    chi2: float
    n_iter: int

    def flux(self, t: np.ndarray, band: np.ndarray) -> np.ndarray:
        return self.source_flux[band] * magnification(t, self.t0, self.u0, self.tE) + self.blend_flux[band]


def _band_quantities(t, F, w, masks, lin, theta):
    """Per row of theta: (a per band, b per band, chi2, H, grad) summed over the bands: the
    bands share (t0, u0, tE) and no flux, so the projected problem's chi^2, Gauss-Newton
    matrix and gradient are the sums of the one-band ones."""
    per_band = [None if m is None else _sums(t[m], F[m], w[m], theta) for m in masks]
    out = []
    for k in range(theta.shape[0]):
        a, b, chi2 = [], [], 0.0
        H = [[0.0] * 3 for _ in range(3)]
        g = [0.0] * 3
        moving = False
        for sums, (sw, sf, sff) in zip(per_band, lin):
            if sums is None:
                a.append(0.0)
                b.append(0.0)
                continue
            ab, bb, c, Hb, gb = _step_quantities(sums[0][k], sums[1][k], sums[2][k], sw, sf, sff)
            a.append(ab)
            b.append(bb)
            chi2 += c
            if Hb is not None:
                moving = True
                for i in range(3):
                    g[i] += gb[i]
                    for j in range(3):
                        H[i][j] += Hb[i][j]
        out.append((a, b, chi2, H if moving else None, g if moving else None))
    return out


def fit_pspl_bands(t: np.ndarray, flux: np.ndarray, flux_err, band: np.ndarray, true_params=None,
                   n_refine: int = 3, max_iter: int = 30, rtol: float = 1e-5, atol: float = 1e-2,
                   coarse_points: int = 600, coarse_iter: int = 10,
                   stop_below: float | None = None) -> PsplBandsFit:
    """Best PSPL fit of a light curve in several bands (weighted least squares in flux):
    microlensing is achromatic, so one (t0, u0, tE); the source and blend fluxes differ
    per band (their colours differ), a >= 0 and b free per band, each in closed form as in
    :func:`fit_pspl`, whose starts (from the curve relative to each band's median), start
    ranking, subsampled coarse pass and Levenberg-Marquardt steps it uses. ``band``: small
    integer codes per point (they index the result's flux arrays). ``t`` increasing.
    The chi^2 returned is recomputed from the residuals; ``stop_below`` as for fit_pspl."""
    t = np.ascontiguousarray(t, dtype=np.float64)
    F = np.ascontiguousarray(flux, dtype=np.float64)
    w = np.ascontiguousarray(np.broadcast_to(1.0 / np.square(np.asarray(flux_err, dtype=np.float64)),
                                             F.shape))
    band = np.asarray(band, dtype=np.int64)
    if t.size < MIN_FIT_POINTS:
        raise ValueError(f"a PSPL fit needs at least {MIN_FIT_POINTS} points, got {t.size}")
    n_bands = int(band.max()) + 1
    masks = [band == b for b in range(n_bands)]
    masks = [m if m.any() else None for m in masks]
    med = np.array([max(float(np.median(F[m])), 1e-300) if m is not None else 1.0 for m in masks])
    starts = _start_grid(t, F / med[band], true_params)
    A = _rank_magnification(t, starts)
    chi2 = np.zeros(len(starts))
    for m in masks:
        if m is not None:
            Am, wm, Fm = A[:, m], w[m], F[m]
            wF = wm * Fm
            chi2 += fluxes(float(wm.sum()), Am @ wm, (Am * Am) @ wm, float(wF.sum()), Am @ wF,
                           float(wF @ Fm))[2]
    theta = starts[_pick_starts(starts, chi2, n_refine)]

    def run(tt, FF, ww, bb, rows, iters, rt, at, stop=None):
        ms = [bb == b for b in range(n_bands)]
        ms = [m if m.any() else None for m in ms]
        lin = [(0.0, 0.0, 0.0) if m is None else
               (float(ww[m].sum()), float(ww[m] @ FF[m]), float(ww[m] @ (FF[m] * FF[m]))) for m in ms]
        return _lm_loop(lambda th: _band_quantities(tt, FF, ww, ms, lin, th), rows, iters, rt, at, stop)

    k = max(1, -(-t.size // coarse_points))
    n_iter = 0
    if k > 1:
        theta, cur, n_iter = run(t[::k], F[::k], w[::k], band[::k], theta, coarse_iter, 100 * rtol,
                                 100 * atol)
        theta = theta[[int(np.argmin([c[2] for c in cur]))]]
    theta, cur, it = run(t, F, w, band, theta, max_iter, rtol, atol, stop_below)
    j = int(np.argmin([c[2] for c in cur]))
    fit = PsplBandsFit(float(theta[j, 0]), float(np.exp(theta[j, 1])), float(np.exp(theta[j, 2])),
                       np.asarray(cur[j][0], dtype=np.float64), np.asarray(cur[j][1], dtype=np.float64),
                       0.0, n_iter + it)
    chi2_final = float(w @ np.square(F - fit.flux(t, band)))
    return PsplBandsFit(fit.t0, fit.u0, fit.tE, fit.source_flux, fit.blend_flux, chi2_final, fit.n_iter)
