"""GPU check for the shipped model: CPU/GPU agreement and inference throughput.

Prints one JSON document: for each device, events/s of full-length inference (1,200
points per event) and of windowed inference of the newest point (the dependency cone
over the last receptive-field points), batch sizes 1..4096; the largest
|P_cuda - P_cpu| on the same inputs; and ``scorer``: the broker's own inference step
(``broker.inference.Scorer.score``: features + scalers + model, what a consumer batch
costs besides Kafka and Redis) on jobs like a consumer's: B warm events with one new
point each (tail windows) and B young events (10-90 points, the GPU pads them into one
pass), events/s per device and the largest |P_cuda - P_cpu| of the Scorer's output.
Usage: python3 scripts/gpu_check.py MODEL_DIR
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
    out["scorer"] = scorer_check(arts, rng)
    print(json.dumps(out, indent=1))


def scorer_check(arts, rng) -> dict:
    """The broker's Scorer on consumer-like jobs, per device and batch size."""
    from broker.inference import Job, Scorer, window_start
    from training.features import REFERENCE_POINTS

    rf = arts["cpu"].receptive_field

    def curve(n):
        t = 61000.0 + np.cumsum(rng.uniform(0.2, 2.0, n))
        u = np.sqrt(0.3 ** 2 + ((t - t[n // 2]) / 30.0) ** 2)
        amp = (u ** 2 + 2) / (u * np.sqrt(u ** 2 + 4))
        err = rng.uniform(0.01, 0.1, n)
        return t, (19.0 - 2.5 * np.log10(amp) + rng.normal(0, err)).astype(np.float32), err.astype(np.float32)

    def job(t, mag, err, new):
        n = len(t)
        s = window_start(n - new, 0, REFERENCE_POINTS, rf)
        ref = float(np.median(mag[:REFERENCE_POINTS].astype(np.float64))) if n >= REFERENCE_POINTS else None
        return Job(n - new, s, t[s:], mag[s:], err[s:], ref)

    sizes = (1, 100, 1000, 5000)
    warm = [job(*curve(400), 1) for _ in range(max(sizes))]
    young = [job(*curve(int(n)), 1) for n in rng.integers(10, 90, max(sizes))]
    res = {}
    ref_out = {}
    for d, art in arts.items():
        sc = Scorer(art)
        r = {"pad_young": sc.pad_young}
        for name, jobs in (("warm", warm), ("young", young)):
            got = sc.score(jobs[:1000])
            if d == "cpu":
                ref_out[name] = got
            else:
                r[f"max_abs_diff_vs_cpu_{name}"] = float(max(np.abs(a - b).max() for a, b in zip(got, ref_out[name])))
            r[f"{name}_events_per_s"] = {b: round(rate(lambda: sc.score(jobs[:b]), b, 0.3)) for b in sizes}
        res[d] = r
    return res


if __name__ == "__main__":
    main(sys.argv[1])
