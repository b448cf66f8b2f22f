"""The one function that turns a light curve into model features.

Training, evaluation and the broker all call :func:`build_features` (through
``Artifact.inputs``, which adds the scalers), so the online input for a light curve
equals the offline input bit for bit.

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
    n = len(mag)
    head = mag[:REFERENCE_POINTS].tolist()
    ref = np.empty(n, dtype=np.float64)
    for j in range(min(n, REFERENCE_POINTS - 1)):
        ref[j] = _median(head[: j + 1])
    if n >= REFERENCE_POINTS:
        ref[REFERENCE_POINTS - 1:] = _median(head)
    return ref


def build_features(time, mag, mag_err, reference: float | None = None,
                   prev_time: float | None = None) -> np.ndarray:
    """Features (n, len(CHANNELS)) float32 for n observed points, one row per point.

    ``time`` in days (strictly increasing), ``mag`` and ``mag_err`` in magnitudes.
    ``reference``/``prev_time``: see the module docstring (tail windows).
    """
    t = np.asarray(time, dtype=np.float64)
    m = np.asarray(mag, dtype=np.float64)
    e = np.asarray(mag_err, dtype=np.float64)
    if t.ndim != 1 or m.shape != t.shape or e.shape != t.shape:
        raise FeatureError(f"time, mag and mag_err must be 1-D arrays of one length, got shapes "
                           f"{t.shape}, {m.shape}, {e.shape}")
    n = len(t)
    out = np.empty((n, len(CHANNELS)), dtype=np.float64)
    if n == 0:
        return out.astype(np.float32)
    ref = np.full(n, float(reference)) if reference is not None else _causal_reference(m)
    out[:, 0] = ref - m
    out[:, 1] = e
    dt = np.empty(n, dtype=np.float64)
    dt[0] = 0.0 if prev_time is None else t[0] - float(prev_time)
    dt[1:] = np.diff(t)
    if np.any(dt < 0):
        raise FeatureError("times must be increasing (and after prev_time)")
    out[:, 2] = np.log1p(dt)
    return out.astype(np.float32)
