"""The dataset format: save/load round trip and clear errors for bad files."""
import json

import numpy as np
import pytest

from training import dataset as ds


def make(n=3, length=5, seed=0):
    rng = np.random.default_rng(seed)
    lens = np.full(n, length)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    t = np.concatenate([np.sort(rng.uniform(0, 1000, length)) for _ in range(n)])
    mag = rng.uniform(18, 20, offsets[-1]).astype(np.float32)
    params = {k: rng.uniform(0.1, 1, n) for k in ds.PARAM_FIELDS}
    return ds.Dataset(offsets=offsets, time=t, mag=mag, mag_err=np.full_like(mag, 0.05),
                      mag_model=mag, mag_pspl=mag, event_id=np.arange(n) + 100,
                      label=np.array([0, 1, 0][:n] + [1] * max(0, n - 3), dtype=np.int8),
                      params=params, meta={"seed": seed})


def test_round_trip(tmp_path):
    d = make()
    p = d.save(tmp_path / "d.npz")
    e = ds.load(p)
    assert e.n_events == 3 and e.meta["seed"] == 0 and e.meta["format_version"] == ds.FORMAT_VERSION
    for name in ("offsets", "time", "mag", "mag_err", "mag_model", "mag_pspl", "event_id", "label"):
        np.testing.assert_array_equal(getattr(e, name), getattr(d, name))
    t, m, err = e.event(1)
    assert len(t) == 5 and np.all(np.diff(t) > 0)


def test_subset_and_concatenate():
    d = make(n=4)
    s = d.subset([2, 0])
    assert list(s.event_id) == [102, 100]
    np.testing.assert_array_equal(s.event(0)[0], d.event(2)[0])
    c = ds.concatenate([d.subset([0]), d.subset([1, 2, 3])])
    np.testing.assert_array_equal(c.time, d.time)
    c.validate()


def test_missing_file(tmp_path):
    with pytest.raises(ds.DatasetError, match="not found"):
        ds.load(tmp_path / "nope.npz")


def test_corrupt_file(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"this is not a zip file")
    with pytest.raises(ds.DatasetError, match="not a readable dataset"):
        ds.load(p)


def test_missing_array(tmp_path):
    d = make()
    p = d.save(tmp_path / "d.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files if k != "mag_err"}
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ds.DatasetError, match="missing array.*mag_err"):
        ds.load(tmp_path / "m.npz")


def test_mismatched_lengths_and_nan_times(tmp_path):
    d = make()
    d.mag = d.mag[:-1]
    with pytest.raises(ds.DatasetError, match="mag has length 14, time has 15"):
        d.validate()
    d = make()
    d.time[7] = np.nan
    with pytest.raises(ds.DatasetError, match="time has a non-finite value at point 7 \\(event_id 101\\)"):
        d.validate()
    d = make()
    d.time[6] = d.time[5]
    with pytest.raises(ds.DatasetError, match="event_id 101 are not strictly increasing"):
        d.validate()


def test_wrong_format_version(tmp_path):
    p = make().save(tmp_path / "d.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.array(json.dumps({"format_version": 99}))
    np.savez(tmp_path / "v.npz", **arrays)
    with pytest.raises(ds.DatasetError, match="format version 99"):
        ds.load(tmp_path / "v.npz")
