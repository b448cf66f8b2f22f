"""Offline evaluation of the PSPL-fit rule, alone and beside the TD-CNN (seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.unit.test_broker_inference import make_artifact
from tests.unit.test_train_eval import synthetic_dataset
from training import evaluate_rules, psplfit
from ulens import cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    return root, synthetic_dataset(n_events=16, n_points=200, seed=4).save(root / "syn.npz")


def test_pspl_fit_summary_plots_and_the_online_function(data, capsys):
    root, path = data
    out = root / "pf"
    assert cli.main(["evaluate", "--rule", "pspl-fit", "--data", str(path), "--output", str(out),
                     "--early-detection"]) == 0
    assert "pspl-fit pspl-fit/2-" in capsys.readouterr().out
    s = json.loads((out / "evaluation_summary.json").read_text())
    assert s["rule"] == "pspl-fit" and s["n_events"] == 16 and s["params"]["version"] == psplfit.Params().version
    for k in ("roc_auc", "recall_by_dchi2", "decision_time", "threshold_sweep", "early_detection", "detectable"):
        assert k in s, k
    assert [r["cut"] for r in s["early_detection"]][-1] == "t0+tE/2"
    for f in ("roc.png", "decision_time.png", "recall_vs_dchi2.png", "early_detection.png"):
        assert (out / f).read_bytes()[:8] == PNG
    # the event scores are the broker's function: the max of psplfit's D over the curve
    from training import dataset
    ds = dataset.load(path)
    stats = psplfit.run_curves([ds.event(i) for i in range(ds.n_events)], psplfit.Params())
    fired = np.array([psplfit.event_score(x) >= psplfit.Params().threshold for x in stats])
    c = s["classification"]["confusion_matrix"]
    assert c["tp"] + c["fp"] == int(fired.sum())
    # cached statistics are reused (no refit: cpu 0 is reported from the cache's record)
    cache = out / "pspl_fit_stats.npz"
    assert cache.is_file()
    again, _ = evaluate_rules.pspl_fit_stats(ds, np.arange(ds.n_events), psplfit.Params(), cache,
                                             __import__("training.train", fromlist=["x"]).file_sha256(path))
    assert all(np.array_equal(a, b) for a, b in zip(again, stats))


def test_both_rules_at_equal_pspl_firing_rate(data, capsys):
    root, path = data
    model = root / "model"
    make_artifact(model, seed=5)
    out = root / "cmp"
    assert cli.main(["evaluate", "--rule", "both", "--model", str(model), "--data", str(path),
                     "--output", str(out), "--false-rate", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "tdcnn" in text and "pspl-fit" in text
    r = json.loads((out / "comparison.json").read_text())
    assert set(r["rules"]) == {"tdcnn", "pspl-fit"} and r["false_rate"] == 0.25
    for name, d in r["rules"].items():
        h = d["matched_rate"]
        assert h["pspl_firing_rate"] <= 0.25
        assert "median_decision_tE_detectable" in h and "completeness_all" in h
    pd = r["paired_decision_time"]
    assert pd["n_both"] + pd["only_tdcnn"] <= pd["n_detectable"]
    cv = r["completeness_vs_decision_time"]
    assert len(cv["x_tE"]) == len(cv["pspl-fit"]["detectable"])
    assert np.all(np.diff(cv["pspl-fit"]["all_binaries"]) >= 0)
    assert (out / "completeness_vs_decision_time.png").read_bytes()[:8] == PNG


def test_either_rule_splits_the_allowed_pspl_triggers_between_the_rules():
    """Six PSPL (each rule scores one of them high) and four detectable binaries (the TD-CNN
    sees two, the fit the other two, each one of them below its high PSPL): with one PSPL
    trigger allowed, a rule alone finds 2 of 4, the two together 3 of 4."""
    from types import SimpleNamespace

    labels = np.array([0] * 6 + [1] * 4)
    td = [0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.95, 0.85, 0.05, 0.05]
    pf = [10, 10, 300, 10, 10, 10, 5, 5, 400, 250.0]
    run_td = [np.array([0.0, v]) for v in td]
    run_pf = [np.array([0.0, v]) for v in pf]
    t = np.array([0.0, 1.0])
    ds = SimpleNamespace(label=labels, params={"dchi2": np.where(labels == 1, 1000.0, np.nan),
                                               "onset": np.where(labels == 1, 0.5, np.nan),
                                               "t0": np.full(10, 0.8), "tE": np.full(10, 1.0)},
                         event=lambda i: (t, None, None))
    out = evaluate_rules.either_rule(ds, np.arange(10), run_td, run_pf, rates=(1 / 6,))
    m = out["pspl_16pct"]
    assert m["recall_detectable"] == pytest.approx(0.75) and m["pspl_firing_rate"] == pytest.approx(1 / 6)
    assert m["onset"]["fraction_triggered"] == pytest.approx(0.75)
    assert m["onset"]["median_delay_days"] == pytest.approx(0.5)     # fired at t = 1, onset 0.5
