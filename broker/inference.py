"""Windowed, batched inference: the model runs only on what a new point needs.

For an event whose points ``n_scored .. n_total-1`` have no probability yet, the state
returns the stored points from ``start = window_start(...)`` on. Two cases:

* ``start == 0`` (young event): model input = ``artifact.inputs`` of the whole curve
  (each band's causal reference and first ``log_dt = 0``), exactly as offline;
* ``start > 0``: the first returned point only gives ``prev_time``; the input rows are
  the next points, built with the bands' fixed references (features' "tail window"
  rule, equal to the rows of a full-curve run). The state returns such a window only
  when every row is at least the K-th point of its band (the append script's rule,
  ``broker.state.reference.window_start``), else the whole stored event.

Windows of the same (length, u) are stacked and run in one ``artifact.predict_last``
call (the model's dependency cone of the newest ``u`` outputs). Because the net is
causal and sees the receptive field, the outputs equal those of ``artifact.predict``
on the full light curve within ``training.model.PROB_TOLERANCE`` (float32 rounding, not
bit for bit; an event's last bits may also change with its batch). On a GPU, young events
(whose windows have many different lengths) are instead right-padded to one length and
run through one full ``artifact.predict`` (right padding is invisible to a causal net):
one call instead of one per length, and the extra positions cost the GPU nothing.

Each group's model input is built in one call, ``artifact.inputs_batch`` (the batch form
of ``training.features.build_features``: one formula, so on one machine the rows equal
``artifact.inputs`` of each window bit for bit; see ``training.features``).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from training.features import build_features_batch

log = logging.getLogger("broker.inference")


def window_start(n_scored: int, first_stored: int, reference_points: int, receptive_field: int) -> int:
    """Global index of the first point the state returns for scoring, for a one-band
    event (the append script's rule; ``broker.state.reference.window_start`` is the rule
    for any bands).

    The context of point ``n_scored`` is its ``receptive_field - 1`` predecessors plus
    one more point for ``prev_time``; a window whose first row (``s + 1``) would come
    before the reference is fixed (the K-th point, index K - 1) starts at the first
    stored point instead.
    """
    s = max(first_stored, n_scored - receptive_field)
    return first_stored if s < reference_points - 2 else s


@dataclass
class Job:
    """One event's pending points and the context the state returned for them."""
    n_scored: int                # global index of the first point to score
    start: int                   # global index of time[0]
    time: np.ndarray             # float64, points start .. n_total-1
    mag: np.ndarray              # float32
    mag_err: np.ndarray          # float32
    # the fixed references (needed when start > 0): (N_SLOTS,) float64 per band slot (NaN
    # where a band has none), or one float for every point
    reference: Optional[object]
    band: Optional[np.ndarray] = None   # u8 band codes (None: one band)

    @property
    def n_new(self) -> int:
        return self.start + len(self.time) - self.n_scored


def tail_inputs(scalers, time: np.ndarray, mag: np.ndarray, mag_err: np.ndarray,
                reference: np.ndarray, band: Optional[np.ndarray] = None) -> np.ndarray:
    """Model input for B tail windows at once.

    ``time`` (B, L+1) float64 (column 0 = prev_time), ``mag``/``mag_err`` (B, L) float32,
    ``reference`` (B,) or (B, N_SLOTS) float64, ``band`` None or (B, L) u8 -> (B, L, C)
    float32; row for row equal to ``artifact.inputs(time[b, 1:], mag[b], mag_err[b],
    reference=reference[b], prev_time=time[b, 0], band=band[b])`` (it is
    ``build_features_batch`` plus the scalers).
    """
    t = np.asarray(time, dtype=np.float64)
    return scalers.transform(build_features_batch(t[:, 1:], mag, mag_err, reference=reference,
                                                  prev_time=t[:, 0], band=band))


def _window_inputs_one(artifact, job: Job) -> np.ndarray:
    if job.start == 0:
        return artifact.inputs(job.time, job.mag, job.mag_err, band=job.band)
    return artifact.inputs(job.time[1:], job.mag[1:], job.mag_err[1:],
                           reference=job.reference, prev_time=float(job.time[0]),
                           band=None if job.band is None else job.band[1:])


def _bands(jobs: list[Job], cut: int = 0) -> Optional[np.ndarray]:
    """The jobs' band codes stacked (None when no job has bands: one band)."""
    if all(j.band is None for j in jobs):
        return None
    return np.stack([np.zeros(len(j.time) - cut, np.uint8) if j.band is None else j.band[cut:]
                     for j in jobs])


def _group_inputs(artifact, jobs: list[Job], tail: bool) -> np.ndarray:
    """Model input (m, rows, C) of jobs whose windows have one length, in one call."""
    t = np.stack([j.time for j in jobs])
    mag = np.stack([j.mag for j in jobs])
    err = np.stack([j.mag_err for j in jobs])
    if not tail:
        return artifact.inputs_batch(t, mag, err, band=_bands(jobs))
    return artifact.inputs_batch(t[:, 1:], mag[:, 1:], err[:, 1:],
                                 reference=np.array([j.reference for j in jobs], dtype=np.float64),
                                 prev_time=t[:, 0], band=_bands(jobs, 1))


def _bucket(rows: int) -> int:
    """The padded length of a tail window of ``rows`` rows: the next power of two (at most
    half of a padded window is padding; a handful of model calls per batch)."""
    return 1 << max(0, int(rows) - 1).bit_length()


class Scorer:
    """Turns jobs into probabilities with as few model calls as the batch allows.

    Windows of one (length, new points) are one ``predict_last`` call (the dependency cone
    of the new points: the cheapest pass for a large group). Groups smaller than
    ``min_group`` (``pad_small``) are instead right-padded together and run in a few full
    passes: a batch of Rubin packets brings tens of lengths and new-point counts (forced
    photometry since the last alert), and a call per group (~1 ms each on a CPU) cost more
    than the padding."""

    def __init__(self, artifact, vectorised: bool = True, pad_young: Optional[bool] = None,
                 pad_small: bool = True, min_group: int = 32):
        self.artifact = artifact
        # one inputs_batch call per group (else artifact.inputs per window: same numbers)
        self.vectorised = bool(vectorised) and hasattr(artifact, "inputs_batch")
        # every young event right-padded into one pass (the GPU default: padding is free there)
        self.pad_young = (getattr(artifact.device, "type", "cpu") == "cuda") if pad_young is None \
            else pad_young
        self.pad_small = bool(pad_small)
        self.min_group = int(min_group)

    def score(self, jobs: list[Job]) -> list[np.ndarray]:
        """P(binary) (float32) of each job's pending points, in job order."""
        out: list[Optional[np.ndarray]] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        tails: dict[int, list[int]] = defaultdict(list)
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
        for (tail, rows, u), members in list(groups.items()):
            if self.pad_small and len(members) < self.min_group:
                del groups[(tail, rows, u)]
                if tail:
                    tails[_bucket(rows)].extend(members)
                else:
                    young.extend(members)
        for members in tails.values():
            self._padded_tails(jobs, members, out)
        for (tail, rows, u), members in groups.items():
            if self.vectorised:
                x = _group_inputs(self.artifact, [jobs[i] for i in members], tail)
            else:
                x = np.stack([_window_inputs_one(self.artifact, jobs[i]) for i in members])
            p = self.artifact.predict_last(x, n_last=u)
            for row, i in enumerate(members):
                out[i] = p[row]
        if young:
            lens = np.array([len(jobs[i].time) for i in young])
            if self.vectorised:
                w = int(lens.max())
                t = np.zeros((len(young), w), dtype=np.float64)
                mag = np.zeros((len(young), w), dtype=np.float32)
                err = np.zeros((len(young), w), dtype=np.float32)
                band = None if all(jobs[i].band is None for i in young) else \
                    np.zeros((len(young), w), dtype=np.uint8)
                for row, i in enumerate(young):
                    n = lens[row]
                    t[row, :n], mag[row, :n], err[row, :n] = jobs[i].time, jobs[i].mag, jobs[i].mag_err
                    if band is not None and jobs[i].band is not None:
                        # padded with the curve's first band: causal references never look ahead
                        band[row, :n], band[row, n:] = jobs[i].band, jobs[i].band[0]
                x = self.artifact.inputs_batch(t, mag, err, lengths=lens, band=band)  # 0 past each length
            else:
                x = self._one_by_one_padded(jobs, young, int(lens.max()))
            self._predict_padded(jobs, young, lens, x, out)
        return out  # type: ignore[return-value]

    def _one_by_one_padded(self, jobs: list[Job], members: list[int], w: int) -> np.ndarray:
        """Model input (m, w, C) of windows built one by one, right-padded with zeros."""
        xs = [_window_inputs_one(self.artifact, jobs[i]) for i in members]
        x = np.zeros((len(xs), w, xs[0].shape[1]), dtype=np.float32)
        for row, a in enumerate(xs):
            x[row, :len(a)] = a
        return x

    def _predict_padded(self, jobs: list[Job], members: list[int], lens: np.ndarray, x: np.ndarray,
                        out: list) -> None:
        """One full pass over right-padded windows; each job's new points (the last of its
        ``lens[row]`` rows) into ``out``."""
        p = self.artifact.predict(x)
        for row, i in enumerate(members):
            n = lens[row]
            out[i] = p[row, n - jobs[i].n_new:n]

    def _padded_tails(self, jobs: list[Job], members: list[int], out: list) -> None:
        """Tail windows of several lengths right-padded to one, one full ``predict``
        (right padding is invisible to a causal net)."""
        lens = np.array([len(jobs[i].time) - 1 for i in members])
        w = int(lens.max())
        if self.vectorised:
            m = len(members)
            t = np.zeros((m, w + 1), dtype=np.float64)
            mag = np.zeros((m, w), dtype=np.float32)
            err = np.zeros((m, w), dtype=np.float32)
            with_band = any(jobs[i].band is not None for i in members)
            band = np.zeros((m, w), dtype=np.uint8) if with_band else None
            for row, i in enumerate(members):
                j, n = jobs[i], lens[row]
                t[row, :n + 1], mag[row, :n], err[row, :n] = j.time, j.mag[1:], j.mag_err[1:]
                t[row, n + 1:] = j.time[-1]
                if with_band and j.band is not None:
                    band[row, :n], band[row, n:] = j.band[1:], j.band[1]
            ref = np.array([jobs[i].reference for i in members], dtype=np.float64)
            x = self.artifact.inputs_batch(t[:, 1:], mag, err, reference=ref, prev_time=t[:, 0],
                                           lengths=lens, band=band)
        else:
            x = self._one_by_one_padded(jobs, members, w)
        self._predict_padded(jobs, members, lens, x, out)
