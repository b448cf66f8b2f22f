"""Offline evaluation of the decision rules on a dataset, alone or side by side.

``ulens evaluate --rule pspl-fit --data FILE``: the classical rule
(:mod:`training.psplfit`, parameters from the config's ``consumer.pspl_fit``, the same
function the broker runs point by point) over every event of the file, with the same
summary figures as the TD-CNN's evaluation: ROC on the rule's event score (the largest
statistic D where firing is allowed), recall in Δχ² bins, PSPL vs detectable binaries,
decision time, a threshold sweep and (``--early-detection``) the score with data up to
10..100% of each light curve and up to t0 - tE .. t0 + tE/2. The rule is causal (each
point's D uses points 1..n only), so the running maximum of D over one pass *is* the
cut-and-rerun score.

``ulens evaluate --rule both --model DIR --data FILE``: both rules on the same events,
each at the threshold where the same share of PSPL events fires (``--false-rate``,
default 5%, thresholds fitted on this file's PSPL events: a matched-rate comparison, not
a held-out threshold), and at their configured thresholds; completeness (all binaries
and Δχ² >= 160), decision time, the paired decision times of the binaries both rules
trigger, early detection, CPU time per point, and the plot
``completeness_vs_decision_time.png`` (share of the binaries triggered by t0 + x tE).

Per-point statistics are cached in the output folder (``pspl_fit_stats.npz``, keyed
by the data file's SHA-256 and the rule's parameter version) so that sweeps and
comparisons do not refit.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np

from training import psplfit
from training.evaluate import EvaluateError, _json, _plots, _save, summarize

PSPL_SWEEP = (20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0, 250.0, 500.0, 1000.0)
DT_GRID_TE = np.linspace(-2.0, 3.0, 101)


def params_from_config(config_path=None, threshold: Optional[float] = None) -> psplfit.Params:
    """The broker's pspl-fit parameters (``consumer.pspl_fit`` of the config)."""
    from dataclasses import asdict

    import config as cfg

    kw = asdict(cfg.load(config_path).consumer.pspl_fit)
    if threshold is not None:
        kw["threshold"] = float(threshold)
        kw["refit_level"] = min(kw["refit_level"], float(threshold))
    return psplfit.Params(**kw)


# --------------------------------------------------------------------------- scores
def event_curve(ds, i: int) -> tuple:
    """The rule's input for event ``i``: (time, mag, mag_err, band) with the dataset's band
    codes (the fit has per-band fluxes), (time, mag, mag_err) when it has none."""
    if getattr(ds, "band", None) is None:
        return ds.event(i)
    return (*ds.event(i), ds.event_band(i))


def _stats_chunk(args) -> tuple[list[np.ndarray], float]:
    curves, params = args
    t0 = time.process_time()
    return psplfit.run_curves(curves, params), time.process_time() - t0


def pspl_fit_stats(ds, events, params: psplfit.Params, cache: Optional[Path] = None,
                   data_sha: str = "", workers: int = 1,
                   progress: bool = False, chunk: int = 256) -> tuple[list[np.ndarray], float]:
    """D at every point of the events (and the CPU seconds it took, summed over ``workers``
    processes; 0 when cached). Each event's D depends on its own points only (the fit is
    per event, psplfit's determinism note), so how events are split between processes
    does not change them."""
    key = f"{data_sha}|{params.version}|{','.join(map(str, np.asarray(events).tolist()))}"
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                off, flat = z["offsets"], z["stats"]   # each z[...] reads the file again: once
                return [flat[off[i]:off[i + 1]].copy() for i in range(len(off) - 1)], float(z["cpu_s"])
    curves = [event_curve(ds, int(i)) for i in events]
    jobs = [(curves[c:c + chunk], params) for c in range(0, len(curves), chunk)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(curves), desc="pspl-fit D", unit="event", file=sys.stderr)
    stats: list[np.ndarray] = []
    cpu = 0.0
    parallel = workers > 1 and len(jobs) > 1
    with (ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("fork"))
          if parallel else nullcontext()) as pool:
        for part, c in (pool.map if parallel else map)(_stats_chunk, jobs):
            stats.extend(part)
            cpu += c
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lens = np.array([len(s) for s in stats])
        np.savez(cache, key=key, stats=np.concatenate(stats) if stats else np.zeros(0),
                 offsets=np.concatenate([[0], np.cumsum(lens)]), cpu_s=cpu)
    return stats, cpu


def tdcnn_running(art, ds, events, pspl_d=None) -> tuple[list[np.ndarray], float]:
    """The TD-CNN's running event score per point (decision.running_score); ``pspl_d``:
    the events' PSPL-fit statistics for a v3 model (the CPU time then excludes them)."""
    from training import decision
    from training.evaluate import event_probs

    t0 = time.process_time()
    probs = event_probs(art, ds, events, pspl_d)
    cpu = time.process_time() - t0
    dec = art.decision
    return [decision.running_score(p, dec["min_points"], dec["smooth_window"]) for p in probs], cpu


def public(s: dict) -> dict:
    return {k: v for k, v in s.items() if not k.startswith("_")}


def completeness_curve(summary: dict, which: str = "bin_det") -> np.ndarray:
    """Share of the binaries (``bin_det``: Δχ² >= 160; ``binary``: all) triggered by
    t0 + x tE, for x in DT_GRID_TE."""
    a = summary["_arrays"]
    sel = a["bin_det"] if which == "bin_det" else a["labels"] == 1
    dt = np.nan_to_num(a["dt_tE"][sel], nan=np.inf)
    if not len(dt):
        return np.zeros_like(DT_GRID_TE)
    return np.array([(dt <= x).mean() for x in DT_GRID_TE])


# --------------------------------------------------------------------------- commands
def evaluate_pspl_fit(data, params: psplfit.Params, output, early_detection: bool = True,
                      plots: bool = True) -> dict:
    from training import dataset as dataset_mod
    from training.train import file_sha256

    data_path = Path(data)
    ds = dataset_mod.load(data_path).magnitudes_only()   # the rule reads magnitudes
    events = np.arange(ds.n_events)
    if not len(events):
        raise EvaluateError(f"{data_path}: no events to evaluate")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stats, cpu = pspl_fit_stats(ds, events, params, out / "pspl_fit_stats.npz", file_sha256(data_path))
    running = [psplfit.running_score(x) for x in stats]
    s = summarize(psplfit.RULE, ds, events, running, params.threshold, early_detection,
                  sweep=PSPL_SWEEP)
    n_points = int(sum(len(x) for x in stats))
    summary = {"rule": psplfit.RULE, "params": {**params.__dict__, "version": params.version},
               "data": {"path": str(data_path), "n_events": int(ds.n_events), "meta": ds.meta,
                        "split": "all"},
               "score": "event score = max over points (>= min_points, event active) of the PSPL-fit "
                        "statistic D (training/psplfit.py)",
               "cpu": {"points": n_points, "seconds": cpu, "us_per_point": 1e6 * cpu / max(n_points, 1)
                       if cpu else None},
               **{k: v for k, v in public(s).items() if k != "rule"}, "output": str(out)}
    if plots:
        summary["plots"] = _plots(out, s["_arrays"], params.threshold, summary.get("early_detection"))
    (out / "evaluation_summary.json").write_text(json.dumps(summary, indent=2, default=_json) + "\n")
    return summary


def compare(model_dir, data, params: psplfit.Params, output, rate: float = 0.05,
            device: str = "cpu", early_detection: bool = True, plots: bool = True) -> dict:
    """Both rules on the same events, at equal PSPL firing rate and at their own thresholds."""
    from training import dataset as dataset_mod
    from training import decision
    from training.artifact import load_artifact
    from training.evaluate import select_events
    from training.train import file_sha256

    model_dir, data_path = Path(model_dir), Path(data)
    art = load_artifact(model_dir, device=device)
    ds = dataset_mod.load(data_path).magnitudes_only()   # the rule reads magnitudes
    events, chosen = select_events(model_dir, art.card, data_path, ds, "test")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stats, cpu_pf = pspl_fit_stats(ds, events, params, out / "pspl_fit_stats.npz", file_sha256(data_path),
                                   workers=os.cpu_count() or 1)
    # a v3 model reads the rule's own D when it was trained with the rule's parameters
    shared = art.needs_pspl_d and art.pspl_params.version == params.version
    run_td, cpu_td = tdcnn_running(art, ds, events, stats if shared else None)
    run_pf = [psplfit.running_score(x) for x in stats]
    labels = ds.label[events].astype(int)
    n_points = int(sum(len(x) for x in stats))
    result: dict = {"data": {"path": str(data_path), "n_events": int(len(events)), **chosen,
                             "seed": ds.meta.get("seed"), "parameter_set": ds.meta.get("parameter_set")},
                    "false_rate": rate, "rules": {}, "model": {"dir": str(model_dir), "version": art.version},
                    "pspl_fit_params": {**params.__dict__, "version": params.version}}
    curves, matched_all = {}, {}
    for name, running, own_thr, cpu in (("tdcnn", run_td, art.threshold, cpu_td),
                                        (psplfit.RULE, run_pf, params.threshold, cpu_pf)):
        scores = np.array([r[-1] if len(r) else -np.inf for r in running])
        thr = decision.threshold_for_false_rate(scores[labels == 0], rate)
        matched = summarize(name, ds, events, running, thr, early_detection)
        own = summarize(name, ds, events, running, own_thr, early_detection=False)
        curves[name] = (completeness_curve(matched), completeness_curve(matched, "binary"))
        matched_all[name] = matched
        result["rules"][name] = {
            "matched_rate": _headline(matched), "own_threshold": _headline(own),
            "cpu_us_per_point": 1e6 * cpu / max(n_points, 1) if cpu else None,
            "cpu_note": ("full-curve batched forward pass offline (not the broker's cost per alert)"
                         if name == "tdcnn" else "the broker's per-point function, run offline"),
            "at_pspl_rates": matched["matched"],
            "detail_matched_rate": public(matched)}
    result["either"] = either_rule(ds, events, run_td, run_pf)
    result["paired_decision_time"] = paired(ds, events, matched_all)
    result["completeness_vs_decision_time"] = {
        "x_tE": DT_GRID_TE.tolist(),
        **{name: {"detectable": c[0].tolist(), "all_binaries": c[1].tolist()} for name, c in curves.items()}}
    if plots:
        result["plots"] = [plot_completeness(out / "completeness_vs_decision_time.png", curves, rate)]
    (out / "comparison.json").write_text(json.dumps(result, indent=2, default=_json) + "\n")
    return result


def either_rule(ds, events, run_td, run_pf, rates=(0.05, 0.01)) -> dict:
    """The two rules together (``consumer.rule: both``): an event is called binary at the
    first trigger of either, at the pair of thresholds that finds the most detectable
    binaries while at most ``rate`` of the PSPL events fire (either rule counts). The pair
    is searched over every split of the allowed PSPL triggers between the rules (thresholds
    fitted on these events: a matched-rate figure, as the others)."""
    from training import decision, metrics
    from training.evaluate import completeness_at_purity, onset_figures

    labels = ds.label[events].astype(int)
    det = metrics.detectable_mask(labels, ds.params["dchi2"][events]) & (labels == 1)
    s_td = np.array([r[-1] if len(r) else -np.inf for r in run_td])
    s_pf = np.array([r[-1] if len(r) else -np.inf for r in run_pf])
    neg_td = np.sort(s_td[labels == 0])[::-1]
    n_neg = int((labels == 0).sum())
    out: dict = {}
    for rate in rates:
        allowed = int(np.floor(rate * n_neg))
        best = None
        for k in range(allowed + 1):           # the TD-CNN may fire on its k highest PSPL
            th_td = decision.threshold_for_false_rate(neg_td, k / n_neg) if k < n_neg else -np.inf
            fired_td = s_td >= th_td
            # the pspl-fit threshold: lowest with at most `allowed` PSPL firing in the union
            cand = np.sort(s_pf[(labels == 0) & ~fired_td])[::-1]
            room = allowed - int((fired_td & (labels == 0)).sum())
            if room < 0:
                continue
            th_pf = float(np.nextafter(cand[room], np.inf)) if room < len(cand) else -np.inf
            fired = fired_td | (s_pf >= th_pf)
            rec = float(fired[det].mean()) if det.any() else 0.0
            if best is None or rec > best[0]:
                best = (rec, th_td, th_pf)
        rec, th_td, th_pf = best
        # the union's running score: an event's first trigger is the earlier rule's
        running = [np.maximum(np.where(a >= th_td, 1.0, 0.0), np.where(b >= th_pf, 1.0, 0.0))
                   for a, b in zip(run_td, run_pf)]
        fired = np.array([r[-1] >= 1.0 if len(r) else False for r in running])
        out[f"pspl_{int(rate * 100)}pct"] = {
            "tdcnn_threshold": float(th_td), "pspl_fit_threshold": float(th_pf),
            "pspl_firing_rate": float(fired[labels == 0].mean()), "recall_detectable": rec,
            "onset": onset_figures(ds, events, running, 1.0)}
    # purity / completeness of the union at the last (1%) pair: its events fired or not
    on = (labels == 1) & np.isfinite(ds.params["onset"][events])
    out["completeness_at_purity_at_1pct_pair"] = completeness_at_purity(labels, fired.astype(float), on)
    return out


def paired(ds, events, matched: dict) -> dict:
    """Decision times of the binaries (Δχ² >= 160) that both rules trigger, at the matched
    rate: pspl-fit minus tdcnn (a positive value: the TD-CNN decided earlier)."""
    a, b = matched["tdcnn"]["_arrays"], matched[psplfit.RULE]["_arrays"]
    det = a["bin_det"]
    tE = ds.params["tE"][events]
    ta, tb = a["dt_tE"] * tE, b["dt_tE"] * tE
    both = det & np.isfinite(ta) & np.isfinite(tb)
    d = (tb - ta)[both]
    share = (lambda m: float(np.mean(m)) if len(d) else None)  # noqa: E731
    return {"n_detectable": int(det.sum()), "n_both": int(both.sum()),
            "only_tdcnn": int((det & np.isfinite(ta) & ~np.isfinite(tb)).sum()),
            "only_pspl_fit": int((det & ~np.isfinite(ta) & np.isfinite(tb)).sum()),
            "median_pspl_fit_minus_tdcnn_days": float(np.median(d)) if len(d) else None,
            "median_pspl_fit_minus_tdcnn_tE": float(np.median(d / tE[both])) if len(d) else None,
            "share_tdcnn_earlier": share(d > 0), "share_same_point": share(d == 0),
            "share_pspl_fit_earlier": share(d < 0)}


def _headline(s: dict) -> dict:
    d = s["decision_time"]
    c = s["classification"]
    return {"threshold": s["threshold"], "pspl_firing_rate": c["pspl_firing_rate"],
            "completeness_all": c["recall"], "completeness_detectable": s["detectable"]["recall_at_threshold"],
            "purity": c["precision"], "roc_auc": s["roc_auc"], "roc_auc_detectable": s["detectable"]["roc_auc"],
            "median_decision_days_detectable": d["binary_detectable_days"].get("median"),
            "median_decision_tE_detectable": d["binary_detectable_tE"].get("median"),
            "fraction_detectable_fired_before_t0": d["fraction_detectable_fired_before_t0"],
            "onset": s["onset"], "recall_by_dchi2": s["recall_by_dchi2"]}


def plot_completeness(path: Path, curves: dict, rate: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (det, allb) in curves.items():
        line, = ax.plot(DT_GRID_TE, det, label=f"{name}: Δχ² ≥ 160")
        ax.plot(DT_GRID_TE, allb, ls="--", color=line.get_color(), label=f"{name}: all binaries")
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="decision time − t0 [t_E]", ylabel="share of binaries triggered by then",
           ylim=(0, 1.02), title=f"Completeness against decision time ({rate:.0%} of PSPL events fire)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def run(args) -> int:
    """`ulens evaluate --rule pspl-fit|both` (called from training.evaluate.run)."""
    params = params_from_config(args.config, args.pspl_threshold)
    if args.rule == psplfit.RULE:
        out = args.output or str(Path("results") / f"pspl-fit_{Path(args.data).stem}")
        s = evaluate_pspl_fit(args.data, params, out, early_detection=args.early_detection)
        if args.json:
            print(json.dumps(s, indent=2, default=_json))
        else:
            d, c = s["detectable"], s["classification"]
            print(f"pspl-fit {params.version}: {s['n_events']} events: ROC AUC {_f(s['roc_auc'])}; at "
                  f"threshold {c['threshold']:.1f}: precision {c['precision']:.3f}, recall {c['recall']:.3f}, "
                  f"PSPL firing {c['pspl_firing_rate']:.3f}")
            print(f"PSPL vs Δχ² >= 160 binaries ({d['n_binary']}): ROC AUC {_f(d['roc_auc'])}, recall "
                  f"{_f(d['recall_at_threshold'])}; CPU {_f(s['cpu']['us_per_point'], '.0f')} µs/point")
            print(f"wrote {s['output']}", file=sys.stderr)
        return 0
    if args.model is None:
        raise EvaluateError("--rule both needs --model (the TD-CNN artifact)")
    from training.artifact import resolve_device

    out = args.output or str(Path("results") / f"compare_{Path(args.data).stem}")
    r = compare(args.model, args.data, params, out, rate=args.false_rate,
                device=str(resolve_device(args.device)), early_detection=args.early_detection)
    if args.json:
        print(json.dumps(r, indent=2, default=_json))
    else:
        print(render_comparison(r))
        print(f"wrote {out}/comparison.json", file=sys.stderr)
    return 0


def render_comparison(r: dict) -> str:
    lines = [f"{r['data']['n_events']} events of {r['data']['path']}; thresholds at "
             f"{r['false_rate']:.0%} PSPL firing (fitted on these PSPL events) and each rule's own",
             f"{'rule':<10}{'threshold':>11}{'PSPL fire':>10}{'compl. all':>11}{'Δχ²≥160':>9}"
             f"{'AUC≥160':>9}{'med dt [d]':>11}{'med dt [tE]':>12}{'µs/pt':>8}"]
    for name, d in r["rules"].items():
        for tag in ("matched_rate", "own_threshold"):
            h = d[tag]
            lines.append(f"{name + ('' if tag == 'matched_rate' else '*'):<10}{h['threshold']:>11.3f}"
                         f"{_f(h['pspl_firing_rate'], '.3f'):>10}{_f(h['completeness_all'], '.3f'):>11}"
                         f"{_f(h['completeness_detectable'], '.3f'):>9}{_f(h['roc_auc_detectable'], '.3f'):>9}"
                         f"{_f(h['median_decision_days_detectable'], '.1f'):>11}"
                         f"{_f(h['median_decision_tE_detectable'], '.2f'):>12}"
                         f"{_f(d['cpu_us_per_point'], '.0f'):>8}")
    lines.append("* at the rule's own threshold (TD-CNN: model card; pspl-fit: consumer.pspl_fit.threshold)")
    lines += ["", "at equal PSPL firing (thresholds fitted on these PSPL events); delay = first trigger - "
              "detectability onset, over the binaries with an onset",
              f"{'rule':<10}{'PSPL fire':>10}{'recall Δχ²≥160':>15}{'triggered':>10}{'by t0+tE':>9}"
              f"{'before onset':>13}{'med delay [d]':>14}{'[visits]':>9}"]
    def rate_row(name: str, m: dict) -> str:
        o = m["onset"]
        return (f"{name:<10}{_f(m['pspl_firing_rate'], '.3f'):>10}{_f(m['recall_detectable'], '.3f'):>15}"
                f"{_f(o.get('fraction_triggered'), '.3f'):>10}"
                f"{_f(o.get('fraction_triggered_before_t0_plus_tE'), '.3f'):>9}"
                f"{_f(o.get('fraction_before_onset'), '.3f'):>13}{_f(o.get('median_delay_days'), '+.1f'):>14}"
                f"{_f(o.get('median_delay_visits'), '+.0f'):>9}")

    for name, d in r["rules"].items():
        lines += [rate_row(name, m) for key, m in d["at_pspl_rates"].items() if key.startswith("pspl_")]
    lines += [rate_row("either", m) + f"   (tdcnn >= {m['tdcnn_threshold']:.4f}, pspl-fit >= "
              f"{m['pspl_fit_threshold']:.1f})" for key, m in r.get("either", {}).items() if key.startswith("pspl_")]
    for name, d in r["rules"].items():
        c = d["at_pspl_rates"]["completeness_at_purity"]
        lines.append(f"{name}: completeness (binaries with an onset) at purity {c['purity']:.2f}: "
                     f"{_f(c['completeness'], '.3f')}")
    pd = r.get("paired_decision_time")
    if pd and pd["n_both"]:
        lines.append(f"binaries Δχ² ≥ 160 triggered by both ({pd['n_both']} of {pd['n_detectable']}; only tdcnn "
                     f"{pd['only_tdcnn']}, only pspl-fit {pd['only_pspl_fit']}): pspl-fit − tdcnn median "
                     f"{pd['median_pspl_fit_minus_tdcnn_days']:+.2f} d ({pd['median_pspl_fit_minus_tdcnn_tE']:+.3f} tE); "
                     f"tdcnn earlier {pd['share_tdcnn_earlier']:.2f}, same point {pd['share_same_point']:.2f}, "
                     f"pspl-fit earlier {pd['share_pspl_fit_earlier']:.2f}")
    return "\n".join(lines)


def _f(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)
