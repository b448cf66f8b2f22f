"""The state's round trips on Redis Cluster: one hash tag per event vs bucketed tags.

Per layout, ``--batches`` poll batches of ``--events`` distinct events (one new point
each, as a busy stream gives) go through ``EventStore.append`` and ``save_scores``, the
two script round trips of every batch, timed from the client (replica waits included).
Printed: median ms per batch, script calls per batch, and the same on the single Redis
for reference. Run it against ``ulens services up --cluster`` (and the single-node
services for the reference)::

    .venv/bin/python scripts/bench_cluster_keys.py --events 500 2000
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np

import config as cfg
from broker import state as st
from broker.consumer import redis_client

SMOOTH, K, RF = 5, 10, 20


def one(client, layout: st.KeyLayout, n_events: int, batches: int) -> dict:
    store = st.EventStore(client, layout.prefix, 3600, 2000, reference_points=K, receptive_field=RF,
                          smooth_window=SMOOTH, keys=layout)
    ids = list(10_000_000 + np.arange(n_events) * 7919)       # spread ids, as Rubin's are
    times, calls = [], 0
    for b in range(batches):
        pts = st.pack_points(np.asarray(ids, np.int64) * 1000 + b, np.full(n_events, 60000.0 + b),
                             np.full(n_events, 18.0, np.float32), np.full(n_events, 0.05, np.float32))
        t0 = time.perf_counter()
        res = store.append(ids, [1] * n_events, pts)
        ups = [st.ScoreUpdate(r.object_id, r.header.n_scored, np.array([0.1], np.float32),
                              np.full(SMOOTH, 0.1, np.float32)) for r in res]
        store.save_scores(ups)
        times.append(time.perf_counter() - t0)
        calls = len(layout.slot_groups(ids, store.chunk))
    # clean up this run's keys
    keys = list(client.scan_iter(match=f"{layout.prefix}:*", count=5000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])     # RedisCluster splits it by slot
    warm = times[2:] if len(times) > 4 else times
    return {"ms_per_batch": round(1000 * statistics.median(warm), 2), "calls_per_round_trip": calls}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, nargs="+", default=[500, 2000], help="distinct events per batch")
    ap.add_argument("--batches", type=int, default=12, help="batches per layout (the first two are warm-up)")
    ap.add_argument("--buckets", type=int, nargs="+", default=[0, 1024, 256, 64],
                    help="bucket counts to compare (0 = one hash tag per event)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-Redis reference")
    args = ap.parse_args(argv)
    base = cfg.load()
    cluster = redis_client(_cluster_settings())
    single = None if args.no_single else redis_client(base)
    for n in args.events:
        if single is not None:
            r = one(single, st.KeyLayout(f"bench-{uuid.uuid4().hex[:6]}"), n, args.batches)
            print(f"events {n:>5}  single Redis            {r['ms_per_batch']:>8} ms  calls {r['calls_per_round_trip']}")
        for b in args.buckets:
            r = one(cluster, st.KeyLayout(f"bench-{uuid.uuid4().hex[:6]}", b), n, args.batches)
            name = "one tag per event" if b == 0 else f"{b} buckets"
            print(f"events {n:>5}  cluster, {name:<18} {r['ms_per_batch']:>8} ms  calls {r['calls_per_round_trip']}",
                  flush=True)


def _cluster_settings() -> cfg.Settings:
    """The settings with redis.cluster true and the cluster's recorded (auto) address."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "cluster.yaml"
        f.write_text("redis:\n  cluster: true\n")
        return cfg.load(f)


if __name__ == "__main__":
    main()
