"""Tiny end-to-end train + evaluate on synthetic data (seconds), and the commands' errors."""
import json

import numpy as np
import pytest
import torch

from training.dataset import PARAM_FIELDS, Dataset
from ulens import cli

torch.set_num_threads(1)


def synthetic_dataset(n_events=24, n_points=160, seed=0, span=200.0):
    """PSPL events and toy 'binaries' (PSPL plus a short bump), in the dataset format."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("time", "mag", "mag_err", "mag_model", "mag_pspl")}
    labels = (np.arange(n_events) % 2).astype(np.int8)
    params = {k: np.full(n_events, np.nan) for k in PARAM_FIELDS}
    for i in range(n_events):
        t = np.sort(rng.choice(np.arange(0, span, span / (1.25 * n_points)), n_points, replace=False))
        t0, tE, u0 = rng.uniform(0.35, 0.65) * span, rng.uniform(8, 20), rng.uniform(0.1, 0.5)
        u = np.sqrt(u0 ** 2 + ((t - t0) / tE) ** 2)
        base = rng.uniform(18, 20)
        pspl = base - 2.5 * np.log10((u ** 2 + 2) / (u * np.sqrt(u ** 2 + 4)))
        bump_t = t0 + rng.uniform(-0.5, 0.5) * tE
        model = pspl - labels[i] * rng.uniform(0.4, 1.0) * np.exp(-0.5 * ((t - bump_t) / 2) ** 2)
        err = np.full(n_points, 0.05)
        for k, v in zip(cols, (t, model + rng.normal(0, 0.05, n_points), err, model, pspl)):
            cols[k].append(v)
        params["t0"][i], params["tE"][i], params["u0"][i] = t0, tE, u0
        params["baseline_mag"][i], params["fs"][i] = base, 1.0
        if labels[i]:
            params["dchi2"][i] = float(np.sum(((model - pspl) / err) ** 2))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    return Dataset(offsets=np.arange(n_events + 1) * n_points, time=c["time"],
                   **{k: c[k].astype(np.float32) for k in ("mag", "mag_err", "mag_model", "mag_pspl")},
                   event_id=np.arange(n_events, dtype=np.int64) + 1000, label=labels, params=params,
                   meta={"generator": "tests/unit/test_train_eval.py"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tr")
    data = synthetic_dataset().save(root / "syn.npz")
    run = train(TrainConfig(data=str(data), experiment_name="tiny", output_root=str(root / "results"),
                            epochs=2, batch_size=8, crop_length=32, conv_channels=(8, 8, 4), fc_units=8,
                            progress=False, command="test"))
    return root, data, run


def test_train_writes_run_folder(trained):
    from training.artifact import load_artifact

    _, data, run = trained
    assert run.name.startswith("tiny_")
    for f in ("weights.pt", "model_card.json", "scalers.json", "config.json", "split.json",
              "training.log", "summary.json"):
        assert (run / f).is_file(), f
    split = json.loads((run / "split.json").read_text())
    ids = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(map(len, ids)) == 24 and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    art = load_artifact(run)
    card = art.card
    assert card["targets"]["rule"] == "windowed_chi2" and card["kwargs"]["dilations"] == [1, 4, 16]
    assert card["data"]["n_events"] == 24 and 0 < art.threshold and card["decision"]["threshold"] == art.threshold


def test_evaluate_summary_and_plots(trained):
    from training.evaluate import evaluate

    _, data, run = trained
    s = evaluate(run, data, early_detection=True)
    assert s["data"]["split"] == "test" and s["n_events"] == len(json.loads((run / "split.json").read_text())["test"])
    out = run / "evaluation"
    assert json.loads((out / "evaluation_summary.json").read_text())["n_events"] == s["n_events"]
    for png in ("roc.png", "decision_time.png", "recall_vs_dchi2.png", "early_detection.png"):
        assert (out / png).stat().st_size > 1000
    assert s["examples"] and all(p.startswith(str(out / "examples")) and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
                                 for p in s["examples"])
    assert [r["cut"] for r in s["early_detection"]][:6] == ["10%", "25%", "50%", "67%", "83%", "100%"]
    assert {"roc_auc", "pr_auc", "classification", "detectable", "recall_by_dchi2", "decision_time",
            "threshold_sweep"} <= set(s)


def test_one_causal_run_equals_cut_and_rerun(trained):
    from training import decision
    from training.artifact import load_artifact
    from training.evaluate import cut_and_rerun_score, event_probs
    from training.dataset import load

    _, data, run = trained
    art, ds = load_artifact(run), load(data)
    probs = event_probs(art, ds, [1])[0]
    dec = art.decision
    running = decision.running_score(probs, dec["min_points"], dec["smooth_window"])
    t, mag, err = ds.event(1)
    for n in (5, 10, 40, 81, 133, 160):
        slow = cut_and_rerun_score(art, t, mag, err, n, band=ds.event_band(1))
        assert slow == pytest.approx(running[n - 1], abs=1e-6) or (slow == running[n - 1] == -np.inf)


def test_cli_train_and_evaluate(trained, capsys):
    root, data, run = trained
    assert cli.main(["evaluate", "--model", str(run), "--data", str(data), "--split", "all", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["data"]["includes_training_events"] is True and s["n_events"] == 24


def test_bad_arguments_are_clean_errors(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "missing.npz"), "--experiment-name", "x",
                     "--output-root", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "dataset file not found" in err and "missing.npz" in err and "Traceback" not in err
    assert cli.main(["evaluate", "--model", str(tmp_path / "nomodel"), "--data", "x.npz"]) == 3
    err = capsys.readouterr().err
    assert "model artifact folder not found" in err and "nomodel" in err
    assert cli.main(["train", "--data", "x.npz", "--experiment-name", "x", "--dilations", "1,a,2"]) == 3
    assert "--dilations" in capsys.readouterr().err


def test_experiment_plan_shares_the_baseline_point():
    from training.experiments import BASELINE, plan

    points = plan(["cadence", "noise", "topology"])
    assert len(points) == 4 + 2 + 3
    base = [p for p in points if p.settings == BASELINE]
    assert len(base) == 1 and base[0].series == ["cadence", "noise", "topology"]
    assert cli.main(["experiments", "--series", "bogus"]) == 3


def test_training_inputs_equal_artifact_inputs(trained):
    """Training builds inputs flat over the dataset; the broker per event: bit-identical."""
    from training.artifact import load_artifact
    from training.dataset import load
    from training.train import dataset_features

    _, data, run = trained
    art, ds = load_artifact(run), load(data)
    flat = art.scalers.transform(dataset_features(ds, art.channels))
    for i in (0, 7, 23):
        assert np.array_equal(flat[ds.offsets[i]:ds.offsets[i + 1]], art.inputs(*ds.event(i), band=ds.event_band(i)))
