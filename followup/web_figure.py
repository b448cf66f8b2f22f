"""An event's figure in Plotly for the dashboard: the panels of training/event_figure.py (light
curve per band with error bars, detections filled and forced points open, the PSPL fit
and its forecast; residuals; P(binary), score and threshold; the trigger), drawn from the
same :func:`training.event_figure.series`.

Plotly (MIT) because the page must zoom into a caustic crossing a follow-up team is
deciding on, and plotly.js ships inside the Python package (``plotly.offline``), so the
dashboard serves it itself: no build step, nothing fetched from the internet.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from training.event_figure import STAT_COLOUR, TRIGGER_COLOUR, LightCurve, PsplCurve, colour, series, stat_floor


def _list(a) -> list:
    """JSON-safe values (NaN -> None: a gap in a line)."""
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=np.float64)]


def light_curve_plotly(lc: LightCurve, fit: Optional[PsplCurve] = None) -> dict:
    """The figure as plotly JSON ({"data": [...], "layout": {...}}), for ``Plotly.react``."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    s = series(lc, fit)
    model, stat = len(s.prob_t) > 0, s.stat is not None
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        row_heights=[0.56, 0.18, 0.26],
                        specs=[[{}], [{}], [{"secondary_y": model and stat}]])
    for b in s.bands:
        c = colour(b.band)
        kinds = [(np.ones(len(b.t), dtype=bool), f"{b.band}", "circle")] if b.detected is None else \
            [(b.detected, f"{b.band} detections", "circle"), (~b.detected, f"{b.band} forced", "circle-open")]
        for sel, name, symbol in kinds:
            if sel.any():
                fig.add_trace(go.Scatter(
                    x=_list(b.t[sel]), y=_list(b.mag[sel]), mode="markers", name=f"{name} ({int(sel.sum())})",
                    legendgroup=b.band, marker={"color": c, "symbol": symbol, "size": 6},
                    error_y={"type": "data", "array": _list(b.err[sel]), "thickness": 1, "width": 0},
                    hovertemplate="MJD %{x:.4f}<br>mag %{y:.3f} ± %{error_y.array:.3f}<extra>" + name + "</extra>"),
                    row=1, col=1)
        if b.model_t is not None:
            past = b.model_t <= s.fit.t_last
            for sel, dash, label in ((past, "solid", "PSPL fit"), (~past, "dash", "forecast")):
                fig.add_trace(go.Scatter(x=_list(b.model_t[sel]), y=_list(b.model_mag[sel]), mode="lines",
                                         name=f"{b.band} {label}", legendgroup=b.band, showlegend=False,
                                         line={"color": c, "dash": dash, "width": 1.5}, hoverinfo="skip"),
                              row=1, col=1)
            fig.add_trace(go.Scatter(x=_list(b.t), y=_list(b.residual), mode="markers", legendgroup=b.band,
                                     showlegend=False, name=f"{b.band} residual",
                                     marker={"color": c, "size": 5},
                                     error_y={"type": "data", "array": _list(b.err), "thickness": 1, "width": 0}),
                          row=2, col=1)
    if len(s.prob_t):
        fig.add_trace(go.Scatter(x=_list(s.prob_t), y=_list(s.prob), mode="markers", name="P(binary) per point",
                                 marker={"color": "#555", "size": 4}), row=3, col=1)
        fig.add_trace(go.Scatter(x=_list(s.prob_t), y=_list(s.score), mode="lines",
                                 name=f"score ({s.smooth_window}-point mean)", line={"color": "black", "width": 1.5}),
                      row=3, col=1)
    if s.threshold is not None and model:
        fig.add_hline(y=s.threshold, line={"color": TRIGGER_COLOUR, "dash": "dash", "width": 1},
                      annotation_text=f"threshold {s.threshold:.3f}", annotation_position="bottom right",
                      row=3, col=1)
    if s.trigger is not None:
        for row in (1, 2, 3):
            fig.add_vline(x=s.trigger.mjd, line={"color": TRIGGER_COLOUR, "width": 1.5}, row=row, col=1)
        if s.trigger.rule == "tdcnn" and model:
            fig.add_trace(go.Scatter(x=[s.trigger.mjd], y=[s.trigger.probability], mode="markers",
                                     name=f"trigger MJD {s.trigger.mjd:.3f}",
                                     marker={"color": TRIGGER_COLOUR, "symbol": "star", "size": 14}),
                          row=3, col=1)
    if stat:
        # the PSPL-fit rule's statistic (log axis; on the right of the model's when both run)
        lo, on2 = stat_floor(s), {"secondary_y": True} if model else {}
        fig.add_trace(go.Scatter(x=_list(s.stat_t), y=_list(np.maximum(s.stat, lo)), mode="lines",
                                 name="PSPL-fit D (active points)", line={"color": STAT_COLOUR, "width": 1.5}),
                      row=3, col=1, **on2)
        if s.stat_threshold is not None and len(lc):
            fig.add_trace(go.Scatter(x=[float(lc.t.min()), float(lc.t.max())], y=[s.stat_threshold] * 2,
                                     mode="lines", name=f"PSPL-fit threshold {s.stat_threshold:g}",
                                     line={"color": TRIGGER_COLOUR, "dash": "dot", "width": 1}),
                          row=3, col=1, **on2)
        if s.trigger is not None and s.trigger.rule != "tdcnn":
            fig.add_trace(go.Scatter(x=[s.trigger.mjd], y=[max(s.trigger.probability, lo)], mode="markers",
                                     name=f"trigger MJD {s.trigger.mjd:.3f} (D {s.trigger.probability:.1f})",
                                     marker={"color": TRIGGER_COLOUR, "symbol": "star", "size": 14}),
                          row=3, col=1, **on2)
        fig.update_yaxes(title_text="PSPL-fit D", type="log", row=3, col=1, **on2)
    if s.fit is not None:
        fig.add_vline(x=s.fit.t0, line={"color": "grey", "dash": "dot", "width": 1}, row=1, col=1)
    head = s.fit.summary() + " (line; dashed: forecast; dotted: t0)" if s.fit is not None else \
        "no PSPL fit (fewer than 4 points, or the fit failed)"
    fig.update_layout(
        title={"text": f"{s.title}<br><sub>{'<br>'.join([head] + s.notes)}</sub>", "font": {"size": 14}},
        height=760, margin={"l": 60, "r": 20, "t": 90, "b": 50}, template="plotly_white",
        legend={"font": {"size": 10}}, hovermode="closest",
        uirevision=str(lc.object_id))      # a refresh keeps the user's zoom
    fig.update_yaxes(title_text="magnitude", autorange="reversed", row=1, col=1)
    fig.update_yaxes(title_text="data − PSPL [mag]", autorange="reversed", row=2, col=1)
    if model or not stat:
        fig.update_yaxes(title_text="P(binary)", range=[-0.03, 1.03], row=3, col=1)
    fig.update_xaxes(title_text="MJD (TAI)", row=3, col=1)
    return fig.to_plotly_json()
