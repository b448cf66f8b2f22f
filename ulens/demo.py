"""`ulens demo`: the whole product on this machine in a few minutes.

services up -> simulate N events (fixed seed) through a survey profile (default: lsst,
Rubin's bulge cadence in ugrizy) -> replay them (default: as Rubin's own lsst.v11_1
packets) at a steady rate the consumer sustains with headroom while the broker consumes
them with the model that serves that survey (``MODEL_FOR_SURVEY``: lsst -> the config's
model.path, models/tdcnn-lsst; thesis -> models/tdcnn-baseline) -> decision-time report,
then the replay rate, the consumer's busy share and the alert -> trigger latency.

The rate: replayed as fast as Kafka takes them, alerts queue in front of the consumer
and the latency the report gives is that queue's. ``--rate`` (default ``DEFAULT_RATE``
alerts/s, about half of what the consumer sustains on this stream on a 2-core machine
shared with the replay, Kafka, Redis and other jobs: docs/BENCHMARKS.md, "Demo") keeps the consumer mostly idle between batches, so the
latency is the broker's own: the replay producer's linger (``REPLAY_LINGER_MS``),
Kafka, the consumer's batch (Redis, model, decision, the trigger's PSPL estimate) and
the trigger's produce. ``--rate max`` replays as fast as possible (a throughput run).

Each demo run gets its own topics, consumer group and Redis key prefix (written to a
config file in the run folder and passed to every stage with --config), so runs never
see each other's alerts or triggers. Every stage runs as its own `ulens` process, as
a user would run it; a failing stage stops the demo with its name, and the demo exits
with that stage's exit status (services unavailable stays 4, bad input 3...).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import config as cfg
from replay.cli import positive_or_max

DEFAULT_EVENTS = 150
# the model each survey's demo runs unless --model says otherwise (README, "Which model");
# None: the config's model.path
MODEL_FOR_SURVEY = {"lsst": None, "thesis": "models/tdcnn-baseline"}
DEFAULT_RATE = 2000.0       # alerts/s; measured in docs/BENCHMARKS.md, "Demo"
# Rubin packets: one consumer sustains ~3,000 packets/s here in full batches, but a batch of
# one or two packets costs ~20 ms (the offset commit, Redis and model calls), so 100
# packets/s keeps it busy with small batches and the latency is its own: docs/BENCHMARKS.md, "Demo"
DEFAULT_RATE_RUBIN = 100.0
ASSIGN_TIMEOUT_S = 120.0   # waiting for the consumer's partitions before the replay starts
REPLAY_LINGER_MS = 5        # the replay producer's linger (its default, 25 ms, is for throughput)

HELP = ("Run the whole pipeline on this machine: start Kafka and Redis, simulate events, replay "
        "them as an alert stream while the broker consumes it with the shipped model, then print "
        "the decision-time report and where the plots are.")


class DemoError(RuntimeError):
    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code      # a failed stage's exit status; 3: bad input (ulens/cli.py)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS,
                   help=f"number of simulated events, half single-lens and half binary (default "
                        f"{DEFAULT_EVENTS}; lsst: ~25 Rubin packets each, ~40 s of replay at the "
                        f"default rate; thesis: ~1,200 alerts each, ~90-110 s; more for a bigger run)")
    p.add_argument("--binary-params", default="baseline",
                   help="binary parameter set (baseline, distinct, planetary, stellar)")
    p.add_argument("--seed", type=int, default=20261127, help="simulation seed")
    p.add_argument("--rate", type=positive_or_max, default=None,
                   help=f"replay rate cap in alerts/s, or 'max' (as fast as Kafka takes them: the "
                        f"latency is then mostly queueing) (default {DEFAULT_RATE:g} compact alerts/s, "
                        f"{DEFAULT_RATE_RUBIN:g} Rubin packets/s: well below what the consumer "
                        f"sustains on a loaded 2-core machine, docs/BENCHMARKS.md)")
    p.add_argument("--speed", default="max",
                   help="replay speed in survey seconds per wall second, or 'max' (default: only "
                        "--rate paces the replay)")
    p.add_argument("--survey", default="lsst", choices=("lsst", "thesis"),
                   help="survey profile the events are drawn through (training/surveys/): lsst = "
                        "Rubin's bulge cadence in ugrizy; thesis = 1,500 even epochs in one band "
                        "(the thesis' survey, ~1,200 alerts per event) (default: lsst)")
    p.add_argument("--format", default=None, choices=("ulens", "rubin"), dest="alert_format",
                   help="alert format the replay sends: rubin (Rubin's lsst.v11_1 packet, one per "
                        "5-sigma detection with 365 days of history; needs `ulens rubin "
                        "fetch-schemas`, which the set-up runs) or ulens (our compact alert, one per "
                        "point) (default: rubin for lsst, ulens for thesis)")
    p.add_argument("--model", default=None,
                   help="model artifact directory (default: the one that serves --survey: lsst -> "
                        "config model.path (models/tdcnn-lsst), thesis -> models/tdcnn-baseline)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="simulation workers")
    p.add_argument("--output", default="runs", help="folder under which the demo run folder is made")
    p.add_argument("--idle", type=float, default=10.0,
                   help="the consumer stops after this many seconds with nothing to read")


def _make_alert_topic(run_conf: Path) -> None:
    """The run's alert topic, made now (the replay would make it too, later) so that the
    consumer can join and get its partitions before the first alert."""
    from replay.producer import ensure_topic

    s = cfg.load(str(run_conf))
    ensure_topic(s.kafka.client_config(), s.kafka.topics.alerts, s.kafka.partitions.alerts)


def _watch_assignment(proc) -> tuple[threading.Event, threading.Thread]:
    """Pass the consumer's log (stderr) through; the event is set at its first partition
    assignment (its log line "assigned N partition(s) of <topic>"), or when it exits."""
    ready = threading.Event()

    def tee():
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if " assigned " in line and " partition(s) of " in line:
                ready.set()
        ready.set()

    t = threading.Thread(target=tee, name="consumer-log", daemon=True)
    t.start()
    return ready, t


def _stage(name: str, argv: list[str]) -> None:
    print(f"\n== {name}: ulens {' '.join(argv)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ulens.cli", *argv])
    if proc.returncode != 0:
        raise DemoError(f"stage '{name}' failed with exit status {proc.returncode}", proc.returncode)
    print(f"== {name}: done in {time.monotonic() - t0:.1f} s", flush=True)


def run(args: argparse.Namespace) -> int:
    if args.events < 2:
        raise DemoError("--events must be at least 2")
    if args.alert_format is None:
        args.alert_format = "rubin" if args.survey == "lsst" else "ulens"
    if args.model is None:
        args.model = MODEL_FOR_SURVEY[args.survey]
    if args.rate is None:
        args.rate = DEFAULT_RATE_RUBIN if args.alert_format == "rubin" else DEFAULT_RATE
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(args.output) / f"demo_{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    base = ["--config", args.config] if args.config else []
    settings = cfg.load(args.config)
    tag = f"demo.{stamp}"
    run_conf = folder / "config.yaml"
    run_conf.write_text(
        ("" if not args.config else f"# over {args.config}\n") +
        "kafka:\n  topics:\n"
        f"    alerts: {tag}.alerts\n    triggers: {tag}.triggers\n"
        f"    dead_letter: {tag}.alerts.dlq\n    truth: {tag}.truth\n"
        f"redis:\n  key_prefix: {settings.redis.key_prefix}:{tag}\n"
        f"consumer:\n  group: ulens-{tag}\n")
    if args.config:  # merge the user's file first, then the run's names over it
        import yaml
        merged = yaml.safe_load(Path(args.config).read_text()) or {}
        for k, v in yaml.safe_load(run_conf.read_text()).items():
            merged.setdefault(k, {}).update(v) if isinstance(v, dict) else merged.__setitem__(k, v)
        run_conf.write_text(yaml.safe_dump(merged))
    conf = ["--config", str(run_conf)]
    data = folder / "events.npz"
    truth = folder / "truth.jsonl"
    started = time.monotonic()
    try:
        _stage("services", ["services", *base, "up"])
        n_bin = args.events // 2
        _stage("simulate", ["simulate", *conf, "--n-pspl", str(args.events - n_bin), "--n-binary", str(n_bin),
                            "--binary-params", args.binary_params, "--seed", str(args.seed),
                            "--survey", args.survey,
                            "--workers", str(args.workers), "--output", str(data)])
        model = ["--model", args.model] if args.model else []
        consume = ["consume", *conf, *model, "--until-idle", str(args.idle)]
        print(f"\n== consume (in the background): ulens {' '.join(consume)}", flush=True)
        summary_file = folder / "consumer_summary.json"   # its stdout: the summary line
        _make_alert_topic(run_conf)
        with open(summary_file, "w") as out:
            consumer = subprocess.Popen([sys.executable, "-m", "ulens.cli", *consume], stdout=out,
                                        stderr=subprocess.PIPE, text=True, bufsize=1)
        ready, tee = _watch_assignment(consumer)
        try:
            # alerts replayed before the consumer has its partitions (group join, model
            # load: seconds) would wait in Kafka and their latency would be that wait
            if not ready.wait(ASSIGN_TIMEOUT_S) and consumer.poll() is None:
                print(f"ulens demo: the consumer has no partitions after {ASSIGN_TIMEOUT_S:.0f} s; "
                      "replaying anyway", file=sys.stderr)
            rate = [] if args.rate == "max" else ["--rate", f"{args.rate:g}"]
            _stage("replay", ["replay", *conf, "--data", str(data), "--format", args.alert_format,
                              "--speed", str(args.speed), *rate,
                              "-X", f"linger.ms={REPLAY_LINGER_MS}", "--truth-out", str(truth)])
            rc = consumer.wait()
        finally:
            if consumer.poll() is None:
                consumer.terminate()
                consumer.wait(30)
            tee.join(10)
        if rc != 0:
            raise DemoError(f"stage 'consume' failed with exit status {rc}", rc)
        _stage("report", ["report", *conf, "--truth", str(truth), "--plots", str(folder / "plots"),
                          "--consumer-summary", str(summary_file), "--output", str(folder / "report.json")])
    except DemoError as exc:
        print(f"\nulens demo: {exc} (run folder {folder})", file=sys.stderr)
        return exc.exit_code
    print("\n" + final_lines(folder, args.rate))
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; run folder {folder} "
          f"(report.json, plots/, truth.jsonl, config.yaml, replay.json, consumer_summary.json)")
    print(dashboard_line(folder))
    return 0


def dashboard_line(folder: Path) -> str:
    """Where to look next: the dashboard over this run's trigger topic and Redis state."""
    from followup.dashboard import DEFAULT_PORT

    return (f"\nthe triggers and each event's light curve, in a browser: .venv/bin/ulens dashboard --config "
            f"{folder / 'config.yaml'}  ->  http://127.0.0.1:{DEFAULT_PORT}/")


def final_lines(folder: Path, rate) -> str:
    """The demo's closing figures: replay rate, the consumer's busy share while it ran,
    alert -> trigger latency per rule (from replay.json, consumer_summary.json and
    report.json in the run folder)."""
    import json

    rep = json.loads((folder / "replay.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    cap = "as fast as possible" if rate == "max" else f"--rate {rate:g}"
    lines = [f"replay: {rep['counts']['alerts_produced']:,} alerts in {rep['seconds']:.1f} s = "
             f"{rep['alerts_per_s']:,.0f} alerts/s ({cap})"]
    summ = None
    for line in (folder / "consumer_summary.json").read_text().splitlines():
        if line.startswith("{"):
            summ = json.loads(line)
    if summ and rep["seconds"] > 0:
        lines.append(f"consumer: busy {summ['busy_seconds']:.1f} s of the replay's {rep['seconds']:.1f} s "
                     f"({100 * summ['busy_seconds'] / rep['seconds']:.0f}%); {summ['triggers']} triggers")
    for rule, r in report["rules"].items():
        lat = r["latency_ms"]
        if lat["n"]:
            lines.append(f"latency alert produced -> trigger produced ({rule}, {lat['n']} triggers): "
                         f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms")
        else:
            lines.append(f"latency ({rule}): no triggers")
    return "\n".join(lines)
