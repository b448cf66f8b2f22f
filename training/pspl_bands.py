"""The best PSPL fit to a light curve in several bands: one (t0, u0, tE) for all bands
(microlensing is achromatic), a source and a blend flux per band (chromatic blending).

The same variable projection as the one-band fit (``training.detectability.fit_pspl``):
for any (t0, ln u0, ln tE) every band's fluxes ``F_b = a_b A + b_b`` (``a_b >= 0``) are
solved in closed form, so only the three non-linear parameters are iterated; the
Gauss-Newton matrix and the gradient of the projected problem are sums over the bands
of the one-band ones (the bands share no linear parameter). Starts, ranking and the
Levenberg-Marquardt step are the one-band fit's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training import detectability as dt
from training import physics


@dataclass(frozen=True)
class BandsFit:
    t0: float
    u0: float
    tE: float
    source_flux: np.ndarray   # a per band code (index = band), 0 where the band has no point
    blend_flux: np.ndarray    # b per band code
    chi2: float
    n_iter: int

    def flux(self, t: np.ndarray, band: np.ndarray) -> np.ndarray:
        A = physics.pspl_magnification(t, self.t0, self.u0, self.tE)
        return self.source_flux[band] * A + self.blend_flux[band]


def _band_sums(t, F, w, band, n_bands, theta):
    """Per start and band: the weighted sums one LM step needs (as ``dt._sums``)."""
    X = dt._pspl_and_derivs(t, theta[:, 0:1], np.exp(theta[:, 1:2]), np.exp(theta[:, 2:3]))
    Xw = X * w
    out = []
    for b in range(n_bands):
        m = band == b
        if not m.any():
            out.append(None)
            continue
        Xm, Xwm = X[:, :, m], Xw[:, :, m]
        out.append((np.matmul(Xwm, Xm.transpose(0, 2, 1)).tolist(), Xwm.sum(axis=2).tolist(),
                    (Xwm @ F[m]).tolist()))
    return out


def _quantities(sums, lin, k):
    """(a per band, b per band, chi2, H, grad) of start k, summed over the bands."""
    a, b, chi2 = [], [], 0.0
    H = [[0.0] * 3 for _ in range(3)]
    g = [0.0] * 3
    any_h = False
    for s, (sw, sf, sff) in zip(sums, lin):
        if s is None:
            a.append(0.0)
            b.append(0.0)
            continue
        ab, bb, c, Hb, gb = dt._step_quantities(s[0][k], s[1][k], s[2][k], sw, sf, sff)
        a.append(ab)
        b.append(bb)
        chi2 += c
        if Hb is not None:
            any_h = True
            for i in range(3):
                g[i] += gb[i]
                for j in range(3):
                    H[i][j] += Hb[i][j]
    return a, b, chi2, (H if any_h else None), (g if any_h else None)


def _lm(t, F, w, band, n_bands, theta, max_iter, rtol, atol):
    lin = []
    for bb in range(n_bands):
        m = band == bb
        lin.append((float(w[m].sum()), float(w[m] @ F[m]), float(w[m] @ (F[m] * F[m]))))
    theta = theta.copy()
    K = theta.shape[0]
    sums = _band_sums(t, F, w, band, n_bands, theta)
    cur = [_quantities(sums, lin, k) for k in range(K)]
    lam = [1e-3] * K
    active = [c[3] is not None for c in cur]
    it = 0
    for it in range(1, max_iter + 1):
        idx = [k for k in range(K) if active[k]]
        if not idx:
            break
        trial = theta[idx].copy()
        for row, k in enumerate(idx):
            H, grad = cur[k][3], cur[k][4]
            l = lam[k]
            Hd = [[H[i][j] + (l * max(H[i][i], 1e-12) if i == j else 0.0) for j in range(3)] for i in range(3)]
            delta = dt._solve3(Hd, grad) or (0.0, 0.0, 0.0)
            tE_now = float(np.exp(theta[k, 2]))
            trial[row, 0] += min(max(delta[0], -2 * tE_now), 2 * tE_now)
            trial[row, 1] = min(max(trial[row, 1] + min(max(delta[1], -1.5), 1.5), dt.LN_U0_MIN), dt.LN_U0_MAX)
            trial[row, 2] = min(max(trial[row, 2] + min(max(delta[2], -1.5), 1.5), dt.LN_TE_MIN), dt.LN_TE_MAX)
        tsums = _band_sums(t, F, w, band, n_bands, trial)
        for row, k in enumerate(idx):
            nq = _quantities(tsums, lin, row)
            old = cur[k][2]
            if nq[2] < old and nq[3] is not None:
                theta[k] = trial[row]
                cur[k] = nq
                lam[k] = max(lam[k] * 0.2, 1e-9)
                if old - nq[2] <= max(rtol * nq[2], atol):
                    active[k] = False
            else:
                lam[k] *= 10.0
                if lam[k] > 1e7:
                    active[k] = False
        if it >= 3:
            best = min(c[2] for c in cur)
            for k in idx:
                if cur[k][2] > 1.5 * best + 50.0:
                    active[k] = False
    return theta, cur, it


def fit_pspl_bands(t: np.ndarray, flux: np.ndarray, flux_err: np.ndarray, band: np.ndarray,
                   true_params=None, n_refine: int = 3, max_iter: int = 30, rtol: float = 1e-5,
                   atol: float = 1e-2, coarse_points: int = 600, coarse_iter: int = 10) -> BandsFit:
    """Best PSPL fit (weighted least squares in flux, a per-band source and blend flux)
    of a multi-band light curve; ``band`` holds small integer codes (any, they index the
    result's flux arrays). ``t`` increasing. The chi^2 returned is recomputed from the
    residuals."""
    t = np.ascontiguousarray(t, dtype=np.float64)
    F = np.ascontiguousarray(flux, dtype=np.float64)
    w = np.ascontiguousarray(1.0 / np.square(np.asarray(flux_err, dtype=np.float64)))
    band = np.asarray(band, dtype=np.int64)
    if t.size < 4:
        raise ValueError(f"a PSPL fit needs at least 4 points, got {t.size}")
    n_bands = int(band.max()) + 1
    # starts from the light curve relative to each band's median (bands in other units)
    med = np.ones(n_bands)
    for b in range(n_bands):
        m = band == b
        if m.any():
            med[b] = max(float(np.median(F[m])), 1e-300)
    starts = dt._start_grid(t, F / med[band], true_params)
    A = dt._pspl_grid(t, starts)
    chi2 = np.zeros(len(starts))
    for b in range(n_bands):
        m = band == b
        if not m.any():
            continue
        Am, wm, Fm = A[:, m], w[m], F[m]
        wF = wm * Fm
        chi2 += dt._linear((Am * Am) @ wm, Am @ wm, Am @ wF, float(wm.sum()), float(wF.sum()),
                           float(wF @ Fm))[2]
    theta = starts[dt._pick_starts(starts, chi2, n_refine)]
    k = max(1, -(-t.size // coarse_points))
    n_iter = 0
    if k > 1:
        theta, cur, n_iter = _lm(t[::k], F[::k], w[::k], band[::k], n_bands, theta, coarse_iter,
                                 100 * rtol, 100 * atol)
        theta = theta[[int(np.argmin([c[2] for c in cur]))]]
    theta, cur, it = _lm(t, F, w, band, n_bands, theta, max_iter, rtol, atol)
    j = int(np.argmin([c[2] for c in cur]))
    a = np.asarray(cur[j][0], dtype=np.float64)
    b = np.asarray(cur[j][1], dtype=np.float64)
    t0, u0, tE = float(theta[j, 0]), float(np.exp(theta[j, 1])), float(np.exp(theta[j, 2]))
    fit = BandsFit(t0, u0, tE, a, b, 0.0, n_iter + it)
    chi2_final = float(w @ np.square(F - fit.flux(t, band)))
    return BandsFit(t0, u0, tE, a, b, chi2_final, n_iter + it)
