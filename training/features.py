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
    brightening in magnitudes relative to a *causal* reference,
    ``ref_j - mag_j`` with ``ref_j = median(mag[0 : min(j + 1, K)])`` and
    ``K = REFERENCE_POINTS``. From point ``K - 1`` on, the reference is fixed: the
    median of the event's first ``K`` points (:func:`event_reference`).
``mag_err``
    the point's 1-sigma magnitude error, as given.
``log_dt``
    ``log1p(time_j - time_{j-1})`` in days; 0 for an event's first point.

Every row depends only on points ``0..j`` (causal). Rows are computed in float64 and
returned as float32.

Tail windows. The broker keeps only the newest points of an event. For a window
``time[m:], mag[m:], mag_err[m:]`` with ``m >= K - 1`` pass the event's fixed
``reference=event_reference(mag)`` and ``prev_time=time[m - 1]``; then

    build_features(t, mag, err)[m:] == build_features(t[m:], mag[m:], err[m:],
                                                      reference=event_reference(mag),
                                                      prev_time=t[m - 1])

exactly. (With ``reference`` given, every row uses it; with ``prev_time`` None the
first row's ``log_dt`` is 0, i.e. the window starts the event.)
"""
from __future__ import annotations

import numpy as np

CHANNELS: tuple[str, ...] = ("dmag", "mag_err", "log_dt")
REFERENCE_POINTS: int = 10


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


def build_features(time, mag, mag_err, reference: float | None = None,
                   prev_time: float | None = None) -> np.ndarray:
    """Features (n, len(CHANNELS)) float32 for n observed points, one row per point.

    ``time`` in days (strictly increasing), ``mag`` and ``mag_err`` in magnitudes.
    ``reference``/``prev_time``: see the module docstring (tail windows). The arithmetic
    is :func:`build_features_batch`'s (one row of a batch), so both agree bit for bit on one
    machine (see the module docstring).
    """
    t = np.asarray(time, dtype=np.float64)
    m = np.asarray(mag, dtype=np.float64)
    e = np.asarray(mag_err, dtype=np.float64)
    if t.ndim != 1 or m.shape != t.shape or e.shape != t.shape:
        raise FeatureError(f"time, mag and mag_err must be 1-D arrays of one length, got shapes "
                           f"{t.shape}, {m.shape}, {e.shape}")
    return build_features_batch(t[None], m[None], e[None],
                                None if reference is None else np.array([float(reference)]),
                                None if prev_time is None else np.array([float(prev_time)]))[0]


def build_features_batch(time, mag, mag_err, reference=None, prev_time=None,
                         lengths=None) -> np.ndarray:
    """Features of B light curves (or tail windows) at once: (B, W) arrays -> (B, W, C) float32.

    Row ``b`` equals ``build_features(time[b, :n], mag[b, :n], mag_err[b, :n],
    reference[b], prev_time[b])[:n]`` bit for bit on one machine, with ``n = lengths[b]``
    (default W).

    ``reference``: None (every curve its own causal reference, i.e. it starts the event)
    or (B,) floats (tail windows: the events' fixed references). ``prev_time``: None (the
    first row's ``log_dt`` is 0) or (B,) floats, the time of the point before each
    window. ``lengths``: None or (B,) ints for right-padded ragged curves; whatever is
    stored past ``lengths[b]`` is ignored and those rows come back as 0.
    """
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

    ref = per_curve(reference, "reference")
    prev = per_curve(prev_time, "prev_time")
    n = per_curve(lengths, "lengths", np.int64)
    valid = None
    if n is not None:
        if np.any((n < 0) | (n > w)):
            raise FeatureError(f"lengths must be in 0..{w}")
        valid = np.arange(w)[None, :] < n[:, None]
    out = np.empty((b, w, len(CHANNELS)), dtype=np.float64)
    if w == 0:
        return out.astype(np.float32)
    out[..., 0] = (ref[:, None] if ref is not None else _causal_reference_batch(m)) - m
    out[..., 1] = e
    dt = np.empty((b, w), dtype=np.float64)
    dt[:, 0] = 0.0 if prev is None else t[:, 0] - prev
    dt[:, 1:] = t[:, 1:] - t[:, :-1]
    if valid is not None:
        dt[~valid] = 0.0
    if np.any(dt < 0):
        raise FeatureError("times must be increasing (and after prev_time)")
    out[..., 2] = np.log1p(dt)
    res = out.astype(np.float32)
    if valid is not None:
        res[~valid] = 0.0
    return res
