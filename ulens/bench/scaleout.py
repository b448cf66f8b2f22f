"""`ulens bench scaleout`: one stream drained by 1, 2, 4... `ulens consume` processes in one
consumer group (Kafka's group protocol shares the partitions; nothing of ours shards).

For each process count N, N processes start in a new group with a new Redis prefix (the
same work each time: every event new to the state) on a new, empty topic with
``--scaleout-partitions`` partitions. Once the group is stable with N members holding every
partition, the processes are stopped (SIGSTOP), the stream is produced (``ulens replay
--speed max``), and they are let go together (SIGCONT): none starts before the others, and
the producer does not share the cores with them. The figure is all the alerts over the time
from the first batch any of them began to the last batch any of them finished. The baseline of every row is N = 1 in the same run; the note
gives each process's share and busy time and the load average, which says where scaling
stops on a small machine: Kafka, Redis and the consumers share its cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from ulens.bench.harness import (Run, cached_dataset, cached_derived, first_alerts, load_dataset, log,
                                 make_row, positive_ints)


_processes = positive_ints("process counts")


def _wait_stable(client: dict, group: str, members: int, partitions: int, procs, timeout: float = 120.0) -> None:
    """Until ``group`` is stable with ``members`` members holding ``partitions`` partitions."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**client, "log_level": 4})
    end = time.monotonic() + timeout
    seen = None
    while time.monotonic() < end:
        dead = [p.returncode for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"scaleout: a `ulens consume` process exited ({dead[0]}) before the group was stable")
        try:
            d = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
            held = sum(len(m.assignment.topic_partitions) for m in d.members)
            seen = (d.state, len(d.members), held)
            if d.state == ConsumerGroupState.STABLE and len(d.members) == members and held == partitions:
                return
        except Exception as exc:        # the group does not exist until the first member joins
            seen = exc
        time.sleep(0.5)
    raise RuntimeError(f"scaleout: group {group} not stable with {members} members in {timeout:.0f} s "
                       f"(last seen: {seen})")


def bench_scaleout(run: Run, a) -> list[dict]:
    from ulens.bench.consumer import model_for, rubin_stream

    rubin = a.format == "rubin"
    fmt = ["--format", "rubin"] if rubin else []
    full = cached_dataset(run.cache, a.events, a.seed, a.workers, a.survey)
    if rubin:
        stream, lens, what = rubin_stream(run, full, a.alerts, a.survey)
        n = int(lens.sum())
    else:
        stream = cached_derived(Path(str(full).replace(".npz", f"_first{a.alerts}.npz")),
                                lambda: first_alerts(load_dataset(full), a.alerts))
        n = len(load_dataset(stream).time)
        what = f"{n} compact alerts"
    log(f"scaleout: {what}; processes {a.processes}, {a.scaleout_partitions} partitions")
    rows, base = [], None
    unit = "packets/s" if rubin else "alerts/s"
    for k in a.processes:
        topic = run.topic(f"scaleout{k}.alerts", a.scaleout_partitions)
        s = run.broker_settings(topic, f"scaleout{k}")
        conf = run.config_file(s, f"scaleout{k}")
        env = dict(os.environ, OMP_NUM_THREADS="1")       # one torch thread a process
        model = model_for(a)
        cmd = run.ulens(["consume", "--until-idle", str(a.scaleout_idle),
                         *(["--model", model] if model else [])], conf)
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(k)]
        try:
            _wait_stable(run.client, s.consumer.group, k, a.scaleout_partitions, procs)
            for p in procs:
                os.kill(p.pid, signal.SIGSTOP)
            rep = run.replay(stream, topic, fmt)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
        if rep["counts"]["alerts_delivered"] != n:
            raise RuntimeError(f"replay delivered {rep['counts']['alerts_delivered']} of {n} alerts")
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        outs = [p.communicate(timeout=1800) for p in procs]
        wall = time.monotonic() - t0
        bad = [(p.returncode, e.strip()[-1500:]) for p, (_, e) in zip(procs, outs) if p.returncode != 0]
        if bad:
            raise RuntimeError(f"scaleout {k}: `ulens consume` failed: {bad[0]}")
        sums = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
        got = sum(x["alerts"] for x in sums)
        if got < n:
            raise RuntimeError(f"scaleout {k}: the processes read {got} of {n} alerts")
        active = [x for x in sums if x["alerts"]]
        t_first = min(x["first_batch_unix"] for x in active)
        t_last = max(x["last_batch_unix"] for x in active)
        rate = n / (t_last - t_first)
        if base is None:
            base = rate
        shares = ", ".join(f"{x['alerts']} ({x['busy_seconds']:.1f} s busy)" for x in sums)
        log(f"scaleout {k}: {rate:,.0f} {unit} ({t_last - t_first:.1f} s of batches, {wall:.0f} s "
            f"with start-up); per process {shares}")
        rows.append(make_row(f"scaleout.{'rubin.' if rubin else ''}p{k}", rate, unit, base,
                             note=f"{k} `ulens consume` processes, one group, {a.scaleout_partitions} "
                                  f"partitions, {what}: {got} alerts read ({got - n} read twice "
                                  f"after rebalances) in {t_last - t_first:.1f} s from the first "
                                  f"batch to the last; per process alerts (busy): {shares}; load "
                                  f"average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, "
                                  f"{os.cpu_count()} cores; baseline: 1 process, same run",
                             target=">= 1.8x with 2 processes (enough cores)" if k == 2 else None))
    return rows


def add_arguments(g) -> None:
    g.add_argument("--processes", type=_processes, default=[1, 2, 4],
                   help="scaleout: consumer process counts to run, comma-separated")
    g.add_argument("--scaleout-partitions", type=int, default=8,
                   help="scaleout: partitions of its alerts topic (at least the largest count)")
    g.add_argument("--scaleout-idle", type=float, default=20.0,
                   help="scaleout: each process exits after this many idle seconds")

