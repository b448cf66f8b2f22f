"""Model artifact: round trip, weights_only refusal, clear errors."""
import json
import os

import numpy as np
import pytest
import torch

from training.artifact import ArtifactError, load_artifact, save_artifact
from training.features import CHANNELS, build_features, event_reference
from training.model import TDCNN
from training.scalers import TwoStageScaler

torch.set_num_threads(1)


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = TDCNN(conv_channels=(8, 8, 4), fc_units=8)
    rng = np.random.default_rng(0)
    sc = TwoStageScaler.fit(rng.normal(size=(100, 3)), channels=CHANNELS)
    d = save_artifact(tmp_path / "art", model, {"threshold": 0.7, "metrics": {"auc": 0.5}}, sc)
    return d, model, sc


def test_round_trip(saved):
    d, model, sc = saved
    art = load_artifact(d)
    assert art.threshold == 0.7 and art.receptive_field == 97 and not art.model.training
    assert art.card["class"] == "training.model:TDCNN" and art.card["decision"]["threshold"] == 0.7
    assert art.version.startswith("art-")
    for k, v in model.state_dict().items():
        assert torch.equal(art.model.state_dict()[k], v)
    rng = np.random.default_rng(1)
    t = np.cumsum(rng.uniform(0.5, 2, 50))
    mag = (20 + 0.05 * rng.normal(size=50)).astype(np.float32)
    err = np.full(50, 0.05, np.float32)
    x = art.inputs(t, mag, err)
    assert np.array_equal(x, sc.transform(build_features(t, mag, err)))
    tail = art.inputs(t[20:], mag[20:], err[20:], reference=event_reference(mag), prev_time=t[19])
    assert np.array_equal(tail, x[20:])
    p = art.predict(np.stack([x, x]), batch_size=1)
    assert p.shape == (2, 50) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(art.predict_curves([x])[0], p[0], atol=1e-6)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_code_carrying_checkpoint(saved):
    d, _, _ = saved
    torch.save({"x": torch.zeros(1), "evil": Evil()}, d / "weights.pt")
    with pytest.raises(ArtifactError, match="weights.pt"):
        load_artifact(d)


@pytest.mark.parametrize("name", ["weights.pt", "model_card.json", "scalers.json"])
def test_missing_file_named(saved, name):
    d, _, _ = saved
    (d / name).unlink()
    with pytest.raises(ArtifactError, match=name):
        load_artifact(d)


def test_corrupt_and_wrong_version(saved, tmp_path):
    d, _, _ = saved
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nope")
    card = json.loads((d / "model_card.json").read_text())
    (d / "model_card.json").write_text(json.dumps(dict(card, format_version=99)))
    with pytest.raises(ArtifactError, match="format version"):
        load_artifact(d)
    (d / "model_card.json").write_text(json.dumps(dict(card, **{"class": "os:system"})))
    with pytest.raises(ArtifactError, match="unknown model class"):
        load_artifact(d)
    (d / "model_card.json").write_text(json.dumps(card))
    (d / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="weights.pt"):
        load_artifact(d)
    (d / "scalers.json").write_text("{")
    with pytest.raises(ArtifactError, match="scalers.json"):
        load_artifact(d)


def test_online_recipe_equals_offline_full_run(saved):
    """Point-by-point online scoring (tail windows + predict_last) == offline full run."""
    from training import decision
    from training.features import REFERENCE_POINTS as K

    d, _, _ = saved
    art = load_artifact(d)
    rng = np.random.default_rng(3)
    n = 130
    t = np.cumsum(rng.uniform(0.5, 2, n))
    mag = (20 - 1.5 * np.exp(-((t - t[70]) / 15) ** 2) + 0.05 * rng.normal(size=n)).astype(np.float32)
    err = np.full(n, 0.05, np.float32)
    smooth = art.decision["smooth_window"]
    offline = decision.score(art.predict(art.inputs(t, mag, err)[None])[0], smooth)
    w = art.receptive_field + smooth - 1
    online = []
    for j in range(1, n + 1):  # the event has j points
        if j - w >= K - 1:
            x = art.inputs(t[j - w:j], mag[j - w:j], err[j - w:j], reference=event_reference(mag[:K]),
                           prev_time=t[j - w - 1])
        else:
            x = art.inputs(t[:j], mag[:j], err[:j])[-w:]
        online.append(art.predict_last(x[None], n_last=min(smooth, len(x)))[0].mean())
    np.testing.assert_allclose(online, offline, atol=1e-5)


def test_inputs_batch_equals_inputs_exactly(saved):
    d, _, _ = saved
    art = load_artifact(d)
    rng = np.random.default_rng(7)
    curves = []
    for n in [1, 3, 9, 10, 11, 40, 97, 120]:
        t = 61000 + np.cumsum(rng.uniform(0.0, 3.0, n))
        curves.append((t, rng.uniform(15, 22, n).astype(np.float32), rng.uniform(0.01, 0.3, n).astype(np.float32)))
    lens = np.array([len(c[0]) for c in curves])
    w = int(lens.max())
    t = np.zeros((len(curves), w))
    mag = np.zeros((len(curves), w), np.float32)
    err = np.zeros((len(curves), w), np.float32)
    for i, (ti, mi, ei) in enumerate(curves):
        t[i, :len(ti)], mag[i, :len(ti)], err[i, :len(ti)] = ti, mi, ei
    x = art.inputs_batch(t, mag, err, lengths=lens)
    for i, (ti, mi, ei) in enumerate(curves):
        assert np.array_equal(x[i, :len(ti)], art.inputs(ti, mi, ei))
        assert not x[i, len(ti):].any()
    # tail windows of one width with fixed references
    long = [c for c in curves if len(c[0]) >= 40]
    m = 25
    refs = np.array([event_reference(c[1]) for c in long])
    prev = np.array([c[0][m - 1] for c in long])
    xt = art.inputs_batch(np.stack([c[0][m:m + 15] for c in long]), np.stack([c[1][m:m + 15] for c in long]),
                          np.stack([c[2][m:m + 15] for c in long]), reference=refs, prev_time=prev)
    for i, (ti, mi, ei) in enumerate(long):
        assert np.array_equal(xt[i], art.inputs(ti, mi, ei)[m:m + 15])


@pytest.mark.parametrize("t_len,n_last", [(1, 1), (40, 3), (97, 1), (98, 2), (104, 8), (150, 30)])
def test_predict_last_equals_predict(saved, t_len, n_last):
    d, _, _ = saved
    art = load_artifact(d)
    x = np.random.default_rng(t_len).uniform(0, 1, (37, t_len, 3)).astype(np.float32)
    np.testing.assert_allclose(art.predict_last(x, n_last, batch_size=16),
                               art.predict(x)[:, -n_last:], atol=1e-5, rtol=0)


def test_a_v2_artifact_builds_its_own_features_and_refuses_unknown_ones(tmp_path):
    """The card's channels choose the feature set: a v2 model gets band-aware inputs from
    the same calls the broker makes; a card naming channels this code cannot build is
    refused with the file named."""
    from training.features import CHANNELS_V2

    torch.manual_seed(0)
    model = TDCNN(in_channels=len(CHANNELS_V2), conv_channels=(8, 8, 4), fc_units=8)
    rng = np.random.default_rng(0)
    sc = TwoStageScaler.fit(rng.normal(size=(100, len(CHANNELS_V2))), channels=CHANNELS_V2)
    d = save_artifact(tmp_path / "v2", model, {"threshold": 0.6, "channels": list(CHANNELS_V2)}, sc)
    art = load_artifact(d)
    assert art.channels == CHANNELS_V2
    t = np.cumsum(rng.uniform(0.5, 2, 40))
    mag = (20 + 0.05 * rng.normal(size=40)).astype(np.float32)
    err = np.full(40, 0.05, np.float32)
    band = np.array([1, 2, 3, 4] * 10, np.uint8)
    x = art.inputs(t, mag, err, band=band)
    assert x.shape == (40, len(CHANNELS_V2))
    assert np.array_equal(x, sc.transform(build_features(t, mag, err, band=band, channels="v2")))
    assert np.array_equal(art.inputs_batch(t[None], mag[None], err[None], band=band[None])[0], x)
    card = json.loads((d / "model_card.json").read_text())
    card["channels"] = ["dmag", "flux"]
    (d / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="model_card.json.*unknown feature channels"):
        load_artifact(d)
