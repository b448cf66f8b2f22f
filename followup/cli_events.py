"""`ulens events`: read the broker's Redis state of an event; draw an event's light curve.

``plot`` draws from Redis (a live event), or offline from a dataset (``--data``) or an
archival text file (``--photometry``), both scored by the model as the broker would have
scored them point by point (training/event_figure.py, which also draws the figure;
followup/lightcurve.py reads Redis).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = ("inspect events in Redis: `show ID` (points, probabilities, trigger state), `list`; "
        "`plot ID` draws the light curve, P(binary), PSPL fit and trigger (Redis, a dataset or an archival file)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="an event's points, probabilities and trigger state")
    show.add_argument("object_id", type=int, metavar="ID", help="diaObjectId")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--last", type=int, metavar="N", default=None, help="print only the newest N points")
    lst = sub.add_parser("list", help="ids of live events (SCAN)")
    lst.add_argument("--limit", type=int, metavar="N", default=100, help="print at most N ids")
    plot = sub.add_parser(
        "plot", help="write a PNG of an event: light curve per band, P(binary) and threshold, the causal "
                     "PSPL fit and its residuals, the trigger",
        description="Draw an event from Redis (default), from a dataset (--data) or from an archival "
                    "light-curve file (--photometry); offline sources are scored with the model.")
    plot.add_argument("object_id", type=int, metavar="ID", nargs="?", default=None,
                      help="diaObjectId (Redis; --data: the event_id); with --photometry the file's own "
                           "id (a hash of its name, as `ulens replay --photometry` gives it) when omitted")
    src = plot.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="FILE", default=None, help="a dataset .npz (`ulens simulate`)")
    src.add_argument("--photometry", metavar="FILE", default=None,
                     help="an archival light curve: text columns time (JD/HJD/HJD-2450000/MJD), mag, error")
    plot.add_argument("--output", metavar="FILE", default=None, help="PNG to write (default: event_ID.png)")
    plot.add_argument("--model", metavar="DIR", default=None,
                      help="model artifact scoring --data/--photometry [config model.path]")
    plot.add_argument("--start-mjd", type=float, metavar="MJD", default=None,
                      help="--data: MJD of the dataset's day 0 [config replay.start_mjd]")
    plot.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the model runs")


def format_event(d: dict) -> str:
    refs = " ".join(f"{b} {m:.4f}" for b, m in d["reference_mag"].items()) or "-"
    counts = " ".join(f"{b} {n}" for b, n in d["points_per_band"].items()) or "-"
    lines = [f"event {d['diaObjectId']}: {d['n_total']} points ({d['n_stored']} stored, "
             f"{d['n_dropped']} dropped, {d['n_scored']} scored), expires in {d['ttl_s']} s",
             f"points per band: {counts}; reference mag per band: {refs}"]
    ring = " ".join(f"{p:.4f}" for p in d["last_probabilities"]) or "-"
    score = "-" if d["score"] is None else f"{d['score']:.4f}"
    lines.append(f"decision: last P(binary) [{ring}], smoothed {score}, triggered "
                 f"{'yes (' + str(d['trigger_status']) + ')' if d['triggered'] else 'no'}")
    t = d["trigger"]
    if t:
        lines.append(f"trigger {t['triggerId']}: point {t['nPoints']} (diaSourceId {t['diaSourceId']}, "
                     f"MJD {t['midpointMjdTai']:.5f}), P {t['probability']:.4f} >= {t['threshold']:.4f}, "
                     f"model {t['modelVersion']}")
        if t.get("summary"):     # schema v2 (an outbox written before v2 has none)
            lines.append(f"  {t['summary']}")
    lines.append(f"{'index':>7} {'diaSourceId':>20} {'MJD':>14} {'band':>4} {'kind':>6} {'mag':>9} "
                 f"{'mag_err':>8} {'P(binary)':>10}")
    for p in d["points"]:
        pb = "-" if p["p_binary"] is None else f"{p['p_binary']:.3f}"
        kind = "forced" if p["forced"] else "det"
        lines.append(f"{p['index']:>7} {p['diaSourceId']:>20} {p['midpointMjdTai']:>14.5f} "
                     f"{p['band'] or '?':>4} {kind:>6} {p['mag']:>9.4f} {p['mag_err']:>8.4f} {pb:>10}")
    return "\n".join(lines)


def run(args) -> int:
    import config
    from broker.consumer import redis_client
    from broker.errors import BrokerError
    from broker.state import scan_events
    from followup.lightcurve import event_dict

    settings = config.load(args.config)
    if args.action == "plot":
        return plot(args, settings)
    client = redis_client(settings)
    prefix = settings.redis.key_prefix
    if args.action == "list":
        for oid in scan_events(client, prefix, args.limit):
            print(oid)
        return 0
    d = event_dict(client, prefix, args.object_id)
    if d is None:
        raise BrokerError(f"no event {args.object_id} in Redis (prefix {prefix!r}): never seen, or expired")
    if args.last is not None:
        d["points"] = d["points"][-args.last:] if args.last > 0 else []
    print(json.dumps(d, indent=2) if args.json else format_event(d))
    return 0


# --------------------------------------------------------------------------------- plot
def plot(args, settings) -> int:
    from followup import lightcurve as lcm
    from training.event_figure import fit_pspl, light_curve_figure, save_png

    if args.data:
        lc = decided(dataset_curve(args.data, args.object_id, settings, args.model, args.start_mjd,
                                   args.device), settings)
    elif args.photometry:
        lc = decided(photometry_curve(args.photometry, args.object_id, settings, args.model, args.device),
                     settings)
    else:
        if args.object_id is None:
            raise lcm.LightCurveError("ulens events plot: give the event's diaObjectId (or --data/--photometry)")
        lc = redis_curve(settings, args.object_id)
    fit = fit_pspl(lc)
    out = save_png(light_curve_figure(lc, fit), args.output or f"event_{lc.object_id}.png")
    print(f"wrote {out}: {len(lc)} points, "
          f"{'trigger at MJD %.3f' % lc.trigger.mjd if lc.trigger else 'no trigger'}, "
          f"{fit.summary() if fit else 'no PSPL fit'}")
    return 0


def decided(lc, settings):
    """A curve scored offline, decided by the broker's rules (``consumer.rule``), with the
    PSPL-fit rule's statistic when that rule runs."""
    from followup import lightcurve as lcm
    from training.event_figure import add_pspl_statistic, decide_offline

    params = lcm.pspl_params_for(settings)
    if params is not None:
        add_pspl_statistic(lc, params)
    return decide_offline(lc, settings.consumer.rules)


def redis_curve(settings, object_id: int):
    """A live event from Redis; the threshold and smoothing of a trigger's record, else
    the broker's (consumer settings over the model card)."""
    from broker.consumer import redis_client
    from followup import lightcurve as lcm

    prefix = settings.redis.key_prefix
    d = lcm.event_dict(redis_client(settings), prefix, object_id)
    if d is None:
        raise lcm.LightCurveError(f"no event {object_id} in Redis (prefix {prefix!r}): never seen, or expired")
    # the model card's threshold when the model runs and no TD-CNN trigger brings its own
    tdcnn_fired = bool(d["trigger"]) and d["trigger"].get("rule", "tdcnn") == "tdcnn"
    rule = broker_rule(settings) if "tdcnn" in settings.consumer.rules and not tdcnn_fired else None
    return lcm.from_event_view(d, f"Redis {prefix!r}", rule, lcm.pspl_params_for(settings))


def broker_rule(settings, card: dict | None = None) -> dict:
    """The tdcnn decision the broker runs with these settings (``broker.triggers.tdcnn_rule``),
    as the figures take it: {threshold, smooth_window, min_points}."""
    from broker.triggers import tdcnn_rule

    if card is None:        # an event that has not fired: the threshold is the model card's
        card = _artifact(settings, None, "cpu").card
    r = tdcnn_rule(settings.consumer, card)
    return {"threshold": r.threshold, "smooth_window": r.smooth, "min_points": r.min_points}


def _artifact(settings, model, device):
    from training.artifact import load_artifact, resolve_device

    return load_artifact(Path(model) if model else settings.model.resolved, device=resolve_device(device))


def dataset_curve(path, object_id, settings, model=None, start_mjd=None, device="cpu"):
    """Event ``object_id`` (its event_id, the stream's diaObjectId) of a dataset, scored offline."""
    import numpy as np

    from followup import lightcurve as lcm
    from training import dataset as dataset_mod
    from training import event_figure
    from training.evaluate import event_probs

    ds = dataset_mod.load(path).magnitudes_only()
    if object_id is None:
        raise lcm.LightCurveError(f"{path}: give the event_id to draw (e.g. {int(ds.event_id[0])})")
    hit = np.flatnonzero(ds.event_id == object_id)
    if not len(hit):
        raise lcm.LightCurveError(f"{path}: no event with event_id {object_id} (ids {int(ds.event_id.min())}"
                                  f"..{int(ds.event_id.max())})")
    i = int(hit[0])
    art = _artifact(settings, model, device)
    (probs,) = event_probs(art, ds, [i])
    start = settings.replay.start_mjd if start_mjd is None else start_mjd
    return event_figure.dataset_curve(ds, i, probs, broker_rule(settings, art.card), start, Path(path).name)


def photometry_curve(path, object_id, settings, model=None, device="cpu"):
    """An archival light-curve file, scored offline; its id as `ulens replay --photometry`
    gives it unless ``object_id`` is given; its band the replay's (``replay.stream.BAND``)."""
    import numpy as np

    from replay.photometry_files import object_id_for, read_table
    from replay.stream import BAND
    from training.event_figure import offline
    from training.survey import BAND_NAMES

    t, mag, err, _ = read_table(path)
    art = _artifact(settings, model, device)
    # the band the broker stores for a replayed file: a v2 model reads it (one-hot)
    code = np.full(len(t), BAND_NAMES.index(BAND), dtype=np.uint8)
    probs = art.predict(art.inputs(t, mag, err, band=code)[None])[0]
    oid = object_id_for(path) if object_id is None else object_id
    return offline(oid, Path(path).name, t, mag, err, np.full(len(t), BAND, dtype=object), None, probs,
                   broker_rule(settings, art.card))
