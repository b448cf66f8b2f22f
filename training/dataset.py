"""The dataset format shared by simulation, training, evaluation and replay.

One ``.npz`` file (no pickle: every array is numeric, ``meta`` is a JSON string).
Light curves are ragged, so points are stored flat and cut by ``offsets``:
event ``i`` owns points ``offsets[i]:offsets[i+1]``. A point is one visit of the
survey (``meta["survey"]``, ``training.survey``), detection or not.

Point arrays (length P):
  time      float64  days since the survey's day 0
  band      uint8    ``training.survey.BAND_NAMES`` code (u g r i z y = 0..5)
  sci_flux, sci_flux_err    float32  nJy: the visit image's total flux (Rubin scienceFlux)
  diff_flux, diff_flux_err  float32  nJy: the difference-image flux, visit minus template
                                     (Rubin psfFlux; may be negative)
  detected  bool     |diff_flux| / diff_flux_err >= the survey's detection_snr (5): the
                     visit is an alert (a DIASource); the others are forced photometry
  m5        float32  the visit's 5-sigma depth (NaN where the survey has none)
  mag       float32  observed magnitude from sci_flux (NaN where sci_flux <= 0: a faint
                     band's visit measured no flux)
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
  baseline_mag         float64  baseline magnitude of source + blend (the survey's reference band)
  fs                   float64  source flux fraction of the baseline flux there (1 = no blending)
  dchi2                float64  detectability: chi2 of the best PSPL fit to the noise-free
                                binary light curve on its visits under their errors (NaN for PSPL)
  onset                float64  detectability onset: time of the first visit at which the best
                                PSPL fit to the visits so far has chi2 >= ``meta["onset_dchi2"]``
                                (NaN: never, and for PSPL; ``training.detectability.onset``)
  onset_index          float64  that visit's index in the event (-1: never)
  source_mag, blend_mag  float64 (N, B)  per-band magnitudes of source and blend, bands in
                                ``meta["bands"]`` order (+inf: no blend)

``meta``: JSON with the generator settings (survey, parameter set, seed, noise, command...).

Format version 2 (this code) added band, the fluxes, detected, m5, onset and the per-band
magnitudes. A one-band survey measured in magnitudes (the thesis' grid) and version-1
files store none of those per-visit arrays: they are derived on load from the magnitudes
as the replay always derived them (template = the baseline, taken as noiseless; float64,
so the replay's alerts keep their bits), band i, no depth; version-1 files have no onset.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

FORMAT_VERSION = 2
READS = (1, 2)
POINT_FIELDS = ("time", "mag", "mag_err", "mag_model", "mag_pspl")
FLUX_FIELDS = ("sci_flux", "sci_flux_err", "diff_flux", "diff_flux_err")
V2_POINT_FIELDS = ("band",) + FLUX_FIELDS + ("detected", "m5")
V1_PARAM_FIELDS = ("t0", "tE", "u0", "s", "q", "alpha", "rho", "baseline_mag", "fs", "dchi2")
PARAM_FIELDS = V1_PARAM_FIELDS + ("onset", "onset_index")
BAND_FIELDS = ("source_mag", "blend_mag")
EVENT_FIELDS = ("event_id", "label") + PARAM_FIELDS
V1_BAND = 3                  # "i": the band the version-1 replay gave every alert
DETECTION_SNR = 5.0


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
    band: Optional[np.ndarray] = None
    sci_flux: Optional[np.ndarray] = None
    sci_flux_err: Optional[np.ndarray] = None
    diff_flux: Optional[np.ndarray] = None
    diff_flux_err: Optional[np.ndarray] = None
    detected: Optional[np.ndarray] = None
    m5: Optional[np.ndarray] = None
    source_mag: Optional[np.ndarray] = None
    blend_mag: Optional[np.ndarray] = None

    def __post_init__(self):
        """Per-visit fields not given are those of a one-band survey measured in magnitudes
        (the thesis' and version-1 files): derived from the magnitudes (``derive_v1``)."""
        self.derived = False
        n = len(self.event_id)
        if "onset" not in self.params:
            self.params["onset"] = np.full(n, np.nan)
        if "onset_index" not in self.params:
            self.params["onset_index"] = np.full(n, -1.0)
        if self.sci_flux is None:
            derive_v1(self)

    @property
    def bands(self) -> tuple[str, ...]:
        """The band names of ``source_mag``/``blend_mag`` columns (meta["bands"])."""
        return tuple(self.meta.get("bands", ("i",)))

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

    def event_band(self, i: int) -> np.ndarray:
        """u8 band codes of event ``i``'s points."""
        return self.band[self.offsets[i]:self.offsets[i + 1]]

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
                       meta=dict(self.meta), **({} if self.derived else {
                           **{k: getattr(self, k)[take] for k in V2_POINT_FIELDS},
                           **{k: getattr(self, k)[idx] for k in BAND_FIELDS}}))

    def magnitudes_only(self) -> "Dataset":
        """The dataset without the visits that have no magnitude (sci_flux <= 0): for the
        parts that read magnitudes (the TD-CNN's features, the PSPL-fit rule). Itself
        when every visit has one."""
        keep = np.isfinite(self.mag)
        if keep.all():
            return self
        event = np.repeat(np.arange(self.n_events), np.diff(self.offsets))
        lens = np.bincount(event[keep], minlength=self.n_events)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        return Dataset(offsets=offsets, time=self.time[keep], mag=self.mag[keep], mag_err=self.mag_err[keep],
                       mag_model=self.mag_model[keep], mag_pspl=self.mag_pspl[keep],
                       event_id=self.event_id, label=self.label, params=dict(self.params),
                       meta=dict(self.meta), **{k: getattr(self, k)[keep] for k in V2_POINT_FIELDS},
                       **{k: getattr(self, k) for k in BAND_FIELDS})

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
        for name in V2_POINT_FIELDS:
            if len(getattr(self, name)) != p:
                raise DatasetError(f"{source}: {name} has length {len(getattr(self, name))}, time has {p}")
        for name in BAND_FIELDS:
            a = getattr(self, name)
            if a.shape != (n, len(self.bands)):
                raise DatasetError(f"{source}: {name} has shape {a.shape}, expected ({n}, {len(self.bands)}) "
                                   f"(events x meta['bands'])")
        flux = self.sci_flux > 0
        if not np.array_equal(np.isfinite(self.mag), flux) or not np.array_equal(np.isfinite(self.mag_err), flux):
            raise DatasetError(f"{source}: mag and mag_err must be finite exactly where sci_flux > 0")
        if np.any(self.mag_err[flux] <= 0):
            raise DatasetError(f"{source}: mag_err must be positive")
        for name in FLUX_FIELDS:
            if not np.all(np.isfinite(getattr(self, name))):
                raise DatasetError(f"{source}: {name} has non-finite values")
        if np.any(self.sci_flux_err <= 0) or np.any(self.diff_flux_err <= 0):
            raise DatasetError(f"{source}: flux errors must be positive")
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
        if not self.derived:        # measured per-visit data (derived data is derived again)
            arrays.update({"band": self.band.astype(np.uint8), "detected": self.detected.astype(bool),
                           "m5": self.m5.astype(np.float32),
                           **{k: getattr(self, k).astype(np.float32) for k in FLUX_FIELDS},
                           **{k: getattr(self, k).astype(np.float64) for k in BAND_FIELDS}})
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
    if "meta" not in arrays:
        raise DatasetError(f"{path}: missing array(s) meta")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exc:
        raise DatasetError(f"{path}: meta is not valid JSON: {exc}") from None
    version = meta.get("format_version")
    if version not in READS:
        raise DatasetError(f"{path}: dataset format version {version!r}, this code reads versions "
                           f"{', '.join(map(str, READS))}")
    params_needed = V1_PARAM_FIELDS if version == 1 else PARAM_FIELDS
    measured = version >= 2 and any(k in arrays for k in V2_POINT_FIELDS + BAND_FIELDS)
    required = ("offsets",) + POINT_FIELDS + ("event_id", "label") + params_needed + \
        (V2_POINT_FIELDS + BAND_FIELDS if measured else ())
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}")
    p = len(arrays["time"])
    for k in POINT_FIELDS[1:] + (V2_POINT_FIELDS if measured else ()):
        if len(arrays[k]) != p:     # before anything is derived from them
            raise DatasetError(f"{path}: {k} has length {len(arrays[k])}, time has {p}")
    extra = {}
    if measured:
        extra = {"band": arrays["band"].astype(np.uint8), "detected": arrays["detected"].astype(bool),
                 "m5": arrays["m5"].astype(np.float32),
                 **{k: arrays[k].astype(np.float32) for k in FLUX_FIELDS},
                 **{k: arrays[k].astype(np.float64) for k in BAND_FIELDS}}
    meta["format_version"] = FORMAT_VERSION
    ds = Dataset(offsets=arrays["offsets"].astype(np.int64), time=arrays["time"].astype(np.float64),
                 **{k: arrays[k].astype(np.float32) for k in POINT_FIELDS[1:]},
                 event_id=arrays["event_id"].astype(np.int64), label=arrays["label"].astype(np.int8),
                 params={k: arrays[k].astype(np.float64) for k in params_needed}, meta=meta, **extra)
    ds.validate(str(path))
    return ds


def concatenate(parts: list[Dataset], meta: dict | None = None) -> Dataset:
    """Join datasets event-wise; their event ids must stay unique (DatasetError)."""
    ids = np.concatenate([p.event_id for p in parts]) if parts else np.zeros(0, np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DatasetError("cannot concatenate datasets that share event ids (simulate them with "
                           "other seeds: the id holds the seed)")
    lens = np.concatenate([p.lengths() for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    if parts and len({p.bands for p in parts}) > 1:
        raise DatasetError(f"cannot concatenate datasets of other bands: {sorted({p.bands for p in parts})}")
    return Dataset(offsets=offsets, time=cat("time"),
                   **{k: cat(k) for k in POINT_FIELDS[1:]}, event_id=cat("event_id"), label=cat("label"),
                   params={k: np.concatenate([p.params[k] for p in parts]) for k in PARAM_FIELDS},
                   meta=meta if meta is not None else (dict(parts[0].meta) if parts else {}),
                   **({} if all(p.derived for p in parts) else
                      {k: cat(k) for k in V2_POINT_FIELDS + BAND_FIELDS}))


def derive_v1(ds: Dataset) -> None:
    """The version-1 (thesis) survey's visit data from its magnitudes, as the replay made
    its alerts: scienceFlux from mag, the template at the baseline magnitude taken as
    noiseless (psfFlux = scienceFlux - template, psfFluxErr = scienceFluxErr), band i,
    detected where |psfFlux| >= 5 psfFluxErr, no depth; source and blend from fs."""
    from training.photometry import mag_to_njy

    per_point = np.repeat(np.arange(len(ds.event_id)), np.diff(ds.offsets))
    sci, sci_err = mag_to_njy(ds.mag, ds.mag_err)
    template = mag_to_njy(np.asarray(ds.params["baseline_mag"], dtype=np.float64))[per_point]
    ds.derived = True
    ds.band = np.full(len(ds.time), V1_BAND, dtype=np.uint8)
    ds.sci_flux, ds.sci_flux_err = sci, sci_err
    ds.diff_flux, ds.diff_flux_err = sci - template, sci_err.copy()
    ds.detected = np.abs(sci - template) >= DETECTION_SNR * sci_err
    ds.m5 = np.full(len(ds.time), np.nan, dtype=np.float32)
    base = np.asarray(ds.params["baseline_mag"], dtype=np.float64)
    fs = np.asarray(ds.params["fs"], dtype=np.float64)
    with np.errstate(divide="ignore"):
        ds.source_mag = (base - 2.5 * np.log10(fs))[:, None]
        ds.blend_mag = (base - 2.5 * np.log10(np.maximum(1.0 - fs, 0.0)))[:, None]
    ds.meta.setdefault("bands", ["i"])
