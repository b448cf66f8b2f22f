"""`ulens bench memory`: the consumer's peak RSS with many live events, and Redis bytes
per event (the broker's record against a plain list of the same points)."""
from __future__ import annotations

import json
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from ulens.bench.harness import (Run, load_dataset, cached_dataset, cached_derived, log,
    make_row, tiled_events)


def _watch_peak(proc: subprocess.Popen, every: float = 0.2) -> dict:
    """Poll /proc/<pid>/status until the process ends: peak RSS (VmHWM) in MiB."""
    peak = {"hwm_mib": 0.0, "rss_mib": 0.0, "samples": []}
    t0 = time.monotonic()
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak["hwm_mib"] = max(peak["hwm_mib"], int(line.split()[1]) / 1024)
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                    peak["rss_mib"] = max(peak["rss_mib"], rss)
                    peak["samples"].append((time.monotonic() - t0, rss))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(every)
    return peak


def rss_trajectory(samples: list, parts: int = 4) -> str:
    """RSS at even fractions of the run, e.g. '25%: 700, 50%: 900, ...' (MiB)."""
    if not samples:
        return "no samples"
    t_end = samples[-1][0]
    out = []
    for k in range(1, parts + 1):
        t = t_end * k / parts
        rss = next((r for s, r in samples if s >= t), samples[-1][1])
        out.append(f"{100 * k // parts}%: {rss:.0f}")
    return ", ".join(out)


def _consume_process(run: Run, data: Path, what: str, n_alerts: int) -> tuple[dict, dict, int]:
    """Produce ``data``, run `ulens consume` as its own process over it: (peak, summary, used_memory delta)."""
    topic = run.topic(f"{what}.alerts")
    run.replay(data, topic)
    s = run.broker_settings(topic, what)
    conf = run.config_file(s, what)
    r = run.redis
    before = int(r.info("memory")["used_memory"])
    proc = subprocess.Popen(run.ulens(["consume", "--until-idle", "30", "--max-alerts", str(n_alerts)],
                                      conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder: dict = {}
    reader = threading.Thread(target=lambda: holder.__setitem__("io", proc.communicate()), daemon=True)
    reader.start()
    peak = _watch_peak(proc)
    reader.join(60)
    out, err = holder.get("io", ("", ""))
    if proc.returncode != 0:
        raise RuntimeError(f"ulens consume failed ({proc.returncode}): {err.strip()[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    after = int(r.info("memory")["used_memory"])
    return peak, summary, after - before


def bench_memory(run: Run, a) -> list[dict]:
    from broker import state as st
    from training.artifact import load_artifact

    rows = []
    full = cached_dataset(run.cache, a.events, a.seed, a.workers)
    ds = load_dataset(full)
    pts = a.memory_points
    big = cached_derived(Path(str(full).replace(".npz", f"_tiled{a.memory_events}x{pts}.npz")),
                         lambda: tiled_events(ds, a.memory_events, pts))
    small_n = max(1, a.memory_events // 100)
    small = cached_derived(Path(str(full).replace(".npz", f"_tiled{small_n}x{pts}.npz")),
                           lambda: tiled_events(ds, small_n, pts, id_base=2 * 10**12))
    log(f"memory: `ulens consume` over {small_n} events x {pts} points (baseline), then "
        f"{a.memory_events} x {pts}")
    p_small, _, _ = _consume_process(run, small, "memsmall", small_n * pts)
    p_big, sum_big, delta = _consume_process(run, big, "membig", a.memory_events * pts)
    prefix = run.prefixes[-1]
    keys = [f"{prefix}:ev:{10**12 + i}" for i in range(0, a.memory_events, max(1, a.memory_events // 1000))]
    usage = [run.redis.memory_usage(k, samples=0) or 0 for k in keys]
    rows.append(make_row("memory.consumer_peak_rss", p_big["hwm_mib"], "MiB", p_small["hwm_mib"],
                         note=f"`ulens consume` process (VmHWM) after {sum_big['alerts']} alerts = "
                              f"{a.memory_events} live events x {pts} points; RSS (MiB) through the "
                              f"run {rss_trajectory(p_big['samples'])}; baseline: the same command "
                              f"over {small_n} events x {pts} points"))
    rows.append(make_row(f"memory.redis_per_event_{pts}pts", float(np.mean(usage)), "bytes",
                         delta / a.memory_events,
                         note=f"MEMORY USAGE of {len(keys)} event keys after {pts} points; baseline: "
                              f"INFO used_memory delta / {a.memory_events} events over the run (other "
                              "clients of this Redis count too)"))

    # 100 points per event through the state path (the broker's append script), vs a list
    n_ev, n_pts = a.redis_events, 100
    art = load_artifact(a.model or run.settings.model.resolved, "cpu")
    sub = tiled_events(ds, n_ev, n_pts, id_base=3 * 10**12)
    prefix = run.prefix("mem100")
    store = st.EventStore(run.redis, prefix, run.settings.redis.event_ttl_s, run.settings.redis.max_points,
                          reference_points=int(art.card["reference_points"]),
                          receptive_field=art.receptive_field,
                          smooth_window=int(art.decision.get("smooth_window", 5)))
    oids = sub.event_id.tolist()
    t_pts = sub.time.reshape(n_ev, n_pts) + run.settings.replay.start_mjd
    m_pts = sub.mag.reshape(n_ev, n_pts)
    e_pts = sub.mag_err.reshape(n_ev, n_pts)
    sid = (sub.event_id[:, None] * 100_000 + np.arange(n_pts)[None, :])
    naive = run.redis.pipeline(transaction=False)
    for j in range(n_pts):   # one point per event per round, as the stream delivers them
        store.append(oids, [1] * n_ev, st.pack_points(sid[:, j], t_pts[:, j], m_pts[:, j], e_pts[:, j]))
        for o in range(n_ev):
            naive.rpush(f"{prefix}:list:{oids[o]}", struct.pack("<qdff", int(sid[o, j]), t_pts[o, j],
                                                                m_pts[o, j], e_pts[o, j]))
        naive.execute()
    ev = [run.redis.memory_usage(store.event_key(o), samples=0) for o in oids]
    lst = [run.redis.memory_usage(f"{prefix}:list:{o}", samples=0) for o in oids]
    rows.append(make_row("memory.redis_per_event_100pts", float(np.mean(ev)), "bytes", float(np.mean(lst)),
                         note=f"MEMORY USAGE of {n_ev} event keys after 100 points appended one at a "
                              "time by the broker's state script (broker.state.EventStore.append); "
                              "baseline: a Redis list of the same 100 points (24 B each, RPUSH)",
                         target="<= 2 KB per live event of 100 points"))
    log(f"memory: consumer peak {p_big['hwm_mib']:.0f} MiB (small {p_small['hwm_mib']:.0f}); Redis "
        f"{np.mean(ev):.0f} B/event at 100 points (list {np.mean(lst):.0f} B)")
    return rows
