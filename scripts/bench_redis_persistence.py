"""What Redis durability costs the consumer: `ulens bench consumer` against each setting.

Starts one private Apache Kafka and one private redis-server per value of
``services.redis_appendfsync`` (always, everysec, off), each configured exactly as
`ulens services up` configures it (free loopback ports, state under a temporary folder,
wiped at the end), then runs `ulens bench consumer` against each Redis in turn, same
Kafka, ``--rounds`` rounds with the order rotated so that a change of machine load hits
every setting alike. Each run measures its own naive-consumer baseline. Prints one line per
run and the medians; the bench's JSON rows are kept under ``--output``.

    .venv/bin/python scripts/bench_redis_persistence.py [--rounds 3] [--output DIR] \
        [-- BENCH ARGS ...]          # default BENCH ARGS: see BENCH_ARGS below

Figures in docs/BENCHMARKS_HISTORY.md ("Redis persistence").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import config as cfg                      # noqa: E402
from ulens import services as svc         # noqa: E402

SETTINGS = ("always", "everysec", "off")
BENCH_ARGS = ["--alerts", "60000", "--warm-points", "0", "--naive-alerts", "300",
              "--latency-events", "10", "--torch-threads", "1"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs per setting (default: 3)")
    ap.add_argument("--output", default=None, help="folder for the JSON rows (default: a temporary one)")
    ap.add_argument("bench_args", nargs="*", help="arguments for `ulens bench consumer` "
                    f"(default: {' '.join(BENCH_ARGS)})")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ulens-persistence-"))
    out = Path(a.output) if a.output else root / "rows"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ULENS_")}
    kport, cport, *rports = svc.free_ports(2 + len(SETTINGS))
    confs, settings = {}, {}
    for mode, rport in zip(SETTINGS, rports):
        data = {"kafka": {"bootstrap_servers": f"127.0.0.1:{kport}"},
                "redis": {"url": f"redis://127.0.0.1:{rport}/0"},
                "services": {"state_dir": str(root / mode), "kafka_port": kport,
                             "kafka_controller_port": cport, "redis_port": rport,
                             "redis_appendfsync": mode, "kafka_heap_mb": 512}}
        confs[mode] = root / f"{mode}.yaml"
        confs[mode].write_text(yaml.safe_dump(data))
        settings[mode] = cfg.load(confs[mode], env=env)
    first, *others = SETTINGS
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in SETTINGS}
    try:
        svc.up(settings[first], quiet=True)           # the Kafka, and the first Redis
        for mode in others:                           # the other Redis servers: Redis alone
            s = settings[mode].services
            paths = svc.Paths(s.state_path)
            paths.state.mkdir(parents=True, exist_ok=True)
            pid, _ = svc._start_redis(s, paths)
            svc._wait(lambda s=s: svc._redis_answers(s.redis_port), s.start_timeout_s, "redis-server",
                      pid, "redis-server", paths.logs() / "redis.log")
            svc._apply_persistence(s, paths)
        for mode in SETTINGS:
            print(f"{mode:<9} redis {svc._redis_persistence(settings[mode].services.redis_port)}", flush=True)
        for r in range(a.rounds):
            order = SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]
            for mode in order:
                rows_file = out / f"{mode}-{r}.jsonl"
                cmd = [sys.executable, "-m", "ulens.cli", "bench", "consumer", "--config", str(confs[mode]),
                       "--json", "--output", str(rows_file), *(a.bench_args or BENCH_ARGS)]
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
                ctx = rows[0]["context"]
                thr = next(x for x in rows if x["name"] == "consumer.throughput")
                results[mode].append((thr["value"], thr["baseline"]))
                delayed = svc._redis(settings[mode].services.redis_port).info("persistence").get("aof_delayed_fsync")
                print(f"round {r} {mode:<9} consumer {thr['value']:>8,.0f} alerts/s  naive baseline "
                      f"{thr['baseline']:>6,.1f} alerts/s  ratio {thr['ratio']:>6.1f}  load "
                      f"{ctx['loadavg_before'][0]:.2f} -> {ctx['loadavg_after'][0]:.2f}  "
                      f"aof_delayed_fsync {delayed}", flush=True)
    finally:
        for mode in reversed(SETTINGS):               # the Kafka last (with the first setting)
            svc.down(settings[mode], wipe=True, quiet=True)
    print("median over rounds:")
    ref = statistics.median(v for v, _ in results["everysec"])
    for mode in SETTINGS:
        med = statistics.median(v for v, _ in results[mode])
        print(f"  {mode:<9} {med:>8,.0f} alerts/s ({med / ref:.2f}x everysec), naive baseline "
              f"{statistics.median(b for _, b in results[mode]):,.1f} alerts/s; runs: "
              + ", ".join(f"{v:,.0f}" for v, _ in results[mode]))
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
