"""training.augment: the spoiled share, the noise factor, outliers, consistent fluxes."""
import numpy as np
import pytest

from training import augment
from training.photometry import njy_to_mag


def _ds():
    from training.simulate import SimulationConfig, simulate

    return simulate(20, 20, SimulationConfig(survey="lsst", seed=11), workers=0)


def test_spoils_the_chosen_share_and_keeps_the_truth():
    ds = _ds()
    s = augment.Settings(fraction=0.5, scatter_min=2.0, scatter_max=2.0, outlier_rate=0.0, seed=1)
    res = augment.augment(ds, s)
    res.validate()
    noise_in, noise_out = ds.mag - ds.mag_model, res.mag - res.mag_model
    spoiled = 0
    for i in range(ds.n_events):
        a, b = ds.offsets[i], ds.offsets[i + 1]
        f = np.isfinite(ds.mag[a:b]) & (ds.mag_err[a:b] <= augment.MAX_ERR)
        far = np.isfinite(ds.mag[a:b]) & ~f                     # too poorly measured to spoil
        assert np.array_equal(res.mag[a:b][far], ds.mag[a:b][far])
        if np.allclose(noise_out[a:b][f], noise_in[a:b][f]):
            continue
        spoiled += 1                                    # the noise exactly doubled (float32)
        np.testing.assert_allclose(noise_out[a:b][f], 2.0 * noise_in[a:b][f], atol=2e-6)
    assert spoiled == res.meta["augment"]["events_augmented"] and 15 <= spoiled <= 45
    assert np.array_equal(res.mag_err, ds.mag_err, equal_nan=True) and np.array_equal(res.mag_model, ds.mag_model)
    assert np.array_equal(res.label, ds.label) and np.array_equal(res.params["dchi2"], ds.params["dchi2"], equal_nan=True)
    f = np.isfinite(res.mag)                            # fluxes moved with the magnitudes
    np.testing.assert_allclose(njy_to_mag(res.sci_flux[f].astype(np.float64)), res.mag[f], atol=1e-4)
    np.testing.assert_allclose(res.sci_flux - ds.sci_flux, res.diff_flux - ds.diff_flux, rtol=1e-3, atol=1.0)


def test_outliers_are_three_to_ten_sigma_both_ways():
    ds = _ds()
    res = augment.augment(ds, augment.Settings(fraction=1.0, scatter_min=1.0, scatter_max=1.0,
                                               outlier_rate=0.05, seed=2))
    jump = (res.mag - ds.mag) / ds.mag_err
    moved = np.isfinite(jump) & (np.abs(jump) > 1e-3)
    assert moved.sum() == res.meta["augment"]["outliers"] > 100
    assert np.all((np.abs(jump[moved]) >= 3 - 1e-3) & (np.abs(jump[moved]) <= 10 + 1e-3))
    assert 0.3 < np.mean(jump[moved] < 0) < 0.7          # brighter and fainter alike


def test_bad_settings_name_the_option():
    with pytest.raises(augment.AugmentError, match="--fraction"):
        augment.Settings(fraction=1.5).check()
    with pytest.raises(augment.AugmentError, match="--scatter"):
        augment.Settings(scatter_min=2.0, scatter_max=1.0).check()


def test_joining_files_that_share_event_ids_is_refused(tmp_path, capsys):
    """The same simulation twice: the ids repeat, and the join says so before any work."""
    from ulens import cli

    f = _ds().save(tmp_path / "a.npz")
    assert cli.main(["augment", "--data", str(f), str(f), "-o", str(tmp_path / "j.npz")]) == 3
    assert "share event ids" in capsys.readouterr().err and not (tmp_path / "j.npz").exists()
