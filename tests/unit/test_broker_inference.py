"""Windowed inference equals the model over the whole light curve (no services).

The broker's window rule (``window_start``) and trimming rule are emulated here in pure
Python; ``tests/integration/test_consumer.py`` runs the same comparison through the
real Redis scripts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from broker.inference import Job, Scorer, tail_inputs, window_start
from training.artifact import load_artifact, save_artifact
from training.features import REFERENCE_POINTS, build_features
from training.model import TDCNN
from training.scalers import TwoStageScaler


def light_curve(rng, n: int, t0: float = 61000.0):
    """A noisy single-lens-like light curve: (time MJD float64, mag float32, err float32)."""
    t = t0 + np.cumsum(rng.uniform(0.05, 2.0, n))
    peak = rng.uniform(t[0], t[-1])
    te = rng.uniform(5.0, 60.0)
    u0 = rng.uniform(0.05, 1.0)
    u = np.sqrt(u0 ** 2 + ((t - peak) / te) ** 2)
    amp = (u ** 2 + 2) / (u * np.sqrt(u ** 2 + 4))
    err = rng.uniform(0.01, 0.1, n)
    mag = rng.uniform(17.0, 21.0) - 2.5 * np.log10(amp) + rng.normal(0.0, err)
    return t, mag.astype(np.float32), err.astype(np.float32)


def make_artifact(directory, seed: int = 0, threshold: float = 0.5, device: str = "cpu"):
    """A real (untrained, randomly initialised) TD-CNN artifact with fitted scalers."""
    torch.manual_seed(seed)
    model = TDCNN().eval()
    # give BatchNorm non-trivial statistics so outputs vary with the input
    with torch.no_grad():
        for block in model.blocks:
            bn = block[1]
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.2, 2.0)
    rng = np.random.default_rng(seed)
    feats = np.concatenate([build_features(*light_curve(rng, 300)) for _ in range(5)])
    scalers = TwoStageScaler.fit(feats)
    save_artifact(directory, model, {"name": f"random-{seed}", "threshold": threshold}, scalers)
    return load_artifact(directory, device)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("art"), seed=3)


def _stream_windowed(artifact, t, mag, err, chunks, max_points):
    """Feed the curve chunk by chunk through the broker's windowing; all probabilities."""
    k, rf = REFERENCE_POINTS, artifact.receptive_field
    scorer = Scorer(artifact)
    first = 0          # global index of the oldest stored point
    n_scored = 0
    out = []
    pos = 0
    for size in chunks:
        n_total = pos + size
        pos = n_total
        # the Lua trimming rule: keep max_points, never the context of unscored points
        drop = (n_total - first) - max_points
        lim = n_scored - rf
        lim = 0 if lim < k else lim
        first += max(0, min(drop, lim - first))
        s = window_start(n_scored, first, k, rf)
        ref = float(np.median(mag[:k].astype(np.float64))) if n_total >= k else None
        job = Job(n_scored, s, t[s:n_total], mag[s:n_total], err[s:n_total], ref)
        (p,) = scorer.score([job])
        assert len(p) == size
        out.append(p)
        n_scored = n_total
    return np.concatenate(out)


@pytest.mark.parametrize("chunking", ["one_by_one", "random_chunks"])
def test_windowed_equals_full_curve(artifact, chunking):
    rng = np.random.default_rng(11)
    t, mag, err = light_curve(rng, 400)
    full = artifact.predict(artifact.inputs(t, mag, err)[None])[0]
    if chunking == "one_by_one":
        chunks = [1] * len(t)
    else:
        chunks = []
        left = len(t)
        while left:
            c = int(min(left, rng.integers(1, 40)))
            chunks.append(c)
            left -= c
    got = _stream_windowed(artifact, t, mag, err, chunks, max_points=120)
    assert got.shape == full.shape
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pad_young", [False, True])
@pytest.mark.parametrize("min_group", [1, 32])
def test_many_events_in_one_batch_equal_full_curves(artifact, pad_young, min_group):
    """A batch mixing young events (start 0) and tail windows of several lengths; young
    windows grouped by length (CPU) or right-padded into one full pass (GPU); groups
    smaller than min_group right-padded together (tails to a few bucket lengths)."""
    rng = np.random.default_rng(5)
    curves = [light_curve(rng, int(n)) for n in rng.integers(20, 300, 12)]
    scorer = Scorer(artifact, pad_young=pad_young, min_group=min_group)
    jobs, expect = [], []
    for t, mag, err in curves:
        n = len(t)
        new = int(rng.integers(1, 4))
        n_scored = n - new
        s = window_start(n_scored, 0, REFERENCE_POINTS, artifact.receptive_field)
        ref = float(np.median(mag[:REFERENCE_POINTS].astype(np.float64)))
        jobs.append(Job(n_scored, s, t[s:], mag[s:], err[s:], ref))
        expect.append(artifact.predict(artifact.inputs(t, mag, err)[None])[0][n_scored:])
    for got, exp in zip(scorer.score(jobs), expect):
        np.testing.assert_allclose(got, exp, atol=1e-5, rtol=0)


def test_tail_inputs_bit_equal_to_artifact_inputs(artifact):
    rng = np.random.default_rng(2)
    b, n = 32, 97
    t = 61000.0 + np.cumsum(rng.uniform(0.0, 5.0, (b, n + 1)), axis=1)
    mag = rng.uniform(12.0, 25.0, (b, n)).astype(np.float32)
    err = rng.uniform(0.001, 1.0, (b, n)).astype(np.float32)
    ref = rng.uniform(12.0, 25.0, b)
    fast = tail_inputs(artifact.scalers, t, mag, err, ref)
    for i in range(b):
        slow = artifact.inputs(t[i, 1:], mag[i], err[i], reference=float(ref[i]), prev_time=float(t[i, 0]))
        assert np.array_equal(fast[i], slow)
    assert Scorer(artifact).vectorised


def test_window_start_rule():
    k, rf = 10, 97
    assert window_start(0, 0, k, rf) == 0           # new event: from its first point
    assert window_start(50, 0, k, rf) == 0          # shorter than the receptive field
    assert window_start(rf + k - 3, 0, k, rf) == 0  # its first row would come before the K-th point
    assert window_start(rf + k - 2, 0, k, rf) == k - 2   # tail: first row the K-th point (fixed reference)
    assert window_start(500, 450, k, rf) == 450     # never before the oldest stored point


def newest_point_jobs(rng, curves, rf: int) -> list:
    """The consumer's job for each whole curve when its newest 1-4 points are new."""
    jobs = []
    for t, mag, err in curves:
        n = len(t)
        new = int(rng.integers(1, min(4, n) + 1))
        s = window_start(n - new, 0, REFERENCE_POINTS, rf)
        ref = float(np.median(mag[:REFERENCE_POINTS].astype(np.float64))) if n >= REFERENCE_POINTS else None
        jobs.append(Job(n - new, s, t[s:], mag[s:], err[s:], ref))
    return jobs


@pytest.mark.parametrize("pad_young", [False, True])
@pytest.mark.parametrize("min_group", [1, 32])
def test_batched_inputs_equal_per_window_inputs(artifact, pad_young, min_group):
    """One inputs_batch call per group gives exactly what artifact.inputs per window gives."""
    rng = np.random.default_rng(8)
    curves = [light_curve(rng, int(n)) for n in rng.integers(5, 260, 30)]
    jobs = newest_point_jobs(rng, curves, artifact.receptive_field)
    fast = Scorer(artifact, pad_young=pad_young, min_group=min_group)
    slow = Scorer(artifact, vectorised=False, pad_young=pad_young, min_group=min_group)
    assert fast.vectorised and not slow.vectorised
    for a, b in zip(fast.score(jobs), slow.score(jobs)):
        assert np.array_equal(a, b)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here (run on a GPU machine: scripts/gpu_check.py)")


@needs_cuda
def test_scorer_on_cuda_equals_the_cpu_full_curves(tmp_path):
    """The broker's GPU path (young events right-padded into one pass, tail windows through
    forward_last) gives the CPU's full-curve probabilities: no TF32, same triggers."""
    cpu = make_artifact(tmp_path / "a", seed=3)
    gpu = make_artifact(tmp_path / "b", seed=3, device="cuda")
    assert gpu.device.type == "cuda" and not torch.backends.cudnn.allow_tf32
    rng = np.random.default_rng(21)
    curves = [light_curve(rng, int(n)) for n in rng.integers(5, 400, 64)]
    jobs = newest_point_jobs(rng, curves, gpu.receptive_field)
    expect = [cpu.predict(cpu.inputs(t, mag, err)[None])[0][j.n_scored:] for (t, mag, err), j in zip(curves, jobs)]
    scorer = Scorer(gpu)
    assert scorer.pad_young
    for got, exp in zip(scorer.score(jobs), expect):
        np.testing.assert_allclose(got, exp, atol=1e-5, rtol=0)
    t, mag, err = curves[-1]
    stream = _stream_windowed(gpu, t, mag, err, [1] * len(t), max_points=120)
    np.testing.assert_allclose(stream, cpu.predict(cpu.inputs(t, mag, err)[None])[0], atol=1e-5, rtol=0)
