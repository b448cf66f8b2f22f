"""Detectability of a binary: chi^2 of the best PSPL fit to its noise-free light curve.

``detectability`` applies the PSPL fit of ``training.pspl`` (:func:`fit_pspl`, whose
module doc describes the model, the closed-form fluxes and the fit) to a noise-free
binary curve, in flux relative to the baseline, with the errors of its epochs. The PSPL
is ``F(t) = a A(t; t0, u0, tE) + b`` with ``a >= 0`` and ``b`` free (a fitted source
fraction above 1, "negative blending", is allowed, as in survey fits), so ``dchi2`` is the
chi^2 of the best PSPL (the binary model itself has chi^2 = 0 on its own noise-free curve).
"""
from __future__ import annotations

import numpy as np

from training import physics
from training.pspl import MIN_FIT_POINTS, PsplFit, fit_pspl


def detectability(t: np.ndarray, flux_model: np.ndarray, mag_err,
                  true_params: tuple[float, float, float] | None = None, **fit_options) -> PsplFit:
    """Best PSPL fit to a noise-free light curve (flux relative to baseline) whose
    magnitude errors are ``mag_err`` (scalar or per point). ``.chi2`` is the dchi2.
    ``fit_options`` go to ``fit_pspl``."""
    sigma_f = physics.mag_err_to_flux_err(flux_model, mag_err)
    return fit_pspl(t, flux_model, sigma_f, true_params=true_params, **fit_options)


def onset(t: np.ndarray, chi2_hindsight: np.ndarray, fit_first, threshold: float) -> int:
    """Detectability onset: the first visit n (0-based) at which the best PSPL fit to the
    visits 0..n alone has chi^2 >= ``threshold`` (the noise-free binary has chi^2 0): the
    earliest moment any rule, seeing only the data so far, could tell the binary from a
    single lens; -1 when even all the visits cannot.

    ``chi2_hindsight``: per visit, the chi^2 term of the best PSPL to *all* the visits. Its
    cumulative sum bounds the best fit to the first visits from above, so the onset is not
    before that sum reaches the threshold (the search starts there). That bound alone is
    no onset: the whole curve's fit misses the early baseline by a little at every point,
    and on dense precise photometry (Roman) its sum passed 160 up to 200 days before the
    first visits that a PSPL cannot fit. ``fit_first(n)`` fits visits 0..n-1 and returns the
    chi^2. The best chi^2 cannot fall when a visit is added, so the search is a bisection
    (~log2 of the visits, fits of the real fitter, whose small failures to find the best
    fit can move the onset by a few visits)."""
    c = np.cumsum(chi2_hindsight)
    if len(c) == 0 or c[-1] < threshold:
        return -1
    # a PSPL (t0, u0, tE and two fluxes) fits up to 4 points exactly, and the fitter takes
    # no fewer: the onset is never before the 4th visit (an outlier at the very start put
    # the search's lower bound there, and a fit of 3 points raised)
    lo, hi = max(int(np.flatnonzero(c >= threshold)[0]), MIN_FIT_POINTS - 1), len(t) - 1
    if hi < lo:
        return -1
    if fit_first(hi + 1) < threshold:
        return -1
    while lo < hi:
        mid = (lo + hi) // 2
        if fit_first(mid + 1) >= threshold:
            hi = mid
        else:
            lo = mid + 1
    return lo
