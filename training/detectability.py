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
from training.pspl import PsplFit, fit_pspl


def detectability(t: np.ndarray, flux_model: np.ndarray, mag_err,
                  true_params: tuple[float, float, float] | None = None, **fit_options) -> PsplFit:
    """Best PSPL fit to a noise-free light curve (flux relative to baseline) whose
    magnitude errors are ``mag_err`` (scalar or per point). ``.chi2`` is the dchi2.
    ``fit_options`` go to ``fit_pspl``."""
    sigma_f = physics.mag_err_to_flux_err(flux_model, mag_err)
    return fit_pspl(t, flux_model, sigma_f, true_params=true_params, **fit_options)
