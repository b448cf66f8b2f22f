"""`ulens report`: join the trigger topic with a replay's ground truth.

How early and how well did the broker decide? For each decision rule found on the
trigger topic: counts per class, purity (precision) and completeness (recall), the
share of single-lens events that triggered, decision time of the true binaries that
triggered (days from t0, units of tE, points seen), recall in detectability bins,
the wall-clock latency from alert produced to trigger produced, and, given the
consumer's summary (``ulens consume`` prints it as its last line; ``--consumer-summary``),
the processing cost per alert of each rule (the time the consumer spent in that rule:
model or fit, decision, the rule's Redis round trips) beside the cost every rule shares
(decode, append, produce, commit). ``--plots`` also draws
``completeness_vs_decision_time.png``: the share of binaries triggered by t0 + x t_E, per
rule.

The scoring is pure (``score``); reading Kafka and drawing plots are kept apart.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

HELP = ("Score the triggers on the trigger topic against a replay's ground truth: purity, "
        "completeness, decision time (days, t_E, points), recall by detectability, latency; "
        "a terminal table, optional JSON and PNG plots.")

DCHI2_BINS = ((0.0, 25.0), (25.0, 160.0), (160.0, 1000.0), (1000.0, math.inf))
DETECTABLE_DCHI2 = 160.0
QUANTILES = (10, 50, 90)
LATENCY_PCT = (50, 95, 99)


class ReportError(ValueError):
    """The report's input is missing or inconsistent; the message names it."""


def read_truth(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise ReportError(f"truth file not found: {path}")
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ReportError(f"{path}:{n}: not a JSON line: {exc}") from None
            if "diaObjectId" not in rec:
                raise ReportError(f"{path}:{n}: no diaObjectId")
            rows.append(rec)
    if not rows:
        raise ReportError(f"{path}: no events")
    return rows


def read_triggers(settings, topic: Optional[str] = None, timeout: float = 30.0) -> list[dict]:
    """Every trigger on the topic, from the beginning to the current end (no group commit)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas import CodecError, default_codec
    topic = topic or settings.kafka.topics.triggers
    codec = default_codec()
    c = Consumer({**settings.kafka.client_config(), "group.id": "ulens-report",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        meta = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        parts = sorted(meta.partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in parts}
        todo = {p for p in parts if ends[p] > 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while todo:
            # consume() waits until it has num_messages or the timeout passes: keep each
            # call short and check the end of every partition between calls.
            msgs = c.consume(num_messages=10000, timeout=0.5)
            if not msgs and time.monotonic() > deadline:
                raise ReportError(f"timed out reading {topic}: partitions {sorted(todo)} not at their end")
            for m in msgs:
                if m.error():
                    continue
                try:
                    out.append(codec.decode_kind(m.value(), "trigger"))
                except CodecError:
                    pass  # not ours to judge here; the count below shows only decodable triggers
                if m.offset() + 1 >= ends[m.partition()]:
                    todo.discard(m.partition())
        return out
    finally:
        c.close()


def _quantiles(x: Iterable[float], qs=QUANTILES) -> dict:
    a = np.asarray(list(x), dtype=float)
    if a.size == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(a, q)) for q in qs}


def _ratio(a: int, b: int) -> Optional[float]:
    return a / b if b else None


def score(truth: list[dict], triggers: list[dict]) -> dict:
    """Score triggers against truth, per rule. Pure: no I/O."""
    by_id = {int(t["diaObjectId"]): t for t in truth}
    labels = {i: t.get("label") for i, t in by_id.items()}
    n_pspl = sum(1 for v in labels.values() if v == 0)
    n_bin = sum(1 for v in labels.values() if v == 1)
    rules = sorted({t["rule"] for t in triggers}) or ["tdcnn"]
    result = {"events": {"total": len(by_id), "pspl": n_pspl, "binary": n_bin,
                         "unlabelled": len(by_id) - n_pspl - n_bin},
              "rules": {}}
    for rule in rules:
        seen_ids: set[str] = set()
        first: dict[int, dict] = {}
        multi: set[int] = set()
        unmatched = 0
        for trg in triggers:
            if trg["rule"] != rule or trg["triggerId"] in seen_ids:
                continue
            seen_ids.add(trg["triggerId"])
            oid = int(trg["diaObjectId"])
            if oid not in by_id:
                unmatched += 1
                continue
            if oid in first:
                multi.add(oid)
                if trg["midpointMjdTai"] >= first[oid]["midpointMjdTai"]:
                    continue
            first[oid] = trg
        tp = [o for o in first if labels[o] == 1]
        fp = [o for o in first if labels[o] == 0]
        dt_days, dt_te, npts, dt_te_det = [], [], [], []
        for o in tp:
            t = by_id[o]
            if t.get("t0_mjd") is None or not t.get("tE"):
                continue
            d = first[o]["midpointMjdTai"] - t["t0_mjd"]
            dt_days.append(d)
            dt_te.append(d / t["tE"])
            npts.append(first[o]["nPoints"])
            if t.get("dchi2") is not None and t["dchi2"] >= DETECTABLE_DCHI2:
                dt_te_det.append(d / t["tE"])
        result_onset = _onset(by_id, labels, first)
        bins = []
        for lo, hi in DCHI2_BINS:
            members = [o for o, t in by_id.items() if labels[o] == 1 and t.get("dchi2") is not None
                       and lo <= t["dchi2"] < hi]
            hit = sum(1 for o in members if o in first)
            bins.append({"dchi2_lo": lo, "dchi2_hi": None if math.isinf(hi) else hi,
                         "binaries": len(members), "triggered": hit, "recall": _ratio(hit, len(members))})
        # a trigger decided late (its alert read in an earlier batch: alertProducedUs 0,
        # schema v1 and v2) has no latency
        lat = np.array([(trg["triggerProducedUs"] - trg["alertProducedUs"]) / 1000.0
                        for trg in first.values() if trg["alertProducedUs"] > 0], dtype=float)
        result["rules"][rule] = {
            "triggers": len(seen_ids), "events_triggered": len(first),
            "events_with_multiple_triggers": len(multi), "unmatched_triggers": unmatched,
            "true_positives": len(tp), "false_positives": len(fp),
            "precision": _ratio(len(tp), len(tp) + len(fp)),
            "recall": _ratio(len(tp), n_bin),
            "pspl_trigger_share": _ratio(len(fp), n_pspl),
            "decision_time": {"days_from_t0": _quantiles(dt_days), "tE_from_t0": _quantiles(dt_te),
                              "points_seen": _quantiles(npts),
                              "share_before_t0": _ratio(sum(1 for d in dt_days if d < 0), len(dt_days)),
                              "n": len(dt_days)},
            "recall_by_dchi2": bins,
            "onset": result_onset,
            "latency_ms": {**_quantiles(lat, LATENCY_PCT),
                           "max": float(lat.max()) if lat.size else None, "n": int(lat.size)},
            "_dt_te": dt_te, "_latency": lat.tolist(), "_dt_te_det": dt_te_det,
        }
    result["_n_binary_detectable"] = sum(1 for i, t in by_id.items() if labels[i] == 1
                                         and t.get("dchi2") is not None and t["dchi2"] >= DETECTABLE_DCHI2)
    return result


def _onset(by_id: dict, labels: dict, first: dict) -> dict:
    """Decision time of the binaries with a detectability onset (truth ``onset_mjd``,
    schema truth v1.1), from the onset: days, and the share triggered at all, by t0 + tE
    and before the onset (training.evaluate.onset_figures, the offline twin)."""
    on = [o for o, t in by_id.items() if labels[o] == 1 and t.get("onset_mjd") is not None]
    days = [first[o]["midpointMjdTai"] - by_id[o]["onset_mjd"] for o in on if o in first]
    by_te = [o for o in on if o in first and by_id[o].get("t0_mjd") is not None and by_id[o].get("tE")
             and first[o]["midpointMjdTai"] < by_id[o]["t0_mjd"] + by_id[o]["tE"]]
    return {"n_binary_with_onset": len(on), "triggered": len(days),
            "fraction_triggered": _ratio(len(days), len(on)),
            "fraction_triggered_before_t0_plus_tE": _ratio(len(by_te), len(on)),
            "fraction_before_onset": _ratio(sum(1 for d in days if d < 0), len(days)),
            "delay_days": _quantiles(days)}


def read_consumer_summaries(paths) -> list[dict]:
    """The JSON summaries ``ulens consume`` printed (its last line; one file per consumer,
    or several JSON lines in one file). Lines that are not a summary are skipped."""
    out: list[dict] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ReportError(f"consumer summary not found: {path}")
        before = len(out)
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "alerts" in rec and "rule_seconds" in rec:
                out.append(rec)
        if len(out) == before:
            raise ReportError(f"{path}: no consumer summary (the JSON line `ulens consume` prints)")
    return out


def cost(summaries: list[dict]) -> dict:
    """Processing cost per alert: each rule's time, and the time all rules share, summed over
    the consumers (a consumer group's members split the alerts). Pure."""
    alerts = sum(int(s.get("alerts", 0)) for s in summaries)
    busy = sum(float(s.get("busy_seconds", 0.0)) for s in summaries)
    rules: dict[str, float] = {}
    for s in summaries:
        for r, sec in (s.get("rule_seconds") or {}).items():
            rules[r] = rules.get(r, 0.0) + float(sec)
    us = (lambda sec: 1e6 * sec / alerts if alerts else None)  # noqa: E731
    return {"consumers": len(summaries), "alerts": alerts, "busy_seconds": busy,
            "per_rule_us_per_alert": {r: us(sec) for r, sec in sorted(rules.items())},
            "per_rule_seconds": dict(sorted(rules.items())),
            "shared_us_per_alert": us(busy - sum(rules.values())),
            "total_us_per_alert": us(busy)}


def public(result: dict) -> dict:
    """The summary without the raw arrays kept for plotting."""
    return {**{k: v for k, v in result.items() if not k.startswith("_")},
            "rules": {r: {k: v for k, v in d.items() if not k.startswith("_")}
                      for r, d in result["rules"].items()}}


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(result: dict) -> str:
    e = result["events"]
    lines = [f"events: {e['total']}  (PSPL {e['pspl']}, binary {e['binary']}, unlabelled {e['unlabelled']})"]
    for rule, r in result["rules"].items():
        dt = r["decision_time"]
        lines += [
            f"\nrule {rule}: {r['triggers']} triggers on {r['events_triggered']} events "
            f"(events with >1 trigger: {r['events_with_multiple_triggers']}, unmatched: {r['unmatched_triggers']})",
            f"  purity (precision) {_fmt(r['precision'])}   completeness (recall) {_fmt(r['recall'])}   "
            f"PSPL events triggered {_fmt(r['pspl_trigger_share'])}",
            "  decision time of true binaries      p10       p50       p90",
            "    days from t0              " + "".join(f"{_fmt(dt['days_from_t0'][f'p{q}'], '>10.1f')}" for q in QUANTILES),
            "    t_E from t0               " + "".join(f"{_fmt(dt['tE_from_t0'][f'p{q}'], '>10.2f')}" for q in QUANTILES),
            "    points seen               " + "".join(f"{_fmt(dt['points_seen'][f'p{q}'], '>10.0f')}" for q in QUANTILES),
            f"    triggered before t0: {_fmt(dt['share_before_t0'])} of {dt['n']}",
            _render_onset(r["onset"]),
            "  recall by detectability (Δχ²):",
        ]
        for b in r["recall_by_dchi2"]:
            hi = "inf" if b["dchi2_hi"] is None else f"{b['dchi2_hi']:g}"
            lines.append(f"    [{b['dchi2_lo']:g}, {hi}): {b['triggered']}/{b['binaries']} = {_fmt(b['recall'])}")
        lat = r["latency_ms"]
        lines.append(f"  latency alert produced -> trigger produced (ms): p50 {_fmt(lat['p50'], '.1f')}  "
                     f"p95 {_fmt(lat['p95'], '.1f')}  p99 {_fmt(lat['p99'], '.1f')}  max {_fmt(lat['max'], '.1f')}")
        c = result.get("cost")
        if c is not None:
            lines.append(f"  processing cost per alert: {_fmt(c['per_rule_us_per_alert'].get(rule), '.1f')} µs "
                         f"in this rule (+ {_fmt(c['shared_us_per_alert'], '.1f')} µs shared by all rules)")
    c = result.get("cost")
    if c is not None:
        lines.append(f"\nconsumer time: {c['alerts']} alerts by {c['consumers']} consumer(s), "
                     f"{_fmt(c['total_us_per_alert'], '.1f')} µs per alert in all "
                     + "".join(f", {r} {_fmt(v, '.1f')}" for r, v in c["per_rule_us_per_alert"].items())
                     + f", shared {_fmt(c['shared_us_per_alert'], '.1f')}")
    return "\n".join(lines)


def _render_onset(o: dict) -> str:
    if not o["n_binary_with_onset"]:
        return "  from the detectability onset: no binary with an onset in the truth (truth v1.0, or none)"
    d = o["delay_days"]
    return (f"  from the detectability onset ({o['n_binary_with_onset']} binaries): triggered "
            f"{_fmt(o['fraction_triggered'])}, by t0 + tE {_fmt(o['fraction_triggered_before_t0_plus_tE'])}, "
            f"delay days p10/p50/p90 {_fmt(d['p10'], '+.1f')} / {_fmt(d['p50'], '+.1f')} / {_fmt(d['p90'], '+.1f')} "
            f"(before the onset: {_fmt(o['fraction_before_onset'])})")


def plot(result: dict, folder: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    rules = result["rules"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, r in rules.items():
        if r["_dt_te"]:
            ax.hist(r["_dt_te"], bins=30, alpha=0.6, label=rule)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="decision time − t0 [t_E]", ylabel="true binaries triggered",
           title="When the broker decided")
    ax.legend()
    out.append(folder / "decision_time.png")
    fig.tight_layout(); fig.savefig(out[-1], dpi=110); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, r in rules.items():
        lat = np.sort(r["_latency"])
        if lat.size:
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=rule)
    ax.set(xlabel="alert produced → trigger produced [ms]", ylabel="fraction of triggers",
           title="Latency CDF")
    ax.set_xscale("log")
    ax.legend()
    out.append(folder / "latency_cdf.png")
    fig.tight_layout(); fig.savefig(out[-1], dpi=110); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = None
    for i, (rule, r) in enumerate(rules.items()):
        rec = [b["recall"] if b["recall"] is not None else 0.0 for b in r["recall_by_dchi2"]]
        labels = [f"[{b['dchi2_lo']:g}, {'∞' if b['dchi2_hi'] is None else format(b['dchi2_hi'], 'g')})\n"
                  f"n={b['binaries']}" for b in r["recall_by_dchi2"]]
        ax.bar(np.arange(len(rec)) + i * 0.8 / max(1, len(rules)), rec, width=0.8 / max(1, len(rules)),
               label=rule)
    if labels:
        ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(xlabel="detectability Δχ²", ylabel="recall", ylim=(0, 1.05), title="Recall against Δχ²")
    ax.legend()
    out.append(folder / "recall_vs_dchi2.png")
    fig.tight_layout(); fig.savefig(out[-1], dpi=110); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = np.linspace(-2.0, 3.0, 201)
    n_bin, n_det = result["events"]["binary"], result.get("_n_binary_detectable", 0)
    for rule, r in rules.items():
        line = None
        for arr, n, style, what in ((r["_dt_te"], n_bin, "-", "all binaries"),
                                    (r.get("_dt_te_det", []), n_det, "--", "Δχ² ≥ 160")):
            if not n:
                continue
            v = np.sort(np.asarray(arr, dtype=float))
            y = np.searchsorted(v, x, side="right") / n
            kw = {"color": line.get_color()} if line is not None else {}
            line, = ax.plot(x, y, style, label=f"{rule}: {what}", **kw)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="decision time − t0 [t_E]", ylabel="completeness (share of binaries triggered by then)",
           ylim=(0, 1.02), title="Completeness against decision time")
    ax.legend(fontsize=8)
    out.append(folder / "completeness_vs_decision_time.png")
    fig.tight_layout(); fig.savefig(out[-1], dpi=110); plt.close(fig)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, metavar="FILE",
                   help="the replay's ground truth (truth.jsonl, printed at the end of `ulens replay`)")
    p.add_argument("--topic", default=None, help="trigger topic [config kafka.topics.triggers]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--plots", metavar="DIR", default=None,
                   help="write decision_time.png, latency_cdf.png, recall_vs_dchi2.png and "
                        "completeness_vs_decision_time.png here")
    p.add_argument("--consumer-summary", metavar="FILE", nargs="+", default=None,
                   help="the JSON line(s) `ulens consume` printed (one file per consumer): adds the "
                        "processing cost per alert of each rule")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the JSON summary to FILE")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka")


def run(args: argparse.Namespace) -> int:
    import config as cfg
    settings = cfg.load(args.config)
    truth = read_truth(args.truth)
    triggers = read_triggers(settings, args.topic, timeout=args.timeout)
    result = score(truth, triggers)
    if args.consumer_summary:
        result["cost"] = cost(read_consumer_summaries(args.consumer_summary))
    summary = public(result)
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2) if args.json else render(result))
    if args.plots:
        paths = plot(result, args.plots)
        print("plots: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
