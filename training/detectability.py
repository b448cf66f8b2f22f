"""Detectability of a binary: chi^2 of the best PSPL fit to its noise-free light curve.

The PSPL model in flux is ``F(t) = a A(t; t0, u0, tE) + b``. The fluxes ``a`` (source)
and ``b`` (blend) enter linearly, so for any (t0, u0, tE) they are solved in closed
form by weighted least squares (with ``a >= 0``: a source flux cannot be negative; ``b``
is free, so a fitted source fraction ``a/(a+b)`` above 1, "negative blending", is
allowed, as in survey fits). Only (t0, ln u0, ln tE) are optimised ("variable
projection"):

1. starts: the true (t0, u0, tE) when known, the time of the brightest point and of
   the brightest point well away from it, crossed with a few u0 values and tE values
   (the true tE and a width estimate from the curve, each times 1/2, 1, 2); ranked by
   chi^2 on every k-th point (about 400), all in one numpy pass;
2. Levenberg-Marquardt from 3 starts together (the best start of each start time, then
   the next best overall) on about 400 points (every k-th),
   then from the best of them on all points, with the Kaufman Jacobian of the variable
   projection problem. The work over the points is numpy (model, derivatives and their
   weighted sums, for all starts at once); the 3x3 algebra per start is plain Python.

The chi^2 returned is recomputed from the residuals of the returned model on all points.
Checked against scipy ``least_squares`` from 60 starts per curve on 150 baseline binaries:
within 1% in 149 (median relative difference 1e-6); one event cut by the window edge
(only its rise observed, a degenerate PSPL fit) came out 12% higher. See also
tests/unit/test_physics.py.

``fit_pspl`` works on any light curve; ``detectability`` applies it to a noise-free
binary curve with the errors of its epochs, so ``dchi2`` is the chi^2 of the best PSPL
(the binary model itself has chi^2 = 0 on its own noise-free curve).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training import physics

LN_U0_MIN, LN_U0_MAX = np.log(1e-6), np.log(20.0)
LN_TE_MIN, LN_TE_MAX = np.log(0.05), np.log(1e4)
U0_GRID = (0.003, 0.02, 0.08, 0.25, 0.8)
TE_SCALES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class PsplFit:
    t0: float
    u0: float
    tE: float
    source_flux: float   # a, in units of the baseline flux
    blend_flux: float    # b, in units of the baseline flux
    chi2: float
    n_iter: int          # Levenberg-Marquardt iterations (both passes)

    def flux(self, t: np.ndarray) -> np.ndarray:
        return self.source_flux * physics.pspl_magnification(t, self.t0, self.u0, self.tE) \
            + self.blend_flux


def _pspl_and_derivs(t, t0, u0, tE):
    """X (K,4,N): dA/dt0, dA/dln u0, dA/dln tE and A, for column vectors t0, u0, tE (K,1)."""
    X = np.empty((t0.shape[0], 4, t.size))
    tau = (t - t0) / tE
    u2 = u0 * u0 + tau * tau
    u = np.sqrt(u2)
    s4 = np.sqrt(u2 + 4.0)
    np.divide(u2 + 2.0, u * s4, out=X[:, 3])
    # dA/du = -8 / (u^2 (u^2+4)^{3/2}); with du/dt0 = -tau/(u tE), du/dln u0 = u0^2/u,
    # du/dln tE = -tau^2/u, all three share the factor dA/du / u.
    g = -8.0 / (u2 * u * s4 * (u2 + 4.0))
    np.multiply(g, -tau / tE, out=X[:, 0])
    np.multiply(g, u0 * u0, out=X[:, 1])
    g *= tau
    np.multiply(g, -tau, out=X[:, 2])
    return X


def _pspl_grid(t, theta):
    """A (K,N) for theta (K,3) = (t0, ln u0, ln tE)."""
    tau = (t - theta[:, 0:1]) * np.exp(-theta[:, 2:3])
    u2 = np.exp(2.0 * theta[:, 1:2]) + tau * tau
    return (u2 + 2.0) / np.sqrt(u2 * (u2 + 4.0))


def _linear(saa, sa, saf, sw, sf, sff):
    """Closed-form weighted fluxes (a >= 0, b free) and chi^2; numpy arrays over starts."""
    det = saa * sw - sa * sa
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (saf * sw - sa * sf) / det
        b = (saa * sf - sa * saf) / det
    flat = ~(a > 0) | ~(det > 0)
    if flat.any():      # constrained optimum on the boundary a = 0: a constant flux
        a = np.where(flat, 0.0, a)
        b = np.where(flat, sf / sw, b)
    chi2 = sff - 2 * a * saf - 2 * b * sf + a * a * saa + 2 * a * b * sa + b * b * sw
    return a, b, np.maximum(chi2, 0.0)


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
    X = _pspl_and_derivs(t, theta[:, 0:1], np.exp(theta[:, 1:2]), np.exp(theta[:, 2:3]))
    Xw = X * w
    return (np.matmul(Xw, X.transpose(0, 2, 1)).tolist(), Xw.sum(axis=2).tolist(),
            (Xw @ F).tolist())


def _step_quantities(G, S1, SF, sw, sf, sff):
    """Scalar algebra of one start: fluxes, chi^2, VarPro Gauss-Newton matrix and gradient."""
    saa, sa, saf = G[3][3], S1[3], SF[3]
    det = saa * sw - sa * sa
    a = (saf * sw - sa * sf) / det if det > 0 else 0.0
    if a > 0:
        b = (saa * sf - sa * saf) / det
    else:               # constrained optimum on the boundary a = 0: a constant flux
        a, b = 0.0, sf / sw
    chi2 = max(sff - 2 * a * saf - 2 * b * sf + a * a * saa + 2 * a * b * sa + b * b * sw, 0.0)
    if a == 0.0:
        return a, b, chi2, None, None
    hA = [G[i][3] for i in range(3)]
    h1 = S1[:3]
    a2 = a * a
    H = [[a2 * (G[i][j] - (sw * hA[i] * hA[j] - sa * (hA[i] * h1[j] + h1[i] * hA[j])
                           + saa * h1[i] * h1[j]) / det) for j in range(3)] for i in range(3)]
    grad = [a * (SF[i] - a * hA[i] - b * h1[i]) for i in range(3)]
    return a, b, chi2, H, grad


def _solve3(M, v):
    """Solve a 3x3 system by Cramer's rule; None when singular."""
    (a, b, c), (d, e, f), (g, h, i) = M
    co0, co1, co2 = e * i - f * h, f * g - d * i, d * h - e * g
    det = a * co0 + b * co1 + c * co2
    if not det or det != det:
        return None
    x = (v[0] * co0 + b * (f * v[2] - v[1] * i) + c * (v[1] * h - e * v[2])) / det
    y = (a * (v[1] * i - f * v[2]) + v[0] * (f * g - d * i) + c * (d * v[2] - v[1] * g)) / det
    z = (a * (e * v[2] - v[1] * h) + b * (v[1] * g - d * v[2]) + v[0] * (d * h - e * g)) / det
    return x, y, z


def _levenberg_marquardt(t, F, w, theta, max_iter, rtol, atol):
    """Refine the rows of theta (K,3) together; returns (theta, a, b, chi2, iterations)."""
    sw, sf, sff = float(w.sum()), float(w @ F), float(w @ (F * F))
    theta = theta.copy()
    K = theta.shape[0]
    cur = [_step_quantities(*g, sw, sf, sff) for g in zip(*_sums(t, F, w, theta))]
    lam = [1e-3] * K
    active = [c[3] is not None for c in cur]
    it = 0
    for it in range(1, max_iter + 1):
        idx = [k for k in range(K) if active[k]]
        if not idx:
            break
        trial = theta[idx].copy()
        for row, k in enumerate(idx):
            _, _, _, H, grad = cur[k]
            l = lam[k]
            Hd = [[H[i][j] + (l * max(H[i][i], 1e-12) if i == j else 0.0) for j in range(3)]
                  for i in range(3)]
            delta = _solve3(Hd, grad) or (0.0, 0.0, 0.0)
            tE_now = float(np.exp(theta[k, 2]))
            trial[row, 0] += min(max(delta[0], -2 * tE_now), 2 * tE_now)
            trial[row, 1] = min(max(trial[row, 1] + min(max(delta[1], -1.5), 1.5), LN_U0_MIN),
                                LN_U0_MAX)
            trial[row, 2] = min(max(trial[row, 2] + min(max(delta[2], -1.5), 1.5), LN_TE_MIN),
                                LN_TE_MAX)
        new = [_step_quantities(*g, sw, sf, sff) for g in zip(*_sums(t, F, w, trial))]
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
    a = np.array([c[0] for c in cur])
    b = np.array([c[1] for c in cur])
    chi2 = np.array([c[2] for c in cur])
    return theta, a, b, chi2, it


def fit_pspl(t: np.ndarray, flux: np.ndarray, flux_err, true_params=None, n_refine: int = 3,
             max_iter: int = 30, rtol: float = 1e-5, atol: float = 1e-2,
             coarse_points: int = 400, rank_points: int = 400, coarse_iter: int = 10) -> PsplFit:
    """Best PSPL fit (weighted least squares in flux) of one light curve.

    ``t`` must be increasing; ``flux_err`` a scalar or one value per point.
    ``true_params`` = (t0, u0, tE) adds the truth (or any guess) to the starts.
    The starts are ranked on every k-th point (about ``rank_points`` points); ``n_refine``
    of them (the best of each start time, then the best overall) are refined on about
    ``coarse_points`` points, and the best of those on all points, each until
    its chi^2 improves by less than max(``rtol`` chi^2, ``atol``) (100 times that on the
    subsample) or after ``max_iter`` iterations (``coarse_iter`` on the subsample).
    The chi^2 returned is recomputed from the residuals.
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
    A = _pspl_grid(tr, starts)
    wFr = wr * Fr
    _, _, chi2 = _linear((A * A) @ wr, A @ wr, A @ wFr, float(wr.sum()), float(wFr.sum()),
                         float(wFr @ Fr))
    theta = starts[_pick_starts(starts, chi2, n_refine)]
    k = max(1, -(-t.size // coarse_points))
    ts, Fs, ws = t[::k], F[::k], w[::k]
    n_iter = 0
    if k > 1:
        theta, _, _, chi2, n_iter = _levenberg_marquardt(ts, Fs, ws, theta, coarse_iter,
                                                         100 * rtol, 100 * atol)
        theta = theta[[int(np.argmin(chi2))]]
    theta, a, b, chi2, it = _levenberg_marquardt(t, F, w, theta, max_iter, rtol, atol)
    j = int(np.argmin(chi2))
    t0, u0, tE = float(theta[j, 0]), float(np.exp(theta[j, 1])), float(np.exp(theta[j, 2]))
    model = a[j] * physics.pspl_magnification(t, t0, u0, tE) + b[j]
    chi2_final = float(w @ np.square(F - model))
    return PsplFit(t0=t0, u0=u0, tE=tE, source_flux=float(a[j]), blend_flux=float(b[j]),
                   chi2=chi2_final, n_iter=n_iter + it)


def detectability(t: np.ndarray, flux_model: np.ndarray, mag_err,
                  true_params: tuple[float, float, float] | None = None, **fit_options) -> PsplFit:
    """Best PSPL fit to a noise-free light curve (flux relative to baseline) whose
    magnitude errors are ``mag_err`` (scalar or per point). ``.chi2`` is the dchi2.
    ``fit_options`` go to ``fit_pspl``."""
    sigma_f = physics.mag_err_to_flux_err(flux_model, mag_err)
    return fit_pspl(t, flux_model, sigma_f, true_params=true_params, **fit_options)
