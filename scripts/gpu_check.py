"""GPU check for the shipped model: CPU/GPU agreement and inference throughput.

Prints one JSON document: for each device, events/s of full-length inference (1,200
points per event) and of windowed inference of the newest point (the dependency cone
over the last receptive-field points), batch sizes 1..4096; and the largest
|P_cuda - P_cpu| on the same inputs. Usage: python3 scripts/gpu_check.py MODEL_DIR
"""
import json
import sys
import time

import numpy as np
import torch

from training.artifact import load_artifact


def rate(fn, n_events, min_s=0.5):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 0
    while True:
        fn()
        reps += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return n_events * reps / dt


def main(model_dir):
    rng = np.random.default_rng(0)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "devices": {}}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    full = rng.normal(size=(4096, 1200, 3)).astype(np.float32)
    arts = {d: load_artifact(model_dir, d) for d in devices}
    rf = arts["cpu"].receptive_field
    win = np.ascontiguousarray(full[:, -rf:])
    ref = arts["cpu"].predict(full[:64])
    for d, art in arts.items():
        res = {"full_events_per_s": {}, "window_events_per_s": {}}
        for b in (1, 16, 256, 1024, 4096):
            nb_full = min(b, 256 if d == "cpu" else 4096)
            res["full_events_per_s"][b] = round(rate(lambda: art.predict(full[:nb_full], batch_size=nb_full), nb_full))
            res["window_events_per_s"][b] = round(rate(lambda: art.predict_last(win[:b], batch_size=b), b))
        p = art.predict(full[:64])
        res["max_abs_diff_vs_cpu_full"] = float(np.abs(p - ref).max())
        res["max_abs_diff_window_vs_full"] = float(np.abs(art.predict_last(win[:64])[:, 0] - p[:, -1]).max())
        out["devices"][d] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
