"""The point-source point-lens (PSPL) core: the magnification and its derivatives.

Every PSPL computation of the package goes through this module: ``training.physics``
re-exports :func:`magnification` and :func:`magnification_u` (as ``pspl_magnification``
and ``pspl_magnification_u``: the simulator's PSPL events).

Magnification (Paczynski 1986, ApJ 304, 1)
------------------------------------------
A point source at a projected distance u (in Einstein radii) from a point lens is
magnified by::

    A(u) = (u^2 + 2) / (u sqrt(u^2 + 4)),

A -> 1 + 2/u^4 far from the lens and A ~ 1/u close to it. On a straight trajectory
at constant speed::

    u(t)^2 = u_0^2 + tau^2,   tau = (t - t_0) / t_E

(``t0``: time of closest approach, days; ``u0``: impact parameter, Einstein radii;
``tE``: Einstein time, days).
"""
from __future__ import annotations

import numpy as np


def _paczynski(u, u2, root, out=None):
    """A from u, u^2 and sqrt(u^2 + 4), each computed by the caller (see the callers for
    why each computes them its own way); ``out``: array to write A into."""
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
