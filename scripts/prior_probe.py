"""Prior-leak probe: how often a model fires on single lenses drawn outside its training
ranges of u0, tE and source fraction fs.

A PSPL event has no binary signal by construction, so a firing rate above the in-range
control is a simulator artefact the model learned, not physics (docs/BENCHMARKS_HISTORY.md,
"Prior leak"). PSPL events only, simulated in this process with one prior overridden at a
time (the baseline set's otherwise), scored at the card threshold on the whole curve.

Usage: python3 scripts/prior_probe.py MODEL_DIR [N_PER_VARIANT] > probe.json
"""
import json
import sys

import numpy as np
import torch

from training import decision, evaluate, simulate
from training.artifact import load_artifact
from training.simulate import U, SimulationConfig

VARIANTS = {   # name: (u0/tE overrides of the baseline set, fs prior)
    "in range (control)": ({}, U(0.5, 1.0)),
    "fs 0.1-0.5": ({}, U(0.1, 0.5)),
    "fs 0.1-0.5, u0 0.01-0.1": ({"u0": U(0.01, 0.1)}, U(0.1, 0.5)),
    "tE 3-10 d": ({"tE": U(3.0, 10.0)}, U(0.5, 1.0)),
    "tE 100-250 d": ({"tE": U(100.0, 250.0)}, U(0.5, 1.0)),
    "u0 0.001-0.01": ({"u0": U(0.001, 0.01)}, U(0.5, 1.0)),
    "u0 0.5-1": ({"u0": U(0.5, 1.0)}, U(0.5, 1.0)),
    "fs 1-1.5 (negative blending)": ({}, U(1.0, 1.5)),
}


def main(model_dir: str, n: int = 800) -> dict:
    torch.set_num_threads(1)
    art = load_artifact(model_dir, "cpu")
    dec = art.decision
    base, fs_prior = dict(simulate.PARAMETER_SETS["baseline"]), simulate.FS_PRIOR
    out = {"model": art.version, "threshold": art.threshold, "n_per_variant": n, "fire_rate": {}}
    try:
        for k, (name, (over, fs)) in enumerate(VARIANTS.items()):
            # in-process simulation (workers=0) reads these module globals at draw time
            simulate.PARAMETER_SETS["probe"] = dict(base, **over)
            simulate.FS_PRIOR = fs
            ds = simulate.simulate(n, 0, SimulationConfig(parameter_set="probe", seed=4242 + k), workers=0)
            probs = evaluate.event_probs(art, ds, np.arange(ds.n_events))
            score = np.array([decision.event_score(p, dec["min_points"], dec["smooth_window"]) for p in probs])
            rate = float(np.mean(score >= art.threshold))
            out["fire_rate"][name] = {"rate": round(rate, 4), "stderr": round(float(np.sqrt(rate * (1 - rate) / n)), 4)}
            print(f"{name:30s} fire {rate:.3f}", file=sys.stderr, flush=True)
    finally:
        simulate.FS_PRIOR = fs_prior
        simulate.PARAMETER_SETS.pop("probe", None)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 800), indent=1))
