"""Microlensing magnifications: point-source point-lens (PSPL, analytic: computed by
``training.pspl``, re-exported here as ``pspl_magnification`` and
``pspl_magnification_u``) and the finite-source static binary lens (VBMicrolensing),
with the flux and magnitude conversions.

Names follow the literature: ``t0`` (time of closest approach, days), ``u0`` (impact
parameter, Einstein radii of the total mass), ``tE`` (Einstein time, days), ``s``
(projected separation, Einstein radii), ``q`` (mass ratio, lighter/heavier, 0 < q <= 1),
``alpha`` (angle of the trajectory, radians), ``rho`` (source radius, Einstein radii).

Geometry (VBMicrolensing 5.x ``BinaryLightCurve``, checked against the installed
package by ``tests/unit/test_physics.py``):

* origin at the centre of mass, lenses on the y1 axis: the heavier lens (mass fraction
  1/(1+q)) at y1 = -s q/(1+q), the lighter one at y1 = +s/(1+q);
* source trajectory, with tau = (t - t0)/tE::

      y1 = u0 sin(alpha) - tau cos(alpha)
      y2 = -u0 cos(alpha) - tau sin(alpha)

  so ``u0`` is the closest approach to the centre of mass and ``alpha`` the angle
  between the binary axis and the direction of motion. The simulation draws u0 >= 0
  and alpha uniform in [0, 2 pi): the sign of u0 is then redundant (a negative u0 is
  the same geometry as +u0 with the trajectory mirrored), so it is never negative;
* ``BinaryLightCurve`` takes ``[ln s, ln q, u0, alpha, ln rho, ln tE, t0]`` (natural logs).

Accuracy of the finite-source calculation: VBMicrolensing stops when the estimated
absolute error of A is below ``Tol`` (``Tol = 0`` hangs, so it is refused here). Measured
on 40 caustic-crossing curves (rho 0.01-0.1) against ``Tol = 1e-6``: ``Tol = 1e-2`` gave
a largest error of 0.0017 mag at about twice the speed of ``Tol = 1e-3`` (0.0002 mag).
Both are far below the photometric errors simulated (0.05 mag or more).
"""
from __future__ import annotations

import math

import numpy as np

# The PSPL magnification lives in the PSPL core; re-exported under the names the
# simulator, the benchmarks and the tests have always used.
from training.pspl import magnification as pspl_magnification  # noqa: F401
from training.pspl import magnification_u as pspl_magnification_u  # noqa: F401

DEFAULT_TOL = 1e-2

_VBM = None


class MagnificationError(ArithmeticError):
    """VBMicrolensing returned non-finite values or raised for a parameter set."""


def source_trajectory(t: np.ndarray, t0: float, u0: float, tE: float,
                      alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Source position (y1, y2) in the binary-lens frame described in the module doc."""
    tau = (np.asarray(t, dtype=np.float64) - t0) / tE
    sa, ca = math.sin(alpha), math.cos(alpha)
    return u0 * sa - tau * ca, -u0 * ca - tau * sa


def lens_positions(s: float, q: float) -> tuple[float, float]:
    """y1 coordinates of the heavier and the lighter lens (centre-of-mass frame)."""
    return -s * q / (1.0 + q), s / (1.0 + q)


def _vbm():
    global _VBM
    if _VBM is None:
        import VBMicrolensing
        _VBM = VBMicrolensing.VBMicrolensing()
    return _VBM


def binary_magnification(t: np.ndarray, t0: float, u0: float, tE: float, s: float, q: float,
                         alpha: float, rho: float, tol: float = DEFAULT_TOL) -> np.ndarray:
    """Finite-source (uniform disc) static binary-lens magnification at times ``t``.

    One ``VBMicrolensing.BinaryLightCurve`` call. Raises MagnificationError when the
    library raises or returns a non-finite value, ValueError for invalid parameters.
    """
    if not tol > 0:
        raise ValueError(f"VBMicrolensing Tol must be > 0 (Tol = 0 hangs), got {tol}")
    if not (s > 0 and q > 0 and rho > 0 and tE > 0):
        raise ValueError(f"binary parameters must have s, q, rho, tE > 0: "
                         f"s={s}, q={q}, rho={rho}, tE={tE}")
    vbm = _vbm()
    vbm.Tol = float(tol)
    vbm.RelTol = 0.0
    t = np.ascontiguousarray(t, dtype=np.float64)
    params = [math.log(s), math.log(q), float(u0), float(alpha), math.log(rho),
              math.log(tE), float(t0)]
    try:
        mag = np.asarray(vbm.BinaryLightCurve(params, t)[0], dtype=np.float64)
    except Exception as exc:  # the C++ extension can raise anything
        raise MagnificationError(f"VBMicrolensing raised {type(exc).__name__}: {exc} "
                                 f"for s={s}, q={q}, u0={u0}, alpha={alpha}, rho={rho}, "
                                 f"tE={tE}, t0={t0}") from exc
    if mag.shape != t.shape or not np.all(np.isfinite(mag)):
        raise MagnificationError(f"VBMicrolensing returned non-finite magnification for s={s}, "
                                 f"q={q}, u0={u0}, alpha={alpha}, rho={rho}, tE={tE}, t0={t0}")
    return mag


def binary_magnification_pointwise(y1: np.ndarray, y2: np.ndarray, s: float, q: float,
                                   rho: float, tol: float = DEFAULT_TOL) -> np.ndarray:
    """Reference: ``BinaryMag2`` called once per source position (slow; for tests)."""
    vbm = _vbm()
    vbm.Tol = float(tol)
    vbm.RelTol = 0.0
    return np.array([vbm.BinaryMag2(s, q, float(a), float(b), rho) for a, b in zip(y1, y2)])


def flux(magnification: np.ndarray, fs: float) -> np.ndarray:
    """Flux relative to the baseline (source + blend) flux: F = fs A + (1 - fs)."""
    return fs * np.asarray(magnification, dtype=np.float64) + (1.0 - fs)


def flux_to_mag(flux_rel: np.ndarray, baseline_mag: float) -> np.ndarray:
    """Magnitude of a flux given relative to the baseline: m = baseline - 2.5 log10(F)."""
    return baseline_mag - 2.5 * np.log10(flux_rel)


def mag_err_to_flux_err(flux_rel: np.ndarray, mag_err) -> np.ndarray:
    """First-order conversion sigma_F = F sigma_m ln(10) / 2.5."""
    return np.asarray(flux_rel, dtype=np.float64) * np.asarray(mag_err) * (math.log(10.0) / 2.5)
