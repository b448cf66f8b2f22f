"""`ulens bench`: the row format and small runs of the parts that need no services."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from replay.stream import from_dataset, plan
from training.dataset import PARAM_FIELDS, Dataset
from ulens import bench, cli
from ulens.bench import harness
from ulens.bench.inference import inference_rows
from ulens.bench.simulate import simulate_rows


def tiny_dataset(lengths=(5, 3, 7, 4), seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    lens = np.asarray(lengths)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    # shared epochs (ties across events, as in the simulation's cadence)
    time = np.concatenate([np.sort(rng.choice(np.arange(20.0), n, replace=False)) for n in lens])
    p = len(time)
    mag = rng.uniform(18, 20, p).astype(np.float32)
    n = len(lens)
    params = {k: rng.uniform(0.1, 1.0, n) for k in PARAM_FIELDS}
    params["baseline_mag"] = np.full(n, 19.0)
    ds = Dataset(offsets=offsets, time=time, mag=mag, mag_err=np.full(p, 0.05, np.float32),
                 mag_model=mag, mag_pspl=mag, event_id=np.arange(100, 100 + n, dtype=np.int64),
                 label=(np.arange(n) % 2).astype(np.int8), params=params, meta={})
    ds.validate()
    return ds


def test_row_format_and_ratio():
    r = harness.make_row("x.rate", 2000.0, "alerts/s", 100.0, note="n")
    assert list(r)[:5] == list(harness.ROW_KEYS)
    assert r["ratio"] == 20.0 and r["note"] == "n"
    r = harness.make_row("x", 1.0, "ms")
    assert r["baseline"] is None and r["ratio"] is None
    r = harness.make_row("x", float("nan"), "ms", 0.0)
    assert r["value"] is None and r["ratio"] is None
    json.dumps(r, allow_nan=False)


def test_context_row_and_table():
    before = harness.machine_context()
    for key in ("nproc", "loadavg", "torch_threads", "date_utc"):
        assert key in before
    rows = [harness.context_row(before, harness.machine_context()),
            harness.make_row("inference.cpu.windowed.b1", 1234.5, "events/s", 100.0)]
    ctx = rows[0]["context"]
    assert rows[0]["name"] == "context" and "loadavg_before" in ctx and "loadavg_after" in ctx
    json.dumps(rows, allow_nan=False)
    table = harness.format_table(rows)
    assert "inference.cpu.windowed.b1" in table and "12.35" in table and "nproc" in table


def test_first_alerts_is_the_replay_order_prefix():
    ds = tiny_dataset()
    n = 9
    cut = harness.first_alerts(ds, n)
    assert len(cut.time) == n
    full = plan(from_dataset(ds, 61000.0))
    part = plan(from_dataset(cut, 61000.0))
    # the same alerts in the same order: (event id, survey time)
    want = [(int(ds.event_id[e]), float(m)) for e, m in zip(full.event[:n], full.mjd[:n])]
    got = [(int(cut.event_id[e]), float(m)) for e, m in zip(part.event, part.mjd)]
    assert got == want
    with pytest.raises(ValueError):
        harness.first_alerts(ds, len(ds.time) + 1)


def test_drop_first_and_tiled_events():
    ds = tiny_dataset()
    d = harness.drop_first(ds, 4)
    assert d.lengths().tolist() == [1, 3]          # events with 5 and 7 points keep 1 and 3
    assert d.event_id.tolist() == [100, 102]
    np.testing.assert_array_equal(d.time[:1], ds.time[4:5])
    t = harness.tiled_events(ds, 10, 4, id_base=5000)
    assert t.n_events == 10 and set(t.lengths()) == {4}
    assert len(set(t.event_id.tolist())) == 10
    t.validate()


def test_inference_rows_small(tmp_path):
    from tests.unit.test_broker_inference import light_curve, make_artifact

    art = make_artifact(tmp_path / "art", seed=1)
    rng = np.random.default_rng(0)
    x = np.stack([art.inputs(*light_curve(rng, 120)) for _ in range(3)])
    rows = inference_rows(art, x, [1, 4], 0.01, "cpu")
    names = [r["name"] for r in rows]
    assert names == ["inference.cpu.full.b1", "inference.cpu.windowed.b1",
                     "inference.cpu.full.b4", "inference.cpu.windowed.b4"]
    assert all(r["value"] > 0 for r in rows)
    assert rows[1]["baseline"] == rows[0]["value"] and rows[3]["baseline"] == rows[2]["value"]


def test_simulate_rows_small():
    rows = simulate_rows(n_binary=1, n_pspl=2, seed=5, workers=0)
    names = [r["name"] for r in rows]
    assert names == ["simulate.binary", "simulate.binary.vbm_plus_dchi2_fit", "simulate.pspl"]
    assert all(r["value"] > 0 and r["baseline"] > 0 for r in rows)


def test_helpers():
    rate, done, secs = harness.timed_rate(lambda: 10, 0.0)
    assert done == 10 and rate > 0
    assert harness.percentiles([]) == [None, None]
    assert harness.percentiles([1.0, 2.0, 3.0], (50,)) == [2.0]
    assert bench._sizes("1,16, 256") == [1, 16, 256]
    with pytest.raises(argparse.ArgumentTypeError):
        bench._sizes("0,2")


def test_command_is_registered_and_parses():
    assert cli.COMMANDS["bench"][0] == "ulens.bench"
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args(["inference", "simulate", "--json", "--batch-sizes", "1,8"])
    assert a.benchmark == ["inference", "simulate"] and a.json and a.batch_sizes == [1, 8]
    with pytest.raises(SystemExit):
        p.parse_args(["nonsense"])


def test_scaleout_and_rubin_options_parse():
    from ulens.bench.scaleout import _processes

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args(["consumer", "scaleout", "--format", "rubin", "--processes", "1,2,4"])
    assert a.format == "rubin" and a.processes == [1, 2, 4] and a.survey is None and a.rate is None
    assert _processes("2, 8") == [2, 8]
    for bad in ("0,2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _processes(bad)
    with pytest.raises(SystemExit):
        p.parse_args(["consumer", "--format", "json"])
    # the datasets of two surveys never share a cache file; the thesis one keeps its old name
    assert harness.dataset_path("/c", 5, 5, 1) != harness.dataset_path("/c", 5, 5, 1, "lsst")
    assert harness.dataset_path("/c", 5, 5, 1).name.startswith("sim_pspl5")


def test_decode_benchmark_small(tmp_path):
    """`ulens bench decode` on a few lsst events: every way reads the same packets (no services)."""
    from types import SimpleNamespace

    from tests.helpers import rubin_schemas
    from ulens.bench.decode import bench_decode

    rubin_schemas((11, 1))
    import config as cfg

    run = SimpleNamespace(cache=tmp_path, settings=cfg.load(None))
    a = SimpleNamespace(survey="lsst", events=16, seed=3, workers=0, decode_packets=200)
    rows = bench_decode(run, a)
    assert [r["name"] for r in rows] == ["decode.rubin.batch", "decode.rubin.fastavro", "decode.rubin.polars"]
    assert all(r["value"] > 0 and r["baseline"] > 0 for r in rows)
