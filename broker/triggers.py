"""The online form of the decision rule, and trigger records: pure functions.

``training.decision`` is the one rule (causal moving average of P(binary) over the
newest M points, threshold, minimum points). Online the broker keeps, per event, the
last M probabilities; :func:`decide` extends them with a batch's new probabilities and
returns the first new point where the rule fires, so that chunk by chunk it fires at
the same point as ``decision.first_trigger`` on the whole run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from broker import trigger_fields as tf
from training import decision


@dataclass(frozen=True)
class Rule:
    name: str            # the trigger's ``rule`` field (consumer.rule)
    threshold: float
    min_points: int
    smooth: int          # M, the moving-average window


def tdcnn_rule(consumer, card: dict) -> Rule:
    """The TD-CNN's rule as the broker runs it: ``consumer.threshold`` (None: the model
    card's), ``consumer.min_points`` and the card's moving-average window."""
    thr = consumer.threshold if consumer.threshold is not None else card["threshold"]
    return Rule("tdcnn", float(thr), int(consumer.min_points),
                int(card["decision"].get("smooth_window", decision.SMOOTH_WINDOW)))


@dataclass(frozen=True)
class Decision:
    fire: Optional[int]        # index into the new probabilities where the rule fires
    score: Optional[float]     # the smoothed probability there
    ring: np.ndarray           # (M,) float32: last M probabilities after the new ones


def decide(prev: np.ndarray, new: np.ndarray, n_before: int, rule: Rule,
           triggered: bool = False) -> Decision:
    """Decide on the new points ``n_before .. n_before+len(new)-1`` of one event.

    ``prev``: the newest ``min(M, n_before)`` probabilities before them, oldest first.
    """
    m = rule.smooth
    prev = np.asarray(prev, dtype=np.float32)[-(m - 1):] if m > 1 else np.empty(0, np.float32)
    new = np.asarray(new, dtype=np.float32)
    seq = np.concatenate([prev, new])
    ring = np.zeros(m, dtype=np.float32)
    tail = seq[-m:]
    ring[m - len(tail):] = tail
    if triggered or len(new) == 0:
        return Decision(None, None, ring)
    # ``prev`` holds every probability the newest scores need (the window is M), so the
    # local score equals the global one at the new points.
    scores = decision.score(seq, m)[len(prev):]
    eligible = n_before + np.arange(1, len(new) + 1) >= max(rule.min_points, 1)
    hit = np.flatnonzero(eligible & (scores >= rule.threshold))
    if len(hit) == 0:
        return Decision(None, None, ring)
    j = int(hit[0])
    return Decision(j, float(scores[j]), ring)


def decide_many(rings: np.ndarray, n_before: np.ndarray, new: list, triggered: np.ndarray,
                rule: Rule) -> list[Decision]:
    """:func:`decide` for many events at once (one call of the rule per group).

    ``rings`` (E, M) float32: each event's last M probabilities (oldest first; only the
    newest ``min(M, n_before)`` are meaningful). Events with at least M - 1 earlier points
    (the steady state) are grouped by their number u of new points; in a group, each
    event's M - 1 previous probabilities and u new ones are laid end to end and
    ``decision.score`` runs once over the lot (every score needs only the M newest values,
    all inside the event's own segment). Young events go through :func:`decide`.
    """
    m = rule.smooth
    e = len(new)
    out: list[Optional[Decision]] = [None] * e
    n_before = np.asarray(n_before, dtype=np.int64)
    triggered = np.asarray(triggered, dtype=bool)
    rings = np.asarray(rings, dtype=np.float32)
    lens = np.fromiter((len(p) for p in new), dtype=np.int64, count=e)
    steady = (lens >= 1) & (n_before >= m - 1)
    for u in np.unique(lens[steady]):
        rows = np.flatnonzero(steady & (lens == u))
        seg = np.empty((len(rows), m - 1 + u), dtype=np.float32)
        seg[:, :m - 1] = rings[rows, 1:]
        seg[:, m - 1:] = np.stack([new[i] for i in rows])
        scores = decision.score(seg.ravel(), m).reshape(seg.shape)[:, m - 1:]
        count = n_before[rows, None] + np.arange(1, u + 1)[None, :]
        hit = (scores >= rule.threshold) & (count >= max(rule.min_points, 1)) & ~triggered[rows, None]
        first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
        for r, i in enumerate(rows):
            ring = seg[r, -m:].copy()
            j = int(first[r])
            out[i] = Decision(j, float(scores[r, j]), ring) if j >= 0 else Decision(None, None, ring)
    for i in range(e):
        if out[i] is None:
            k = int(min(m, n_before[i]))
            prev = rings[i][m - k:] if k else np.empty(0, np.float32)
            out[i] = decide(prev, new[i], int(n_before[i]), rule, bool(triggered[i]))
    return out  # type: ignore[return-value]


def trigger_id(object_id: int, rule: str, model_version: str) -> str:
    """Deterministic: one id per (event, rule, model version)."""
    return hashlib.sha256(f"{int(object_id)}|{rule}|{model_version}".encode()).hexdigest()[:32]


def trigger_record(object_id: int, source_id: int, rule: Rule, score: float, n_points: int,
                   mjd: float, alert_produced_us: int, model_version: str,
                   extra: Optional[dict] = None) -> dict:
    """The trigger (schema ``trigger``) without ``triggerProducedUs`` (set at produce).
    ``extra``: the v2 fields (``broker.trigger_fields.v2_fields``); the summary line is
    made here from the whole record."""
    rec = {"triggerId": trigger_id(object_id, rule.name, model_version),
           "diaObjectId": int(object_id), "diaSourceId": int(source_id), "rule": rule.name,
           "probability": float(score), "threshold": float(rule.threshold),
           "nPoints": int(n_points), "midpointMjdTai": float(mjd),
           "alertProducedUs": int(alert_produced_us), "modelVersion": model_version}
    return tf.as_latest({**rec, **(extra or {})})


def stored_curves(store, results) -> dict[int, tuple[np.ndarray, int]]:
    """{object id: (the event's stored points, global index of the first)} for append
    results ``results``: a result's window when it holds every stored point, else read
    from the store, all in one round trip (a batch of thesis binaries fires hundreds)."""
    out, missing = {}, []
    for res in results:
        h = res.header
        if res.start == h.n_dropped and len(res.window) == h.n_total - h.n_dropped:
            out[res.object_id] = (res.window, res.start)
        else:
            missing.append(res)
    if missing:
        views = store.read_many([res.object_id for res in missing])
        for res in missing:
            view = views.get(res.object_id)
            # expired meanwhile: the window is what there is
            out[res.object_id] = (res.window, res.start) if view is None else (view.points, view.first_index)
    return out


def trigger_at(object_id: int, record, points, mine, rule: Rule, score: float, g: int,
               model_version: str, curve: Optional[tuple] = None,
               fit_params: Optional[tuple] = None) -> dict:
    """The trigger a rule fired at the event's point ``g`` (0-based), whose stored record
    (``broker.state.RECORD``: time, diaSourceId, ...) is ``record``.

    Its alertProducedUs is that of the deciding alert when it is in this batch (``points``
    rows ``mine``); a point decided late (scored after a crash or a model switch, its alert
    in an earlier batch) gets 0. Coordinates from the batch's alerts of the event
    (``Points.ra``/``dec``). ``curve`` = (stored points, global index of the first): the
    points up to ``g`` give the bands seen and the causal PSPL estimate, fitted here
    (``trigger_fields.fit_estimate``) unless the rule brings its own (t0, u0, tE) in
    ``fit_params`` (``trigger_fields.estimate_at``). Without ``curve`` only the deciding
    point is known: no estimate."""
    src = int(record["id"])
    produced_us = 0
    for i in mine:
        if points.source_id[i] == src:
            produced_us = int(points.produced_us[i])
            break
    ra, dec = tf.coordinates(points, mine, src)
    recs, estimate = None, None
    if curve is not None:
        stored, first = curve
        recs = stored[:max(g - int(first) + 1, 0)]
        if len(recs) == 0 or int(recs[-1]["id"]) != src:
            recs = None          # not the curve of this point (cannot happen; be safe)
    if recs is not None:
        if fit_params is not None:
            estimate = tf.estimate_at(recs, *fit_params)
        else:
            estimate = tf.fit_estimate(recs)
    extra = tf.v2_fields(ra=ra, dec=dec, record=record, recs=recs, estimate=estimate)
    return trigger_record(object_id, src, rule, score, g + 1, float(record["t"]), produced_us,
                          model_version, extra)
