"""`ulens bench inference`: the model's full-length and windowed passes per batch size
(CPU, and CUDA when there is one)."""
from __future__ import annotations


import numpy as np

from ulens.bench.harness import Run, load_dataset, cached_dataset, log, make_row, timed_rate


def inference_rows(artifact, x_full: np.ndarray, batch_sizes: list[int], min_seconds: float,
                   device: str) -> list[dict]:
    """events/s of full-length ``predict`` and windowed ``predict_last`` per batch size."""
    rf = artifact.receptive_field
    t_len = x_full.shape[1]
    x_win = np.ascontiguousarray(x_full[:, -rf:])
    rows, full_rate = [], {}
    artifact.predict(x_full[:1])       # warm-up (allocator, kernels)
    artifact.predict_last(x_win[:1])

    def batch(x, b):
        reps = -(-b // len(x))
        return np.ascontiguousarray(np.concatenate([x] * reps)[:b]) if reps > 1 else x[:b].copy()

    for b in batch_sizes:
        xf, xw = batch(x_full, b), batch(x_win, b)
        artifact.predict(xf[:min(b, 16)])
        full_rate[b], _, _ = timed_rate(lambda: (artifact.predict(xf), b)[1], min_seconds)
        artifact.predict_last(xw[:min(b, 16)])
        win, _, _ = timed_rate(lambda: (artifact.predict_last(xw, n_last=1), b)[1], min_seconds)
        b1 = full_rate[batch_sizes[0]]
        rows.append(make_row(f"inference.{device}.full.b{b}", full_rate[b], "events/s",
                             b1 if b != batch_sizes[0] else None,
                             note=(f"artifact.predict over {t_len} points, batch {b}"
                                   + (f"; baseline: batch {batch_sizes[0]}" if b != batch_sizes[0] else ""))))
        rows.append(make_row(f"inference.{device}.windowed.b{b}", win, "events/s", full_rate[b],
                             note=f"artifact.predict_last (dependency cone of the newest output) "
                                  f"over the last {rf} points, batch {b}; baseline: full length, "
                                  "same batch"))
        log(f"inference {device} b{b}: full {full_rate[b]:,.0f}/s, windowed {win:,.0f}/s")
    return rows


def bench_inference(run: Run, a) -> list[dict]:
    import torch

    from training.artifact import load_artifact

    full = cached_dataset(run.cache, a.events, a.seed, a.workers)
    ds = load_dataset(full)
    length = a.length
    idx = np.flatnonzero(ds.lengths() >= length)[:256]
    if len(idx) == 0:
        raise ValueError(f"bench: no event with {length} points")
    model_dir = a.model or run.settings.model.resolved
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        art = load_artifact(model_dir, device)
        x = np.stack([art.inputs(*(arr[:length] for arr in ds.event(int(i)))) for i in idx])
        rows += inference_rows(art, x, a.batch_sizes, a.min_seconds, device)
    return rows
