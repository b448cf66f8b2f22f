"""`ulens demo`: the whole product on this machine in a few minutes.

services up -> simulate N events (fixed seed) -> replay them at a survey-like speed
while the broker consumes them with the shipped model -> decision-time report.

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
import time
from pathlib import Path

import config as cfg

HELP = ("Run the whole pipeline on this machine: start Kafka and Redis, simulate events, replay "
        "them as an alert stream while the broker consumes it with the shipped model, then print "
        "the decision-time report and where the plots are.")


class DemoError(RuntimeError):
    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code      # a failed stage's exit status; 3: bad input (ulens/cli.py)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=500,
                   help="number of simulated events, half single-lens and half binary")
    p.add_argument("--binary-params", default="baseline",
                   help="binary parameter set (baseline, distinct, planetary, stellar)")
    p.add_argument("--seed", type=int, default=20261127, help="simulation seed")
    p.add_argument("--speed", default="2500000",
                   help="replay speed in survey seconds per wall second (2.5e6 = 1000 survey days in "
                        "about 35 s), or 'max'")
    p.add_argument("--model", default=None, help="model artifact directory [config model.path]")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="simulation workers")
    p.add_argument("--output", default="runs", help="folder under which the demo run folder is made")
    p.add_argument("--idle", type=float, default=10.0,
                   help="the consumer stops after this many seconds with nothing to read")


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
                            "--workers", str(args.workers), "--output", str(data)])
        model = ["--model", args.model] if args.model else []
        consume = ["consume", *conf, *model, "--until-idle", str(args.idle)]
        print(f"\n== consume (in the background): ulens {' '.join(consume)}", flush=True)
        consumer = subprocess.Popen([sys.executable, "-m", "ulens.cli", *consume])
        try:
            _stage("replay", ["replay", *conf, "--data", str(data), "--speed", str(args.speed),
                              "--truth-out", str(truth)])
            rc = consumer.wait()
        finally:
            if consumer.poll() is None:
                consumer.terminate()
                consumer.wait(30)
        if rc != 0:
            raise DemoError(f"stage 'consume' failed with exit status {rc}", rc)
        _stage("report", ["report", *conf, "--truth", str(truth), "--plots", str(folder / "plots"),
                          "--output", str(folder / "report.json")])
    except DemoError as exc:
        print(f"\nulens demo: {exc} (run folder {folder})", file=sys.stderr)
        return exc.exit_code
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; run folder {folder} "
          f"(report.json, plots/, truth.jsonl, config.yaml)")
    return 0
