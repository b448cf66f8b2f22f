"""Magnitudes <-> fluxes in nJy (AB), the one conversion used by replay and broker.

AB magnitude m of a flux F in nJy: m = 31.4 - 2.5 log10(F). Errors propagate to first
order: sigma_F = F * ln(10)/2.5 * sigma_m.
"""
from __future__ import annotations

import numpy as np

AB_ZEROPOINT_NJY = 31.4
K_MAG = np.log(10.0) / 2.5      # sigma_F = K_MAG sigma_m F: a magnitude error as a flux error


def mag_to_njy(mag, mag_err=None):
    """Flux (nJy) of AB magnitude ``mag``; with ``mag_err`` also return the flux error."""
    flux = np.power(10.0, (AB_ZEROPOINT_NJY - np.asarray(mag, dtype=np.float64)) / 2.5)
    if mag_err is None:
        return flux
    return flux, flux * K_MAG * np.asarray(mag_err, dtype=np.float64)


def njy_to_mag(flux, flux_err=None):
    """AB magnitude of ``flux`` (nJy, > 0); with ``flux_err`` also return the magnitude error."""
    flux = np.asarray(flux, dtype=np.float64)
    mag = AB_ZEROPOINT_NJY - 2.5 * np.log10(flux)
    if flux_err is None:
        return mag
    return mag, np.asarray(flux_err, dtype=np.float64) / (flux * K_MAG)
