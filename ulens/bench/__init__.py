"""`ulens bench consumer|decode|replay|inference|simulate|memory|scaleout [--json]`: measured,
not estimated.

Every benchmark prints rows ``{"name", "value", "unit", "baseline", "ratio"}`` (optional
``note``; ``ratio = value / baseline``), preceded by one ``context`` row with the machine
(nproc, load average before and after, torch threads, date, versions). ``--json`` prints
one JSON object per line; otherwise a table. Each figure is compared with a baseline
measured in the same run, on the same data and machine (see docs/BENCHMARKS.md).

Data: one simulated dataset per survey profile (``--events``, half binary, fixed ``--seed``)
is cached under ``--cache-dir`` (default ``<services.cache_dir>/bench``), keyed by its
parameters, with the streams cut from it (compact: the first ``--alerts`` alerts in
survey-time order; Rubin: whole events making about ``--alerts`` packets). Topics, consumer
groups and Redis keys of a run carry a unique tag and are deleted at the end.

One module per benchmark (``consumer``, ``decode``, ``replay``, ``inference``, ``simulate``,
``memory``, ``scaleout``), the shared harness (``harness``: rows, machine context, cached
datasets, the run's topics, groups and Redis prefixes) and the consumers a figure is
compared with (``baselines``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


from ulens.bench.consumer import bench_consumer
from ulens.bench.decode import add_arguments as decode_arguments
from ulens.bench.decode import bench_decode
from ulens.bench.harness import (Run, context_row, format_table, log, machine_context, make_row,
                                 positive_ints)
from ulens.bench.inference import bench_inference
from ulens.bench.memory import bench_memory
from ulens.bench.replay import bench_replay
from ulens.bench.scaleout import add_arguments as scaleout_arguments
from ulens.bench.scaleout import bench_scaleout
from ulens.bench.simulate import bench_simulate


HELP = ("throughput and latency benchmarks (consumer, decode, replay, inference, simulate, memory, "
        "scaleout), each against a baseline measured in the same run, with the machine's context")


BENCHMARKS = ("consumer", "decode", "replay", "inference", "simulate", "memory", "scaleout")


_sizes = positive_ints("batch sizes")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", nargs="+", choices=BENCHMARKS + ("all",),
                   help="which benchmarks to run (all = every one, in this order)")
    p.add_argument("--json", action="store_true", help="one JSON row per line (else a table)")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the JSON rows here")
    p.add_argument("--cache-dir", default=None,
                   help="simulated datasets are cached here [default <services.cache_dir>/bench]")
    p.add_argument("--events", type=int, default=5000, help="events in the cached dataset (half binary)")
    p.add_argument("--seed", type=int, default=1, help="simulation seed of the cached dataset")
    p.add_argument("--workers", type=int, default=None, help="processes for the one-off simulation")
    p.add_argument("--model", default=None, help="model artifact [config model.path]")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in this process (the in-process consumer, inference) "
                        "[torch's default]")
    g = p.add_argument_group("consumer / replay")
    g.add_argument("--alerts", type=int, default=200_000,
                   help="alerts in the stream: the first N in survey-time order over all events")
    g.add_argument("--warm-points", type=int, default=120,
                   help="second consumer run: the same number of alerts after each event's first N "
                        "points, put in Redis beforehand (0 = skip)")
    g.add_argument("--warm-alerts", type=int, default=60_000, help="alerts in that second run")
    g.add_argument("--naive-alerts", type=int, default=1000,
                   help="alerts (of the first events of the same stream) for the naive consumer")
    g.add_argument("--format", choices=("compact", "rubin"), default="compact",
                   help="consumer: our compact alert, or Rubin's lsst.v11_1 packet with a year of "
                        "history (whole events of --survey; rows consumer.rubin.*)")
    g.add_argument("--rule", choices=("tdcnn", "pspl-fit", "both"), default="tdcnn",
                   help="the broker's decision rule (default: tdcnn, the rule of the naive "
                        "baseline, a TD-CNN consumer: with another the ratio compares unlike work)")
    g.add_argument("--survey", default=None, metavar="NAME",
                   help="survey profile of the dataset (training/surveys) [thesis for compact, "
                        "lsst for rubin]")
    g.add_argument("--rate", type=float, default=None,
                   help="offered alerts/s in the latency run [3000 compact, 1000 rubin]")
    g.add_argument("--latency-seconds", type=float, default=30.0,
                   help="latency run: replay the first events of the stream making about "
                        "rate x seconds alerts")
    g.add_argument("--latency-events", type=int, default=None,
                   help="latency run: replay exactly the first N events instead")
    g.add_argument("--profile", metavar="DIR", default=None,
                   help="cProfile the consumer throughput run; write DIR/consumer_throughput.prof "
                        "('-' = print only) and print the top functions on stderr")
    decode_arguments(p.add_argument_group("decode"))
    scaleout_arguments(p.add_argument_group("scaleout (its stream: --format, --survey and --alerts "
                                            "as for consumer)"))
    g = p.add_argument_group("inference")
    g.add_argument("--batch-sizes", type=_sizes, default=[1, 16, 256, 4096], help="comma-separated")
    g.add_argument("--length", type=int, default=1200, help="full light-curve length in points")
    g.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    g = p.add_argument_group("simulate")
    g.add_argument("--sim-binary", type=int, default=64, help="binary events (workers=1)")
    g.add_argument("--sim-pspl", type=int, default=2048, help="PSPL events (workers=1)")
    g.add_argument("--sim-surveys", type=lambda v: [x for x in v.split(",") if x], default=["thesis", "lsst", "roman"],
                   metavar="NAMES", help="survey profiles, comma-separated (training/surveys)")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-events", type=int, default=100_000, help="live events held by the consumer")
    g.add_argument("--memory-points", type=int, default=2, help="points per event in that run")
    g.add_argument("--redis-events", type=int, default=1000, help="events grown to 100 points for "
                   "the per-event Redis figure")


def run(args) -> int:
    from config import mask_url
    from ulens.cli import EXIT_OK, EXIT_UNEXPECTED, exit_code_for

    which = list(BENCHMARKS) if "all" in args.benchmark else \
        [b for b in BENCHMARKS if b in args.benchmark]
    if args.survey is None:
        args.survey = "lsst" if args.format == "rubin" else "thesis"
    if args.torch_threads is not None:
        import torch
        torch.set_num_threads(args.torch_threads)
    before = machine_context()
    rows: list[dict] = []
    r = Run(args)
    fns = {"consumer": bench_consumer, "decode": bench_decode, "replay": bench_replay, "inference": bench_inference,
           "simulate": bench_simulate, "memory": bench_memory, "scaleout": bench_scaleout}
    failed = []
    try:
        for b in which:
            log(f"== {b} (load average {os.getloadavg()[0]:.2f})")
            t0 = time.perf_counter()
            try:
                got = fns[b](r, args)
            except Exception as exc:   # report the others; a failed benchmark is an error row
                failed.append(exc)
                what = mask_url(f"{type(exc).__name__}: {exc}")
                log(f"{b} failed: {what}")
                got = [make_row(f"{b}.error", None, None, note=what)]
            rows += got
            log(f"== {b} done in {time.perf_counter() - t0:.0f} s")
    finally:
        r.cleanup()
    rows.insert(0, context_row(before, machine_context()))
    rows[0]["context"]["benchmarks"] = which
    rows[0]["context"]["argv"] = " ".join(["ulens", "bench", *sys.argv[2:]]) \
        if sys.argv[1:2] == ["bench"] else None
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
    if args.output:
        Path(args.output).write_text("".join(json.dumps(row) + "\n" for row in rows))
    # the first failure's status in the `ulens` table (4: services unavailable...), else 1
    return (exit_code_for(failed[0]) or EXIT_UNEXPECTED) if failed else EXIT_OK
