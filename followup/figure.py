"""An event's figure in matplotlib (``ulens events plot``):
three panels sharing the time axis, drawn from :func:`followup.lightcurve.series`.

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

from pathlib import Path
from typing import Optional

from followup.lightcurve import LightCurve, PsplCurve, Series, series

# one colour per band (colour-blind-safe hues, blue to dark red in wavelength order); other bands blue
BAND_COLOURS = {"u": "#56b4e9", "g": "#008060", "r": "#e03030", "i": "#d08000", "z": "#7a4fa0",
                "y": "#6b2a2a"}
OTHER_COLOUR = "#1f77b4"
TRIGGER_COLOUR = "crimson"


def colour(band: str) -> str:
    return BAND_COLOURS.get(band, OTHER_COLOUR)


def light_curve_figure(lc: LightCurve, fit: Optional[PsplCurve] = None, *, width: float = 9.0):
    """The Figure of ``lc`` (with ``fit``, :func:`followup.lightcurve.fit_pspl`, when given)."""
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
    ax_p.set_xlabel("MJD (TAI)")
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
        ax.plot([], [], color=TRIGGER_COLOUR, label=f"trigger at MJD {s.trigger.mjd:.2f}")
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


def _probability(ax, s: Series) -> None:
    if len(s.prob_t):
        ax.plot(s.prob_t, s.prob, ".", color="0.35", ms=3, label="P(binary) per point")
        ax.plot(s.prob_t, s.score, "-", color="k", lw=1.2, label=f"score ({s.smooth_window}-point mean)")
    else:
        ax.text(0.5, 0.5, "no scored point", transform=ax.transAxes, ha="center", va="center")
    if s.threshold is not None:
        ax.axhline(s.threshold, color=TRIGGER_COLOUR, ls="--", lw=1.0, label=f"threshold {s.threshold:.3f}")
    if s.trigger is not None and s.trigger.rule == "tdcnn":
        ax.plot([s.trigger.mjd], [s.trigger.probability], "*", color=TRIGGER_COLOUR, ms=11,
                label=f"trigger, score {s.trigger.probability:.3f}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("P(binary)")
    ax.legend(fontsize=7, loc="upper left")


def save_png(fig, path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path

