"""The one function that turns a light curve into model features.

Training, evaluation and the broker all call :func:`build_features` (through
``Artifact.inputs``, which adds the scalers) or its batch form
:func:`build_features_batch` (through ``Artifact.inputs_batch``; the broker, many tail
windows at once). ``build_features`` is one row of the batch form: one formula, so the
online input for a light curve equals the offline input bit for bit on the same machine
(the same numpy code, elementwise and per row, so a row does not depend on the other rows
of its batch). Across machines it may differ in the last bits: numpy picks its SIMD
kernels for the CPU it runs on.

Channels, one row per observed point ``j`` (no resampling: one step per point):

``dmag``
    brightening in magnitudes relative to a *causal* reference of the point's band,
    ``ref_j - mag_j`` with ``ref_j`` the median of the first ``min(r + 1, K)`` points of
    that band, ``r`` the point's rank within its band and ``K = REFERENCE_POINTS``. From a
    band's ``K``-th point on, its reference is fixed: the median of its first ``K`` points
    (:func:`event_reference` of the band's magnitudes). The light curves of different
    bands share one magnification but not their baseline (source colour, blending), so a
    band is only ever compared with itself: a constant source seen in g and i is flat.
    With one band (``band`` None, or every point in one band) this is the median of the
    event's first points, as before bands were kept.
``mag_err``
    the point's 1-sigma magnitude error, as given.
``log_dt``
    ``log1p(time_j - time_{j-1})`` in days; 0 for an event's first point.

Those three are the thesis models' set (``CHANNELS_V1``, the default). A model trained
for surveys of many cadences, bands and depths (``CHANNELS_V2``, ``ulens train
--features v2``) reads the same ``dmag`` and ``log_dt`` and, instead of the raw error:

``snr``
    how significant the brightening is: ``asinh(z)`` with ``z = (F_j - F_ref) / sigma_F``
    the flux above the band's reference in units of the point's flux error,
    ``z = (1 - 10^(-0.4 dmag)) / (0.4 ln(10) mag_err)`` (first order in the error, as the
    magnitude error itself is). A 0.1-mag brightening is z = 18 at 0.005 mag but z = 0.3
    at 0.3 mag: the same dmag means a detection on a bright source and noise on a faint
    one, which a constant-error survey never taught the thesis models.
``log_mag_err``
    ``ln(mag_err)`` (errors span 0.005-0.5 mag in one Rubin light curve).
``band_u`` .. ``band_y``
    the band, one-hot (a learned linear embedding in the first convolution); a code
    outside ugrizy, or no band, is all zeros.

A third set (``CHANNELS_V3``, ``ulens train --features v3``) adds to v2 what the classical
rule already computes at every point, the causal PSPL-fit statistic ``D_j``
(:mod:`training.psplfit`: the Δχ² of a free flux offset over the newest points on top of
the robust per-band PSPL fit of points ``0..j``; ``-inf`` where the rule is not eligible):

``pspl_active``
    1 where ``D_j`` is finite (the fit is significant and the model magnified at the
    point), else 0.
``pspl_d``
    ``asinh(D_j / PSPL_D_SCALE)`` where active, else 0 (D spans 0 to 1e5: the log-like
    tail keeps a caustic crossing from saturating the first layer).

``D`` is not a function of the light curve that this module can compute row by row (it is
the state of an iterative fit), so v3 callers pass it (``pspl_d``, with the fit parameters
the model card names: ``Artifact.inputs`` computes it when not given).

Errors below ``MIN_MAG_ERR`` are taken as ``MIN_MAG_ERR`` in ``snr`` and ``log_mag_err``.

Every row depends only on points ``0..j`` (causal). Rows are computed in float64 and
returned as float32.

Tail windows. The broker keeps only the newest points of an event. For a window
``time[m:], mag[m:], mag_err[m:]`` in which every point is at least the ``K``-th of its
band, pass the bands' fixed references (``reference``: one float for a one-band curve, or
one per band slot, :func:`band_references`) and ``prev_time=time[m - 1]``; then

    build_features(t, mag, err, band=b)[m:] == build_features(
        t[m:], mag[m:], err[m:], band=b[m:], reference=band_references(mag, b),
        prev_time=t[m - 1])

exactly. (A float ``reference`` is used by every row; a per-slot array by the rows of each
slot whose entry is not NaN, the others taking their band's causal reference within the
window; with ``prev_time`` None the first row's ``log_dt`` is 0: the window starts the event.)

Bands are u8 codes, ``u g r i z y`` = 0..5 (``training.survey.BAND_NAMES``, the dataset's
and the broker's code); any other code shares one slot, ``SLOT_UNKNOWN``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from training.photometry import K_MAG

CHANNELS_V1: tuple[str, ...] = ("dmag", "mag_err", "log_dt")
CHANNELS_V2: tuple[str, ...] = ("dmag", "snr", "log_mag_err", "log_dt",
                                "band_u", "band_g", "band_r", "band_i", "band_z", "band_y")
CHANNELS_V3: tuple[str, ...] = CHANNELS_V2 + ("pspl_active", "pspl_d")
FEATURE_SETS: dict[str, tuple[str, ...]] = {"v1": CHANNELS_V1, "v2": CHANNELS_V2, "v3": CHANNELS_V3}
PSPL_D_SCALE = 10.0               # the rule's refit level: D below it is capped there unconfirmed
CHANNELS = CHANNELS_V1            # the default: the thesis models' set
MIN_MAG_ERR = 1e-3
REFERENCE_POINTS: int = 10
N_BANDS = 6                       # u g r i z y
N_SLOTS = N_BANDS + 1             # + one slot for any other band code
SLOT_UNKNOWN = N_BANDS


class FeatureError(ValueError):
    """Light-curve arrays that cannot be turned into features (the message says why)."""


def _median(values: list[float]) -> float:
    """Median of a short list of floats (the middle value, or the mean of the two middle)."""
    v = sorted(values)
    h = len(v) // 2
    return v[h] if len(v) % 2 else (v[h - 1] + v[h]) / 2.0


def event_reference(mag) -> float | None:
    """The event's fixed reference magnitude: median of its first K points (None if fewer)."""
    mag = np.asarray(mag, dtype=np.float64)
    if mag.ndim != 1:
        raise FeatureError(f"mag must be one-dimensional, got shape {mag.shape}")
    if len(mag) < REFERENCE_POINTS:
        return None
    return _median(mag[:REFERENCE_POINTS].tolist())


def band_slots(band) -> np.ndarray:
    """Reference slots (0..N_SLOTS-1, intp) of u8 band codes: 0..5 themselves, others SLOT_UNKNOWN."""
    b = np.asarray(band)
    return np.where((b >= 0) & (b < N_BANDS), b, SLOT_UNKNOWN).astype(np.intp)


def band_references(mag, band=None) -> np.ndarray:
    """(N_SLOTS,) float64: each band's fixed reference (median of its first K points), NaN
    for a band with fewer than K points."""
    mag = np.asarray(mag, dtype=np.float64)
    slots = np.zeros(len(mag), np.intp) if band is None else band_slots(band)
    out = np.full(N_SLOTS, np.nan)
    for s in np.unique(slots):
        r = event_reference(mag[slots == s])
        if r is not None:
            out[s] = r
    return out


def _causal_reference(mag: np.ndarray) -> np.ndarray:
    """ref_j = median(mag[0:min(j+1, K)]) for every j (float64)."""
    return _causal_reference_batch(np.asarray(mag, dtype=np.float64)[None])[0]


def _median_rows(sorted_rows: np.ndarray) -> np.ndarray:
    """Row medians of row-sorted (B, k) float64, the arithmetic of :func:`_median`."""
    h = sorted_rows.shape[1] // 2
    if sorted_rows.shape[1] % 2:
        return sorted_rows[:, h].copy()
    return (sorted_rows[:, h - 1] + sorted_rows[:, h]) / 2.0


def _causal_reference_batch(mag: np.ndarray) -> np.ndarray:
    """ref[b, j] = median(mag[b, 0:min(j+1, K)]) for (B, W) float64 -> (B, W) float64."""
    b, w = mag.shape
    ref = np.empty((b, w), dtype=np.float64)
    for j in range(min(w, REFERENCE_POINTS - 1)):
        ref[:, j] = _median_rows(np.sort(mag[:, :j + 1], axis=1))
    if w >= REFERENCE_POINTS:
        ref[:, REFERENCE_POINTS - 1:] = _median_rows(np.sort(mag[:, :REFERENCE_POINTS], axis=1))[:, None]
    return ref


def _reference_columns(m: np.ndarray, slots: Optional[np.ndarray], ref: Optional[np.ndarray]) -> np.ndarray:
    """Each point's reference (B, W) float64: ``ref`` (B,) for every point of its curve, or
    (B, N_SLOTS) per band slot (NaN: the band's causal reference within the row), or None
    (every band its causal reference)."""
    b, w = m.shape
    if ref is not None and ref.ndim == 1:
        return np.broadcast_to(ref[:, None], (b, w)).copy()
    if slots is None:
        slots = np.zeros((b, w), dtype=np.intp)
    out = np.full((b, w), np.nan) if ref is None else np.take_along_axis(ref, slots, axis=1)
    need = np.isnan(out)
    if not need.any():
        return out
    single = (slots == slots[:, :1]).all(axis=1)
    rows = np.flatnonzero(single & need.any(axis=1))
    if len(rows):                    # one band per row (the usual one-band survey): at once
        out[rows] = _causal_reference_batch(m[rows])
    multi = np.flatnonzero(~single & need.any(axis=1))
    if len(multi):                   # several bands per row: every (row, band) at once
        out[multi] = _grouped_causal_reference(m[multi], slots[multi], need[multi], out[multi])
    return out


def _grouped_causal_reference(m: np.ndarray, slots: np.ndarray, need: np.ndarray,
                              out: np.ndarray) -> np.ndarray:
    """``out`` (R, W) with each point of a (row, band slot) that ``need`` marks given its
    band's causal reference within the row: the median of that band's first min(rank+1, K)
    points. The medians of all groups come from one :func:`_causal_reference_batch` over a
    (groups, K) table of each group's first K points: the same sorts and arithmetic as a
    call per group (a NaN-padded slot of a short group is never part of a queried prefix)."""
    k_ref = REFERENCE_POINTS
    r_, w_ = slots.shape
    key = np.arange(r_)[:, None] * N_SLOTS + slots
    sel = np.isin(key, np.unique(key[need]))
    rr, cc = np.nonzero(sel)                          # row-major: in column order within a row
    k = key[rr, cc]
    order = np.argsort(k, kind="stable")              # by group, column order kept
    ks = k[order]
    new = np.ones(len(ks), dtype=bool)
    new[1:] = ks[1:] != ks[:-1]
    gid = np.cumsum(new) - 1
    rank = np.arange(len(ks)) - np.flatnonzero(new)[gid]
    vals = m[rr[order], cc[order]]
    table = np.full((int(gid[-1]) + 1, k_ref), np.nan)
    first = rank < k_ref
    table[gid[first], rank[first]] = vals[first]
    with np.errstate(invalid="ignore"):
        medians = _causal_reference_batch(table)
    out = out.copy()
    out[rr[order], cc[order]] = medians[gid, np.minimum(rank, k_ref - 1)]
    return out


def feature_set(channels) -> tuple[str, ...]:
    """``channels`` (a set's name or its channel list) as one of :data:`FEATURE_SETS`."""
    if isinstance(channels, str):
        if channels not in FEATURE_SETS:
            raise FeatureError(f"unknown feature set {channels!r} (known: {', '.join(FEATURE_SETS)})")
        return FEATURE_SETS[channels]
    c = tuple(channels)
    if c not in FEATURE_SETS.values():
        raise FeatureError(f"unknown feature channels {list(c)} (known sets: "
                           + "; ".join(f"{k} = {list(v)}" for k, v in FEATURE_SETS.items()) + ")")
    return c


def needs_pspl_d(channels) -> bool:
    """Whether a feature set reads the PSPL-fit statistic (v3)."""
    return "pspl_d" in feature_set(channels)


def build_features(time, mag, mag_err, reference=None, prev_time: float | None = None,
                   band=None, channels=CHANNELS, pspl_d=None) -> np.ndarray:
    """Features (n, len(CHANNELS)) float32 for n observed points, one row per point.

    ``time`` in days (strictly increasing), ``mag`` and ``mag_err`` in magnitudes, ``band``
    u8 codes (None: one band). ``reference``/``prev_time``: see the module docstring (tail
    windows; ``reference`` a float or (N_SLOTS,) per band slot). ``pspl_d``: the PSPL-fit
    statistic at each point (feature set v3 only). The arithmetic is
    :func:`build_features_batch`'s (one row of a batch), so both agree bit for bit on one
    machine (see the module docstring).
    """
    t = np.asarray(time, dtype=np.float64)
    m = np.asarray(mag, dtype=np.float64)
    e = np.asarray(mag_err, dtype=np.float64)
    if t.ndim != 1 or m.shape != t.shape or e.shape != t.shape:
        raise FeatureError(f"time, mag and mag_err must be 1-D arrays of one length, got shapes "
                           f"{t.shape}, {m.shape}, {e.shape}")
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        reference = reference.reshape(1) if reference.ndim == 0 else reference[None]
    return build_features_batch(t[None], m[None], e[None], reference,
                                None if prev_time is None else np.array([float(prev_time)]),
                                band=None if band is None else np.asarray(band)[None],
                                channels=channels,
                                pspl_d=None if pspl_d is None else np.asarray(pspl_d)[None])[0]


def build_features_batch(time, mag, mag_err, reference=None, prev_time=None,
                         lengths=None, band=None, channels=CHANNELS, pspl_d=None) -> np.ndarray:
    """Features of B light curves (or tail windows) at once: (B, W) arrays -> (B, W, C) float32.

    Row ``b`` equals ``build_features(time[b, :n], mag[b, :n], mag_err[b, :n],
    reference[b], prev_time[b], band[b, :n])[:n]`` bit for bit on one machine, with
    ``n = lengths[b]`` (default W).

    ``reference``: None (every curve its bands' causal references, i.e. it starts the
    event), (B,) floats (one reference for every point of a curve) or (B, N_SLOTS) per
    band slot (tail windows: the bands' fixed references; NaN = causal within the row).
    ``prev_time``: None (the first row's ``log_dt`` is 0) or (B,) floats, the time of the
    point before each window. ``lengths``: None or (B,) ints for right-padded ragged
    curves; whatever is stored past ``lengths[b]`` is ignored and those rows come back as
    0. ``band``: None (one band) or (B, W) u8 codes. ``channels``: a feature set
    (:data:`FEATURE_SETS`, by name or channel list). ``pspl_d``: (B, W) the PSPL-fit
    statistic per point (-inf: not eligible), required by v3 and ignored otherwise.
    """
    channels = feature_set(channels)
    t = np.asarray(time, dtype=np.float64)
    m = np.asarray(mag, dtype=np.float64)
    e = np.asarray(mag_err, dtype=np.float64)
    if t.ndim != 2 or m.shape != t.shape or e.shape != t.shape:
        raise FeatureError(f"time, mag and mag_err must be 2-D arrays (curves, points) of one "
                           f"shape, got shapes {t.shape}, {m.shape}, {e.shape}")
    b, w = t.shape

    def per_curve(a, name, dtype=np.float64):
        if a is None:
            return None
        a = np.asarray(a, dtype=dtype)
        if a.shape != (b,):
            raise FeatureError(f"{name} must have one value per curve ({b}), got shape {a.shape}")
        return a

    ref = None
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape not in ((b,), (b, N_SLOTS)):
            raise FeatureError(f"reference must be one value per curve ({b},) or one per band slot "
                               f"({b}, {N_SLOTS}), got shape {ref.shape}")
    slots = None
    if band is not None:
        bnd = np.asarray(band)
        if bnd.shape != (b, w):
            raise FeatureError(f"band must have the shape of time {t.shape}, got {bnd.shape}")
        slots = band_slots(bnd)
    d = None
    if channels == CHANNELS_V3:
        if pspl_d is None:
            raise FeatureError("feature set v3 needs pspl_d, the PSPL-fit statistic at every point "
                               "(training.psplfit.run_curves with the model card's pspl_fit parameters)")
        d = np.asarray(pspl_d, dtype=np.float64)
        if d.shape != (b, w):
            raise FeatureError(f"pspl_d must have the shape of time {t.shape}, got {d.shape}")
        if np.isnan(d).any() or np.isposinf(d).any():
            raise FeatureError("pspl_d must be finite or -inf (not eligible), found NaN or +inf")
    prev = per_curve(prev_time, "prev_time")
    n = per_curve(lengths, "lengths", np.int64)
    valid = None
    if n is not None:
        if np.any((n < 0) | (n > w)):
            raise FeatureError(f"lengths must be in 0..{w}")
        valid = np.arange(w)[None, :] < n[:, None]
    out = np.empty((b, w, len(channels)), dtype=np.float64)
    if w == 0:
        return out.astype(np.float32)
    dmag = _reference_columns(m, slots, ref) - m
    dt = np.empty((b, w), dtype=np.float64)
    dt[:, 0] = 0.0 if prev is None else t[:, 0] - prev
    dt[:, 1:] = t[:, 1:] - t[:, :-1]
    if valid is not None:
        dt[~valid] = 0.0
    if np.any(dt < 0):
        raise FeatureError("times must be increasing (and after prev_time)")
    if channels == CHANNELS_V1:
        out[..., 0], out[..., 1], out[..., 2] = dmag, e, np.log1p(dt)
    else:
        ef = np.maximum(e, MIN_MAG_ERR)
        out[..., 0] = dmag
        out[..., 1] = np.arcsinh(-np.expm1(-K_MAG * dmag) / (K_MAG * ef))
        out[..., 2] = np.log(ef)
        out[..., 3] = np.log1p(dt)
        onehot = out[..., 4:]
        onehot[...] = 0.0
        if slots is not None:
            known = slots < N_BANDS
            bi, wi = np.nonzero(known)
            onehot[bi, wi, slots[known]] = 1.0
        if d is not None:
            active = np.isfinite(d)
            out[..., 10] = active
            out[..., 11] = np.arcsinh(np.where(active, d, 0.0) / PSPL_D_SCALE)   # asinh(0) = 0
    res = out.astype(np.float32)
    if valid is not None:
        res[~valid] = 0.0
    return res
