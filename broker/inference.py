"""Windowed, batched inference: the model runs only on what a new point needs.

For an event whose points ``n_scored .. n_total-1`` have no probability yet, the state
returns the stored points from ``start = window_start(...)`` on. Two cases:

* ``start == 0`` (young event): model input = ``artifact.inputs`` of the whole curve
  (the event's causal reference and first ``log_dt = 0``), exactly as offline;
* ``start > 0`` (then ``start >= K``): the first returned point only gives
  ``prev_time``; the input rows are the next ``receptive_field + u - 1`` points, built
  with the event's fixed ``reference`` (features' "tail window" rule, equal to the rows
  of a full-curve run).

Windows of the same (length, u) are stacked and run in one ``artifact.predict_last``
call (the model's dependency cone of the newest ``u`` outputs). Because the net is
causal and sees the receptive field, the outputs equal those of ``artifact.predict``
on the full light curve (tested to 1e-5). On a GPU, young events (whose windows have
many different lengths) are instead right-padded to one length and run through one
full ``artifact.predict`` (right padding is invisible to a causal net): one call
instead of one per length, and the extra positions cost the GPU nothing.

Tail-window features for a whole group are built in one vectorised step
(:func:`tail_inputs`), the same arithmetic as ``training.features.build_features``
followed by the artifact's scalers; :class:`Scorer` checks bit-equality with
``artifact.inputs`` on startup and falls back to calling ``artifact.inputs`` per
window if the check fails.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from training.features import CHANNELS, FeatureError

log = logging.getLogger("broker.inference")


def window_start(n_scored: int, first_stored: int, reference_points: int, receptive_field: int) -> int:
    """Global index of the first point the state returns for scoring (mirrors the Lua).

    The context of point ``n_scored`` is its ``receptive_field - 1`` predecessors plus
    one more point for ``prev_time``; a window that would start before the event's
    reference is fixed (index < K) starts at the first point instead.
    """
    s = max(first_stored, n_scored - receptive_field)
    return first_stored if s < reference_points else s


@dataclass
class Job:
    """One event's pending points and the context the state returned for them."""
    n_scored: int                # global index of the first point to score
    start: int                   # global index of time[0]
    time: np.ndarray             # float64, points start .. n_total-1
    mag: np.ndarray              # float32
    mag_err: np.ndarray          # float32
    reference: Optional[float]   # the event's fixed reference (needed when start > 0)

    @property
    def n_new(self) -> int:
        return self.start + len(self.time) - self.n_scored


def tail_inputs(scalers, time: np.ndarray, mag: np.ndarray, mag_err: np.ndarray,
                reference: np.ndarray) -> np.ndarray:
    """Model input for B tail windows at once.

    ``time`` (B, L+1) float64 (column 0 = prev_time), ``mag``/``mag_err`` (B, L) float32,
    ``reference`` (B,) float64 -> (B, L, C) float32; row for row equal to
    ``artifact.inputs(time[b, 1:], mag[b], mag_err[b], reference=reference[b],
    prev_time=time[b, 0])``.
    """
    m = np.asarray(mag, dtype=np.float64)
    e = np.asarray(mag_err, dtype=np.float64)
    t = np.asarray(time, dtype=np.float64)
    out = np.empty(m.shape + (len(CHANNELS),), dtype=np.float64)
    out[..., 0] = np.asarray(reference, dtype=np.float64)[:, None] - m
    out[..., 1] = e
    dt = t[:, 1:] - t[:, :-1]
    if np.any(dt < 0):
        raise FeatureError("times must be increasing (and after prev_time)")
    out[..., 2] = np.log1p(dt)
    return scalers.transform(out.astype(np.float32))


def _window_inputs_one(artifact, job: Job) -> np.ndarray:
    if job.start == 0:
        return artifact.inputs(job.time, job.mag, job.mag_err)
    return artifact.inputs(job.time[1:], job.mag[1:], job.mag_err[1:],
                           reference=job.reference, prev_time=float(job.time[0]))


class Scorer:
    """Turns jobs into probabilities with as few model calls as the batch allows."""

    def __init__(self, artifact, vectorised: bool = True, pad_young: Optional[bool] = None):
        if tuple(CHANNELS) != ("dmag", "mag_err", "log_dt"):
            vectorised = False  # tail_inputs knows these channels only
        self.artifact = artifact
        self.vectorised = vectorised and self._self_check()
        self.pad_young = (getattr(artifact.device, "type", "cpu") == "cuda") if pad_young is None \
            else pad_young

    def _self_check(self) -> bool:
        """``tail_inputs`` must equal ``artifact.inputs`` bit for bit on this machine."""
        rng = np.random.default_rng(12345)
        b, n = 16, 40
        t = 61000.0 + np.cumsum(rng.uniform(0.0, 3.0, (b, n + 1)), axis=1)
        mag = rng.uniform(14.0, 24.0, (b, n)).astype(np.float32)
        err = rng.uniform(0.001, 0.5, (b, n)).astype(np.float32)
        ref = rng.uniform(14.0, 24.0, b)
        fast = tail_inputs(self.artifact.scalers, t, mag, err, ref)
        for i in range(b):
            slow = self.artifact.inputs(t[i, 1:], mag[i], err[i], reference=float(ref[i]),
                                        prev_time=float(t[i, 0]))
            if not np.array_equal(fast[i], slow):
                log.warning("vectorised tail features differ from artifact.inputs: "
                            "using artifact.inputs per window")
                return False
        return True

    def score(self, jobs: list[Job]) -> list[np.ndarray]:
        """P(binary) (float32) of each job's pending points, in job order."""
        out: list[Optional[np.ndarray]] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        young: list[int] = []
        for i, job in enumerate(jobs):
            u = job.n_new
            if u <= 0:
                out[i] = np.empty(0, dtype=np.float32)
                continue
            if job.start > 0 and job.reference is None:
                raise ValueError(f"window starting at point {job.start} needs the event reference")
            if job.start == 0 and self.pad_young:
                young.append(i)
                continue
            rows = len(job.time) - (1 if job.start > 0 else 0)
            groups[(job.start > 0, rows, u)].append(i)
        for (tail, rows, u), members in groups.items():
            if tail and self.vectorised:
                x = tail_inputs(self.artifact.scalers,
                                np.stack([jobs[i].time for i in members]),
                                np.stack([jobs[i].mag[1:] for i in members]),
                                np.stack([jobs[i].mag_err[1:] for i in members]),
                                np.array([jobs[i].reference for i in members], dtype=np.float64))
            else:
                x = np.stack([_window_inputs_one(self.artifact, jobs[i]) for i in members])
            p = self.artifact.predict_last(x, n_last=u)
            for row, i in enumerate(members):
                out[i] = p[row]
        if young:
            xs = [_window_inputs_one(self.artifact, jobs[i]) for i in young]
            x = np.zeros((len(xs), max(len(a) for a in xs), xs[0].shape[1]), dtype=np.float32)
            for row, a in enumerate(xs):
                x[row, :len(a)] = a
            p = self.artifact.predict(x)
            for row, i in enumerate(young):
                n = len(xs[row])
                out[i] = p[row, n - jobs[i].n_new:n]
        return out  # type: ignore[return-value]
