"""Feature set v3: v2 plus the classical rule's causal PSPL-fit statistic D per point.

The channels are a pure function of (curve, D); the artifact computes D with its card's
fit parameters when a caller gives none; a training on v3 writes those parameters into
the card; the per-point statistics come out the same from one process or several.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.unit.test_train_eval import synthetic_dataset
from training import evaluate_rules, psplfit
from training.features import (CHANNELS_V2, CHANNELS_V3, PSPL_D_SCALE, FeatureError, build_features,
                               build_features_batch)


def _curve(n=80, seed=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.uniform(0.5, 3.0, n))
    err = rng.uniform(0.01, 0.1, n)
    mag = 19.0 + rng.normal(0, 1, n) * err - 1.5 * np.exp(-((t - t[n // 2]) / 8) ** 2)
    return t, mag, err, np.array([1, 2, 3, 4] * (n // 4), np.uint8)


def test_v3_channels_are_v2_plus_the_statistic():
    t, mag, err, band = _curve()
    d = np.full(len(t), -np.inf)
    d[40:] = np.linspace(0.0, 500.0, len(t) - 40)
    f = build_features(t, mag, err, band=band, channels="v3", pspl_d=d)
    assert f.shape == (len(t), len(CHANNELS_V3))
    assert np.array_equal(f[:, :len(CHANNELS_V2)], build_features(t, mag, err, band=band, channels="v2"))
    assert np.array_equal(f[:, 10], (np.arange(len(t)) >= 40).astype(np.float32))
    assert np.all(f[:40, 11] == 0.0)                     # not eligible: no evidence either way
    np.testing.assert_allclose(f[40:, 11], np.arcsinh(d[40:] / PSPL_D_SCALE), rtol=1e-6)
    # the batch form is the same rows
    assert np.array_equal(build_features_batch(t[None], mag[None], err[None], band=band[None],
                                               channels="v3", pspl_d=d[None])[0], f)


def test_v3_without_or_with_bad_statistic_is_refused():
    t, mag, err, band = _curve()
    with pytest.raises(FeatureError, match="v3 needs pspl_d"):
        build_features(t, mag, err, band=band, channels="v3")
    with pytest.raises(FeatureError, match="pspl_d must have the shape"):
        build_features(t, mag, err, band=band, channels="v3", pspl_d=np.zeros(len(t) - 1))
    bad = np.zeros(len(t))
    bad[3] = np.nan
    with pytest.raises(FeatureError, match="NaN"):
        build_features(t, mag, err, band=band, channels="v3", pspl_d=bad)


def test_statistics_from_several_processes_equal_one(tmp_path):
    """Each event's fit is its own (psplfit's determinism note): splitting the events over
    worker processes changes nothing, bit for bit."""
    ds = synthetic_dataset(n_events=12, n_points=120, seed=7)
    ev = np.arange(ds.n_events)
    one, _ = evaluate_rules.pspl_fit_stats(ds, ev, psplfit.Params(), chunk=4)
    two, cpu = evaluate_rules.pspl_fit_stats(ds, ev, psplfit.Params(), workers=2, chunk=4)
    assert cpu > 0 and len(two) == len(one)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))


def test_train_v3_card_names_the_fit_and_inputs_compute_it(tmp_path):
    from training.artifact import ArtifactError, load_artifact
    from training.evaluate import event_probs
    from training.train import TrainConfig, train

    data = synthetic_dataset(n_events=16, n_points=120, seed=3).save(tmp_path / "syn.npz")
    run = train(TrainConfig(data=str(data), experiment_name="v3", output_root=str(tmp_path / "runs"),
                            epochs=1, batch_size=8, crop_length=32, conv_channels=(8, 8, 4), fc_units=8,
                            features="v3", progress=False, command="test"))
    art = load_artifact(run)
    assert art.channels == CHANNELS_V3 and art.pspl_params == psplfit.Params(**art.card["pspl_fit"])
    assert art.card["pspl_fit_version"] == art.pspl_params.version
    assert list((tmp_path / "runs" / "pspl_d").glob("*.npz"))          # kept for the next run
    from training import dataset
    ds = dataset.load(data).magnitudes_only()
    t, mag, err = ds.event(5)
    d = psplfit.run_curves([(t, mag, err)], art.pspl_params)[0]
    assert np.array_equal(art.inputs(t, mag, err), art.inputs(t, mag, err, pspl_d=d))
    # exact: one process, the same code path on both sides; only who computed D differs
    assert np.array_equal(event_probs(art, ds, [5])[0], event_probs(art, ds, [5], pspl_d=[d])[0])
    with pytest.raises(FeatureError, match="tail window of a v3 model"):
        art.inputs(t[20:], mag[20:], err[20:], reference=float(mag[0]), prev_time=float(t[19]))
    # the broker keeps no per-point D yet: it refuses such a model at start, by name
    import config as cfg
    from broker.consumer import load_model
    from broker.errors import BrokerError
    with pytest.raises(BrokerError, match="feature set v3.*cannot serve yet"):
        load_model(cfg.load(), run, "cpu")
    card = json.loads((run / "model_card.json").read_text())
    del card["pspl_fit"]
    (run / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="needs its pspl_fit parameters"):
        load_artifact(run)


def test_the_shipped_v3_model_loads_with_the_rules_parameters():
    from pathlib import Path

    from training.artifact import load_artifact
    d = Path(__file__).resolve().parents[2] / "models" / "tdcnn-lsst-v3"
    art = load_artifact(d)
    assert art.channels == CHANNELS_V3
    # trained on D from the broker's own consumer.pspl_fit parameters: one fit can serve both
    assert art.pspl_params.version == evaluate_rules.params_from_config().version
