"""`ulens bench consumer`: the broker's throughput (young and warm events), the naive
consumer's on the same stream, and latency at a fixed offered rate against the no-op floor."""
from __future__ import annotations

import cProfile
import json
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ulens.bench.baselines import NaiveConsumer, NoopConsumer
from ulens.bench.harness import (Run, load_dataset, profile_report, timed_broker_class,
    cached_dataset, cached_derived, drop_first, first_alerts, log, make_row, percentiles,
    read_topic, run_codec, warm_state)


def _warm(broker) -> None:
    """What a broker that has been running has: its Rubin block decoders built (polars
    imported, the schemas inlined: ~0.5 s at the first Rubin batch) and the model called
    once, so that the latency run measures the steady state, not the start."""
    from broker.rubin_columns import COLUMNS

    for sid in broker.codec.ids_of("rubin"):
        broker.codec.block_reader(sid, COLUMNS)
    broker.artifact.predict(np.zeros((1, 8, broker.artifact.scalers.n_channels), np.float32))


def _paced(run: Run, stream: Path, topic: str, replay_args: list, consume, n: int, assigned,
           stop, what: str) -> dict:
    """``consume(n)`` on a thread while ``ulens replay`` offers ``stream`` to ``topic`` at
    a fixed rate (``replay_args``); the replay's report."""
    th = threading.Thread(target=consume, args=(n,), daemon=True)
    th.start()
    if not assigned.wait(60):
        stop()
        raise RuntimeError(f"latency run ({what}): no partition assignment within 60 s")
    proc = run.replay(stream, topic, replay_args, popen=True)
    _, err = proc.communicate()
    if proc.returncode != 0:
        stop()
        raise RuntimeError(f"latency replay failed: {err.strip()[-2000:]}")
    th.join(120)
    if th.is_alive():
        stop()
        th.join(30)
        raise RuntimeError(f"latency run ({what}): not every alert was read in 120 s after the replay")
    return json.loads(proc.report_path.read_text())


def rubin_stream(run: Run, full: Path, packets: int, survey: str) -> tuple[Path, np.ndarray, str]:
    """Whole events of the survey dataset ``full``, as many as make about ``packets`` Rubin
    packets (one per 5-sigma detection, each with a year of history): (file, packets per
    event, what)."""
    from replay.stream import from_dataset, plan

    ds = load_dataset(full)
    r = run.settings.replay
    counts = plan(from_dataset(ds, r.start_mjd), detections_only=True,
                  snr_threshold=r.snr_threshold).per_event_counts()
    k = int(min(ds.n_events, np.searchsorted(np.cumsum(counts), packets) + 1))
    path = cached_derived(Path(str(full).replace(".npz", f"_events{k}.npz")),
                          lambda: ds.subset(np.arange(k)))
    lens = ds.lengths()[:k]
    what = (f"{int(counts[:k].sum())} Rubin lsst.v11_1 packets of {k} whole {survey} events "
            f"({int(np.median(lens))} visits and {int(np.median(counts[:k]))} packets a median event)")
    return path, counts[:k], what


def model_for(a) -> Optional[str]:
    """``--model``, else the model that serves the survey (ulens.demo.MODEL_FOR_SURVEY; None:
    the config's model.path)."""
    from ulens.demo import MODEL_FOR_SURVEY

    return a.model or MODEL_FOR_SURVEY.get(a.survey)


def bench_consumer(run: Run, a) -> list[dict]:
    """The rows of ``ulens bench consumer`` in the chosen format: compact alerts (rows
    ``consumer.*``) or Rubin packets (``consumer.rubin.*``)."""
    from broker.consumer import load_model

    rubin = a.format == "rubin"
    name = "consumer.rubin" if rubin else "consumer"
    unit = "packets/s" if rubin else "alerts/s"
    fmt = ["--format", "rubin"] if rubin else []
    TimedBroker = timed_broker_class()
    rows: list[dict] = []
    full = cached_dataset(run.cache, a.events, a.seed, a.workers, a.survey)
    if rubin:
        stream, lens, what = rubin_stream(run, full, a.alerts, a.survey)
        n = int(lens.sum())
        n_events = len(lens)
    else:
        stream = cached_derived(Path(str(full).replace(".npz", f"_first{a.alerts}.npz")),
                                lambda: first_alerts(load_dataset(full), a.alerts))
        sds = load_dataset(stream)
        n = len(sds.time)
        lens = sds.lengths()
        n_events = sds.n_events
        what = (f"{n} alerts over {n_events} events ({lens.min()}..{lens.max()} points each, "
                f"survey days {sds.time.min():.1f}..{sds.time.max():.1f})")
    log(f"stream: {what}")
    artifact = load_model(run.settings, model_for(a))
    log(f"model: {model_for(a) or run.settings.model.path}")

    # 1. throughput: pre-produce, then one broker from start to the last commit
    topic = run.topic(f"{name}.alerts")
    rep = run.replay(stream, topic, fmt)
    if rep["counts"]["alerts_delivered"] != n:
        raise RuntimeError(f"replay delivered {rep['counts']['alerts_delivered']} of {n} alerts")
    log(f"pre-produced {n} alerts to {topic} ({rep['kafka']['partitions']} partitions) at "
        f"{rep['alerts_per_s']:,.0f} alerts/s")
    s1 = run.broker_settings(topic, name)
    t_make = time.perf_counter()
    broker = TimedBroker(s1, artifact, topic=topic)
    prof = cProfile.Profile() if a.profile else None
    log(f"consumer: throughput run over {n} alerts")
    if prof:
        prof.enable()
    summary = broker.run(until_idle=60.0, max_alerts=n)
    if prof:
        prof.disable()
    t_end = time.perf_counter()
    if summary.alerts != n:
        raise RuntimeError(f"consumer read {summary.alerts} of {n} alerts")
    busy = broker.t_last - broker.t_first
    rate = n / busy
    trig_msgs = read_topic(run.client, s1.kafka.topics.triggers)
    dlq = sum(summary.dead_letters.values())
    log(f"consumer: {n} alerts in {busy:.2f} s = {rate:,.0f} alerts/s; {summary.triggers} triggers "
        f"({len(trig_msgs)} on the topic), {dlq} dead letters; with startup {t_end - t_make:.2f} s")
    sizes = np.array([b for b, _ in broker.batches])
    if prof:
        profile_report(prof, Path(a.profile) / "consumer_throughput.prof" if a.profile != "-" else None)

    # 1b. steady state: the same number of alerts after each event's first --warm-points
    # points, which are put into Redis (with their probabilities) beforehand
    steady = None
    if rubin and a.warm_points:
        log("consumer: no warm run for Rubin packets (the stream is whole events: their later "
            "packets are the warm ones)")
    elif a.warm_points:
        from broker import state as st

        w = a.warm_points
        sstream = cached_derived(Path(str(full).replace(".npz", f"_from{w}_first{a.warm_alerts}.npz")),
                                 lambda: first_alerts(drop_first(load_dataset(full), w), a.warm_alerts))
        wds = load_dataset(sstream)
        stopic = run.topic("steady.alerts")
        run.replay(sstream, stopic)
        s2 = run.broker_settings(stopic, "steady")
        sb = TimedBroker(s2, artifact, topic=stopic)
        log(f"consumer: warming {wds.n_events} events with {w} points each in Redis")
        store = st.EventStore(sb.store.r, s2.redis.key_prefix, s2.redis.event_ttl_s, s2.redis.max_points,
                              reference_points=int(artifact.card["reference_points"]),
                              receptive_field=artifact.receptive_field, smooth_window=sb.rule.smooth)
        full_ds = load_dataset(full)
        keep_ids = np.isin(full_ds.event_id, wds.event_id)
        warm_state(store, artifact, full_ds.subset(np.flatnonzero(keep_ids)), w,
                   run.settings.replay.start_mjd, sb.rule)
        del full_ds
        wl = wds.lengths()
        log(f"consumer: steady-state run over {len(wds.time)} alerts (points {w}..{w + wl.max() - 1})")
        sprof = cProfile.Profile() if a.profile else None
        if sprof:
            sprof.enable()
        ss = sb.run(until_idle=60.0, max_alerts=len(wds.time))
        if sprof:
            sprof.disable()
            profile_report(sprof, Path(a.profile) / "consumer_warm.prof" if a.profile != "-" else None,
                            what="warm")
        if ss.alerts != len(wds.time):
            raise RuntimeError(f"steady run read {ss.alerts} of {len(wds.time)} alerts")
        sbusy = sb.t_last - sb.t_first
        steady = (len(wds.time) / sbusy, sbusy, ss, wds.n_events, wl)
        log(f"consumer: steady state {steady[0]:,.0f} alerts/s, {ss.triggers} triggers, "
            f"{sum(ss.dead_letters.values())} dead letters")

    # 2. the naive consumer on a smaller stream: the first events of the same cut
    n_rate, naive_note = None, "no naive run (--naive-alerts 0)"
    if a.naive_alerts > 0:
        k = int(np.searchsorted(np.cumsum(lens), a.naive_alerts) + 1)
        k = min(k, n_events)
        n_naive = int(lens[:k].sum())
        ntopic = run.topic(f"{name}.naive.alerts")
        run.replay(stream, ntopic, ["--limit-events", str(k), *fmt])
        nconf = run.broker_settings(ntopic, f"{name}.naive")
        naive = NaiveConsumer(nconf, artifact, ntopic, nconf.kafka.topics.triggers,
                              nconf.consumer.group, nconf.redis.key_prefix)
        log(f"naive consumer: {n_naive} alerts of the first {k} events")
        naive.run(n_naive)
        n_rate = naive.alerts / (naive.t_last - naive.t_first)
        log(f"naive consumer: {n_rate:,.1f} alerts/s, {naive.triggers} triggers")
        naive_note = (f"baseline: naive consumer (per message: whole curve from Redis, full-length "
                      f"model, commit) on {n_naive} alerts of {k} events of the same stream, "
                      f"{naive.triggers} triggers")

    rows.append(make_row(f"{name}.throughput", rate, unit, n_rate,
                         note=f"{what}; first batch to last commit {busy:.2f} s, {summary.triggers} "
                              f"triggers, {dlq} dead letters, {summary.backfilled} history points "
                              f"appended, {len(sizes)} batches (mean {sizes.mean():.0f} alerts); "
                              f"{naive_note}",
                         target=">= 5,000 packets/s with a season of history, >= 50x naive" if rubin
                         else ">= 20,000 alerts/s, >= 50x naive"))
    rows.append(make_row(f"{name}.throughput_incl_startup", n / (t_end - t_make), unit, rate,
                         note=f"from Broker() (Kafka group join) to close: {t_end - t_make:.2f} s; "
                              "baseline: consumer.throughput (first batch to last commit)"))
    if steady is not None:
        srate, sbusy, ss, sev, wl = steady
        rows.append(make_row("consumer.throughput_warm", srate, "alerts/s", rate,
                             note=f"{int(wl.sum())} alerts of {sev} events whose first "
                                  f"{a.warm_points} points (and probabilities) were already in "
                                  f"Redis: points {a.warm_points}..{a.warm_points + wl.max() - 1}, "
                                  f"every window a tail window of the receptive field; {sbusy:.2f} s, "
                                  f"{ss.triggers} triggers; baseline: consumer.throughput (young "
                                  "events, same run)"))

    # 3. latency at a fixed offered rate, a replay running concurrently: the no-op floor
    # first, then the broker, each alone in this process (as threads side by side each
    # would wait for the other's GIL and inflate the other's latency)
    offer = a.rate if a.rate is not None else (1000.0 if rubin else 3000.0)
    k_lat = a.latency_events or min(n_events, int(np.searchsorted(
        np.cumsum(lens), offer * a.latency_seconds) + 1))
    limit = ["--rate", str(offer), "--limit-events", str(k_lat), *fmt]
    n_lat = int(lens[:k_lat].sum())
    ft = run.topic(f"{name}.latency.noop.alerts")
    floor = NoopConsumer(run.settings, ft, run.group(f"{name}.latency.noop"))
    log(f"latency: replay of {n_lat} alerts at --rate {offer:g}, the no-op consumer reading them")
    _paced(run, stream, ft, limit, floor.run, n_lat, floor.assigned, floor.stop.set, "no-op consumer")
    lt = run.topic(f"{name}.latency.alerts")
    s3 = run.broker_settings(lt, f"{name}.latency")
    lb = TimedBroker(s3, artifact, topic=lt, record_latency=True)
    _warm(lb)
    log("latency: the same replay while the broker consumes")
    rep3 = _paced(run, stream, lt, limit, lambda k: lb.run(max_alerts=k), n_lat, lb.assigned, lb.stop, "broker")
    lat = np.concatenate(lb.latency_ms) if lb.latency_ms else np.zeros(0)
    flat = np.concatenate(floor.latency_ms) if floor.latency_ms else np.zeros(0)
    trig = [run_codec().decode_kind(m.value(), "trigger") for m in read_topic(run.client, s3.kafka.topics.triggers)]
    a2t = [(t["triggerProducedUs"] - t["alertProducedUs"]) / 1000.0 for t in trig if t["alertProducedUs"] > 0]
    p50, p99 = percentiles(lat)
    f50, f99 = percentiles(flat)
    t50, t99 = percentiles(a2t)
    lsz = np.array([b for b, _ in lb.batches])
    lsec = np.array([s for _, s in lb.batches])
    offered = rep3["alerts_per_s"]
    common = (f"offered {offered:,.0f} {unit} (replay --rate {offer:g}), {n_lat} alerts; "
              f"{len(lsz)} batches, mean {lsz.mean():.0f} alerts, processing mean "
              f"{1000 * lsec.mean():.0f} ms p99 {1000 * np.percentile(lsec, 99):.0f} ms; config "
              f"batch_size {run.settings.consumer.batch_size}, poll_timeout_s "
              f"{run.settings.consumer.poll_timeout_s}")
    rows.append(make_row(f"{name}.latency.offered_rate", offered, unit, rate,
                         note="what the concurrent `ulens replay --rate` achieved; baseline: the "
                              f"consumer's throughput on the same stream ({name}.throughput): a "
                              "ratio above 1 means the consumer was overloaded and latency grows "
                              "with the length of the run"))
    rows.append(make_row(f"{name}.latency.alert_to_processed.p50", p50, "ms", f50,
                         note="alert produced (Kafka CreateTime) -> batch committed; baseline: a "
                              "no-op consumer with the broker's own poll (poll_batch), alone, on the same "
                              "replay just before; " + common))
    rows.append(make_row(f"{name}.latency.alert_to_processed.p99", p99, "ms", f99,
                         target="<= 100 ms at 1,000 Rubin packets/s offered" if rubin else None))
    rows.append(make_row(f"{name}.latency.alert_to_trigger.p50", t50, "ms", f50,
                         note=f"{len(a2t)} triggers: triggerProducedUs - alertProducedUs of the "
                              "deciding alert; baseline: the no-op consumer's p50"))
    rows.append(make_row(f"{name}.latency.alert_to_trigger.p99", t99, "ms", f99,
                         target="<= 100 ms at 1,000 Rubin packets/s offered" if rubin
                         else "<= 250 ms at 3,000 alerts/s offered",
                         note=f"{len(a2t)} triggers (p99 of so few is close to their maximum, "
                              f"{max(a2t) if a2t else float('nan'):.0f} ms); baseline: the no-op consumer's p99"))
    return rows
