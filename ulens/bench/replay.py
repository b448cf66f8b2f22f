"""`ulens bench replay`: `ulens replay --speed max` against encoding the same records
without Kafka."""
from __future__ import annotations

import time
from pathlib import Path


from ulens.bench.harness import (Run, load_dataset, cached_dataset, cached_derived, first_alerts,
    log, make_row, run_codec)


def bench_replay(run: Run, a) -> list[dict]:
    from replay.stream import from_dataset, plan

    full = cached_dataset(run.cache, a.events, a.seed, a.workers)
    stream = cached_derived(Path(str(full).replace(".npz", f"_first{a.alerts}.npz")),
                            lambda: first_alerts(load_dataset(full), a.alerts))
    r = run.settings.replay
    # baseline: the replay loop without Kafka: the same records, built and encoded
    lc = from_dataset(load_dataset(stream), r.start_mjd, source=str(stream))
    p = plan(lc, history=r.history_points, detections_only=r.detections_only,
             snr_threshold=r.snr_threshold)
    codec = run_codec()
    sid = codec.schema_id("alert")
    enc = codec.encode
    now_ns = time.time_ns
    log(f"replay: encode-only baseline over {p.n_alerts} alerts")
    t0 = time.perf_counter()
    nbytes = n = 0
    for _key, _mjd, rec in p.records(union_tuples=True):
        rec["alertProducedUs"] = now_ns() // 1000
        nbytes += len(enc(rec, schema_id=sid))
        n += 1
    enc_rate = n / (time.perf_counter() - t0)
    del p, lc
    topic = run.topic("replay.alerts")
    log(f"replay: `ulens replay --speed max` of the same {n} alerts to {topic}")
    t1 = time.perf_counter()
    rep = run.replay(stream, topic)
    wall = time.perf_counter() - t1
    if rep["counts"]["alerts_delivered"] != n:
        raise RuntimeError(f"replay delivered {rep['counts']['alerts_delivered']} of {n}")
    return [
        make_row("replay.throughput", rep["alerts_per_s"], "alerts/s", enc_rate,
                 note=f"`ulens replay --speed max`, {n} alerts ({nbytes / n:.0f} B each) to "
                      f"{rep['kafka']['partitions']} partitions, produce loop + flush "
                      f"{rep['seconds']:.2f} s, all delivered (acks=all); baseline: the same "
                      "records built and fastavro-encoded, no Kafka, in the bench process",
                 target=">= 50,000 alerts/s"),
        make_row("replay.throughput_incl_startup", n / wall, "alerts/s", rep["alerts_per_s"],
                 note=f"whole `ulens replay` process {wall:.2f} s (imports, dataset load, plan, "
                      "topic check, truth file); baseline: the produce loop alone"),
    ]
