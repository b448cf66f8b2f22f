"""``ulens evaluate``'s example figures (training/event_figure.py): the events chosen per
kind, and their PNGs, the figure of ``ulens events plot`` from a dataset."""
from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_broker_inference import make_artifact
from training import decision
from training import event_figure as ef
from training.simulate import SimulationConfig, simulate

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset():
    ds = simulate(4, 4, SimulationConfig(survey="lsst", seed=3), workers=0).magnitudes_only()
    # every binary detectable, so each kind is met whatever the draw (the rule's choice is
    # what is tested, not the simulator's)
    ds.params["dchi2"] = np.where(ds.label == 1, 1e4 + np.arange(ds.n_events), 0.0)
    return ds


def _running(ds, fire: dict) -> list:
    """Running scores: event i reaches 0.9 at its point fire[i] (else stays at 0.1 + i/100)."""
    out = []
    for i in range(ds.n_events):
        n = int(ds.lengths()[i])
        r = np.full(n, 0.1 + i / 100)
        r[:decision.MIN_POINTS - 1] = -np.inf
        if i in fire:
            r[fire[i]:] = 0.9
        out.append(r)
    return out


def test_examples_are_chosen_per_kind(dataset):
    ds = dataset
    binaries, pspl = np.flatnonzero(ds.label == 1), np.flatnonzero(ds.label == 0)
    b0, b1, b2, b3 = binaries
    p0, p1, p2, p3 = pspl
    fire = {b0: 40, b1: 20, p0: 30, p1: 25}
    running = _running(ds, fire)
    running[p1][30:] = 0.95                            # p1 is the highest-scoring false trigger
    got = ef.choose_examples(ds, np.arange(ds.n_events), running, 0.5, n_per_kind=2)
    assert set(got) == set(ef.EXAMPLE_KINDS)
    t = {i: ds.event(i)[0][fire[i]] - (ds.params["onset"][i] if np.isfinite(ds.params["onset"][i])
                                       else ds.params["t0"][i]) for i in (b0, b1)}
    assert got["early_binary"] == sorted((b0, b1), key=t.get)
    assert got["missed_binary"] == [b3, b2]            # the larger delta-chi2 first
    assert got["false_pspl"] == [p1, p0]
    assert got["quiet_pspl"] == [p2, p3]               # the lower event score first
    assert ef.choose_examples(ds, np.arange(ds.n_events), running, 0.5, n_per_kind=1)["quiet_pspl"] == [p2]
    with pytest.raises(ValueError, match="running has 3 score arrays for 8 events"):
        ef.choose_examples(ds, np.arange(ds.n_events), running[:3], 0.5)


def test_example_figures_write_a_png_per_chosen_event(dataset, tmp_path):
    ds = dataset
    art = make_artifact(tmp_path / "art", seed=1)
    binaries, pspl = np.flatnonzero(ds.label == 1), np.flatnonzero(ds.label == 0)
    running = _running(ds, {binaries[0]: 15, pspl[0]: 20})
    events = np.arange(ds.n_events)
    paths = ef.example_figures(art, ds, events, running, 0.5, tmp_path / "figs", n_per_kind=1)
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert [n.split("_1_event")[0] for n in names] == list(ef.EXAMPLE_KINDS)
    assert names[0] == f"early_binary_1_event{int(ds.event_id[binaries[0]])}.png"
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG


def test_a_dataset_curve_is_drawn_on_its_day_axis_with_its_detections(dataset):
    ds = dataset
    i = int(np.flatnonzero(ds.label == 1)[0])
    p = np.linspace(0.0, 1.0, int(ds.lengths()[i]))
    lc = ef.dataset_curve(ds, i, p, decision.params(0.5), source="x")
    a, b = ds.offsets[i], ds.offsets[i + 1]
    assert lc.time_axis == "day" and np.array_equal(lc.t, ds.time[a:b])
    assert np.array_equal(lc.detected, ds.detected[a:b]) and lc.source == "x, label binary"
    assert lc.trigger is not None and lc.trigger.index == decision.first_trigger(p, 0.5)
    fig = ef.light_curve_figure(lc, ef.fit_pspl(lc))
    assert fig.axes[2].get_xlabel() == ef.TIME_AXES["day"]
    assert ef.dataset_curve(ds, i, p, decision.params(0.5), start_mjd=60000.0).t[0] == 60000.0 + ds.time[a]
