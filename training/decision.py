"""The one decision rule, shared by offline evaluation and the broker (pure numpy).

Given the per-point P(binary) of one event, in observation order:

* ``score(probs, smooth)``: the causal moving average over the newest ``smooth`` points,
  ``score[j] = mean(probs[max(0, j - smooth + 1) : j + 1])`` (fewer points at the start).
* The event **fires** at the first point ``j`` with ``score[j] >= threshold`` and at least
  ``min_points`` points seen (``j + 1 >= min_points``): :func:`first_trigger`.
* The event score (for ROC curves and threshold choice) is the largest score over the
  points where firing is allowed: :func:`event_score`. So an event fires at threshold
  ``thr`` exactly when ``event_score >= thr``; with data up to point ``n`` only, use
  ``event_score(probs[:n+1])`` (the rule is causal).

The parameters travel in the model card as ``card["decision"]`` =
``{"rule": RULE, "smooth_window": M, "min_points": P, "threshold": thr}``.
"""
from __future__ import annotations

import numpy as np

RULE = "causal_moving_average"
SMOOTH_WINDOW = 5
MIN_POINTS = 10


def score(probs, smooth: int = SMOOTH_WINDOW) -> np.ndarray:
    """Causal moving average of P(binary) over the newest ``smooth`` points (float64)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"probs must be one-dimensional, got shape {p.shape}")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    c = np.concatenate([[0.0], np.cumsum(p)])
    j = np.arange(len(p))
    lo = np.maximum(0, j - smooth + 1)
    return (c[j + 1] - c[lo]) / (j + 1 - lo)


def first_trigger(probs, threshold: float, min_points: int = MIN_POINTS,
                  smooth: int = SMOOTH_WINDOW) -> int | None:
    """Index of the first point where the event fires, or None."""
    s = score(probs, smooth)
    ok = np.flatnonzero(s[max(min_points, 1) - 1:] >= threshold)
    return int(ok[0]) + max(min_points, 1) - 1 if len(ok) else None


def first_crossing(running, threshold: float) -> int | None:
    """First point where a running event score (:func:`running_score`, or any other rule's:
    non-decreasing) reaches ``threshold``, or None: where that rule fires."""
    j = int(np.searchsorted(running, threshold, side="left"))
    return j if j < len(running) else None


def running_score(probs, min_points: int = MIN_POINTS, smooth: int = SMOOTH_WINDOW) -> np.ndarray:
    """``out[j]`` = event score with data up to point j (-inf before ``min_points``)."""
    s = score(probs, smooth)
    s[: max(min_points, 1) - 1] = -np.inf
    return np.maximum.accumulate(s) if len(s) else s


def event_score(probs, min_points: int = MIN_POINTS, smooth: int = SMOOTH_WINDOW) -> float:
    """Largest score where firing is allowed (-inf if the event has < min_points points)."""
    r = running_score(probs, min_points, smooth)
    return float(r[-1]) if len(r) else float("-inf")


def threshold_for_false_rate(negative_scores, max_rate: float = 0.05) -> float:
    """Lowest threshold at which at most ``max_rate`` of the negatives (PSPL) would fire."""
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return 0.5
    k = int(np.floor(max_rate * len(s)))  # this many may fire
    if k >= len(s):
        return float(s[-1])
    return float(np.nextafter(s[k], np.inf))


def params(threshold: float, min_points: int = MIN_POINTS, smooth: int = SMOOTH_WINDOW) -> dict:
    """The card's ``decision`` entry."""
    return {"rule": RULE, "smooth_window": int(smooth), "min_points": int(min_points),
            "threshold": float(threshold)}
