"""Pure replay logic: light curves -> time-ordered alert records (no I/O, no Kafka).

Formats the broker and the report depend on (keep them stable):

* ``diaObjectId`` = the dataset's ``event_id`` (archival files: see
  :mod:`replay.photometry_files`). It must lie in ``0 .. MAX_OBJECT_ID``.
* ``diaSourceId`` = ``diaObjectId * 100_000 + i`` where ``i`` is the point's index in
  the event's full light curve (0-based, before any detections-only selection), so a
  point keeps its id whatever is filtered. ``i`` < 100,000 points per event and
  ``diaObjectId`` <= MAX_OBJECT_ID = 92,233,720,368,546 keep the id below 2**63.
* Kafka key = ``str(diaObjectId).encode("ascii")`` (decimal digits, no padding).
* ``midpointMjdTai`` = ``start_mjd + time`` (dataset day axis); archival: the file's MJD.
* ``scienceFlux``, ``scienceFluxErr``, ``psfFlux``, ``psfFluxErr``, ``band``: a dataset's
  own per-visit fluxes and bands (``training.dataset``: a survey profile's difference
  imaging, with its template noise; for the thesis survey and archival files, derived from
  the magnitudes: scienceFlux = :func:`training.photometry.mag_to_njy` of ``mag``, psfFlux =
  scienceFlux - a noiseless template at the baseline, band ``"i"``).
* ``ra``/``dec``: a deterministic position per event in a bulge field, :func:`sky_positions`.
* ``--detections-only`` sends the visits the survey marks detected (Rubin: a 5-sigma
  difference-image detection); archival files use ``|psfFlux| / psfFluxErr >= snr``.
* ``prvDiaSources``: with history N > 0, the event's previous N *sent* points (oldest
  first; with detections-only these are previous detections, as in Rubin's packet);
  ``[]`` for the first one; ``null`` when history is off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from training.dataset import PARAM_FIELDS, Dataset
from training.photometry import mag_to_njy

SOURCE_ID_FACTOR = 100_000
MAX_POINTS_PER_EVENT = SOURCE_ID_FACTOR
MAX_OBJECT_ID = (2**63 - 1 - (SOURCE_ID_FACTOR - 1)) // SOURCE_ID_FACTOR  # 92_233_720_368_546
BAND = "i"
FIELD_RA, FIELD_DEC, FIELD_HALF_WIDTH = 268.5, -29.0, 1.0
LABEL_NAMES = {0: "pspl", 1: "binary"}


class ReplayError(ValueError):
    """The input to a replay is unusable; the message names the file and the problem."""


# ---------------------------------------------------------------------------- ids and positions

def source_ids(object_ids, point_index) -> np.ndarray:
    """``diaSourceId`` of each point: ``object_id * 100_000 + point_index`` (bounds checked)."""
    obj = np.asarray(object_ids, dtype=np.int64)
    idx = np.asarray(point_index, dtype=np.int64)
    check_object_ids(obj)
    if idx.size and (idx.min() < 0 or idx.max() >= MAX_POINTS_PER_EVENT):
        raise ReplayError(f"point index out of range 0..{MAX_POINTS_PER_EVENT - 1}: an event has "
                          f"more than {MAX_POINTS_PER_EVENT} points")
    return obj * SOURCE_ID_FACTOR + idx


def check_object_ids(object_ids, source: str = "input") -> None:
    obj = np.asarray(object_ids, dtype=np.int64)
    if obj.size and (obj.min() < 0 or obj.max() > MAX_OBJECT_ID):
        bad = int(obj[(obj < 0) | (obj > MAX_OBJECT_ID)][0])
        raise ReplayError(f"{source}: event id {bad} is out of range 0..{MAX_OBJECT_ID} "
                          f"(diaSourceId = id * {SOURCE_ID_FACTOR} + point index must fit in 63 bits)")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised on uint64 (wraps modulo 2**64 by design)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sky_positions(object_ids) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (ra, dec) in degrees per object: uniform in (268.5, -29.0) +/- 1 deg.

    u1 = splitmix64(id) / 2**64, u2 = splitmix64(id ^ 0x5DEECE66D) / 2**64;
    ra = 268.5 + (2 u1 - 1), dec = -29.0 + (2 u2 - 1). Same id, same position, any machine.
    """
    obj = np.asarray(object_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        u1 = (_splitmix64(obj) >> np.uint64(11)).astype(np.float64) / 2.0**53
        u2 = (_splitmix64(obj ^ np.uint64(0x5DEECE66D)) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return FIELD_RA + FIELD_HALF_WIDTH * (2 * u1 - 1), FIELD_DEC + FIELD_HALF_WIDTH * (2 * u2 - 1)


def fluxes(mag, mag_err, baseline_mag):
    """(scienceFlux, scienceFluxErr, psfFlux, psfFluxErr) in nJy for points at ``baseline_mag``.

    ``baseline_mag`` is per point (broadcast the event's value). psfFlux is the simulated
    difference flux against a noiseless template at the baseline (source + blend).
    """
    sci, sci_err = mag_to_njy(mag, mag_err)
    template = mag_to_njy(baseline_mag)
    return sci, sci_err, sci - template, sci_err


# ---------------------------------------------------------------------------- light curves

@dataclass
class LightCurves:
    """Events to replay: ragged points cut by ``offsets`` (as in the dataset), times in MJD.

    ``truth`` holds per-event ground-truth columns (the dataset's parameters; empty for
    archival files, whose truth is unknown). ``names`` labels each event's origin.
    """
    object_id: np.ndarray          # int64 (N,)
    offsets: np.ndarray            # int64 (N+1,)
    mjd: np.ndarray                # float64 (P,)
    mag: np.ndarray                # (P,)
    mag_err: np.ndarray            # (P,)
    baseline_mag: np.ndarray       # float64 (N,)
    source: str = "input"
    label: Optional[np.ndarray] = None          # int8 (N,) or None = unknown
    params: dict = field(default_factory=dict)  # name -> float64 (N,)
    start_mjd: Optional[float] = None           # MJD of the dataset's day 0 (None: archival)
    names: Optional[list] = None                # per-event origin (archival file names)
    # a dataset's per-visit data (None: derived from the magnitudes, band i)
    band: Optional[np.ndarray] = None           # (P,) band names
    fluxes: Optional[tuple] = None              # (P,) x 4: scienceFlux, its error, psfFlux, its error
    detected: Optional[np.ndarray] = None       # (P,) bool: the survey's alerts

    @property
    def n_events(self) -> int:
        return len(self.object_id)

    @property
    def n_points(self) -> int:
        return len(self.mjd)

    def validate(self) -> None:
        """Raise ReplayError on anything that would make a bad or unordered stream."""
        n, p, src = len(self.object_id), len(self.mjd), self.source
        if len(self.offsets) != n + 1 or (n and (self.offsets[0] != 0 or self.offsets[-1] != p)) \
                or np.any(np.diff(self.offsets) < 0):
            raise ReplayError(f"{src}: offsets do not cut the {p} points into {n} events")
        for name in ("mag", "mag_err"):
            if len(getattr(self, name)) != p:
                raise ReplayError(f"{src}: {name} has length {len(getattr(self, name))}, time has {p}")
        if len(self.baseline_mag) != n:
            raise ReplayError(f"{src}: baseline_mag has length {len(self.baseline_mag)}, expected {n}")
        check_object_ids(self.object_id, src)
        if len(np.unique(self.object_id)) != n:
            raise ReplayError(f"{src}: event ids are not unique")
        lens = np.diff(self.offsets)
        if n and lens.max() > MAX_POINTS_PER_EVENT:
            i = int(np.argmax(lens))
            raise ReplayError(f"{src}: event {int(self.object_id[i])} has {int(lens[i])} points, "
                              f"more than the {MAX_POINTS_PER_EVENT} a diaSourceId can number")
        if not np.all(np.isfinite(self.mjd)):
            raise ReplayError(f"{src}: non-finite observation times")
        if self.fluxes is None and (not np.all(np.isfinite(self.mag)) or not np.all(np.isfinite(self.mag_err))
                                    or np.any(self.mag_err <= 0)):
            raise ReplayError(f"{src}: magnitudes must be finite with finite positive errors")
        for name in ("band", "detected"):
            a = getattr(self, name)
            if a is not None and len(a) != p:
                raise ReplayError(f"{src}: {name} has length {len(a)}, time has {p}")
        if not np.all(np.isfinite(self.baseline_mag)):
            raise ReplayError(f"{src}: baseline_mag must be finite")
        if p > 1:
            step = np.diff(self.mjd)
            inner = self.offsets[1:-1]
            step[inner[(inner > 0) & (inner < p)] - 1] = 1.0   # ignore event boundaries
            if np.any(step <= 0):
                bad = int(np.flatnonzero(step <= 0)[0])
                ev = int(np.searchsorted(self.offsets, bad, side="right") - 1)
                raise ReplayError(f"{src}: times of event {int(self.object_id[ev])} are not "
                                  "strictly increasing")

    def head(self, n_events: Optional[int]) -> "LightCurves":
        """The first ``n_events`` events in input order (``--limit-events``)."""
        if n_events is None or n_events >= self.n_events:
            return self
        k = int(self.offsets[n_events])
        return LightCurves(
            object_id=self.object_id[:n_events], offsets=self.offsets[:n_events + 1],
            mjd=self.mjd[:k], mag=self.mag[:k], mag_err=self.mag_err[:k],
            baseline_mag=self.baseline_mag[:n_events], source=self.source,
            label=None if self.label is None else self.label[:n_events],
            params={k_: v[:n_events] for k_, v in self.params.items()},
            start_mjd=self.start_mjd, names=None if self.names is None else self.names[:n_events],
            band=None if self.band is None else self.band[:k],
            fluxes=None if self.fluxes is None else tuple(f[:k] for f in self.fluxes),
            detected=None if self.detected is None else self.detected[:k])


def from_dataset(ds: Dataset, start_mjd: float, source: str = "dataset") -> LightCurves:
    """Light curves of a (validated) dataset, its day axis mapped to MJD = start_mjd + time."""
    if not math.isfinite(start_mjd):
        raise ReplayError(f"start MJD must be finite, got {start_mjd}")
    from training.survey import BAND_NAMES

    return LightCurves(
        object_id=np.asarray(ds.event_id, dtype=np.int64), offsets=np.asarray(ds.offsets, np.int64),
        mjd=start_mjd + np.asarray(ds.time, dtype=np.float64), mag=ds.mag, mag_err=ds.mag_err,
        baseline_mag=np.asarray(ds.params["baseline_mag"], dtype=np.float64), source=source,
        label=np.asarray(ds.label), params={k: np.asarray(ds.params[k], np.float64) for k in PARAM_FIELDS},
        start_mjd=float(start_mjd), band=np.asarray(BAND_NAMES, dtype=object)[ds.band],
        fluxes=tuple(np.asarray(getattr(ds, k), dtype=np.float64)
                     for k in ("sci_flux", "sci_flux_err", "diff_flux", "diff_flux_err")),
        detected=np.asarray(ds.detected, dtype=bool))


# ---------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Every alert to send, in send order (survey time; ties: input event order, then point)."""
    lc: LightCurves
    history: int
    order: np.ndarray          # (A,) index into the selected points (event order) per alert
    sel_point: np.ndarray      # (S,) global point index of each selected point (event order)
    sel_event: np.ndarray      # (S,) event index of each selected point
    sel_start: np.ndarray      # (S,) first selected position of the same event
    mjd: np.ndarray            # (A,) survey time of each alert, send order
    event: np.ndarray          # (A,) event index of each alert, send order
    columns: dict              # selected-point columns, event order, as numpy arrays

    @property
    def n_alerts(self) -> int:
        return len(self.order)

    def per_event_counts(self) -> np.ndarray:
        return np.bincount(self.sel_event, minlength=self.lc.n_events)

    def records(self, chunk: int = 65_536, union_tuples: bool = False
                ) -> Iterator[tuple[bytes, float, dict]]:
        """Yield (key, mjd, record) per alert in send order; the caller sets alertProducedUs.

        Columns are put in send order and turned into Python lists ``chunk`` alerts at a
        time, so the loop costs about one dict literal per alert and memory stays bounded.
        History dicts (one per selected point, shared by the alerts that carry it) are
        built only when history is on. ``union_tuples``: give prvDiaSources in fastavro's
        union tuple notation ``("array", [...])``: same bytes, but fastavro skips validating
        the whole history to pick the union branch (about 2x faster with 10 points).
        """
        c = self.columns
        keys_ev = [str(o).encode("ascii") for o in self.lc.object_id.tolist()]
        ra_ev, dec_ev = sky_positions(self.lc.object_id)
        n_hist = self.history
        prv = start = None
        if n_hist:
            prv = [{"diaSourceId": a, "midpointMjdTai": b, "band": bd, "psfFlux": d,
                    "psfFluxErr": e, "scienceFlux": f, "scienceFluxErr": g}
                   for a, b, bd, d, e, f, g in zip(*(c[k].tolist() for k in (
                       "diaSourceId", "midpointMjdTai", "band", "psfFlux", "psfFluxErr", "scienceFlux",
                       "scienceFluxErr")))]
            start = self.sel_start.tolist()
        names = ("diaSourceId", "midpointMjdTai", "band", "psfFlux", "psfFluxErr", "scienceFlux",
                 "scienceFluxErr")
        for lo in range(0, self.n_alerts, chunk):
            o = self.order[lo:lo + chunk]
            ev = self.event[lo:lo + chunk]
            cols = [c[k][o].tolist() for k in names]
            evl = ev.tolist()
            keys = [keys_ev[e] for e in evl]
            obj = self.lc.object_id[ev].tolist()
            ra, dec = ra_ev[ev].tolist(), dec_ev[ev].tolist()
            if not n_hist:
                for key, sid, oid, m, bd, r, d, psf, pe, sci, se in zip(keys, cols[0], obj, cols[1], cols[2],
                                                                        ra, dec, *cols[3:]):
                    yield key, m, {
                        "diaSourceId": sid, "diaObjectId": oid, "midpointMjdTai": m, "band": bd,
                        "ra": r, "dec": d, "psfFlux": psf, "psfFluxErr": pe, "scienceFlux": sci,
                        "scienceFluxErr": se, "alertProducedUs": 0, "prvDiaSources": None}
            else:
                for g, key, sid, oid, m, bd, r, d, psf, pe, sci, se in zip(
                        o.tolist(), keys, cols[0], obj, cols[1], cols[2], ra, dec, *cols[3:]):
                    yield key, m, {
                        "diaSourceId": sid, "diaObjectId": oid, "midpointMjdTai": m, "band": bd,
                        "ra": r, "dec": d, "psfFlux": psf, "psfFluxErr": pe, "scienceFlux": sci,
                        "scienceFluxErr": se, "alertProducedUs": 0,
                        "prvDiaSources": ("array", prv[max(start[g], g - n_hist):g])
                        if union_tuples else prv[max(start[g], g - n_hist):g]}


def point_events(lc: LightCurves) -> tuple[np.ndarray, np.ndarray]:
    """(event index, index in the event) of every point."""
    lens = np.diff(lc.offsets)
    event_of_point = np.repeat(np.arange(lc.n_events, dtype=np.int64), lens)
    return event_of_point, np.arange(lc.n_points, dtype=np.int64) - np.repeat(lc.offsets[:-1], lens)


def point_photometry(lc: LightCurves) -> tuple:
    """(scienceFlux, scienceFluxErr, psfFlux, psfFluxErr, band) of every point: the
    dataset's own, else derived from the magnitudes (:func:`fluxes`, band ``i``)."""
    if lc.fluxes is not None:
        sci, sci_err, psf, psf_err = lc.fluxes
    else:
        sci, sci_err, psf, psf_err = fluxes(lc.mag, lc.mag_err,
                                            np.repeat(lc.baseline_mag, np.diff(lc.offsets)))
    band = lc.band if lc.band is not None else np.full(lc.n_points, BAND, dtype=object)
    return sci, sci_err, psf, psf_err, band


def plan(lc: LightCurves, *, history: int = 0, detections_only: bool = False,
         snr_threshold: float = 5.0) -> Plan:
    """Select the points to send and sort them into survey-time order (one stable argsort)."""
    if history < 0:
        raise ReplayError(f"history must be >= 0, got {history}")
    lc.validate()
    n, p = lc.n_events, lc.n_points
    event_of_point, index_in_event = point_events(lc)
    sci, sci_err, psf, psf_err, band = point_photometry(lc)
    if detections_only:
        det = lc.detected if lc.detected is not None else np.abs(psf) >= snr_threshold * psf_err
        keep = np.flatnonzero(det)
    else:
        keep = np.arange(p, dtype=np.int64)
    sel_event = event_of_point[keep]
    # first selected position of each event (selection keeps event order)
    first = np.searchsorted(sel_event, np.arange(n), side="left")
    sel_start = first[sel_event]
    mjd_sel = lc.mjd[keep]
    order = np.argsort(mjd_sel, kind="stable")
    columns = {
        "diaSourceId": source_ids(lc.object_id[sel_event], index_in_event[keep]),
        "midpointMjdTai": mjd_sel, "psfFlux": psf[keep], "psfFluxErr": psf_err[keep],
        "scienceFlux": sci[keep], "scienceFluxErr": sci_err[keep], "band": band[keep]}
    return Plan(lc=lc, history=int(history), order=order, sel_point=keep, sel_event=sel_event,
                sel_start=sel_start, mjd=mjd_sel[order], event=sel_event[order], columns=columns)


# ---------------------------------------------------------------------------- ground truth

TRUTH_FIELDS = ("diaObjectId", "label", "t0", "t0_mjd", "tE", "u0", "s", "q", "alpha", "rho",
                "fs", "baseline_mag", "dchi2", "onset_mjd", "onset_index", "n_points", "first_mjd",
                "last_mjd", "source", "run_id")   # the truth schema's order (v1.1)


def _num(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def truth_records(p: Plan, n_sent: np.ndarray, run_id: str) -> list[dict]:
    """Ground truth of every event with at least one alert sent (``n_sent`` per event).

    One record per event, the same dict for the JSONL file and the truth topic (schema
    ``truth``). NaN parameters (binary parameters of PSPL events) become null; archival
    light curves have label and parameters null.
    """
    lc = p.lc
    sent = np.asarray(n_sent)
    # first and last MJD among sent points: alerts go out in time order per event, so the
    # first sent point is the event's first selected point, the last is the n_sent-th.
    first_pos = np.searchsorted(p.sel_event, np.arange(lc.n_events), side="left")
    out = []
    for e in np.flatnonzero(sent > 0).tolist():
        k = int(sent[e])
        par = {nm: _num(lc.params[nm][e]) if nm in lc.params else None
               for nm in ("t0", "tE", "u0", "s", "q", "alpha", "rho", "fs", "dchi2", "onset",
                          "onset_index")}
        t0 = par["t0"]
        out.append({
            "diaObjectId": int(lc.object_id[e]),
            "label": None if lc.label is None else int(lc.label[e]),
            "t0": t0, "t0_mjd": None if t0 is None or lc.start_mjd is None else lc.start_mjd + t0,
            "tE": par["tE"], "u0": par["u0"], "s": par["s"], "q": par["q"],
            "alpha": par["alpha"], "rho": par["rho"], "fs": par["fs"],
            "baseline_mag": _num(lc.baseline_mag[e]), "dchi2": par["dchi2"],
            # onset_index -1 means none (training.dataset): null, like its NaN onset
            "onset_mjd": None if par["onset"] is None or lc.start_mjd is None else lc.start_mjd + par["onset"],
            "onset_index": None if par["onset"] is None or par["onset_index"] is None
            or par["onset_index"] < 0 else int(par["onset_index"]),
            "n_points": k,
            "first_mjd": float(p.columns["midpointMjdTai"][first_pos[e]]),
            "last_mjd": float(p.columns["midpointMjdTai"][first_pos[e] + k - 1]),
            "source": lc.names[e] if lc.names is not None else lc.source,
            "run_id": run_id})
    return out
