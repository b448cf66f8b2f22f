"""An event's light curve from Redis (a live event), for the follow-up views.

The broker's stored points with their P(binary) and kind (``broker.state.read_event``,
what ``ulens events show --json`` prints: ``forced`` for a Rubin packet's forced
photometry, else a detection; ``broker.state.layout``) and its trigger record become a
``training.event_figure.LightCurve``, the light curve every view draws. Offline sources
(a dataset, an archival file: ``followup.cli_events``) are made there too
(``training.event_figure.offline``), as are the PSPL fit, the series drawn and the
matplotlib figure, which ``ulens evaluate``'s example figures share.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from training import decision, psplfit
from training.event_figure import UNKNOWN_BAND, LightCurve, Trigger, add_pspl_statistic


class LightCurveError(ValueError):
    """An event cannot be drawn (not in Redis, not in the dataset...); the message names it."""
    exit_code = 3           # bad input (ulens/cli.py's table)


def from_event_view(d: dict, source: str, rule: Optional[dict] = None, pspl_params=None) -> LightCurve:
    """A Redis event: ``d`` = ``broker.state.EventView.to_dict()``. ``rule``
    (``followup.cli_events.broker_rule``) gives the threshold and smoothing; a tdcnn trigger's own
    threshold wins (it is the one the event was decided with). ``pspl_params``
    (``training.psplfit.Params``, :func:`pspl_params_for`): also the PSPL-fit rule's
    statistic at every point (without them, for a pspl-fit trigger: the rule's default
    parameters at the trigger's threshold)."""
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
    if pspl_params is None and trig is not None and trig.rule == psplfit.RULE:
        pspl_params = dataclasses.replace(psplfit.Params(), threshold=trig.threshold)
    if pspl_params is not None:
        add_pspl_statistic(lc, pspl_params)
    return lc


def event_dict(client, prefix: str, object_id: int) -> Optional[dict]:
    """``broker.state.read_event(...).to_dict()`` (None when the event is not stored) with
    the PSPL-fit rule's trigger (its outbox ``P:tp``, ``broker.rule_psplfit``) where the
    event has no TD-CNN trigger (``P:tr``): the trigger a follow-up view shows, whichever
    rule fired."""
    from broker.rule_psplfit import trigger_key
    from broker.state import outbox_record, read_event

    view = read_event(client, prefix, object_id)
    if view is None:
        return None
    d = view.to_dict()
    if not d["trigger"]:
        status, record = outbox_record(client.get(trigger_key(prefix, object_id, client)))
        if record is not None:
            d["trigger"], d["trigger_status"] = record, status
    return d


def pspl_params_for(settings):
    """The PSPL-fit rule's parameters when ``settings`` run that rule (``consumer.rule``
    pspl-fit or both), else None: what the views draw beside the model."""
    if psplfit.RULE not in settings.consumer.rules:
        return None
    from broker.rule_psplfit import params_from_settings

    return params_from_settings(settings)
