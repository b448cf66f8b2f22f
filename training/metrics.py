"""Event-level metrics shared by training (validation) and evaluation.

Scores are event scores from :func:`training.decision.event_score` (the largest smoothed
P(binary) where firing is allowed; ``-inf`` when an event never reached ``min_points``).
"""
from __future__ import annotations

import numpy as np

DETECTABLE_DCHI2 = 160.0
DCHI2_BINS = ((0.0, 25.0), (25.0, 160.0), (160.0, 1000.0), (1000.0, np.inf))


def _finite(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).copy()
    s[~np.isfinite(s)] = -1.0  # below every probability
    return s


def roc_auc(labels, scores) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, _finite(scores)))


def pr_auc(labels, scores) -> float | None:
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(average_precision_score(labels, _finite(scores)))


def detectable_mask(labels, dchi2, min_dchi2: float = DETECTABLE_DCHI2) -> np.ndarray:
    """PSPL events and binaries with Δχ² >= min_dchi2 (the 'detectable' comparison)."""
    labels = np.asarray(labels)
    d = np.nan_to_num(np.asarray(dchi2, dtype=np.float64), nan=-np.inf)
    return (labels == 0) | ((labels == 1) & (d >= min_dchi2))


def classification(labels, scores, threshold: float) -> dict:
    """Accuracy, precision, recall, F1 and confusion matrix of ``score >= threshold``."""
    y = np.asarray(labels).astype(int)
    pred = (np.asarray(scores) >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "accuracy": (tp + tn) / max(len(y), 1),
            "precision": precision, "recall": recall, "f1": f1,
            "pspl_firing_rate": fp / (fp + tn) if fp + tn else 0.0,
            "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}}


def event_metrics(labels, scores, dchi2, threshold: float) -> dict:
    """The headline figures: AUC overall and PSPL vs detectable binaries, recall at threshold."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    det = detectable_mask(labels, dchi2)
    binaries_det = det & (labels == 1)
    fired = scores >= threshold
    return {
        "n_events": int(len(labels)), "n_pspl": int(np.sum(labels == 0)),
        "n_binary": int(np.sum(labels == 1)), "n_binary_detectable": int(binaries_det.sum()),
        "roc_auc": roc_auc(labels, scores),
        "roc_auc_detectable": roc_auc(labels[det], scores[det]),
        "pr_auc": pr_auc(labels, scores),
        "threshold": float(threshold),
        "recall_detectable": float(fired[binaries_det].mean()) if binaries_det.any() else None,
        "recall": float(fired[labels == 1].mean()) if np.any(labels == 1) else None,
        "pspl_firing_rate": float(fired[labels == 0].mean()) if np.any(labels == 0) else None,
    }


def recall_by_dchi2(labels, scores, dchi2, threshold: float, bins=DCHI2_BINS) -> list[dict]:
    labels = np.asarray(labels)
    d = np.asarray(dchi2, dtype=np.float64)
    fired = np.asarray(scores) >= threshold
    rows = []
    for lo, hi in bins:
        sel = (labels == 1) & (d >= lo) & (d < hi)
        rows.append({"dchi2_min": lo, "dchi2_max": None if np.isinf(hi) else hi, "n": int(sel.sum()),
                     "recall": float(fired[sel].mean()) if sel.any() else None})
    return rows
