"""`ulens experiments`: the thesis' three series, each point simulate -> train -> evaluate.

* cadence: fraction of epochs dropped 0.05 / 0.2 / 0.3 / 0.4 (baseline 0.2)
* photometric error: 0.05 / 0.10 / 0.20 mag (baseline 0.05)
* topology: binary parameter sets baseline / distinct / planetary / stellar

Every point simulates its own training set (``--n-events``, half binary) and a fresh test
set (``--test-events``, another seed), trains with the standard recipe
(:mod:`training.train`) and evaluates on the fresh test set (:mod:`training.evaluate`).
The baseline point is shared by the three series (run once). Results: one table,
``{output_root}/experiments_{timestamp}/results.md`` and ``results.json``, plus every
run folder and dataset under it.

``--quick`` is a smoke run (a few hundred events, two epochs, a small net): it checks the
pipeline, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HELP = "run the cadence / photometric-error / topology series (simulate, train, evaluate) into one table"

BASELINE = {"binary_params": "baseline", "cadence": 0.2, "mag_err": 0.05}
SERIES = {
    "cadence": [{"cadence": c} for c in (0.05, 0.2, 0.3, 0.4)],
    "noise": [{"mag_err": e} for e in (0.05, 0.10, 0.20)],
    "topology": [{"binary_params": b} for b in ("baseline", "distinct", "planetary", "stellar")],
}
# how each setting reaches `ulens simulate` (option names of training.simulate)
SIMULATE_OPTIONS = {"binary_params": "--binary-params", "cadence": "--cadence-mask-prob",
                    "mag_err": "--mag-error-std"}


class ExperimentError(ValueError):
    """Bad experiment arguments (the message names the problem)."""


@dataclass
class Point:
    settings: dict
    series: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        s = self.settings
        return f"{s['binary_params']}_drop{s['cadence']:g}_err{s['mag_err']:g}"


def plan(series: list[str]) -> list[Point]:
    """The distinct simulation settings of the chosen series, each tagged with its series."""
    points: dict[tuple, Point] = {}
    for name in series:
        for change in SERIES[name]:
            settings = dict(BASELINE, **change)
            key = tuple(sorted(settings.items()))
            points.setdefault(key, Point(settings)).series.append(name)
    return list(points.values())


def simulate(settings: dict, n_events: int, seed: int, output: Path, workers: int,
             quiet: bool = False) -> Path:
    """Run `ulens simulate` in-process through its command contract."""
    mod = importlib.import_module("training.simulate")
    parser = argparse.ArgumentParser(prog="ulens simulate")
    parser.add_argument("--config", default=None)
    mod.add_arguments(parser)
    known = {o for a in parser._actions for o in a.option_strings}
    argv = ["--n-pspl", str(n_events - n_events // 2), "--n-binary", str(n_events // 2),
            "--output", str(output), "--seed", str(seed), "--workers", str(workers)]
    for key, value in settings.items():
        opt = SIMULATE_OPTIONS[key]
        if opt not in known:
            if value == BASELINE[key]:
                continue  # the simulator's default is the baseline
            raise ExperimentError(f"`ulens simulate` has no option {opt} (needed for {key}={value})")
        argv += [opt, str(value)]
    if quiet and "--quiet" in known:
        argv.append("--quiet")
    rc = mod.run(parser.parse_args(argv))
    if rc:
        raise ExperimentError(f"ulens simulate {' '.join(argv)} failed with exit status {rc}")
    return output


def run_experiments(series: list[str], n_events: int, test_events: int, output_root: Path, seed: int,
                    workers: int, train_overrides: dict, device: str = "auto",
                    progress: bool = True) -> Path:
    from training.artifact import resolve_device
    from training.evaluate import evaluate
    from training.train import TrainConfig, train

    eval_device = str(resolve_device(device))

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = output_root / f"experiments_{stamp}"
    (out / "data").mkdir(parents=True)
    rows = []
    points = plan(series)
    for k, point in enumerate(points):
        t0 = time.time()
        print(f"[{k + 1}/{len(points)}] {point.name} ({', '.join(point.series)})", file=sys.stderr)
        data = out / "data"
        train_file = simulate(point.settings, n_events, seed + 2 * k, data / f"{point.name}_train.npz", workers,
                              quiet=not progress)
        test_file = simulate(point.settings, test_events, seed + 2 * k + 1000, data / f"{point.name}_test.npz",
                             workers, quiet=not progress)
        cfg = TrainConfig(data=str(train_file), experiment_name=point.name, output_root=str(out / "runs"),
                          seed=seed, device=device, progress=progress,
                          command=f"ulens experiments (point {point.name})", **train_overrides)
        run_dir = train(cfg)
        s = evaluate(run_dir, test_file, split="test", early_detection=True, device=eval_device)
        early = {r["cut"]: r for r in s["early_detection"]}
        rows.append({
            "point": point.name, "series": point.series, **point.settings,
            "n_train_events": n_events, "n_test_events": s["n_events"], "run_dir": str(run_dir),
            "threshold": s["model"]["threshold"],
            "roc_auc": s["roc_auc"], "roc_auc_detectable": s["detectable"]["roc_auc"],
            "recall_detectable": s["detectable"]["recall_at_threshold"],
            "pspl_firing_rate": s["detectable"]["pspl_firing_rate"],
            "binaries_below_dchi2_160": s["binary_dchi2_fractions"]["below_160"],
            "recall_detectable_by_t0": early["t0"]["recall_detectable"],
            "median_decision_time_tE": s["decision_time"]["binary_detectable_tE"].get("median"),
            "wall_s": round(time.time() - t0, 1)})
        _write(out, rows, n_events, test_events)
    return out


def _write(out: Path, rows: list[dict], n_events: int, test_events: int) -> None:
    (out / "results.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    f = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Experiment series ({n_events} training events per point, fresh test sets of {test_events})", "",
             "Binary recall and PSPL firing rate at the model's threshold (<= 5% of validation PSPL fire); "
             "detectable = PSPL vs binaries with Δχ² >= 160.", "",
             "| series | binary params | drop fraction | σ (mag) | AUC all | AUC Δχ²≥160 | recall Δχ²≥160 | "
             "PSPL firing | binaries Δχ²<160 | recall Δχ²≥160 by t0 | median decision time [tE] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([", ".join(r["series"]), r["binary_params"], f(r["cadence"]), f(r["mag_err"]),
                                        f(r["roc_auc"]), f(r["roc_auc_detectable"]), f(r["recall_detectable"]),
                                        f(r["pspl_firing_rate"]), f(r["binaries_below_dchi2_160"]),
                                        f(r["recall_detectable_by_t0"]), f(r["median_decision_time_tE"])]) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small smoke run (numbers mean nothing)")
    p.add_argument("--series", default="cadence,noise,topology", help="comma-separated subset")
    p.add_argument("--n-events", type=int, default=6000, help="training events per point (half binary)")
    p.add_argument("--test-events", type=int, default=2000, help="fresh test events per point")
    p.add_argument("--epochs", type=int, default=30, help="most training epochs per point")
    p.add_argument("--max-minutes", type=float, default=10.0, help="training cap per point")
    p.add_argument("--workers", type=int, default=2, help="simulation processes")
    p.add_argument("--output-root", default="results", metavar="DIR",
                   help="folder under which experiments_<timestamp> is made")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulations and training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run(args) -> int:
    series = [s.strip() for s in args.series.split(",") if s.strip()]
    bad = [s for s in series if s not in SERIES]
    if bad or not series:
        raise ExperimentError(f"unknown series {bad or series}; choose from {', '.join(SERIES)}")
    overrides = {"epochs": args.epochs, "max_minutes": args.max_minutes}
    n, n_test = args.n_events, args.test_events
    if args.quick:
        n, n_test = min(n, 200), min(n_test, 100)
        overrides = {"epochs": 2, "max_minutes": 1.0, "conv_channels": (16, 16, 8), "fc_units": 16,
                     "batch_size": 16}
    if n < 40 or n_test < 10:
        raise ExperimentError("--n-events must be >= 40 and --test-events >= 10")
    out = run_experiments(series, n, n_test, Path(args.output_root), args.seed, args.workers, overrides,
                          device=args.device, progress=not args.no_progress)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'} and results.json", file=sys.stderr)
    return 0
