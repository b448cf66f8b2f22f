"""`ulens evaluate`: score held-out events with a trained model; summary JSON and plots.

Held-out events only: when ``--data`` is the file the model was trained on (same
SHA-256 as the card's ``data.sha256``), the run's test split (``split.json``) is scored;
any other file is held out as a whole. ``--split all`` on the training file scores every
event and says so in the summary (``includes_training_events``).

Everything is measured with the one decision rule (:mod:`training.decision`) on the
event score = running maximum of the causal 5-point mean of P(binary):

* accuracy / precision / recall / F1 / confusion matrix at the card's threshold; ROC AUC
  and PR AUC of the event score (P(binary), never the winning class's confidence);
* PSPL vs detectable binaries (Δχ² >= 160): ROC AUC and recall at the card threshold
  (chosen on validation so that <= 5% of PSPL events fire);
* recall in Δχ² bins (<25, 25-160, 160-1000, >1000);
* early detection: the event score with data up to 10/25/50/67/83/100% of each light
  curve's points, and up to t0 - tE, t0 - tE/2, t0, t0 + tE/2. The model and the
  features are causal, so the per-point outputs of one run over the whole curve *are*
  the cut-and-rerun outputs (tests/unit/test_train_eval.py proves it on an event);
* decision time (first trigger) relative to t0, in days and in units of tE;
* a threshold sweep 0.5-0.99;
* decision time from the detectability onset (``onset``: the first visit at which the
  best PSPL fit to the visits so far has Δχ² >= 160, stored by ``ulens simulate``): for
  the binaries that have one, days and visits from the onset to the first trigger, the
  share triggered at all, before t0 + tE and before the onset; at the card's threshold
  and at the thresholds where 5% and 1% of the file's PSPL events fire (``matched``),
  with the completeness at purity 0.90 (PSPL vs onset binaries). BinML (Roman-like
  cadence) is the anchor: 89% within the season, median +5.0 d after onset,
  completeness 0.883 at purity 0.90.

Writes ``DIR/evaluation/evaluation_summary.json`` (or ``--output``) and PNGs (roc.png,
decision_time.png, recall_vs_dchi2.png, early_detection.png, and ``examples/``: a few
events drawn as ``ulens events plot`` draws them); ``--json`` prints the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HELP = ("evaluate a trained model (or the classical PSPL-fit rule, or both side by side: --rule) "
        "on held-out events (metrics JSON + plots)")

FRACTIONS = (0.10, 0.25, 0.50, 0.67, 0.83, 1.00)
TIME_CUTS = (("t0-tE", -1.0), ("t0-tE/2", -0.5), ("t0", 0.0), ("t0+tE/2", 0.5))
SWEEP = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


class EvaluateError(ValueError):
    """Bad evaluation input (the message names the problem)."""


def select_events(art_dir: Path, card: dict, data_path: Path, ds, split: str) -> tuple[np.ndarray, dict]:
    """Indices of the events to score and a description of the choice."""
    from training.train import file_sha256

    same = card.get("data", {}).get("sha256") == file_sha256(data_path)
    if not same:
        return np.arange(ds.n_events), {"split": "all", "data_is_training_file": False,
                                        "includes_training_events": False}
    if split == "all":
        return np.arange(ds.n_events), {"split": "all", "data_is_training_file": True,
                                        "includes_training_events": True}
    split_path = art_dir / "split.json"
    if not split_path.is_file():
        raise EvaluateError(f"{data_path} is the model's training file but {split_path} is missing: "
                            "cannot tell held-out events (use another dataset or --split all)")
    try:
        ids = np.asarray(json.loads(split_path.read_text())["test"], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as exc:
        raise EvaluateError(f"{split_path}: unreadable split ({exc})") from None
    idx = np.flatnonzero(np.isin(ds.event_id, ids))
    if len(idx) != len(ids):
        raise EvaluateError(f"{split_path}: {len(ids) - len(idx)} test event ids are not in {data_path}")
    return idx, {"split": "test", "data_is_training_file": True, "includes_training_events": False}


def event_probs(art, ds, events, pspl_d=None) -> list[np.ndarray]:
    """P(binary) per point over each whole light curve (one causal run per event).
    ``pspl_d``: the events' PSPL-fit statistics for a v3 model (computed here, with the
    card's parameters, when not given)."""
    if art.needs_pspl_d and pspl_d is None:
        from training.evaluate_rules import pspl_fit_stats

        pspl_d, _ = pspl_fit_stats(ds, events, art.pspl_params, workers=os.cpu_count() or 1)
    inputs = [art.inputs(*ds.event(int(i)), band=ds.event_band(int(i)),
                         pspl_d=None if pspl_d is None else pspl_d[k]) for k, i in enumerate(events)]
    return art.predict_curves(inputs, batch_size=128)


def cut_and_rerun_score(art, time, mag, mag_err, n_points: int, band=None) -> float:
    """Event score from a fresh run on the first ``n_points`` points only (the slow way)."""
    from training import decision

    dec = art.decision
    if n_points <= 0:
        return float("-inf")
    x = art.inputs(time[:n_points], mag[:n_points], mag_err[:n_points],
                   band=None if band is None else band[:n_points])
    p = art.predict(x[None])[0]
    return decision.event_score(p, dec["min_points"], dec["smooth_window"])


def _stats(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0}
    q = np.percentile(v, [10, 25, 50, 75, 90])
    return {"n": int(len(v)), "mean": float(v.mean()), "p10": float(q[0]), "p25": float(q[1]),
            "median": float(q[2]), "p75": float(q[3]), "p90": float(q[4])}


def summarize(name: str, ds, events, running: list, thr: float, early_detection: bool = True,
              sweep=SWEEP) -> dict:
    """The evaluation figures of one rule from its per-point running event score (the
    TD-CNN's and the PSPL-fit rule's alike): classification, ROC, PSPL vs detectable
    binaries, recall by Δχ², decision time, a threshold sweep and early detection. The
    arrays behind the plots are under ``_arrays`` (not for the JSON)."""
    from training import metrics

    labels = ds.label[events].astype(int)
    dchi2 = ds.params["dchi2"][events]
    t0, tE = ds.params["t0"][events], ds.params["tE"][events]
    scores = np.array([r[-1] if len(r) else -np.inf for r in running])
    det = metrics.detectable_mask(labels, dchi2)
    bin_det = det & (labels == 1)
    s: dict = {"rule": name, "threshold": float(thr), "n_events": int(len(events)),
               "n_pspl": int((labels == 0).sum()), "n_binary": int((labels == 1).sum())}
    s["classification"] = metrics.classification(labels, scores, thr)
    s["roc_auc"] = metrics.roc_auc(labels, scores)
    s["pr_auc"] = metrics.pr_auc(labels, scores)
    s["detectable"] = {
        "dchi2_min": metrics.DETECTABLE_DCHI2, "n_binary": int(bin_det.sum()),
        "roc_auc": metrics.roc_auc(labels[det], scores[det]),
        "recall_at_threshold": float((scores[bin_det] >= thr).mean()) if bin_det.any() else None,
        "pspl_firing_rate": float((scores[labels == 0] >= thr).mean()) if (labels == 0).any() else None}
    from training import decision
    if (labels == 0).any() and bin_det.any():
        for rate in (0.05, 0.01):
            th = decision.threshold_for_false_rate(scores[labels == 0], rate)
            s["detectable"][f"recall_at_{int(rate * 100)}pct_test_pspl_firing"] = \
                float((scores[bin_det] >= th).mean())
    s["binary_dchi2_fractions"] = {
        "below_25": float(np.mean(dchi2[labels == 1] < 25)) if (labels == 1).any() else None,
        "below_160": float(np.mean(dchi2[labels == 1] < 160)) if (labels == 1).any() else None}
    s["recall_by_dchi2"] = metrics.recall_by_dchi2(labels, scores, dchi2, thr)
    dt_days = _decision_days(ds, events, running, thr, t0)
    s["decision_time"] = {
        "binary_detectable_days": _stats(dt_days[bin_det]), "binary_detectable_tE": _stats((dt_days / tE)[bin_det]),
        "binary_all_tE": _stats((dt_days / tE)[labels == 1]),
        "pspl_false_trigger_tE": _stats((dt_days / tE)[labels == 0]),
        "fraction_detectable_fired_before_t0": float(np.mean(np.nan_to_num(dt_days[bin_det], nan=np.inf) < 0))
        if bin_det.any() else None}
    rows = []
    for th in sorted(set(sweep) | {round(float(thr), 6)}):
        c = metrics.classification(labels, scores, th)
        d = _decision_days(ds, events, running, th, t0)
        fd = (d / tE)[bin_det]
        fd = fd[np.isfinite(fd)]
        rows.append({"threshold": th, "precision": c["precision"], "recall": c["recall"], "f1": c["f1"],
                     "pspl_firing_rate": c["pspl_firing_rate"],
                     "recall_detectable": float((scores[bin_det] >= th).mean()) if bin_det.any() else None,
                     "median_decision_time_tE_detectable": float(np.median(fd)) if len(fd) else None})
    s["threshold_sweep"] = rows
    s["onset"] = onset_figures(ds, events, running, thr)
    s["matched"] = matched_rate_figures(ds, events, running, scores, labels)
    if early_detection:
        s["early_detection"] = _early(ds, events, running, thr, labels, det, bin_det, t0, tE)
    s["_arrays"] = {"labels": labels, "scores": scores, "det": det, "bin_det": bin_det,
                    "dt_tE": dt_days / tE, "dchi2": dchi2}
    return s


PURITY_GOAL = 0.90
MATCHED_RATES = (0.05, 0.01)


def _first_trigger_times(ds, events, running, thr) -> tuple[np.ndarray, np.ndarray]:
    """(time, index) of each event's first trigger at ``thr``: NaN and -1 where none."""
    from training.decision import first_crossing

    times, idx = np.full(len(events), np.nan), np.full(len(events), -1)
    for k, (i, r) in enumerate(zip(events, running)):
        j = first_crossing(r, thr)
        if j is not None:
            times[k], idx[k] = ds.event(int(i))[0][j], j
    return times, idx


def onset_figures(ds, events, running, thr) -> dict:
    """Decision time of the binaries with a detectability onset, counted from it.

    Visits are counted on the points the rule saw (the file's, magnitudes only): the
    onset visit is the first point at or after the onset time. A trigger before the
    onset is kept with a negative delay (a lucky or a false call: nothing a causal rule
    could have known yet); ``fraction_before_onset`` says how many."""
    onset = ds.params["onset"][events]
    labels = ds.label[events]
    has = (labels == 1) & np.isfinite(onset)
    out: dict = {"n_binary_with_onset": int(has.sum()), "threshold": float(thr)}
    if not has.any():
        return out
    trig_t, trig_j = _first_trigger_times(ds, events, running, thr)
    t0, tE = ds.params["t0"][events], ds.params["tE"][events]
    days, visits = [], []
    for k in np.flatnonzero(has & (trig_j >= 0)):
        t = ds.event(int(events[k]))[0]
        days.append(trig_t[k] - onset[k])
        visits.append(int(trig_j[k]) - int(np.searchsorted(t, onset[k], side="left")))
    days, visits = np.array(days, float), np.array(visits, float)
    fired = has & (trig_j >= 0)
    out.update({
        "fraction_triggered": float(fired[has].mean()),
        "fraction_triggered_before_t0_plus_tE": float(np.mean(
            np.nan_to_num(trig_t[has], nan=np.inf) < (t0 + tE)[has])),
        "fraction_before_onset": float(np.mean(days < 0)) if len(days) else None,
        "delay_days": _stats(days), "delay_visits": _stats(visits),
        "median_delay_days": float(np.median(days)) if len(days) else None,
        "median_delay_visits": float(np.median(visits)) if len(visits) else None})
    return out


def completeness_at_purity(labels, scores, positive, purity: float = PURITY_GOAL) -> dict:
    """Highest completeness (share of ``positive`` events fired) over thresholds at which
    purity = fired positives / (fired positives + fired PSPL) >= ``purity``; the class mix
    is the file's."""
    neg = np.sort(scores[labels == 0])[::-1]
    pos = np.sort(scores[positive])[::-1]
    if not len(pos) or not len(neg):
        return {"purity": purity, "completeness": None, "threshold": None}
    best = (0.0, None)
    for th in np.unique(np.concatenate([pos[np.isfinite(pos)], [np.inf]])):
        tp = len(pos) - np.searchsorted(pos[::-1], th, side="left")
        fp = len(neg) - np.searchsorted(neg[::-1], th, side="left")
        if tp and tp / (tp + fp) >= purity and tp / len(pos) > best[0]:
            best = (tp / len(pos), float(th))
    return {"purity": purity, "completeness": best[0], "threshold": best[1]}


def matched_rate_figures(ds, events, running, scores, labels) -> dict:
    """The rule at the thresholds where 5% and 1% of this file's PSPL events fire (a
    matched-rate comparison between rules: the thresholds are fitted on these PSPL
    events): recall on detectable binaries and the onset figures; and the completeness
    at purity 0.90 on PSPL vs the binaries with an onset."""
    from training import decision, metrics

    det = metrics.detectable_mask(labels, ds.params["dchi2"][events]) & (labels == 1)
    on = (labels == 1) & np.isfinite(ds.params["onset"][events])
    out: dict = {"completeness_at_purity": completeness_at_purity(labels, scores, on)}
    if not (labels == 0).any():
        return out
    for rate in MATCHED_RATES:
        th = decision.threshold_for_false_rate(scores[labels == 0], rate)
        o = onset_figures(ds, events, running, th)
        out[f"pspl_{int(rate * 100)}pct"] = {
            "threshold": float(th), "pspl_firing_rate": float((scores[labels == 0] >= th).mean()),
            "recall_detectable": float((scores[det] >= th).mean()) if det.any() else None,
            "onset": o}
    return out


def _decision_days(ds, events, running, thr, t0) -> np.ndarray:
    """Days from t0 to each event's first trigger at ``thr`` (NaN: none)."""
    return _first_trigger_times(ds, events, running, thr)[0] - t0


def _early(ds, events, running, thr, labels, det, bin_det, t0, tE) -> list[dict]:
    from training import metrics

    rows = []
    cuts = [(f"{int(round(f * 100))}%", lambda n, k, f=f: int(np.ceil(f * n))) for f in FRACTIONS]
    cuts += [(name, lambda n, k, c=c: int(np.searchsorted(ds.event(int(events[k]))[0],
                                                           t0[k] + c * tE[k], side="right")))
             for name, c in TIME_CUTS]
    for name, cut in cuts:
        s = np.empty(len(events))
        for k, r in enumerate(running):
            n = cut(len(r), k)
            s[k] = r[n - 1] if n >= 1 else -np.inf
        fired = s >= thr
        rows.append({"cut": name, "roc_auc": metrics.roc_auc(labels, s),
                     "roc_auc_detectable": metrics.roc_auc(labels[det], s[det]),
                     "recall_detectable": float(fired[bin_det].mean()) if bin_det.any() else None,
                     "recall": float(fired[labels == 1].mean()) if (labels == 1).any() else None,
                     "pspl_firing_rate": float(fired[labels == 0].mean()) if (labels == 0).any() else None})
    return rows



def evaluate(model_dir, data, split: str = "test", early_detection: bool = True,
             device: str = "cpu", plots: bool = True, output=None) -> dict:
    """Score held-out events; write ``output`` (default ``model_dir/evaluation``); return the summary."""
    from training import dataset as dataset_mod
    from training import decision
    from training.artifact import load_artifact

    model_dir, data_path = Path(model_dir), Path(data)
    art = load_artifact(model_dir, device=device)  # ArtifactError names the file (no TF32 on cuda)
    # the TD-CNN reads magnitudes: a visit that measured no flux (a faint band) has none
    ds = dataset_mod.load(data_path).magnitudes_only()               # DatasetError names the file
    events, chosen = select_events(model_dir, art.card, data_path, ds, split)
    if len(events) == 0:
        raise EvaluateError(f"{data_path}: no events to evaluate")
    dec, thr = art.decision, art.threshold
    mp, sm = dec["min_points"], dec["smooth_window"]
    running = [decision.running_score(p, mp, sm) for p in event_probs(art, ds, events)]
    s = summarize("tdcnn", ds, events, running, thr, early_detection)
    summary: dict = {
        "model": {"dir": str(model_dir), "version": art.version, "threshold": thr, "decision": dec},
        "data": {"path": str(data_path), "n_events": int(ds.n_events), "meta": ds.meta, **chosen},
        "score": "event score = max over points (>= min_points seen) of the causal "
                 f"{sm}-point mean of P(binary)",
        **{k: v for k, v in s.items() if k not in ("rule", "threshold")}}
    a = summary.pop("_arrays")
    out = Path(output) if output is not None else model_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    summary["output"] = str(out)
    if plots:
        from training.event_figure import example_figures

        summary["plots"] = _plots(out, a, thr, summary.get("early_detection"))
        # a few events drawn as `ulens events plot` draws them (early and missed binaries,
        # false and quiet PSPL)
        summary["examples"] = example_figures(art, ds, events, running, thr, out / "examples")
    (out / "evaluation_summary.json").write_text(json.dumps(summary, indent=2, default=_json) + "\n")
    return summary


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def _plots(out: Path, arrays: dict, thr, early) -> list[str]:
    """roc.png, decision_time.png, recall_vs_dchi2.png (and early_detection.png) from the
    ``_arrays`` of :func:`summarize`."""
    labels, scores, det, bin_det, dt_tE, dchi2 = (arrays[k] for k in (
        "labels", "scores", "det", "bin_det", "dt_tE", "dchi2"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = []
    s = np.where(np.isfinite(scores), scores, -1.0)
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, sel in (("all binaries", np.ones_like(det)), ("Δχ² ≥ 160", det)):
        if len(np.unique(labels[sel])) == 2:
            fpr, tpr, _ = roc_curve(labels[sel], s[sel])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.axvline(0.05, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="PSPL firing rate (FPR)", ylabel="binary recall (TPR)", title="ROC of the event score")
    ax.legend(loc="lower right")
    files.append(_save(fig, out / "roc.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    v = dt_tE[bin_det & np.isfinite(dt_tE)]
    if len(v):
        ax.hist(np.clip(v, -3, 3), bins=40)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="first trigger − t0 [tE] (clipped to ±3)", ylabel="binaries (Δχ² ≥ 160)",
           title=f"Decision time at threshold {thr:.3f}")
    files.append(_save(fig, out / "decision_time.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    b = labels == 1
    d = dchi2[b]
    edges = np.logspace(0, 5, 21)
    centres, rec = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (d >= lo) & (d < hi)
        if sel.sum() >= 3:
            centres.append(np.sqrt(lo * hi))
            rec.append(np.mean(scores[b][sel] >= thr))
    ax.semilogx(centres, rec, "o-")
    ax.axvline(160, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="Δχ² (best PSPL fit to the binary)", ylabel="recall at threshold", ylim=(0, 1.02),
           title="Recall vs detectability")
    files.append(_save(fig, out / "recall_vs_dchi2.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    if early:
        n_frac = len(FRACTIONS)
        for ax, rows, xlabel in ((axes[0], early[:n_frac], "share of each light curve's points seen"),
                                 (axes[1], early[n_frac:], "data up to")):
            names = [r["cut"] for r in rows]
            ax.plot(names, [r["recall_detectable"] for r in rows], "o-", label="recall Δχ² ≥ 160")
            ax.plot(names, [r["recall"] for r in rows], "s-", label="recall all binaries")
            ax.plot(names, [r["pspl_firing_rate"] for r in rows], "^-", label="PSPL firing rate")
            ax.plot(names, [r["roc_auc_detectable"] for r in rows], "d--", label="AUC Δχ² ≥ 160")
            ax.set(xlabel=xlabel, ylim=(0, 1.02))
        axes[0].legend(fontsize=8)
    fig.suptitle(f"Early detection (threshold {thr:.3f})")
    files.append(_save(fig, out / "early_detection.png"))
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model artifact / training run folder (required for --rule tdcnn and both)")
    p.add_argument("--rule", choices=("tdcnn", "pspl-fit", "both"), default="tdcnn",
                   help="tdcnn: the model; pspl-fit: the classical PSPL-fit rule (consumer.pspl_fit of "
                        "the config); both: side by side at equal PSPL firing rate "
                        "(training/evaluate_rules.py)")
    p.add_argument("--pspl-threshold", type=float, default=None, metavar="D",
                   help="pspl-fit threshold (default: consumer.pspl_fit.threshold)")
    p.add_argument("--false-rate", type=float, default=0.05, metavar="R",
                   help="--rule both: share of PSPL events allowed to fire, for each rule's threshold")
    p.add_argument("--data", required=True, metavar="FILE", help="dataset .npz")
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help="on the training file: its test split, or all events")
    p.add_argument("--early-detection", action="store_true", help="also measure early detection")
    p.add_argument("--json", action="store_true", help="print the summary JSON")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="folder for the summary and plots (default: MODEL/evaluation)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the model runs")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")


def run(args) -> int:
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    if args.rule != "tdcnn":
        from training import evaluate_rules

        return evaluate_rules.run(args)
    if args.model is None:
        raise EvaluateError("--model is required with --rule tdcnn")
    from training.artifact import resolve_device

    s = evaluate(args.model, args.data, split=args.split, early_detection=args.early_detection,
                 device=str(resolve_device(args.device)), output=args.output)
    if args.json:
        print(json.dumps(s, indent=2, default=_json))
    else:
        d = s["detectable"]
        c = s["classification"]
        print(f"{s['n_events']} events ({s['data']['split']}): ROC AUC {_f(s['roc_auc'])}, "
              f"PR AUC {_f(s['pr_auc'])}; at threshold {c['threshold']:.4f}: accuracy {c['accuracy']:.3f}, "
              f"precision {c['precision']:.3f}, recall {c['recall']:.3f}, F1 {c['f1']:.3f}")
        print(f"PSPL vs Δχ² >= 160 binaries ({d['n_binary']}): ROC AUC {_f(d['roc_auc'])}, recall "
              f"{_f(d['recall_at_threshold'])} at PSPL firing rate {_f(d['pspl_firing_rate'])}")
        print(render_onset(s))
        print(f"wrote {s['output']}", file=sys.stderr)
    return 0


def render_onset(s: dict) -> str:
    """The onset-based lines of the text output (also the report's)."""
    o = s["onset"]
    if not o.get("n_binary_with_onset"):
        return "decision time from the onset: no binary of this file has a detectability onset"
    lines = [f"decision time from the detectability onset ({o['n_binary_with_onset']} binaries with one), "
             f"at the card threshold: triggered {o['fraction_triggered']:.3f}, by t0 + tE "
             f"{o['fraction_triggered_before_t0_plus_tE']:.3f}, median delay "
             f"{_f(o['median_delay_days'])} d / {_f(o['median_delay_visits'])} visits "
             f"(before the onset: {_f(o['fraction_before_onset'])})"]
    for key, m in s["matched"].items():
        if key.startswith("pspl_"):
            mo = m["onset"]
            lines.append(f"  at {m['pspl_firing_rate']:.3f} PSPL firing (threshold {m['threshold']:.4f}): recall "
                         f"Δχ² >= 160 {_f(m['recall_detectable'])}, triggered {_f(mo.get('fraction_triggered'))}, "
                         f"median delay {_f(mo.get('median_delay_days'))} d")
    c = s["matched"]["completeness_at_purity"]
    lines.append(f"  completeness at purity {c['purity']:.2f}: {_f(c['completeness'])}")
    return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
