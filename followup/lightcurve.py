"""An event's light curve as the follow-up views draw it, from any of its three sources,
and the one computation of what they draw (:func:`series`).

Sources:

* Redis (a live event): the broker's stored points with their P(binary) and kind
  (``broker.state.read_event``, what ``ulens events show --json`` prints: ``forced`` for
  a Rubin packet's forced photometry, else a detection; ``broker.state.layout``) and its
  trigger record.
* A dataset (``ulens simulate``): the event's visits, each flagged a 5-sigma detection
  (an alert) or not (forced photometry), scored offline by the model.
* An archival file (``ulens replay --photometry``'s text table): measured points, no flag,
  scored offline by the model.

Offline scores come from the caller (``Artifact.predict`` over the whole curve: the model
is causal, so its per-point output is what the broker would have stored point by point)
and the trigger from ``training.decision.first_trigger``, the broker's rule.

The PSPL fit is the causal one the trigger's estimate uses (``broker.trigger_fields``):
``training.pspl.fit_pspl_bands``, weighted least squares in flux, one (t0, u0, tE) and a
source and blend flux per band, over the points seen so far.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from broker.trigger_fields import K_MAG, MIN_FIT_POINTS
from training import decision, pspl

UNKNOWN_BAND = "?"
GRID_POINTS = 600           # samples of each band's model curve
PREDICT_TE = 0.5            # the model curve goes this many tE past the last point (a forecast),
PREDICT_SPAN = 0.25         # but no further than this share of the data's time span


class LightCurveError(ValueError):
    """An event cannot be drawn (not in Redis, not in the dataset...); the message names it."""
    exit_code = 3           # bad input (ulens/cli.py's table)


@dataclass
class Trigger:
    """Where an event fired: the deciding point and the decision."""
    mjd: float
    index: int                      # the deciding point's index in the event (0-based)
    probability: float              # the decision score at that point (the rule's statistic)
    threshold: float
    rule: str = "tdcnn"
    record: Optional[dict] = None   # the trigger record (Redis / the topic), None offline


@dataclass
class LightCurve:
    object_id: int
    source: str                     # where it was read, for the title
    t: np.ndarray                   # MJD (TAI), increasing
    mag: np.ndarray
    err: np.ndarray
    band: np.ndarray                # band names (object); UNKNOWN_BAND where not known
    detected: Optional[np.ndarray]  # bool per point; None: the source does not record it
    p_binary: np.ndarray            # float64 per point; NaN: not scored
    threshold: Optional[float] = None
    smooth_window: int = decision.SMOOTH_WINDOW
    min_points: int = decision.MIN_POINTS
    first_index: int = 0            # index in the event of the first point held (Redis drops the oldest)
    trigger: Optional[Trigger] = None
    notes: list = field(default_factory=list)   # what the figure should say about its data

    def __len__(self) -> int:
        return len(self.t)

    def score(self) -> np.ndarray:
        """The decision score per point (the causal ``smooth_window``-point mean of
        P(binary), ``training.decision.score``); NaN where the point is not scored."""
        out = np.full(len(self.t), np.nan)
        ok = np.isfinite(self.p_binary)
        if ok.any():
            out[ok] = decision.score(self.p_binary[ok], self.smooth_window)
        return out


# ------------------------------------------------------------------------------ sources
def decision_of(card_decision: dict, threshold: Optional[float] = None,
                min_points: Optional[int] = None) -> dict:
    """{threshold, smooth_window, min_points} from a model card's ``decision`` and the
    consumer's overrides (``consumer.threshold``, ``consumer.min_points``), as the broker
    builds its rule."""
    return {"threshold": float(card_decision["threshold"] if threshold is None else threshold),
            "smooth_window": int(card_decision.get("smooth_window", decision.SMOOTH_WINDOW)),
            "min_points": int(card_decision.get("min_points", decision.MIN_POINTS)
                              if min_points is None else min_points)}


def from_event_view(d: dict, source: str, rule: Optional[dict] = None) -> LightCurve:
    """A Redis event: ``d`` = ``broker.state.EventView.to_dict()``. ``rule``
    (:func:`decision_of`) gives the threshold and smoothing; a tdcnn trigger's own
    threshold wins (it is the one the event was decided with)."""
    pts = d["points"]
    rule = dict(rule or {})
    rec = d.get("trigger")
    trig = None
    if rec:
        trig = Trigger(mjd=float(rec["midpointMjdTai"]), index=int(rec["nPoints"]) - 1,
                       probability=float(rec["probability"]), threshold=float(rec["threshold"]),
                       rule=str(rec.get("rule", "tdcnn")), record=rec)
        if trig.rule == "tdcnn":
            rule["threshold"] = trig.threshold
    lc = LightCurve(
        object_id=int(d["diaObjectId"]), source=source,
        t=np.array([p["midpointMjdTai"] for p in pts], dtype=np.float64),
        mag=np.array([p["mag"] for p in pts], dtype=np.float64),
        err=np.array([p["mag_err"] for p in pts], dtype=np.float64),
        band=np.array([p["band"] or UNKNOWN_BAND for p in pts], dtype=object),
        detected=np.array([not p["forced"] for p in pts], dtype=bool),
        p_binary=np.array([np.nan if p["p_binary"] is None else p["p_binary"] for p in pts], dtype=np.float64),
        threshold=rule.get("threshold"), smooth_window=int(rule.get("smooth_window", decision.SMOOTH_WINDOW)),
        min_points=int(rule.get("min_points", decision.MIN_POINTS)),
        first_index=int(pts[0]["index"]) if pts else 0, trigger=trig)
    if d.get("n_dropped"):
        lc.notes.append(f"{d['n_dropped']} oldest points dropped by the broker (redis.max_points)")
    return lc


def offline(object_id: int, source: str, t, mag, err, band, detected, probs, rule: dict) -> LightCurve:
    """A light curve scored offline (dataset or archival file): ``probs`` per point from
    the model over the whole curve; the trigger is the broker's rule applied to them."""
    p = np.asarray(probs, dtype=np.float64)
    lc = LightCurve(object_id=int(object_id), source=source, t=np.asarray(t, dtype=np.float64),
                    mag=np.asarray(mag, dtype=np.float64), err=np.asarray(err, dtype=np.float64),
                    band=np.asarray(band, dtype=object),
                    detected=None if detected is None else np.asarray(detected, dtype=bool),
                    p_binary=p, threshold=float(rule["threshold"]),
                    smooth_window=int(rule["smooth_window"]), min_points=int(rule["min_points"]))
    j = decision.first_trigger(p, lc.threshold, lc.min_points, lc.smooth_window) if len(p) else None
    if j is not None:
        lc.trigger = Trigger(mjd=float(lc.t[j]), index=j, probability=float(lc.score()[j]),
                             threshold=lc.threshold)
    if detected is None:
        lc.notes.append("the file has no detection flag: every point is drawn alike")
    return lc


# -------------------------------------------------------------------------- PSPL fit
@dataclass(frozen=True)
class PsplCurve:
    """A PSPL fit of the first ``n_points`` points: F_b(t) = a_b A(t) + b_b per band, in
    flux relative to the magnitude ``m_ref``."""
    t0: float
    u0: float
    tE: float
    chi2_dof: Optional[float]
    n_points: int
    t_last: float                   # time of the last point fitted
    bands: tuple                    # band names, in the order of the flux arrays
    source_flux: np.ndarray
    blend_flux: np.ndarray
    m_ref: float

    def mag(self, t, band: str) -> np.ndarray:
        """Model magnitude in ``band`` at times ``t`` (NaN where the model flux is not positive)."""
        k = self.bands.index(band)
        f = self.source_flux[k] * pspl.magnification(np.asarray(t, dtype=np.float64), self.t0,
                                                     self.u0, self.tE) + self.blend_flux[k]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(f > 0, self.m_ref - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)

    def summary(self) -> str:
        chi = "" if self.chi2_dof is None else f", chi2/dof {self.chi2_dof:.2f}"
        return (f"PSPL fit of the first {self.n_points} points: t0 {self.t0:.2f}, u0 {self.u0:.3f}, "
                f"tE {self.tE:.1f} d{chi}")


def fit_pspl(lc: LightCurve, n_points: Optional[int] = None) -> Optional[PsplCurve]:
    """The causal PSPL fit of the curve's first ``n_points`` points (all by default);
    None when it cannot be made (fewer than 4 usable points, a failed fit)."""
    n = len(lc) if n_points is None else min(int(n_points), len(lc))
    t, m, e, band = lc.t[:n], lc.mag[:n], lc.err[:n], lc.band[:n]
    ok = np.isfinite(t) & np.isfinite(m) & np.isfinite(e) & (e > 0)
    t, m, e, band = t[ok], m[ok], e[ok], band[ok]
    if len(t) < MIN_FIT_POINTS:
        return None
    names, dense = np.unique(band.astype(str), return_inverse=True)
    m_ref = float(np.median(m))
    F = np.power(10.0, -0.4 * (m - m_ref))
    try:
        with np.errstate(all="ignore"):
            fit = pspl.fit_pspl_bands(t, F, K_MAG * e * F, dense.ravel())
    except (ValueError, ArithmeticError, np.linalg.LinAlgError):
        return None
    if not all(math.isfinite(x) for x in (fit.t0, fit.u0, fit.tE, fit.chi2)):
        return None
    dof = len(t) - 3 - 2 * len(names)
    return PsplCurve(fit.t0, fit.u0, fit.tE, fit.chi2 / dof if dof > 0 else None, int(n), float(t[-1]),
                     tuple(str(b) for b in names), np.asarray(fit.source_flux, dtype=np.float64),
                     np.asarray(fit.blend_flux, dtype=np.float64), m_ref)


# ---------------------------------------------------------------------- what is drawn
@dataclass
class BandSeries:
    band: str
    t: np.ndarray
    mag: np.ndarray
    err: np.ndarray
    detected: Optional[np.ndarray]          # None: kind unknown
    residual: Optional[np.ndarray]          # mag - PSPL model, None without a fit
    model_t: Optional[np.ndarray] = None    # the model curve, sampled
    model_mag: Optional[np.ndarray] = None


@dataclass
class Series:
    """Everything an event's figure shows, computed once for both renderers."""
    title: str
    bands: list
    prob_t: np.ndarray                      # the scored points
    prob: np.ndarray
    score: np.ndarray
    threshold: Optional[float]
    smooth_window: int
    trigger: Optional[Trigger]
    fit: Optional[PsplCurve]
    notes: list


BAND_ORDER = "ugrizy"


def series(lc: LightCurve, fit: Optional[PsplCurve]) -> Series:
    """The panels' data: per band the points (detections and forced points told apart
    when the source records it), their residuals from the PSPL fit and its model curve
    (sampled from the first point to ``PREDICT_TE`` tE past the last one, at most
    ``PREDICT_SPAN`` of the data's span); P(binary) and
    the decision score at every scored point; threshold and trigger."""
    names = sorted(set(lc.band.astype(str)), key=lambda b: (BAND_ORDER.index(b) if b in BAND_ORDER else len(BAND_ORDER), b))
    span = (float(lc.t.min()), float(lc.t.max())) if len(lc) else (0.0, 1.0)
    out = []
    for b in names:
        k = lc.band.astype(str) == b
        s = BandSeries(b, lc.t[k], lc.mag[k], lc.err[k], None if lc.detected is None else lc.detected[k], None)
        if fit is not None and b in fit.bands:
            s.residual = s.mag - fit.mag(s.t, b)
            hi = span[1] + min(PREDICT_TE * fit.tE, PREDICT_SPAN * (span[1] - span[0]))
            s.model_t = np.linspace(span[0], hi, GRID_POINTS)
            s.model_mag = fit.mag(s.model_t, b)
        out.append(s)
    ok = np.isfinite(lc.p_binary)
    title = f"diaObjectId {lc.object_id}  ({lc.source})"
    return Series(title, out, lc.t[ok], lc.p_binary[ok], lc.score()[ok], lc.threshold, lc.smooth_window,
                  lc.trigger, fit, list(lc.notes))
