"""`ulens simulate`: reproducibility, the dataset it writes, failures, bad arguments."""
import json
import math

import numpy as np
import pytest

from training import dataset, physics
from training import simulate as sim
from training.simulate import SimulationConfig, SimulationError


@pytest.fixture(scope="module")
def small():
    """20 events through worker processes, and the same with another worker count."""
    cfg = SimulationConfig(seed=11)
    one = sim.simulate(8, 12, cfg, workers=1)
    two = sim.simulate(8, 12, cfg, workers=2)
    return one, two


def _arrays(ds):
    out = {k: getattr(ds, k) for k in ("offsets", "time", "mag", "mag_err", "mag_model",
                                       "mag_pspl", "event_id", "label")}
    out.update(ds.params)
    return out


def test_same_seed_same_data_whatever_the_workers(small):
    one, two = small
    a, b = _arrays(one), _arrays(two)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert one.meta == two.meta


def test_files_are_identical_in_content(small, tmp_path):
    one, two = small
    one.save(tmp_path / "1.npz")
    two.save(tmp_path / "2.npz")
    z1, z2 = np.load(tmp_path / "1.npz"), np.load(tmp_path / "2.npz")
    assert sorted(z1.files) == sorted(z2.files)
    for k in z1.files:
        assert z1[k].tobytes() == z2[k].tobytes(), k


def test_dataset_content(small):
    ds, _ = small
    ds.validate()
    assert ds.n_events == 20 and int(ds.label.sum()) == 12
    for name in ("mag", "mag_model", "mag_pspl", "time"):
        assert np.all(np.isfinite(getattr(ds, name))), name
    assert np.all(ds.mag_err == np.float32(0.05))
    pspl, binary = ds.label == 0, ds.label == 1
    for k in ("s", "q", "alpha", "rho", "dchi2"):
        assert np.all(np.isnan(ds.params[k][pspl])), k
        assert np.all(np.isfinite(ds.params[k][binary])), k
    for k in ("t0", "tE", "u0", "baseline_mag", "fs"):
        assert np.all(np.isfinite(ds.params[k])), k
    assert np.all(ds.params["dchi2"][binary] >= 0)
    # baseline priors, for both classes
    assert np.all((ds.params["tE"] >= 10) & (ds.params["tE"] <= 100))
    assert np.all((ds.params["u0"] >= 0.01) & (ds.params["u0"] <= 0.5))
    assert np.all((ds.params["baseline_mag"] >= 18) & (ds.params["baseline_mag"] <= 22))
    assert np.all((ds.params["fs"] >= 0.5) & (ds.params["fs"] <= 1))
    # epochs: a subset of the 1,500 even epochs, about 80% kept
    assert np.all(np.isin(ds.time, sim.EPOCHS))
    assert 0.75 < len(ds.time) / (20 * 1500) < 0.85
    # classes interleaved; ids unique and decodable
    assert len(np.unique(ds.event_id)) == 20
    kinds = [sim.decode_event_id(e)[1] for e in ds.event_id]
    assert kinds == ds.label.tolist()
    assert {sim.decode_event_id(e)[0] for e in ds.event_id} == {11}
    assert not (np.all(ds.label[:8] == 0) and np.all(ds.label[8:] == 1))


def test_points_follow_the_model(small):
    ds, _ = small
    for i in range(ds.n_events):
        a, b = ds.offsets[i], ds.offsets[i + 1]
        t = ds.time[a:b]
        p = {k: ds.params[k][i] for k in ds.params}
        if ds.label[i] == 0:
            A = physics.pspl_magnification(t, p["t0"], p["u0"], p["tE"])
            np.testing.assert_array_equal(ds.mag_pspl[a:b], ds.mag_model[a:b])
        else:
            A = physics.binary_magnification(t, p["t0"], p["u0"], p["tE"], p["s"], p["q"],
                                             p["alpha"], p["rho"])
        expected = physics.flux_to_mag(physics.flux(A, p["fs"]), p["baseline_mag"])
        np.testing.assert_allclose(ds.mag_model[a:b], expected, atol=2e-5)
    resid = (ds.mag - ds.mag_model).astype(np.float64)
    assert abs(resid.mean()) < 0.002 and resid.std() == pytest.approx(0.05, rel=0.03)


def test_mag_pspl_is_the_fit_that_gives_dchi2(small):
    ds, _ = small
    for i in np.flatnonzero(ds.label == 1):
        a, b = ds.offsets[i], ds.offsets[i + 1]
        F = 10 ** (-0.4 * (ds.mag_model[a:b].astype(np.float64) - ds.params["baseline_mag"][i]))
        Fp = 10 ** (-0.4 * (ds.mag_pspl[a:b].astype(np.float64) - ds.params["baseline_mag"][i]))
        sig = physics.mag_err_to_flux_err(F, 0.05)
        chi2 = float(np.sum(((F - Fp) / sig) ** 2))
        # float32 storage of the magnitudes limits the agreement
        assert chi2 == pytest.approx(ds.params["dchi2"][i], rel=0.02, abs=0.5)


def test_meta_records_the_settings(small):
    ds, _ = small
    m = ds.meta
    assert m["parameter_set"] == "baseline" and m["seed"] == 11
    assert m["cadence_mask_prob"] == 0.2 and m["mag_error_std"] == 0.05
    assert m["n_pspl"] == 8 and m["n_binary"] == 12 and m["failures_resampled"] == 0
    assert m["thesis_priors"] is False
    assert m["versions"]["VBMicrolensing"] and m["versions"]["numpy"]
    assert "log-uniform" not in json.dumps(m["priors"]["binary"])
    json.dumps(m)


def test_classes_use_separate_streams_and_the_same_code_path():
    cfg = SimulationConfig(seed=5)
    p = sim.draw_parameters(sim.event_rng(5, sim.PSPL, 0), sim.PSPL, cfg)
    b = sim.draw_parameters(sim.event_rng(5, sim.BINARY, 0), sim.BINARY, cfg)
    assert p["t0"] != b["t0"]
    # same stream -> same shared parameters whatever the class
    p2 = sim.draw_parameters(sim.event_rng(5, sim.BINARY, 0), sim.PSPL, cfg)
    for k in ("t0", "tE", "u0", "baseline_mag", "fs"):
        assert p2[k] == b[k], k


def test_thesis_priors_shortcut_changes_only_pspl():
    cfg = SimulationConfig(seed=5, thesis_priors=True)
    tes = [sim.draw_parameters(sim.event_rng(5, sim.PSPL, i), sim.PSPL, cfg)["tE"]
           for i in range(300)]
    assert max(tes) > 100                         # beyond the baseline set's 10..100
    b = sim.draw_parameters(sim.event_rng(5, sim.BINARY, 0), sim.BINARY, cfg)
    assert b == sim.draw_parameters(sim.event_rng(5, sim.BINARY, 0), sim.BINARY,
                                    SimulationConfig(seed=5))


def test_wide_shared_priors_are_the_same_for_both_classes_and_cover_the_leaks():
    cfg = SimulationConfig(seed=5, shared_priors="wide")
    draws = {k: [sim.draw_parameters(sim.event_rng(5, sim.BINARY, i), k, cfg) for i in range(2000)]
             for k in (sim.PSPL, sim.BINARY)}
    for a, b in zip(draws[sim.PSPL], draws[sim.BINARY]):     # same stream -> same shared draws
        for k in ("t0", "tE", "u0", "baseline_mag", "fs"):
            assert a[k] == b[k], k
    d = draws[sim.PSPL]
    fs, te, u0 = (np.array([x[k] for x in d]) for k in ("fs", "tE", "u0"))
    # beyond the set's fs >= 0.5, 10 <= tE <= 100 and u0 <= 0.5, well populated
    assert (fs < 0.5).mean() > 0.7 and fs.min() >= 0.01 and (fs < 0.05).mean() > 0.2
    assert (te < 10).mean() > 0.1 and (te > 100).mean() > 0.2 and 5 <= te.min() and te.max() <= 250
    assert (u0 > 0.5).mean() > 0.4 and u0.min() >= 0.001
    # the default is untouched: the same stream gives the set's narrow draws
    narrow = sim.draw_parameters(sim.event_rng(5, sim.PSPL, 0), sim.PSPL, SimulationConfig(seed=5))
    assert 0.5 <= narrow["fs"] <= 1 and 10 <= narrow["tE"] <= 100
    with pytest.raises(sim.SimulationError, match="contradict"):
        SimulationConfig(shared_priors="wide", thesis_priors=True)
    with pytest.raises(sim.SimulationError, match="unknown shared priors 'huge'"):
        SimulationConfig(shared_priors="huge")


@pytest.mark.parametrize("name", sorted(sim.PARAMETER_SETS))
def test_every_parameter_set_simulates(name):
    ds = sim.simulate(1, 2, SimulationConfig(parameter_set=name, seed=3), workers=0)
    ds.validate()
    assert ds.meta["parameter_set"] == name
    for k, prior in sim.PARAMETER_SETS[name].items():
        v = ds.params[k][ds.label == 1]
        assert np.all((v >= prior.lo) & (v <= prior.hi)), k


def test_failed_binary_is_resampled_and_counted(monkeypatch):
    cfg = SimulationConfig(seed=2)
    clean = sim.simulate(0, 3, cfg, workers=0)
    real = physics.binary_magnification
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise physics.MagnificationError("injected failure")
        if calls["n"] == 2:
            return np.full(len(args[0]), np.nan)      # NaN is a failure too
        return real(*args, **kwargs)

    monkeypatch.setattr(physics, "binary_magnification", flaky)
    ds = sim.simulate(0, 3, cfg, workers=0)
    assert ds.meta["failures_resampled"] == 2
    assert np.all(ds.label == 1) and np.all(np.isfinite(ds.mag))
    first = sim.event_id(2, sim.BINARY, 0)
    i_new, i_old = (int(np.flatnonzero(d.event_id == first)[0]) for d in (ds, clean))
    # the failing event drew new parameters from its own stream; the others are unchanged
    assert ds.params["s"][i_new] != clean.params["s"][i_old]
    assert np.isfinite(ds.params["dchi2"][i_new])
    others_new = np.sort(ds.params["s"][ds.event_id != first])
    others_old = np.sort(clean.params["s"][clean.event_id != first])
    np.testing.assert_array_equal(others_new, others_old)


def test_endless_failure_stops_with_an_error(monkeypatch):
    def broken(*args, **kwargs):
        raise physics.MagnificationError("always")
    monkeypatch.setattr(physics, "binary_magnification", broken)
    with pytest.raises(RuntimeError, match="failed 100 times"):
        sim.simulate(0, 1, SimulationConfig(), workers=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(parameter_set="galactic"), "unknown binary parameter set 'galactic'"),
    (dict(cadence_mask_prob=1.0), "cadence mask probability must be in [0, 1)"),
    (dict(cadence_mask_prob=-0.1), "cadence mask probability"),
    (dict(mag_error_std=0.0), "magnitude error std must be a positive number"),
    (dict(mag_error_std=float("nan")), "magnitude error std"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(vbm_tol=0.0), "tolerance must be > 0"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(SimulationError) as exc:
        sim.simulate(1, 1, SimulationConfig(**kwargs), workers=0)
    assert message in str(exc.value)


@pytest.mark.parametrize("counts, message", [
    ((-1, 5), "number of PSPL events must be a non-negative integer"),
    ((5, -2), "number of binary events must be a non-negative integer"),
    ((0, 0), "nothing to simulate"),
])
def test_bad_counts_are_named(counts, message):
    with pytest.raises(SimulationError, match=message):
        sim.simulate(*counts, SimulationConfig(), workers=0)


def _cli(args, capsys):
    from ulens import cli
    rc = cli.main(["simulate", *args])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--n-pspl", "-3"], "--n-pspl must be >= 0"),
    (["--binary-params", "nope"], "unknown binary parameter set 'nope'"),
    (["--cadence-mask-prob", "1"], "cadence mask probability must be in [0, 1)"),
    (["--mag-error-std", "-0.1"], "magnitude error std must be a positive number"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_cli_bad_arguments_fail_cleanly_before_work(extra, message, tmp_path, capsys):
    out = tmp_path / "x.npz"
    args = ["--n-pspl", "2", "--n-binary", "2", "--output", str(out), "-q"]
    # later values win in argparse
    rc, cap = _cli(args + extra, capsys)
    assert rc == 3 and message in cap.err and "Traceback" not in cap.err
    assert not out.exists()


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, cap = _cli(["--n-pspl", "1", "--n-binary", "1", "--output", str(blocker / "d.npz"),
                    "-q"], capsys)
    assert rc == 3 and "cannot be written" in cap.err and "a-file" in cap.err
    rc, cap = _cli(["--n-pspl", "1", "--n-binary", "1", "--output", str(tmp_path), "-q"], capsys)
    assert rc == 3 and "is a directory" in cap.err


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    out = tmp_path / "sub" / "sim.npz"
    rc, cap = _cli(["--n-pspl", "3", "--n-binary", "2", "--output", str(out), "--seed", "4",
                    "--workers", "1", "--cadence-mask-prob", "0.3", "--mag-error-std", "0.1",
                    "-q"], capsys)
    assert rc == 0, cap.err
    ds = dataset.load(out)
    assert ds.n_events == 5 and ds.meta["cadence_mask_prob"] == 0.3
    assert np.all(ds.mag_err == np.float32(0.1))
    cmd = ds.meta["command"]
    assert cmd.startswith("ulens simulate --survey thesis --n-pspl 3 --n-binary 2") and "--workers" not in cmd
    assert "wrote" in cap.out and "dchi2" in cap.out


def test_help_explains_every_option(capsys):
    from ulens import cli
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    out = capsys.readouterr().out
    for opt in ("--n-pspl", "--n-binary", "--binary-params", "--output", "--cadence-mask-prob",
                "--mag-error-std", "--seed", "--workers", "--thesis-priors", "--vbm-tol", "--shared-priors",
                "baseline", "distinct", "planetary", "stellar", "log-uniform", "SHORTCUT"):
        assert opt in out, opt


def test_event_ids_are_stable():
    assert sim.event_id(0, sim.PSPL, 0) == 0
    assert sim.event_id(0, sim.BINARY, 0) == 1 << 27
    assert sim.decode_event_id(sim.event_id(123, 1, 4567)) == (123, 1, 4567)
    assert sim.event_id(2**16 + 5, 0, 1) == sim.event_id(5, 0, 1)
    # ids stay below 2**44 so diaSourceId = id * 100000 + index fits in 63 bits
    assert sim.event_id(2**16 - 1, 1, 2**27 - 1) < 2**44 < (2**63 - 1) // 100000
    assert math.isclose(float(sim.EPOCHS[1] - sim.EPOCHS[0]), 1000 / 1499)
