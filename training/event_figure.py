"""An offline event's figure, the pure part every follow-up view and the evaluation share:
what to draw, computed once (:func:`series`), and its matplotlib figure
(:func:`light_curve_figure`); :func:`example_figures` writes ``ulens evaluate``'s examples.

Here (in ``training``) because the evaluation draws the same figure as ``ulens events
plot`` and ``training`` may not import the follow-up views above it (DESIGN.md's
dependency direction); ``followup`` imports this module and adds what is Redis, Kafka or
web specific (``followup.lightcurve.from_event_view``, ``followup.web_figure``).

A light curve (:class:`LightCurve`) is an event's points: times, magnitudes, errors,
band names, detected flags (None where the source does not say), P(binary) per point and
the decision. Offline scores come from the caller (``Artifact.predict`` over the whole
curve: the model is causal, so its per-point output is what the broker would have stored
point by point) and the trigger from ``training.decision.first_trigger``, the broker's rule.

The PSPL fit is the causal one the trigger's estimate uses (``broker.trigger_fields``):
:func:`training.pspl.fit_pspl_bands`, weighted least squares in flux, one (t0, u0, tE) and
a source and blend flux per band, over the points seen so far.

The figure: three panels sharing the time axis.

1. the light curve per band with error bars (detections filled, forced photometry open;
   one style when the source does not say), the causal PSPL fit's model curve (dashed
   past the last fitted point: a forecast) and its peak;
2. the residuals from that fit, per band;
3. P(binary) at every scored point, the decision score (its causal moving mean) and the
   threshold; the trigger is a vertical line through all three.

A ``matplotlib.figure.Figure`` is made directly (no pyplot): no global state, so the
dashboard's threads or a test can draw at once; saving it uses the Agg canvas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from training import decision, pspl, psplfit
from training.photometry import K_MAG
from training.pspl import MIN_FIT_POINTS

UNKNOWN_BAND = "?"
GRID_POINTS = 600           # samples of each band's model curve
PREDICT_TE = 0.5            # the model curve goes this many tE past the last point (a forecast),
PREDICT_SPAN = 0.25         # but no further than this share of the data's time span
# a light curve's time axis: MJD (Redis, an archival file, a dataset placed at an MJD) or
# the dataset's own days (the evaluation: no replay start is known there)
TIME_AXES = {"MJD": "MJD (TAI)", "day": "day (the dataset's time axis)"}


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
    time_axis: str = "MJD"          # what ``t`` is: a key of TIME_AXES
    # the PSPL-fit rule's statistic D per point (-inf: not active) and its threshold, when
    # that rule decides the event (:func:`add_pspl_statistic`); None otherwise
    statistic: Optional[np.ndarray] = None
    statistic_threshold: Optional[float] = None

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


# ------------------------------------------------------------------- offline sources
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


def add_pspl_statistic(lc: LightCurve, params) -> LightCurve:
    """``lc`` with the PSPL-fit rule's statistic D at each of its points (``params``: a
    ``training.psplfit.Params``), computed as the broker computes it (``psplfit.run_curves``
    over the points in order, each with its band). Exact for a whole light curve; when
    Redis dropped the oldest points the fit starts at the first point held (a note says so)."""
    from training.survey import BAND_NAMES

    codes = np.array([BAND_NAMES.index(b) if b in BAND_NAMES else 255 for b in lc.band.astype(str)],
                     dtype=np.uint8)
    lc.statistic = psplfit.run_curves([(lc.t, lc.mag, lc.err, codes)], params)[0] if len(lc) else np.zeros(0)
    lc.statistic_threshold = float(params.threshold)
    if lc.first_index:
        lc.notes.append("PSPL-fit statistic recomputed from the first point held, not the event's first")
    return lc


def decide_offline(lc: LightCurve, rules: tuple) -> LightCurve:
    """An offline curve's trigger under the broker's ``rules`` (``consumer.rules``): the
    TD-CNN's (already set by :func:`offline`), the PSPL-fit rule's first point with D >=
    its threshold (:func:`add_pspl_statistic` first), or the earlier of the two."""
    cands = [lc.trigger] if "tdcnn" in rules and lc.trigger is not None else []
    if psplfit.RULE in rules and lc.statistic is not None:
        j = psplfit.first_trigger(lc.statistic, lc.statistic_threshold)
        if j is not None:
            cands.append(Trigger(mjd=float(lc.t[j]), index=j, probability=float(lc.statistic[j]),
                                 threshold=lc.statistic_threshold, rule=psplfit.RULE))
    lc.trigger = min(cands, key=lambda x: x.index) if cands else None
    return lc


def dataset_curve(ds, i: int, probs, rule: dict, start_mjd: Optional[float] = None,
                  source: str = "") -> LightCurve:
    """Event ``i`` (its position) of a dataset (``training.dataset``) scored offline: its
    visits' bands and 5-sigma detected flags; times ``start_mjd`` + the dataset's day
    axis (None: the day axis itself, so labelled)."""
    from training.survey import BAND_NAMES

    t, mag, err = ds.event(i)
    a, b = ds.offsets[i], ds.offsets[i + 1]
    label = f"label {'binary' if ds.label[i] else 'PSPL'}"
    lc = offline(int(ds.event_id[i]), f"{source}, {label}" if source else label,
                 np.asarray(t, dtype=np.float64) + (0.0 if start_mjd is None else float(start_mjd)),
                 mag, err, np.asarray(BAND_NAMES, dtype=object)[ds.event_band(i)],
                 None if ds.detected is None else ds.detected[a:b], probs, rule)
    if start_mjd is None:
        lc.time_axis = "day"
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
    time_axis: str = "MJD"
    stat_t: Optional[np.ndarray] = None     # the points where the PSPL-fit rule was active
    stat: Optional[np.ndarray] = None       # its statistic D there
    stat_threshold: Optional[float] = None


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
    sr = Series(title, out, lc.t[ok], lc.p_binary[ok], lc.score()[ok], lc.threshold, lc.smooth_window,
                lc.trigger, fit, list(lc.notes), lc.time_axis)
    if lc.statistic is not None:
        act = np.isfinite(lc.statistic)
        sr.stat_t, sr.stat, sr.stat_threshold = lc.t[act], lc.statistic[act], lc.statistic_threshold
    return sr


# ------------------------------------------------------------------------- the figure
# one colour per band (colour-blind-safe hues, blue to dark red in wavelength order); other bands blue
BAND_COLOURS = {"u": "#56b4e9", "g": "#008060", "r": "#e03030", "i": "#d08000", "z": "#7a4fa0",
                "y": "#6b2a2a"}
OTHER_COLOUR = "#1f77b4"
TRIGGER_COLOUR = "crimson"


def colour(band: str) -> str:
    return BAND_COLOURS.get(band, OTHER_COLOUR)


def light_curve_figure(lc: LightCurve, fit: Optional[PsplCurve] = None, *, width: float = 9.0):
    """The Figure of ``lc`` (with ``fit``, :func:`fit_pspl`, when given)."""
    from matplotlib.figure import Figure

    s = series(lc, fit)
    fig = Figure(figsize=(width, 8.0), layout="constrained")
    ax_lc, ax_res, ax_p = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.1, 1.4]})
    _light_curve(ax_lc, s)
    _residuals(ax_res, s)
    _probability(ax_p, s)
    if s.trigger is not None:
        for ax in (ax_lc, ax_res, ax_p):
            ax.axvline(s.trigger.mjd, color=TRIGGER_COLOUR, lw=1.2, ls="-", alpha=0.8)
    ax_p.set_xlabel(TIME_AXES[s.time_axis])
    fig.suptitle(s.title, fontsize=11)
    return fig


def _light_curve(ax, s: Series) -> None:
    for b in s.bands:
        c = colour(b.band)
        if b.detected is None:
            ax.errorbar(b.t, b.mag, b.err, fmt="o", ms=3, color=c, ecolor=c, elinewidth=0.7,
                        alpha=0.85, label=f"{b.band}: {len(b.t)} points")
        else:
            for sel, name, face in ((b.detected, "detections", c), (~b.detected, "forced", "none")):
                if sel.any():
                    ax.errorbar(b.t[sel], b.mag[sel], b.err[sel], fmt="o", ms=3.5, color=c, mfc=face,
                                ecolor=c, elinewidth=0.7, alpha=0.9 if face != "none" else 0.55,
                                label=f"{b.band} {name} ({int(sel.sum())})")
        if b.model_t is not None:
            past = b.model_t <= s.fit.t_last
            ax.plot(b.model_t[past], b.model_mag[past], "-", color=c, lw=1.2)
            ax.plot(b.model_t[~past], b.model_mag[~past], "--", color=c, lw=1.0, alpha=0.8)
    if s.fit is not None:
        ax.axvline(s.fit.t0, color="grey", lw=0.8, ls=":")
    if s.trigger is not None:
        ax.plot([], [], color=TRIGGER_COLOUR, label=f"trigger at {s.time_axis} {s.trigger.mjd:.2f}")
    ax.invert_yaxis()
    ax.set_ylabel("magnitude")
    ax.legend(fontsize=7, loc="best", ncol=2)
    lines = [s.fit.summary() + " (line; dashed: forecast; dotted: t0)" if s.fit is not None
             else "no PSPL fit (fewer than 4 points, or the fit failed)"] + s.notes
    ax.set_title("\n".join(lines), fontsize=8, loc="left")


def _residuals(ax, s: Series) -> None:
    for b in s.bands:
        if b.residual is not None:
            ax.errorbar(b.t, b.residual, b.err, fmt="o", ms=2.5, color=colour(b.band), elinewidth=0.6,
                        alpha=0.8)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_ylabel("data − PSPL\n[mag]")


STAT_COLOUR = "#1f5fa0"          # the PSPL-fit statistic's axis


def stat_floor(s: Series) -> float:
    """The lower end of the statistic's log axis (D <= 0 drawn there)."""
    return 0.5 if s.stat_threshold is None else min(0.5, s.stat_threshold / 20.0)


def _probability(ax, s: Series) -> None:
    """P(binary) and its score when the model ran; the PSPL-fit statistic D (log axis, on
    the right when both are drawn) when that rule decides the event."""
    model = len(s.prob_t) > 0
    if model:
        ax.plot(s.prob_t, s.prob, ".", color="0.35", ms=3, label="P(binary) per point")
        ax.plot(s.prob_t, s.score, "-", color="k", lw=1.2, label=f"score ({s.smooth_window}-point mean)")
        if s.threshold is not None:
            ax.axhline(s.threshold, color=TRIGGER_COLOUR, ls="--", lw=1.0, label=f"threshold {s.threshold:.3f}")
        if s.trigger is not None and s.trigger.rule == "tdcnn":
            ax.plot([s.trigger.mjd], [s.trigger.probability], "*", color=TRIGGER_COLOUR, ms=11,
                    label=f"trigger, score {s.trigger.probability:.3f}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("P(binary)")
        ax.legend(fontsize=7, loc="upper left")
    elif s.stat is None:
        ax.text(0.5, 0.5, "no scored point", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylabel("P(binary)")
    if s.stat is None:
        return
    ax2 = ax.twinx() if model else ax
    lo = stat_floor(s)
    ax2.plot(s.stat_t, np.maximum(s.stat, lo), "-", color=STAT_COLOUR, lw=1.1, label="PSPL-fit D (active points)")
    if s.stat_threshold is not None:
        ax2.axhline(s.stat_threshold, color=TRIGGER_COLOUR, ls=":", lw=1.0,
                    label=f"PSPL-fit threshold {s.stat_threshold:g}")
    if s.trigger is not None and s.trigger.rule != "tdcnn":
        ax2.plot([s.trigger.mjd], [max(s.trigger.probability, lo)], "*", color=TRIGGER_COLOUR, ms=11,
                 label=f"trigger, D {s.trigger.probability:.1f}")
    ax2.set_yscale("log")
    ax2.set_ylim(bottom=lo)
    ax2.set_ylabel("PSPL-fit D", color=STAT_COLOUR if model else "k")
    if not len(s.stat_t):
        ax2.text(0.5, 0.5, "the PSPL-fit rule was not active at any point", transform=ax2.transAxes,
                 ha="center", va="center")
    ax2.legend(fontsize=7, loc="upper right" if model else "upper left")


def save_png(fig, path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path



# ------------------------------------------------------------- the evaluation's examples
# the kinds of example, in the order they are drawn (each a file name's part)
EXAMPLE_KINDS = ("early_binary", "missed_binary", "false_pspl", "quiet_pspl")


def choose_examples(ds, events, running, threshold: float, n_per_kind: int = 2) -> dict:
    """{kind: [position in ``events``, ...]} of the evaluation's example events, at most
    ``n_per_kind`` each (a kind with no event is left out):

    * ``early_binary``: detectable binaries (``training.metrics.detectable_mask``) that
      fired, the earliest first: days from the detectability onset to the trigger (from
      t0 where the event has no onset);
    * ``missed_binary``: detectable binaries that never fired, the largest Δχ² first (the
      plainest binaries the rule missed);
    * ``false_pspl``: PSPL events that fired, the highest event score first;
    * ``quiet_pspl``: PSPL events that never fired, the lowest event score first.
    """
    from training import metrics

    events = np.asarray(events, dtype=np.int64)
    if len(running) != len(events):
        raise ValueError(f"running has {len(running)} score arrays for {len(events)} events")
    labels = ds.label[events]
    dchi2 = np.asarray(ds.params["dchi2"], dtype=np.float64)[events]
    det_bin = metrics.detectable_mask(labels, dchi2) & (labels == 1)
    fired = [decision.first_crossing(np.asarray(r), threshold) for r in running]
    top = np.array([float(r[-1]) if len(r) else -np.inf for r in running])
    onset = np.asarray(ds.params["onset"], dtype=np.float64)[events]
    t0 = np.asarray(ds.params["t0"], dtype=np.float64)[events]

    def delay(k: int) -> float:
        t = float(ds.event(int(events[k]))[0][fired[k]])
        return t - (onset[k] if np.isfinite(onset[k]) else t0[k])

    ks = range(len(events))
    picks = {
        "early_binary": sorted((k for k in ks if det_bin[k] and fired[k] is not None), key=delay),
        "missed_binary": sorted((k for k in ks if det_bin[k] and fired[k] is None), key=lambda k: -dchi2[k]),
        "false_pspl": sorted((k for k in ks if labels[k] == 0 and fired[k] is not None), key=lambda k: -top[k]),
        "quiet_pspl": sorted((k for k in ks if labels[k] == 0 and fired[k] is None), key=lambda k: top[k]),
    }
    return {kind: picks[kind][:n_per_kind] for kind in EXAMPLE_KINDS if picks[kind]}


def example_figures(art, ds, events, running, threshold: float, out_dir, n_per_kind: int = 2) -> list[str]:
    """Write ``ulens evaluate``'s example figures, the figure of ``ulens events plot``, of
    the events :func:`choose_examples` picks; the PNGs' paths, named
    ``<kind>_<rank>_event<event_id>.png``.

    ``running[k]``: the running event score of event ``events[k]`` (positions in ``ds``;
    ``training.decision.running_score`` over its P(binary)), which places the trigger at
    ``threshold``; the P(binary) panel is the model's (``training.evaluate.event_probs``),
    so a running score of another rule (the PSPL fit's) is drawn with the model beside it.
    """
    from training.evaluate import event_probs   # here: evaluate imports this module

    chosen = choose_examples(ds, events, running, threshold, n_per_kind)
    order = [(kind, rank, k) for kind, ks in chosen.items() for rank, k in enumerate(ks, 1)]
    if not order:
        return []
    events = np.asarray(events, dtype=np.int64)
    probs = event_probs(art, ds, [int(events[k]) for _, _, k in order])
    rule = {**art.decision, "threshold": float(threshold)}
    out_dir = Path(out_dir)
    paths = []
    for (kind, rank, k), p in zip(order, probs):
        i = int(events[k])
        lc = dataset_curve(ds, i, p, rule, source=kind.replace("_", " "))
        # the trigger is where the caller's running score (any rule's) crosses the threshold
        j = decision.first_crossing(np.asarray(running[k]), threshold)
        lc.trigger = None if j is None else Trigger(mjd=float(lc.t[j]), index=j,
                                                    probability=float(running[k][j]), threshold=float(threshold))
        path = out_dir / f"{kind}_{rank}_event{int(ds.event_id[i])}.png"
        save_png(light_curve_figure(lc, fit_pspl(lc)), path)
        paths.append(str(path))
    return paths
