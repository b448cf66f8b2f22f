"""The dataset format shared by simulation, training, evaluation and replay.

One ``.npz`` file (no pickle: every array is numeric, ``meta`` is a JSON string).
Light curves are ragged, so points are stored flat and cut by ``offsets``:
event ``i`` owns points ``offsets[i]:offsets[i+1]``.

Point arrays (length P):
  time      float64  days since the start of the survey window (0..1000)
  mag       float32  observed magnitude (noise included)
  mag_err   float32  1-sigma magnitude error
  mag_model float32  noise-free magnitude of the true lens model at that time
  mag_pspl  float32  noise-free magnitude of the best-fitting PSPL model (hindsight fit to
                     the whole noise-free curve; equal to mag_model for PSPL events).
                     Training may use mag_model/mag_pspl to build per-point targets;
                     the stream (replay) never sends them.

Event arrays (length N):
  event_id  int64    unique id (becomes ``diaObjectId`` in the stream)
  label     int8     0 = single lens (PSPL), 1 = binary lens
  t0, tE, u0           float64  shared microlensing parameters (days, days, Einstein radii)
  s, q, alpha, rho     float64  binary parameters (NaN for PSPL)
  baseline_mag         float64  baseline magnitude of source + blend
  fs                   float64  source flux fraction of the baseline flux (1 = no blending)
  dchi2                float64  detectability: chi2 of the best PSPL fit to the noise-free
                                binary light curve under the event's errors (NaN for PSPL)

``meta``: JSON with the generator settings (parameter set, seed, cadence, noise, command...).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

FORMAT_VERSION = 1
POINT_FIELDS = ("time", "mag", "mag_err", "mag_model", "mag_pspl")
PARAM_FIELDS = ("t0", "tE", "u0", "s", "q", "alpha", "rho", "baseline_mag", "fs", "dchi2")
EVENT_FIELDS = ("event_id", "label") + PARAM_FIELDS


class DatasetError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the problem."""


@dataclass
class Dataset:
    offsets: np.ndarray
    time: np.ndarray
    mag: np.ndarray
    mag_err: np.ndarray
    mag_model: np.ndarray
    mag_pspl: np.ndarray
    event_id: np.ndarray
    label: np.ndarray
    params: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return len(self.event_id)

    def __len__(self) -> int:
        return self.n_events

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def event(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time, mag, mag_err) of event ``i``."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.time[a:b], self.mag[a:b], self.mag_err[a:b]

    def events(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for i in range(self.n_events):
            yield self.event(i)

    def subset(self, indices) -> "Dataset":
        """A new dataset holding events ``indices`` in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        lens = self.lengths()[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        take = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]) \
            if len(idx) else np.zeros(0, dtype=np.int64)
        return Dataset(offsets=offsets, time=self.time[take], mag=self.mag[take],
                       mag_err=self.mag_err[take], mag_model=self.mag_model[take],
                       mag_pspl=self.mag_pspl[take], event_id=self.event_id[idx],
                       label=self.label[idx], params={k: v[idx] for k, v in self.params.items()},
                       meta=dict(self.meta))

    def validate(self, source: str = "dataset") -> None:
        """Raise DatasetError naming the first inconsistency."""
        n, p = len(self.event_id), len(self.time)
        if self.offsets.ndim != 1 or len(self.offsets) != n + 1:
            raise DatasetError(f"{source}: offsets has length {len(self.offsets)}, expected {n + 1}")
        if n and (self.offsets[0] != 0 or self.offsets[-1] != p or np.any(np.diff(self.offsets) < 0)):
            raise DatasetError(f"{source}: offsets do not cut the {p} points into {n} events")
        for name in POINT_FIELDS[1:]:
            if len(getattr(self, name)) != p:
                raise DatasetError(f"{source}: {name} has length {len(getattr(self, name))}, "
                                   f"time has {p}")
        for name, arr in [("label", self.label)] + list(self.params.items()):
            if len(arr) != n:
                raise DatasetError(f"{source}: {name} has length {len(arr)}, event_id has {n}")
        missing = [k for k in PARAM_FIELDS if k not in self.params]
        if missing:
            raise DatasetError(f"{source}: missing parameter array(s) {', '.join(missing)}")
        if not np.all(np.isfinite(self.time)):
            bad = int(np.flatnonzero(~np.isfinite(self.time))[0])
            ev = int(np.searchsorted(self.offsets, bad, side="right") - 1)
            raise DatasetError(f"{source}: time has a non-finite value at point {bad} "
                               f"(event_id {int(self.event_id[ev])})")
        if not np.all(np.isfinite(self.mag)):
            raise DatasetError(f"{source}: mag has non-finite values")
        if not np.all(np.isfinite(self.mag_err)) or np.any(self.mag_err <= 0):
            raise DatasetError(f"{source}: mag_err must be finite and positive")
        if len(np.unique(self.event_id)) != n:
            raise DatasetError(f"{source}: event_id values are not unique")
        if not np.all(np.isin(self.label, (0, 1))):
            raise DatasetError(f"{source}: label must be 0 (PSPL) or 1 (binary)")
        step = np.diff(self.time)
        step[self.offsets[1:-1][self.offsets[1:-1] > 0] - 1] = 1.0  # ignore event boundaries
        if p > 1 and np.any(step <= 0):
            bad = int(np.flatnonzero(step <= 0)[0])
            ev = int(np.searchsorted(self.offsets, bad, side="right") - 1)
            raise DatasetError(f"{source}: times of event_id {int(self.event_id[ev])} "
                               "are not strictly increasing")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self.validate(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, format_version=FORMAT_VERSION)
        arrays = {"offsets": self.offsets.astype(np.int64), "time": self.time.astype(np.float64),
                  **{k: getattr(self, k).astype(np.float32) for k in POINT_FIELDS[1:]},
                  "event_id": self.event_id.astype(np.int64), "label": self.label.astype(np.int8),
                  "meta": np.array(json.dumps(meta, sort_keys=True))}
        arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in self.params.items()})
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        return path


def load(path: str | Path) -> Dataset:
    """Load and validate a dataset; any problem is a DatasetError naming the file and field."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable dataset (.npz): {exc}") from None
    required = ("offsets",) + POINT_FIELDS + EVENT_FIELDS + ("meta",)
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exc:
        raise DatasetError(f"{path}: meta is not valid JSON: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: dataset format version {meta.get('format_version')!r}, "
                           f"this code reads version {FORMAT_VERSION}")
    ds = Dataset(offsets=arrays["offsets"].astype(np.int64), time=arrays["time"].astype(np.float64),
                 **{k: arrays[k].astype(np.float32) for k in POINT_FIELDS[1:]},
                 event_id=arrays["event_id"].astype(np.int64), label=arrays["label"].astype(np.int8),
                 params={k: arrays[k].astype(np.float64) for k in PARAM_FIELDS}, meta=meta)
    ds.validate(str(path))
    return ds


def concatenate(parts: list[Dataset], meta: dict | None = None) -> Dataset:
    """Join datasets event-wise (event ids must stay unique)."""
    lens = np.concatenate([p.lengths() for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return Dataset(offsets=offsets, time=cat("time"),
                   **{k: cat(k) for k in POINT_FIELDS[1:]}, event_id=cat("event_id"), label=cat("label"),
                   params={k: np.concatenate([p.params[k] for p in parts]) for k in PARAM_FIELDS},
                   meta=meta if meta is not None else (dict(parts[0].meta) if parts else {}))
