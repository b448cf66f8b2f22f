"""The classical anomaly detector: a robust PSPL fit updated with every new point.

This is the rule follow-up teams have run for years (SIGNALMEN/ARTEMiS refit a
point-source point-lens model as each point arrives and flag data that deviate from
it; RTModel and KMTNet's finders judge deviations by a Δχ² threshold). Pure numpy, no
I/O: the broker (``broker.rule_psplfit``) and the offline evaluation
(``training.evaluate_rules``) call the same :func:`advance`, so a light curve fed point
by point through the stream and the whole light curve fed at once go through the same
per-point arithmetic.

Model and fit (per event)
-------------------------
Microlensing is achromatic, the source and the blend have their own colours: each band k
has its own source and blend flux and all bands share (t0, u0, tE), the standard model of
multi-band and multi-site light curves (every data set gets its own source and blend
flux, e.g. MulensModel, Poleski & Yee 2019, Astronomy and Computing 26, 35; here as
``training.pspl.fit_pspl_bands``, the detectability onset's offline fit). A curve is
(time, mag, mag_err) (one band) or (time, mag, mag_err, band) with u8 band codes, mapped
to ``N_SLOTS`` slots by ``training.features.band_slots`` (u g r i z y and one slot for any
other code). Flux relative to the band's first point, ``F = 10**(-0.4 (m - m_ref[k]))``
(the reference is kept in the state when the band is first seen, so it outlives the
point), modelled as ``F(t) = a_k A(t; t0, u0, tE) + b_k`` (``a_k`` source flux >= 0,
``b_k`` blend with ``a_k/(a_k+b_k) <= fs_max``: bounded negative blending, which removes
the rising-wing degeneracy u0 -> large, a -> inf, b -> -inf). The fluxes are solved in
closed form, band by band, for every (t0, ln u0, ln tE) ("variable projection", as the
detectability fit); only the three non-linear parameters are iterated. Given them the
bands' fluxes are independent, so chi^2, the reduced (VarPro) Gauss-Newton matrix and
its gradient are sums over the bands of the one-band ones. A band with fewer than
``MIN_BAND_POINTS`` points has a constant flux (a_k = 0, b_k its weighted mean): it
cannot say anything about the magnification yet. Every per-band quantity is computed
band by band and a band an event lacks adds exact zeros, so an event's arithmetic does
not depend on which bands the other events of its group have, and a one-band curve (any
code) gives the bits of the (time, mag, mag_err) curve. The magnification and its
derivatives, the bounded closed-form fluxes and the 3x3 solve are the PSPL core's
(``training.pspl``, whose module doc gives the formulas); the robust weights, the LM step
and the statistic are this rule's.

* Likelihood: the errors are Gaussian in magnitude, so each point's flux error is
  ``sigma_F = 0.921 sigma_m F_model`` with the *model* flux of the current iterate
  (iteratively re-weighted: the fit converges to the magnitude-space least squares, not
  to the flux one that over-weights faint fluctuations).
* Robust loss: soft-L1 on the (first-order) magnitude residual z, IRLS weights
  ``1/sqrt(1 + (z/(c s))^2)``; ``s`` is the event's error scale, estimated without the
  model from the scatter of consecutive points of the same band (:func:`error_scale`, at
  least 1; across bands the step would be the colour),
  re-estimated at each multi-start refit: under-estimated errors do not make every point
  an anomaly, and the anomaly itself (a bad PSPL fit) cannot inflate the scale and hide.
* Warm start: each new point costs ``steps_per_point`` Levenberg-Marquardt steps from
  the previous solution (VarPro Gauss-Newton matrix, Kaufman's approximation; a step is
  kept only if the weighted chi^2 falls, else the damping grows).
* Cheap path: where the current model is not magnified at the newest point (by
  ``min(1, active_sigma/2)`` sigma) and no window of newest points deviates from it by
  ``refit_level``, the point cannot fire; it costs O(window) and the fit is left as it
  is (most of a 1,000-day light curve is baseline).
* Multi-start refit ("refit when the fit is poor"): a grid of 64 starts (t0 at the
  brightest 3-point run, and 3, 15 and 50 days after the newest point, for rising events;
  u0 0.03/0.1/0.3/1; tE 5/15/40/100 d), ranked by robust cost (per-band closed-form
  fluxes) on a subsample (the newest 32 points and every r-th older one; a band the
  subsample misses keeps its current fluxes), the best ``restart_keep`` refined there by
  ``restart_iter`` LM steps; the two best and the current solution then get
  ``FINE_ITER`` steps on all points and the lowest robust cost wins. It runs at the
  first fit (``min_points``), on tracked points when the number of points has grown by
  ``restart_growth`` since the last one, and whenever the statistic reaches
  ``refit_level`` (at most every ``refit_cooldown`` points).
* Confirmation: a statistic above ``refit_level`` counts only at a point where such a
  refit has just recomputed it (elsewhere it is capped at ``refit_level``, so
  ``threshold >= refit_level``): a deviation is believed only when the best PSPL found
  from many starts still fails to explain it (a stuck local fit is not an anomaly).

Decision statistic
------------------
At point n, from the solution of points 1..n-1 with point n added, for each window W of
the newest k points, k in ``windows`` (powers of two ``window_min .. window_max``), the
Δχ² of a free flux offset over W on top of the PSPL (a one-parameter "free residual"
alternative, so every window's Δχ² is chi^2 with 1 degree of freedom under the null
and the windows can be compared), in its Gauss-Newton form, exact for a linearised
model whether or not the fit has converged on the new point::

    T_W   = sum_W r_i / sigma_i^2 - g_W' I^-1 grad     (r = F - F_model)
    V_W   = sum_W 1 / sigma_i^2   - g_W' I^-1 g_W      (what the fit cannot absorb)
    Δχ²_W = T_W^2 / V_W / s^2

with ``g_W = sum_W psi_i J_i / sigma_i^2``, ``I = sum psi_i J_i J_i' / sigma_i^2`` the
(robust) information of the PSPL parameters (J = dF/d(t0, ln u0, ln tE, a_1, b_1, ..,
a_K, b_K), each point's flux derivatives those of its own band) and ``grad`` the fit's
gradient over all points: the leverage terms stop a young event, whose PSPL is still
free to bend, from calling its own newest points anomalous (nor a band's first points:
its own b_k absorbs them), and a fit one LM step behind from calling its own lag an
anomaly. I is block-structured (the bands' 2x2 flux blocks are coupled only through the
shared parameters), so ``g' I^-1 h`` is taken by block elimination: closed-form 2x2
inverses per band and one 3x3 solve of the Schur complement (:func:`_leverage`).
``D_n = max_W Δχ²_W``.

The event is *active* at n when (i) the PSPL amplitude is significant over the bands,
``sum_k a_k^2 / var(a_k) >= event_dchi2`` (var(a_k) = S_w / det at fixed t0, u0, tE with
b_k free: each band's Δχ² of the fit against a constant flux in that band, summed; for
one band the one-band test), and (ii) the model is significantly magnified at the newest
point in that point's band, ``a_k (A(t_n) - 1) >= active_sigma s sigma_n``. Points
before ``min_points`` or not active
get ``D_n = -inf``. The event fires at the first point with ``D_n >= threshold``; its
score (ROC curves, threshold choice) is ``max_n D_n``, so it fires at threshold
``thr`` exactly when its score is ``>= thr`` (as ``training.decision`` for the TD-CNN),
for any ``thr >= refit_level``: the trajectory of the fit does not depend on the threshold.

Determinism: :func:`advance` processes points one at a time, so the result does not
depend on how the stream was batched. Events are vectorised in groups padded to a
canonical length (``pad_length(n)``, a multiple of ``PAD``), and every reduction is a
row sum over that length, so one event's arithmetic does not depend on which other
events share its batch (tests/unit/test_psplfit.py checks bit equality).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from training import photometry, pspl
from training.features import N_SLOTS, band_slots

RULE = "pspl-fit"
FORMAT_VERSION = 2            # 2: per-band reference magnitudes and fluxes (1: one band)
PAD = 128                     # canonical padded lengths are multiples of this
K_MAG = photometry.K_MAG        # sigma_F = K_MAG sigma_m F (one definition, training.photometry)

LN_U0 = (math.log(1e-4), math.log(5.0))
LN_TE = (math.log(0.5), math.log(2000.0))
LAM_MIN, LAM_MAX = 1e-7, 1e7
FLUX_FLOOR = 1e-6
FINE_ITER = 3                 # LM steps on all points after the coarse multi-start pass
MIN_BAND_POINTS = 3           # a band with fewer points has a constant flux (a_k = 0, b_k free)

GRID_U0 = (0.03, 0.1, 0.3, 1.0)
GRID_TE = (5.0, 15.0, 40.0, 100.0)
GRID_T0_AFTER = (3.0, 15.0, 50.0)  # days after the newest point (rising events)

# state flags
HAS_REF, HAS_FIT, TRIGGERED = 1, 2, 4

STATE = np.dtype([
    ("version", "u1"), ("flags", "u1"),
    ("seen", "u1"),           # bit k: band slot k has its reference (m_ref[k]) and fluxes
    ("reserved", "u1"),
    ("n_done", "<u4"),        # points processed (global count: indices 0..n_done-1; byte 4:
                              # the save script's compare-and-set reads it there)
    ("n_restart", "<u4"),     # n at the last multi-start fit
    ("n_refit", "<u4"),       # n at the last candidate-triggered refit
    ("t_ref", "<f8"),
    ("m_ref", "<f8", (N_SLOTS,)),   # per band slot (training.features.band_slots): its first point
    ("t0", "<f8"), ("lu0", "<f8"), ("lte", "<f8"),
    ("a", "<f8", (N_SLOTS,)), ("b", "<f8", (N_SLOTS,)),   # per band slot, in its m_ref's flux unit
    ("lam", "<f8"), ("scale", "<f8"),
    ("last", "<f8"),          # D at the newest point (-inf when not eligible)
    ("best", "<f8"),          # running max of D: the event score so far
])


class PsplFitError(ValueError):
    """Bad rule parameters (the message names the parameter)."""


@dataclass(frozen=True)
class Params:
    threshold: float = 19.9
    min_points: int = 12
    window_min: int = 2
    window_max: int = 32
    active_sigma: float = 1.5
    event_dchi2: float = 50.0
    robust_c: float = 2.0
    steps_per_point: int = 1
    refit_level: float = 10.0
    refit_cooldown: int = 4
    restart_growth: float = 1.25
    restart_keep: int = 3
    restart_iter: int = 8
    fs_max: float = 1.25

    def __post_init__(self):
        checks = (("threshold", self.threshold > 0), ("min_points", self.min_points >= 8),
                  ("window_min", 1 <= self.window_min <= self.window_max),
                  ("window_max", 1 <= self.window_max <= 256),
                  ("active_sigma", self.active_sigma >= 0), ("event_dchi2", self.event_dchi2 >= 0),
                  ("robust_c", self.robust_c > 0), ("steps_per_point", 1 <= self.steps_per_point <= 10),
                  ("refit_level", self.refit_level > 0), ("refit_cooldown", self.refit_cooldown >= 1),
                  ("restart_growth", self.restart_growth > 1.0), ("restart_keep", self.restart_keep >= 1),
                  ("restart_iter", 1 <= self.restart_iter <= 100), ("fs_max", self.fs_max >= 1.0))
        for name, ok in checks:
            if not ok:
                raise PsplFitError(f"pspl-fit parameter {name} = {getattr(self, name)!r} is out of range")
        if self.threshold < self.refit_level:
            raise PsplFitError(f"pspl-fit threshold {self.threshold} must be >= refit_level "
                               f"{self.refit_level} (only refit-confirmed deviations may fire)")

    @property
    def kappa(self) -> float:
        """The blend bound b >= -kappa a that keeps a/(a+b) <= fs_max."""
        return 1.0 - 1.0 / self.fs_max

    @property
    def windows(self) -> tuple[int, ...]:
        out, k = [], 1
        while k <= self.window_max:
            if k >= self.window_min:
                out.append(k)
            k *= 2
        return tuple(out) or (self.window_min,)

    def state_params(self) -> dict:
        """Everything that changes the fit's trajectory (not the threshold)."""
        d = asdict(self)
        d.pop("threshold")
        return d

    @property
    def version(self) -> str:
        """``pspl-fit/2-<hash>``: the trigger's modelVersion; the hash covers every parameter
        but the threshold, and the state format (FORMAT_VERSION), so a saved state is only
        continued with the parameters and the layout that produced it (the broker keys its
        Redis state by this hash alone: broker.rule_psplfit.params_hash; a state of another
        format is never read there)."""
        key = dict(self.state_params(), state_format=FORMAT_VERSION)
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        return f"{RULE}/{FORMAT_VERSION}-{h}"


# --------------------------------------------------------------------------- state
def new_state(n: int) -> np.ndarray:
    s = np.zeros(n, dtype=STATE)
    s["version"] = FORMAT_VERSION
    s["lam"] = 1e-3
    s["scale"] = 1.0
    s["last"] = -np.inf
    s["best"] = -np.inf
    return s


def pack_state(s: np.ndarray) -> bytes:
    return np.ascontiguousarray(s, dtype=STATE).tobytes()


def unpack_state(raw: Optional[bytes]) -> np.ndarray:
    """One event's state from its packed bytes (a fresh state for None/empty)."""
    if not raw:
        return new_state(1)[0]
    if raw[0] != FORMAT_VERSION:     # byte 0 is the version in every layout
        raise PsplFitError(f"pspl-fit state version {raw[0]}, this code reads {FORMAT_VERSION} "
                           f"(the layout changed: start the event's fit again)")
    if len(raw) != STATE.itemsize:
        raise PsplFitError(f"pspl-fit state of {len(raw)} bytes, expected {STATE.itemsize}")
    return np.frombuffer(raw, dtype=STATE)[0].copy()


def pad_length(n: int) -> int:
    return max(PAD, -(-int(n) // PAD) * PAD)


# --------------------------------------------------------------------------- physics
def _mag_model(a, b, A):
    return -2.5 * np.log10(np.maximum(a * A + b, FLUX_FLOOR))


class _Rows:
    """Data of a group of events at one step: (B, L) arrays plus validity. Columns at and
    beyond ``n`` are finite filler (later points, or the last point repeated) with weight 0:
    they never change a sum, so a row's results depend only on its valid points and L.

    Bands: ``slot`` (B, L) is each point's band slot, ``bands`` (K,) the slots any row of
    the group may have (ascending); per-band quantities are (B, K) arrays over them, ``bi``
    a point's index into ``bands``, ``oh`` (B, K, L) the band masks, ``cnt`` (B, K) the
    valid points per band. When K = 1 every point is in the one band: ``slot``, ``bi`` and
    ``oh`` are None and every sum is the one-band code's. A band a row lacks has zero sums, so it adds exact zeros to
    every sum over bands: a row's results do not depend on the other rows' bands."""

    def __init__(self, t, m, e, n, F=None, valid=None, last=None, slot=None, bands=None):
        self.t, self.m, self.e, self.n = t, m, e, n          # t, m relative to the refs
        L = t.shape[-1]
        self.valid = (np.arange(L)[None, :] < n[:, None]).astype(np.float64) if valid is None else valid
        self.F = np.power(10.0, -0.4 * m) if F is None else F
        self.last = n - 1 if last is None else last
        if bands is None:
            bands = np.zeros(1, dtype=np.intp)
        self.slot, self.bands = slot, bands
        self._band_masks()

    def _band_masks(self):
        K = len(self.bands)
        if K == 1:                   # one band: no per-point band arrays (slot, bi unused)
            self.slot = self.bi = self.oh = None
            self.cnt = self.n.astype(np.float64)[:, None]           # n: the valid points
        else:
            self.bi = np.searchsorted(self.bands, self.slot)
            self.oh = (self.bi[:, None, :] == np.arange(K)[None, :, None]).astype(np.float64)
            self.cnt = (self.oh * self.valid[:, None, :]).sum(-1)
        self._set_few()

    def _set_few(self):
        """``few`` (B, K): bands with too few points for a free source flux; ``few_flat``
        its (B * K,) view, None when no band of any row is short (the common case)."""
        self.few = self.cnt < MIN_BAND_POINTS
        self.few_flat = self.few.ravel() if self.few.any() else None

    def subsample(self, dense: int = 32, target: int = 160) -> "_Rows":
        """The newest ``dense`` points and every r-th older one (r set by the padded
        length only, so the choice depends on the row's own n and L): for ranking and
        coarse refinement of the multi-start."""
        L = self.t.shape[-1]
        r = max(1, -(-L // target))
        offs = np.concatenate([np.arange(dense), dense + r * np.arange(-(-max(L - dense, 0) // r))])
        idx = self.last[:, None] - offs[None, ::-1]                    # ascending time
        ok = idx >= 0
        idx = np.maximum(idx, 0)
        rows = np.arange(len(self.n))[:, None]
        return _Rows(self.t[rows, idx], self.m[rows, idx], self.e[rows, idx], ok.sum(1),
                     self.F[rows, idx], ok.astype(np.float64), np.full(len(self.n), len(offs) - 1),
                     None if self.slot is None else self.slot[rows, idx], self.bands)

    def take(self, idx):
        r = _Rows.__new__(_Rows)
        r.t, r.m, r.e, r.n = self.t[idx], self.m[idx], self.e[idx], self.n[idx]
        r.valid, r.F, r.last = self.valid[idx], self.F[idx], self.last[idx]
        r.bands, r.cnt = self.bands, self.cnt[idx]
        if self.oh is None:
            r.slot = r.bi = r.oh = None
        else:
            r.slot, r.bi, r.oh = self.slot[idx], self.bi[idx], self.oh[idx]
        r._set_few()
        return r

    def band_sum(self, x):
        """Per-band sums of the per-point (B, L) ``x``, flat (B * K,) in (row, band) order:
        the one-band row sum when K = 1. (Per-band arithmetic runs on such flat arrays: for
        one band they are the one-band code's (B,) arrays, no dearer.)"""
        if self.oh is None:
            return x.sum(-1)
        return (x[:, None, :] * self.oh).sum(-1).ravel()

    def per_point(self, v):
        """The per-band (B, K) ``v`` at each point (B, L) (a (B, 1) column when K = 1)."""
        return v[:, :1] if self.oh is None else np.take_along_axis(v, self.bi, axis=1)


def _col(x):
    return np.asarray(x, dtype=np.float64)[:, None]


def _ksum(x, K=None):
    """Sum over the band axis 1 of (B, K, ...) ``x`` (or of flat (B * K, ...) ``x`` when ``K``
    is given), band after band: a band a row lacks adds an exact 0."""
    if K is not None:
        x = x.reshape((-1, K) + x.shape[1:])
    tot = x[:, 0]
    for k in range(1, x.shape[1]):
        tot = tot + x[:, k]
    return tot


def _any_band(x):
    """Any band true, per row of (B, K) ``x``."""
    return x[:, 0] if x.shape[1] == 1 else x.any(axis=1)


def _band_fluxes(few, S_w, S_A, S_AA, S_F, S_AF, S_FF, kappa):
    """Closed-form fluxes per band (``pspl.fluxes_bounded``, elementwise over any shape);
    a band with too few points (``few``; None: none) gets a constant flux a = 0,
    b = S_F / S_w."""
    a, b, chi, _ = pspl.fluxes_bounded(S_w, S_A, S_AA, S_F, S_AF, S_FF, kappa)
    if few is not None:
        bf = S_F / np.where(S_w > 0, S_w, 1.0)
        a = np.where(few, 0.0, a)
        b = np.where(few, bf, b)
        chi = np.where(few, S_FF - bf * S_F, chi)
    return a, b, chi


def _weights(R: _Rows, A, a, b, scale, c):
    """IRLS weights psi / sigma_F^2 at the model a_k A + b_k (sigma_F from the model flux)."""
    Fm = np.maximum(R.per_point(a) * A + R.per_point(b), FLUX_FLOOR)
    sF = K_MAG * R.e * Fm
    zc = (R.F - Fm) / (sF * (c * _col(scale)))       # first-order magnitude residual / (c s)
    return R.valid / (sF * sF * np.sqrt(1.0 + zc * zc))


def _sums(R: _Rows, w, A, D):
    """Every weighted sum of products of (A, dA/dtheta, 1, F), per band: one batched matrix
    product per row and band (each computed alone: batch-independent). Returns the
    (B * K, 6, 6) matrices M (order A, dA/dt0, dA/dln u0, dA/dln tE, 1, F; rows in (row,
    band) order) and named (B * K,) views."""
    B, L = A.shape
    X = np.empty((B, 6, L))
    X[:, 0], X[:, 1], X[:, 2], X[:, 3], X[:, 4], X[:, 5] = A, D[0], D[1], D[2], 1.0, R.F
    Xt = X.transpose(0, 2, 1)
    if R.oh is None:
        M = (X * w[:, None, :]) @ Xt
    else:
        K = R.oh.shape[1]
        M = np.empty((B, K, 6, 6))
        for k in range(K):
            M[:, k] = (X * (w * R.oh[:, k])[:, None, :]) @ Xt
        M = M.reshape(B * K, 6, 6)
    S = {"M": M, "w": M[:, 4, 4], "A": M[:, 0, 4], "AA": M[:, 0, 0], "F": M[:, 5, 4],
         "AF": M[:, 0, 5], "FF": M[:, 5, 5]}
    return S


class _Point:
    """A solution and the weighted sums at it (the LM step and the statistic share them).
    ``a``, ``b``: (B, K) fluxes per band; the bands share (t0, ln u0, ln tE) and no flux, so
    chi^2, the reduced Gauss-Newton matrix H and the gradient g3 are sums over the bands
    of the one-band ones."""

    def __init__(self, R, th, a, b, scale, p: Params):
        self.th = th                                   # (t0, lu0, lte) arrays
        A, *D = pspl.magnification_ln_derivatives(R.t, _col(th[0]), _col(th[1]), _col(th[2]))
        self.w = _weights(R, A, a, b, scale, p.robust_c)
        self.S = S = _sums(R, self.w, A, D)
        M = S["M"]
        B, K = R.cnt.shape
        Sw, SA, SAA = S["w"], S["A"], S["AA"]                  # flat (B * K,): (row, band)
        a, b, chi = _band_fluxes(R.few_flat, Sw, SA, SAA, S["F"], S["AF"], S["FF"], p.kappa)
        self.a, self.b = a.reshape(B, K), b.reshape(B, K)
        self.chi = _ksum(chi, K)
        self.flat = ~_any_band(self.a > 0)             # no band has a source flux
        det = SAA * Sw - SA * SA
        sdet = np.where(det > 0, det, 1.0)
        DA, Dv, DF = M[:, 1:4, 0], M[:, 1:4, 4], M[:, 1:4, 5]                  # (B K, 3)
        DD = np.triu(M[:, 1:4, 1:4])
        DD = DD + np.triu(DD, 1).transpose(0, 2, 1)                             # symmetric
        self.DA, self.Dv, self.DD = DA, Dv, DD
        o = (Sw[:, None, None] * DA[:, :, None] * DA[:, None, :]
             - SA[:, None, None] * (DA[:, :, None] * Dv[:, None, :] + Dv[:, :, None] * DA[:, None, :])
             + SAA[:, None, None] * Dv[:, :, None] * Dv[:, None, :])
        self.H = _ksum((a * a)[:, None, None] * (DD - o / sdet[:, None, None]), K)  # (B, 3, 3)
        # -1/2 d chi2 / d(t0, ln u0, ln tE) summed over bands, and d/d(a_k, b_k) per band at
        # (a, b): those vanish unless a flux constraint is active
        self.g3 = _ksum(a[:, None] * (DF - a[:, None] * DA - b[:, None] * Dv), K)     # (B, 3)
        self.grad_a = (S["AF"] - a * SAA - b * SA).reshape(B, K)
        self.grad_b = (S["F"] - a * SA - b * Sw).reshape(B, K)
        # amplitude significance: sum over bands of a_k^2 / var(a_k) (b_k free, fixed theta)
        self.wald = _ksum(np.where(Sw > 0, a * a * np.maximum(det, 0.0) / np.where(Sw > 0, Sw, 1.0), 0.0), K)


_EYE3 = np.eye(3)


def _solve_rows(M, V, fallback):
    """``np.linalg.solve`` of the stacked systems (B, n, n) x = (B, n, m), and where that
    refuses a singular one, each system alone: a singular row gets ``fallback(i)`` and the
    others their own LAPACK solution, the bits a stack without that row would give. (A
    fallback for the whole stack made one event's arithmetic depend on the events that
    shared its group: the broker's triggers then depended on how the stream was batched.)"""
    try:
        return np.linalg.solve(M, V)
    except np.linalg.LinAlgError:
        out = np.empty(np.broadcast_shapes(V.shape, M.shape[:1] + V.shape[1:]), dtype=np.float64)
        for i in range(len(M)):
            try:
                out[i] = np.linalg.solve(M[i], V[i])
            except np.linalg.LinAlgError:
                out[i] = fallback(i)
        return out


def _lm_step(R: _Rows, P: _Point, lam, p: Params):
    """One LM step per row from the solution P (its weights held fixed). Returns the new
    (th, a, b, lam), a and b (B, K)."""
    t0, lu0, lte = P.th
    H = P.H
    diag = np.einsum("bii->bi", H)
    Hd = H + (lam[:, None] * diag + 1e-300)[:, :, None] * _EYE3
    good = ~P.flat & np.all(np.isfinite(Hd.reshape(len(lam), -1)), axis=1) & (np.min(diag, axis=1) > 0)
    Hd = np.where(good[:, None, None], Hd, _EYE3)
    g = np.where(good[:, None], P.g3, 0.0)
    d = _solve_rows(Hd, g[:, :, None], lambda i: np.stack(pspl.solve3(
        [[Hd[i:i + 1, j, k] for k in range(3)] for j in range(3)], [g[i:i + 1, j] for j in range(3)]),
        axis=1)[0][:, None])[:, :, 0]
    d = np.where(np.isfinite(d), d, 0.0)
    te = np.exp(lte)
    nt0 = t0 + np.minimum(np.maximum(d[:, 0], -2 * te), 2 * te)
    nlu0 = np.minimum(np.maximum(lu0 + np.minimum(np.maximum(d[:, 1], -1.5), 1.5), LN_U0[0]), LN_U0[1])
    nlte = np.minimum(np.maximum(lte + np.minimum(np.maximum(d[:, 2], -1.5), 1.5), LN_TE[0]), LN_TE[1])
    A2 = pspl.magnification_ln(R.t, _col(nt0), _col(nlu0), _col(nlte))
    w = P.w
    wA2 = w * A2
    S = P.S
    B, K = P.a.shape
    a2, b2, chi = _band_fluxes(R.few_flat, S["w"], R.band_sum(wA2), R.band_sum(wA2 * A2), S["F"],
                               R.band_sum(wA2 * R.F), S["FF"], p.kappa)
    chi1 = _ksum(chi, K)
    flat2 = ~_any_band(a2.reshape(B, K) > 0)
    ok = good & ~flat2 & (chi1 < P.chi) & np.isfinite(chi1)
    th = (np.where(ok, nt0, t0), np.where(ok, nlu0, lu0), np.where(ok, nlte, lte))
    lam2 = np.where(ok, np.maximum(lam * 0.2, LAM_MIN), np.minimum(lam * 10.0, LAM_MAX))
    okb = ok if K == 1 else np.repeat(ok, K)
    a_new = np.where(okb, a2, P.a.ravel()).reshape(B, K)
    b_new = np.where(okb, b2, P.b.ravel()).reshape(B, K)
    return th, a_new, b_new, np.where(P.flat, lam, lam2)


def _robust_cost(R: _Rows, th, a, b, scale, c):
    A = pspl.magnification_ln(R.t, _col(th[0]), _col(th[1]), _col(th[2]))
    z = (R.m - _mag_model(R.per_point(a), R.per_point(b), A)) / R.e
    cs = c * _col(scale)
    return (R.valid * 2.0 * cs * cs * (np.sqrt(1.0 + (z / cs) ** 2) - 1.0)).sum(-1), z


def _peak_time(R: _Rows):
    """Time of the brightest run of 3 consecutive valid points (robust to one outlier;
    each band's flux relative to its own first point)."""
    F = np.where(R.valid > 0, R.F, -np.inf)
    run = np.minimum(np.minimum(F[:, :-2], F[:, 1:-1]), F[:, 2:])
    rows = np.arange(len(R.n))
    j = np.argmax(run, axis=1) + 1
    good = np.isfinite(run[rows, j - 1])
    return np.where(good, R.t[rows, j], R.t[rows, R.last])


def _multistart(R: _Rows, s: dict, p: Params) -> dict:
    """Global refit of the rows: a grid of starts and the current solution, ranked and
    refined on a subsample (the newest points dense, older ones thinned), then the best
    two and the current solution refined on all points; the lowest robust cost wins.
    ``s["a"]``, ``s["b"]``: the current fluxes per band of ``R.bands`` (B, K); the result's
    are too."""
    B = len(R.n)
    c = p.robust_c
    Q = R.subsample()
    t_new = R.t[np.arange(B), R.last]
    t0s = np.stack([_peak_time(R)] + [t_new + d for d in GRID_T0_AFTER], axis=1)     # (B, 4)
    g_t0, g_u0, g_te = np.meshgrid(np.arange(t0s.shape[1]), np.log(GRID_U0), np.log(GRID_TE),
                                   indexing="ij")
    S = g_t0.size
    T0 = t0s[:, g_t0.ravel()]                                                          # (B, S)
    LU0 = np.broadcast_to(g_u0.ravel(), (B, S))
    LTE = np.broadcast_to(g_te.ravel(), (B, S))
    # rank: closed-form fluxes per band under observed-flux errors, then the robust cost
    A = pspl.magnification_ln(Q.t[:, None, :], T0[..., None], LU0[..., None], LTE[..., None])
    sF = K_MAG * Q.e * Q.F
    w = (Q.valid / (sF * sF))[:, None, :]
    wA = w * A
    Fb = Q.F[:, None, :]
    if Q.oh is None:
        a0, b0, _ = _band_fluxes(None if Q.few_flat is None else Q.few, w.sum(-1), wA.sum(-1), (wA * A).sum(-1), (w * Fb).sum(-1),
                                 (wA * Fb).sum(-1), (w * Fb * Fb).sum(-1), p.kappa)    # (B, S)
        ap, bp = a0[..., None], b0[..., None]
        a0, b0 = a0[..., None], b0[..., None]                                          # (B, S, 1)
    else:
        oh = Q.oh[:, None, :, :]                                                       # (B, 1, K, Lq)

        def bsum(x):
            return (x[:, :, None, :] * oh).sum(-1)                                     # (B, ., K)
        a0, b0, _ = _band_fluxes(None if Q.few_flat is None else Q.few[:, None, :], bsum(w), bsum(wA), bsum(wA * A), bsum(w * Fb),
                                 bsum(wA * Fb), bsum(w * Fb * Fb), p.kappa)           # (B, S, K)
        bi = np.broadcast_to(Q.bi[:, None, :], A.shape)
        ap, bp = np.take_along_axis(a0, bi, axis=2), np.take_along_axis(b0, bi, axis=2)
    z = (Q.m[:, None, :] - _mag_model(ap, bp, A)) / Q.e[:, None, :]
    cs = c * s["scale"][:, None, None]
    cost = (Q.valid[:, None, :] * 2 * cs * cs * (np.sqrt(1 + (z / cs) ** 2) - 1)).sum(-1)
    keep = np.argsort(cost, axis=1, kind="stable")[:, :p.restart_keep]                 # (B, k)
    rows = np.arange(B)[:, None]
    K = keep.shape[1]
    nb = a0.shape[2]
    # coarse: refine the kept starts on the subsample
    QQ = Q.take(np.repeat(np.arange(B), K))
    th = (T0[rows, keep].ravel(), LU0[rows, keep].ravel(), LTE[rows, keep].ravel())
    a, b = a0[rows, keep].reshape(B * K, nb), b0[rows, keep].reshape(B * K, nb)
    lam = np.full(B * K, 1e-3)
    sc = np.repeat(s["scale"], K)
    for _ in range(p.restart_iter):
        th, a, b, lam = _lm_step(QQ, _Point(QQ, th, a, b, sc, p), lam, p)
    cost, _ = _robust_cost(QQ, th, a, b, sc, c)
    cost = np.where(np.isfinite(cost) & _any_band(a > 0), cost, np.inf).reshape(B, K)
    # a band the subsample missed keeps its current fluxes as the fine pass's start
    missed = QQ.cnt == 0
    if missed.any():
        a = np.where(missed, np.repeat(s["a"], K, axis=0), a)
        b = np.where(missed, np.repeat(s["b"], K, axis=0), b)
    top = np.argsort(cost, axis=1, kind="stable")[:, :2]
    pick = (np.arange(B)[:, None] * K + top)                                           # (B, 2)
    # fine: the two best and the current solution on all points
    has = (s["flags"] & HAS_FIT) > 0
    cand = {}
    for k, v in (("t0", th[0]), ("lu0", th[1]), ("lte", th[2])):
        cur = np.where(has, s[k], v[pick[:, 0]])[:, None]
        cand[k] = np.concatenate([cur, v[pick]], axis=1)                               # (B, 3)
    for k, v in (("a", a), ("b", b)):
        cur = np.where(has[:, None], s[k], v[pick[:, 0]])[:, None]
        cand[k] = np.concatenate([cur, v[pick]], axis=1)                               # (B, 3, K)
    K = cand["t0"].shape[1]
    RR = R.take(np.repeat(np.arange(B), K))
    th = (cand["t0"].ravel(), cand["lu0"].ravel(), cand["lte"].ravel())
    a, b = cand["a"].reshape(B * K, nb), cand["b"].reshape(B * K, nb)
    lam = np.full(B * K, 1e-3)
    sc = np.repeat(s["scale"], K)
    for _ in range(FINE_ITER):
        th, a, b, lam = _lm_step(RR, _Point(RR, th, a, b, sc, p), lam, p)
    cost, _ = _robust_cost(RR, th, a, b, sc, c)
    cost = np.where(np.isfinite(cost) & _any_band(a > 0), cost, np.inf).reshape(B, K)
    pick = np.arange(B) * K + np.argmin(cost, axis=1)
    out = {"t0": th[0][pick], "lu0": th[1][pick], "lte": th[2][pick], "a": a[pick], "b": b[pick],
           "lam": lam[pick]}
    out["scale"] = error_scale(R)
    return out


def error_scale(R: _Rows) -> np.ndarray:
    """The event's error scale, model-free: 1.4826 median |m_(i+1) - m_i| / sqrt(e_i^2 +
    e_(i+1)^2) over consecutive points of the same band (the light curve changes little
    from one point of a band to its next except in a caustic crossing, so the median is
    the noise's; across bands the step would be the colour), at least 1. A scale from the
    PSPL fit's residuals would grow with the very anomaly it should reveal."""
    m, e = R.m, R.e
    ok = R.valid[:, 1:] > 0
    if R.oh is not None:             # each band's points in time order, band after band
        K = len(R.bands)
        key = np.where(R.valid > 0, R.bi, K)
        order = np.argsort(key, axis=1, kind="stable")
        m, e = np.take_along_axis(m, order, axis=1), np.take_along_axis(e, order, axis=1)
        key = np.take_along_axis(key, order, axis=1)
        ok = (key[:, 1:] == key[:, :-1]) & (key[:, 1:] < K)
    dz = np.abs(np.diff(m, axis=1)) / np.sqrt(e[:, 1:] ** 2 + e[:, :-1] ** 2)
    dz = np.where(ok, dz, np.inf)
    dz.sort(axis=1)
    k = ok.sum(1)
    r = np.arange(len(k))
    med = 0.5 * (dz[r, np.maximum(k - 1, 0) // 2] + dz[r, np.maximum(k, 1) // 2])
    return np.where((k >= 4) & np.isfinite(med), np.maximum(1.0, 1.4826 * med), 1.0)


def _reg(x):
    """A diagonal entry of the information matrix, regularised (a flat direction)."""
    return x + (1e-9 * np.abs(x) + 1e-300)


def _leverage(R: _Rows, P: _Point, Gn, Ga, Gb):
    """g_q' I^-1 g_q and g_q' I^-1 grad per window q (the statistic's V and T corrections),
    by the block form of I (:func:`_statistic`): ``Gn`` (B, 3, Q+1), ``Ga``, ``Gb`` (B, K,
    Q+1) the windows' sums of psi J / sigma^2 over (t0, ln u0, ln tE), a_k and b_k, the
    fit's gradient in the last column. Returns (corr, shift), each (B, Q); 0 for a row
    without a fit (no band with a source flux, or a non-finite matrix)."""
    B, K = R.cnt.shape
    Q = Gn.shape[2] - 1
    S = P.S                                     # flat (B * K,) band rows, as P's sums
    pa = P.a.ravel()
    few = R.few.ravel()
    empty = (R.cnt == 0).ravel()
    Hnn = _ksum((pa * pa)[:, None, None] * P.DD, K)                             # (B, 3, 3)
    Hnn[:, np.arange(3), np.arange(3)] = _reg(np.einsum("bii->bi", Hnn))
    Ca = np.where(few[:, None], 0.0, pa[:, None] * P.DA)                       # (B K, 3)
    Cb = pa[:, None] * P.Dv
    Daa = np.where(few, 1.0, _reg(S["AA"]))
    Dab = np.where(few, 0.0, S["A"])
    Dbb = np.where(empty, 1.0, _reg(S["w"]))
    Ga = np.where(few[:, None], 0.0, Ga.reshape(B * K, Q + 1))
    Gb = Gb.reshape(B * K, Q + 1)
    det = Daa * Dbb - Dab * Dab
    ia, ib, iab = Dbb / det, Daa / det, -Dab / det                             # D_k^-1
    ya = ia[:, None] * Ga + iab[:, None] * Gb                                  # D_k^-1 (g_a, g_b)
    yb = iab[:, None] * Ga + ib[:, None] * Gb
    band_q = _ksum(Ga[:, :-1] * ya[:, :-1] + Gb[:, :-1] * yb[:, :-1], K)                   # (B, Q)
    band_s = _ksum(Ga[:, :-1] * ya[:, -1:] + Gb[:, :-1] * yb[:, -1:], K)
    gh = Gn - _ksum(Ca[:, :, None] * ya[:, None, :] + Cb[:, :, None] * yb[:, None, :], K)  # (B, 3, Q+1)
    Sc = Hnn - _ksum(ia[:, None, None] * Ca[:, :, None] * Ca[:, None, :]
                     + iab[:, None, None] * (Ca[:, :, None] * Cb[:, None, :] + Cb[:, :, None] * Ca[:, None, :])
                     + ib[:, None, None] * Cb[:, :, None] * Cb[:, None, :], K)
    fitted = (~P.flat & np.all(np.isfinite(Sc.reshape(B, -1)), axis=1)
              & np.all(np.isfinite(gh.reshape(B, -1)), axis=1)
              & np.isfinite(band_q).all(1) & np.isfinite(band_s).all(1))
    corr = np.zeros((B, Q))
    shift = np.zeros((B, Q))
    if fitted.any():
        fi = np.flatnonzero(fitted)
        Sf, gf = Sc[fi], gh[fi]
        X = _solve_rows(Sf, gf, lambda i: np.linalg.lstsq(Sf[i], gf[i], rcond=None)[0])
        g = gh[fi][:, :, :-1]
        corr[fi] = band_q[fi] + np.einsum("bjq,bjq->bq", g, X[:, :, :-1])
        shift[fi] = band_s[fi] + np.einsum("bjq,bj->bq", g, X[:, :, -1])
    return corr, shift


def _statistic(R: _Rows, P: _Point, scale, p: Params):
    """D (max over windows of the offset Δχ², Gauss-Newton: valid also when P is not the
    converged fit) and the activity test, per row.

    The information matrix of (t0, ln u0, ln tE, a_1, b_1, .., a_K, b_K) is
    [[H_nn, C], [C', blockdiag(D_k)]] with D_k = [[S_AA, S_A], [S_A, S_w]]_k (the bands'
    fluxes are independent given the shared parameters), so g' I^-1 h is
    sum_k g_k' D_k^-1 h_k + (g_n - sum_k C_k D_k^-1 g_k)' Sc^-1 (h_n - sum_k C_k D_k^-1 h_k)
    with the Schur complement Sc = H_nn - sum_k C_k D_k^-1 C_k' (the 3x3 reduced matrix):
    2x2 inverses per band in closed form and one 3x3 solve per row, whatever K. A band with
    fewer than MIN_BAND_POINTS points has only b_k (its a_k row is the identity); a band
    the row lacks has D_k = identity and zero gradients: it adds exact zeros."""
    B = len(R.n)
    K = len(R.bands)
    W = max(p.windows)
    c = p.robust_c
    idx = R.last[:, None] - np.arange(W)[None, ::-1]              # (B, W) oldest .. newest
    inwin = (idx >= 0).astype(np.float64)
    idx = np.maximum(idx, 0)
    rows = np.arange(B)[:, None]
    t, m, e, F = R.t[rows, idx], R.m[rows, idx], R.e[rows, idx], R.F[rows, idx]
    A, *D = pspl.magnification_ln_derivatives(t, _col(P.th[0]), _col(P.th[1]), _col(P.th[2]))
    if K == 1:
        a, b = P.a[:, :1], P.b[:, :1]
        ohw = inwin[:, None, :]
    else:
        bw = R.bi[rows, idx]
        a, b = np.take_along_axis(P.a, bw, axis=1), np.take_along_axis(P.b, bw, axis=1)
        ohw = (bw[:, None, :] == np.arange(K)[None, :, None]) * inwin[:, None, :]   # (B, K, W)
    s = _col(scale)
    Fm = np.maximum(a * A + b, FLUX_FLOOR)
    z = (m + 2.5 * np.log10(Fm)) / e
    psi = 1.0 / np.sqrt(1.0 + (z / (c * s)) ** 2)
    sF = K_MAG * e * Fm
    v2 = inwin / (sF * sF)
    r = F - Fm
    pv = psi * v2
    Jn = [pv * a * D[0], pv * a * D[1], pv * a * D[2]]
    pvA = (pv * A)[:, None, :] * ohw
    pv1 = pv[:, None, :] * ohw
    ks = list(p.windows)
    Q = len(ks)
    Gn = np.empty((B, 3, Q + 1))
    Ga = np.empty((B, K, Q + 1))
    Gb = np.empty((B, K, Q + 1))
    T = np.empty((B, Q))
    V0 = np.empty((B, Q))
    for q, k in enumerate(ks):
        T[:, q] = (v2 * r)[:, W - k:].sum(-1)
        V0[:, q] = v2[:, W - k:].sum(-1)
        for j in range(3):
            Gn[:, j, q] = Jn[j][:, W - k:].sum(-1)
        Ga[:, :, q] = pvA[:, :, W - k:].sum(-1)
        Gb[:, :, q] = pv1[:, :, W - k:].sum(-1)
    Gn[:, :, -1] = P.g3
    Ga[:, :, -1] = P.grad_a
    Gb[:, :, -1] = P.grad_b
    corr, shift = _leverage(R, P, Gn, Ga, Gb)
    V = np.maximum(V0 - corr, 0.05 * V0)
    Tadj = T - shift
    enough = R.n[:, None] >= np.asarray(ks)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(enough & (V > 0), Tadj * Tadj / V, -np.inf) / (scale[:, None] ** 2)
    d = np.where(np.isfinite(d), d, -np.inf)
    stat = d.max(axis=1)
    excess = a[:, -1] * (A[:, -1] - 1.0) / sF[:, -1]             # in the newest point's band
    active = ~P.flat & (P.wald >= p.event_dchi2) & (excess >= p.active_sigma * scale)
    return stat, active


# --------------------------------------------------------------------------- driver
@dataclass
class Outcome:
    """What :func:`advance` says about one event."""
    stats: np.ndarray              # D at each processed point (-inf when not eligible)
    fire: Optional[int]            # global index of the firing point, or None
    fire_stat: Optional[float]


def curve_slots(curve: tuple) -> np.ndarray:
    """Band slots (intp) of a curve's points: ``training.features.band_slots`` of its 4th
    element (u8 band codes), or slot 0 for every point of a (time, mag, mag_err) curve."""
    if len(curve) > 3 and curve[3] is not None:
        sl = band_slots(np.asarray(curve[3]))
        if sl.shape != (len(curve[0]),):
            raise PsplFitError(f"pspl-fit curve with {len(curve[0])} points and {sl.size} band codes")
        return sl
    return np.zeros(len(curve[0]), dtype=np.intp)


def advance(states: np.ndarray, curves: Sequence[tuple], first: Sequence[int], params: Params,
            stop_when_triggered: bool = True, record: bool = False,
            group_rows: int = 256) -> tuple[np.ndarray, list[Outcome]]:
    """Process each event's unprocessed points, one point at a time.

    ``states`` (E,) STATE records (``new_state``); ``curves[e]`` = (time, mag, mag_err) of
    the stored points of event e (one band), or (time, mag, mag_err, band) with u8 band
    codes per point (``training.features.band_slots``: u g r i z y and one slot for any
    other code), whose first one has global index ``first[e]``; points
    ``states[e]['n_done'] .. first[e] + len - 1`` are processed. An event that has fired
    (flag TRIGGERED) is skipped when ``stop_when_triggered`` (the broker); offline, with it
    False, every point gets its statistic and the event score is the running max.
    Returns the new states and, per event, the statistics of the processed points (when
    ``record``) and the first point where D >= threshold (fire).
    """
    p = params
    st = np.array(states, dtype=STATE, copy=True)
    E = len(st)
    first = np.asarray(first, dtype=np.int64)
    lens = np.array([len(cv[0]) for cv in curves], dtype=np.int64)
    n_total = first + lens
    start = np.maximum(st["n_done"].astype(np.int64), first)
    skip = ((st["flags"] & TRIGGERED) > 0) & stop_when_triggered
    todo = np.where(skip, 0, np.maximum(n_total - start, 0))
    stats = [np.full(int(u), -np.inf) for u in todo]
    fires: list = [None] * E
    fstat: list = [None] * E
    if not todo.any():
        return st, [Outcome(stats[e], None, None) for e in range(E)]
    slots = [curve_slots(cv) if todo[e] > 0 else None for e, cv in enumerate(curves)]
    band_mask = np.zeros(E, dtype=np.int64)              # bit k: the stored curve has slot k
    for e in np.flatnonzero(todo > 0):
        present = np.unique(slots[e])
        band_mask[e] = int(np.sum(np.left_shift(1, present)))
        if (st["flags"][e] & HAS_REF) == 0:
            st["t_ref"][e] = float(curves[e][0][0])
            st["flags"][e] |= HAS_REF
        for k in present:         # a band's reference: its first stored point, kept in the state
            if not (int(st["seen"][e]) >> int(k)) & 1:
                st["m_ref"][e, k] = float(curves[e][1][int(np.argmax(slots[e] == k))])
                st["a"][e, k], st["b"][e, k] = 0.0, 1.0    # a constant flux at the reference
                st["seen"][e] |= np.uint8(1 << int(k))
    # stacked, referenced data (padded with the last point; never read as valid)
    Lmax = pad_length(int(lens.max()))
    TT, MM, EE = np.empty((E, Lmax)), np.empty((E, Lmax)), np.empty((E, Lmax))
    SL = np.zeros((E, Lmax), dtype=np.intp)
    for e in np.flatnonzero(todo > 0):
        t, m, er = curves[e][:3]
        k = len(t)
        TT[e, :k] = np.asarray(t, dtype=np.float64) - st["t_ref"][e]
        MM[e, :k] = np.asarray(m, dtype=np.float64) - st["m_ref"][e][slots[e]]
        EE[e, :k] = np.asarray(er, dtype=np.float64)
        SL[e, :k] = slots[e]
        if k:
            TT[e, k:], MM[e, k:], EE[e, k:], SL[e, k:] = TT[e, k - 1], MM[e, k - 1], EE[e, k - 1], SL[e, k - 1]
    FF = np.power(10.0, -0.4 * MM)
    stopped = np.zeros(E, dtype=bool)
    for j in range(int(todo.max())):
        live = np.flatnonzero((todo > j) & ~stopped)
        if not len(live):
            break
        n_glob = start[live] + j + 1                      # points seen, this one included
        n_st = n_glob - first[live]                       # stored points up to this one
        Ls = (np.maximum(n_st, 1) + PAD - 1) // PAD * PAD
        for L in np.unique(Ls):
            sel = np.flatnonzero(Ls == L)
            for c0 in range(0, len(sel), group_rows):
                k = sel[c0:c0 + group_rows]
                g = live[k]
                bits = int(np.bitwise_or.reduce(band_mask[g]))
                bands = np.array([q for q in range(N_SLOTS) if (bits >> q) & 1], dtype=np.intp)
                _step(st, g, n_glob[k], n_st[k], TT, MM, EE, FF, SL, bands, int(L), p)
                d = st["last"][g]
                if record:
                    for e, val in zip(g, d):
                        stats[e][j] = val
                hit = (d >= p.threshold) & ((st["flags"][g] & TRIGGERED) == 0)
                for e in g[hit]:
                    fires[e] = int(start[e] + j)
                    fstat[e] = float(st["last"][e])
                    st["flags"][e] |= TRIGGERED
                    stopped[e] = stop_when_triggered
    return st, [Outcome(stats[e], fires[e], fstat[e]) for e in range(E)]


_FIELDS = ("t0", "lu0", "lte", "a", "b", "lam", "scale", "flags", "n_restart", "n_refit", "best")
TRACK_SIGMA = 1.0   # the fit is updated at points where the model is magnified by >= 1 sigma


def _quick(R: _Rows, s: dict, p: Params):
    """The current solution against the newest points only (O(window) per row): the
    offset Δχ² of each window without the leverage term (an upper bound of the full
    statistic's refit-free value) and the model's excess at the newest point in sigma,
    each point in its band's fluxes (``s["a"]``, ``s["b"]``: (B, N_SLOTS))."""
    B = len(R.n)
    W = max(p.windows)
    idx = R.last[:, None] - np.arange(W)[None, ::-1]
    inwin = (idx >= 0).astype(np.float64)
    rows = np.arange(B)[:, None]
    idx = np.maximum(idx, 0)
    t, e, F = R.t[rows, idx], R.e[rows, idx], R.F[rows, idx]
    A = pspl.magnification_ln(t, _col(s["t0"]), _col(s["lu0"]), _col(s["lte"]))
    if R.oh is None:
        a, b = s["a"][:, R.bands[:1]], s["b"][:, R.bands[:1]]                      # (B, 1)
    else:
        sl = R.slot[rows, idx]
        a, b = s["a"][rows, sl], s["b"][rows, sl]
    Fm = np.maximum(a * A + b, FLUX_FLOOR)
    sF = K_MAG * e * Fm
    v2 = inwin / (sF * sF)
    vr = v2 * (F - Fm)
    best = np.full(B, -np.inf)
    for k in p.windows:
        T, V = vr[:, W - k:].sum(-1), v2[:, W - k:].sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where((R.n >= k) & (V > 0), T * T / np.where(V > 0, V, 1.0), -np.inf)
        best = np.maximum(best, d)
    excess = a[:, -1] * (A[:, -1] - 1.0) / sF[:, -1]
    return best / s["scale"] ** 2, excess / s["scale"]


def _put(full, rows, bands, vals, present):
    """Write the per-band ``vals`` (B, K) into the (., N_SLOTS) array ``full`` at ``rows``
    and the slots ``bands``, only where the row has points of the band (``present``): a
    band it lacks keeps its fluxes, whichever bands the other rows of the group have."""
    ix = (rows[:, None], bands[None, :])
    full[ix] = np.where(present, vals, full[ix])


def _step(st: np.ndarray, g: np.ndarray, n_glob: np.ndarray, n_st: np.ndarray, TT, MM, EE, FF, SL,
          bands: np.ndarray, L: int, p: Params) -> None:
    """Point n (the n_st-th stored point) of the events g: fit, statistic, in place.

    Cheap path: where the current model is not magnified at the newest point (by
    TRACK_SIGMA) and no window deviates by refit_level, the point cannot fire (not
    active) and nothing moves: O(window) work. Elsewhere, the full path: statistic at
    the previous solution with the new point (Gauss-Newton corrected), one or more LM
    steps over all points, and a multi-start refit when due. ``bands``: the slots any
    of the events has (the per-band arrays' columns)."""
    R = _Rows(TT[g, :L], MM[g, :L], EE[g, :L], n_st.astype(np.int64), FF[g, :L],
              slot=SL[g, :L], bands=bands)
    s = {k: st[k][g].copy() for k in _FIELDS}
    B = len(g)
    old_enough = n_glob >= p.min_points
    has = (s["flags"] & HAS_FIT) > 0
    D = np.full(B, -np.inf)
    active = np.zeros(B, dtype=bool)
    full = np.zeros(B, dtype=bool)
    if has.any():
        dq, exq = _quick(R, s, p)
        full = has & ((exq >= min(TRACK_SIGMA, 0.5 * p.active_sigma)) | (dq >= p.refit_level))
    if full.any():
        fi = np.flatnonzero(full)
        Rf = R if len(fi) == B else R.take(fi)
        sf = {k: v[fi] for k, v in s.items()}
        P = _Point(Rf, (sf["t0"], sf["lu0"], sf["lte"]), sf["a"][:, bands], sf["b"][:, bands],
                   sf["scale"], p)
        D[fi], active[fi] = _statistic(Rf, P, sf["scale"], p)
        th, a, b, lam = _lm_step(Rf, P, sf["lam"], p)
        for _ in range(1, p.steps_per_point):
            th, a, b, lam = _lm_step(Rf, _Point(Rf, th, a, b, sf["scale"], p), lam, p)
        for k, v in zip(("t0", "lu0", "lte", "lam"), (*th, lam)):
            s[k][fi] = v
        _put(s["a"], fi, bands, a, Rf.cnt > 0)
        _put(s["b"], fi, bands, b, Rf.cnt > 0)
    # multi-start: the first fit, on the growth ladder (tracked events), to confirm a candidate
    ladder = full & (n_glob >= p.restart_growth * np.maximum(s["n_restart"], 1))
    first_fit = ~has & old_enough & (n_st >= 8)
    cand = full & ~ladder & (D >= p.refit_level) & ((n_glob - s["n_refit"]) >= p.refit_cooldown)
    need = ladder | first_fit | cand
    if need.any():
        ri = np.flatnonzero(need)
        for c0 in range(0, len(ri), 16):
            sub = ri[c0:c0 + 16]
            ss = {k: v[sub] for k, v in s.items()}
            ss["a"], ss["b"] = ss["a"][:, bands], ss["b"][:, bands]
            Rs = R.take(sub)
            out = _multistart(Rs, ss, p)
            for k in ("t0", "lu0", "lte", "lam", "scale"):
                s[k][sub] = out[k]
            _put(s["a"], sub, bands, out["a"], Rs.cnt > 0)
            _put(s["b"], sub, bands, out["b"], Rs.cnt > 0)
        s["flags"][ri] |= HAS_FIT
        s["n_restart"][ri] = np.where(cand[ri], s["n_restart"][ri], n_glob[ri])
        s["n_refit"][ri] = n_glob[ri]
        Rn = R.take(ri)
        sn = {k: v[ri] for k, v in s.items()}
        P = _Point(Rn, (sn["t0"], sn["lu0"], sn["lte"]), sn["a"][:, bands], sn["b"][:, bands],
                   sn["scale"], p)
        D[ri], active[ri] = _statistic(Rn, P, sn["scale"], p)
    # a deviation above refit_level counts only when a refit at this point confirmed it
    D = np.where(need, D, np.minimum(D, p.refit_level))
    D = np.where(old_enough & active, D, -np.inf)
    s["best"] = np.maximum(s["best"], D)
    for k in _FIELDS:
        st[k][g] = s[k]
    st["last"][g] = D
    st["n_done"][g] = n_glob


# --------------------------------------------------------------------------- offline
def run_curves(curves: Sequence[tuple], params: Params, chunk: int = 256) -> list[np.ndarray]:
    """D at every point of every light curve (offline: no stop after firing)."""
    out: list[np.ndarray] = []
    for c0 in range(0, len(curves), chunk):
        part = curves[c0:c0 + chunk]
        _, res = advance(new_state(len(part)), part, np.zeros(len(part), dtype=np.int64), params,
                         stop_when_triggered=False, record=True)
        out.extend(r.stats for r in res)
    return out


def running_score(stats: np.ndarray) -> np.ndarray:
    """Event score with data up to each point (running max of D)."""
    s = np.asarray(stats, dtype=np.float64)
    return np.maximum.accumulate(s) if len(s) else s


def event_score(stats: np.ndarray) -> float:
    s = np.asarray(stats, dtype=np.float64)
    return float(s.max()) if len(s) else float("-inf")


def first_trigger(stats: np.ndarray, threshold: float) -> Optional[int]:
    hit = np.flatnonzero(np.asarray(stats) >= threshold)
    return int(hit[0]) if len(hit) else None
