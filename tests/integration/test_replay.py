"""`ulens replay` against the real Kafka: counts, order per key, schema, truth, pacing, inputs.

Each test uses its own topics (3 partitions where order matters) and reads them back by
assigning every partition from the beginning until the expected count has arrived
(no consumer group, no sleeps), then checks the high watermarks hold nothing more.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import config as cfg
from replay import photometry_files as pf
from schemas import default_codec
from tests.helpers import unique
from tests.unit.test_replay_stream import make_dataset
from training.photometry import mag_to_njy
from ulens import cli

REPO = Path(__file__).resolve().parents[2]
START = cfg.ReplaySettings().start_mjd   # the replay's default day 0


# ---------------------------------------------------------------------------- helpers

def _partitions(settings, topic):
    md = AdminClient(settings.kafka.client_config()).list_topics(timeout=10)
    t = md.topics.get(topic)
    return None if t is None or t.error is not None else sorted(t.partitions)


def high_watermarks(settings, topic) -> int:
    parts = _partitions(settings, topic)
    if parts is None:
        return 0
    c = Consumer({**settings.kafka.client_config(), "group.id": unique("wm")})
    try:
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    finally:
        c.close()


def read_topic(settings, topic, expect: int, timeout: float = 30.0):
    """All messages of ``topic`` (every partition, from the start): exactly ``expect`` of them."""
    parts = _partitions(settings, topic)
    assert parts is not None, f"topic {topic} does not exist"
    c = Consumer({**settings.kafka.client_config(), "group.id": unique("g"),
                  "enable.auto.commit": False, "enable.partition.eof": False})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for m in c.consume(num_messages=min(10_000, expect - len(got)), timeout=1.0):
                assert m.error() is None, m.error()
                got.append(m)
    finally:
        c.close()
    assert len(got) == expect, f"got {len(got)} of {expect} messages from {topic}"
    assert high_watermarks(settings, topic) == expect, "more messages on the topic than expected"
    return got


def by_key(msgs):
    codec = default_codec()
    out: dict[bytes, list] = {}
    for m in msgs:
        out.setdefault(m.key(), []).append(codec.decode_kind(m.value(), "alert"))
    return out


@pytest.fixture
def conf(tmp_path, topics):
    """A config with this test's truth topic; replay creates alert topics with 3 partitions."""
    t = topics("truth")["truth"]
    p = tmp_path / "replay.yaml"
    p.write_text(f"kafka:\n  topics:\n    truth: {t}\n  partitions:\n    alerts: 3\n")
    return p, t


@pytest.fixture
def fresh_topic(services):
    """A topic name nobody created yet; deleted at the end if the replay created it."""
    names = []

    def make(name="alerts"):
        names.append(unique(name))
        return names[-1]

    yield make
    if names:
        # the client kept in a name (a temporary one may be collected before its futures
        # resolve: the teardown then waited forever once) and every wait bounded
        admin = AdminClient(services.kafka.client_config())
        for f in admin.delete_topics(names, operation_timeout=30).values():
            try:
                f.result(timeout=60)
            except Exception:
                pass


def replay(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["replay", "--no-progress", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------- dataset replays

def test_replay_streams_every_point_in_order_with_truth(services, topics, conf, tmp_path, capsys):
    config, truth_topic = conf
    ds = make_dataset(6, 40, seed=1)
    data = ds.save(tmp_path / "ds.npz")
    t = topics("alerts", partitions=3)["alerts"]
    rc, out, err = replay(capsys, "--config", config, "--data", data, "--topic", t,
                          "--truth-out", tmp_path / "run" / "truth.jsonl", "--publish-truth")
    assert rc == 0, err
    n = len(ds.time)
    assert f"replay: {n} alerts, 6 events" in out and "alerts/s" in out and "MJD" in out
    msgs = read_topic(services, t, n)
    codec = default_codec()
    assert {m.value()[1:5] for m in msgs} == {codec.schema_id("alert").to_bytes(4, "big")}
    groups = by_key(msgs)
    assert sorted(groups) == sorted(str(e).encode() for e in ds.event_id)
    for i, eid in enumerate(ds.event_id.tolist()):
        recs = groups[str(eid).encode()]
        tm, mag, err_ = ds.event(i)
        mjd = [r["midpointMjdTai"] for r in recs]
        assert mjd == (START + tm).tolist()                           # per key: time order
        assert [r["diaSourceId"] for r in recs] == [eid * 100_000 + k for k in range(len(tm))]
        sci, sci_err = mag_to_njy(mag, err_)
        assert [r["scienceFlux"] for r in recs] == sci.tolist()
        assert [r["psfFluxErr"] for r in recs] == sci_err.tolist()
        assert [r["psfFlux"] for r in recs] == (sci - mag_to_njy(ds.params["baseline_mag"][i])).tolist()
        assert all(r["diaObjectId"] == eid and r["band"] == "i" for r in recs)
        assert all(r["prvDiaSources"] is None for r in recs)
    produced = [r["alertProducedUs"] for rs_ in groups.values() for r in rs_]
    assert abs(max(produced) / 1e6 - time.time()) < 120

    truth = read_jsonl(tmp_path / "run" / "truth.jsonl")
    assert [r["diaObjectId"] for r in truth] == ds.event_id.tolist()
    for i, r in enumerate(truth):
        assert r["label"] == int(ds.label[i]) and r["n_points"] == int(ds.lengths()[i])
        for k in ("t0", "tE", "u0", "fs", "baseline_mag"):
            assert r[k] == ds.params[k][i]
        assert r["t0_mjd"] == START + ds.params["t0"][i]
        for k in ("s", "q", "alpha", "rho", "dchi2"):
            assert (r[k] is None) if ds.label[i] == 0 else r[k] == ds.params[k][i]
    run = json.loads((tmp_path / "run" / "replay.json").read_text())
    assert run["counts"]["alerts_produced"] == run["counts"]["alerts_delivered"] == n
    assert run["kafka"]["partitions"] == 3 and run["survey_mjd_range"][0] == START + ds.time.min()
    # the same truth on the compacted truth topic, key = diaObjectId
    tmsgs = read_topic(services, truth_topic, len(truth))
    assert {m.key(): codec.decode_kind(m.value(), "truth") for m in tmsgs} == \
        {str(r["diaObjectId"]).encode(): r for r in truth}


def test_missing_topic_is_created_with_configured_partitions(services, conf, fresh_topic, tmp_path,
                                                             capsys):
    ds = make_dataset(3, 10, seed=2)
    t = fresh_topic()
    rc, out, err = replay(capsys, "--config", conf[0], "--data", ds.save(tmp_path / "d.npz"),
                          "--topic", t, "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 0, err
    assert "3 partitions, created" in err
    assert len(_partitions(services, t)) == 3
    read_topic(services, t, 30)


def test_limit_events_sends_only_the_first_events(services, topics, tmp_path, capsys):
    ds = make_dataset(5, 12, seed=3)
    t = topics("alerts", partitions=3)["alerts"]
    rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--topic", t,
                          "--limit-events", 2, "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 0, err
    groups = by_key(read_topic(services, t, 24))
    assert sorted(groups) == sorted(str(e).encode() for e in ds.event_id[:2])
    assert [r["diaObjectId"] for r in read_jsonl(tmp_path / "truth.jsonl")] == ds.event_id[:2].tolist()


def test_history_and_detections_only(services, topics, tmp_path, capsys):
    ds = make_dataset(4, 40, seed=4, amplitude=2.0)
    t = topics("alerts", partitions=3)["alerts"]
    from replay.stream import fluxes
    base = np.repeat(ds.params["baseline_mag"], ds.lengths())
    _, _, psf, psf_err = fluxes(ds.mag, ds.mag_err, base)
    expect = int((np.abs(psf) / psf_err >= 5.0).sum())
    assert 0 < expect < len(ds.time)
    rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--topic", t,
                          "--history", 3, "--detections-only", "--snr-threshold", 5,
                          "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 0, err
    groups = by_key(read_topic(services, t, expect))
    for recs in groups.values():
        for k, r in enumerate(recs):
            assert abs(r["psfFlux"]) / r["psfFluxErr"] >= 5.0
            want = [{f: q[f] for f in ("diaSourceId", "midpointMjdTai", "band", "psfFlux",
                                       "psfFluxErr", "scienceFlux", "scienceFluxErr")}
                    for q in recs[max(0, k - 3):k]]
            assert r["prvDiaSources"] == want
    truth = read_jsonl(tmp_path / "truth.jsonl")
    assert sum(r["n_points"] for r in truth) == expect


def test_rate_caps_alerts_per_second(services, topics, tmp_path, capsys):
    ds = make_dataset(4, 50, seed=5)                     # 200 alerts
    t = topics("alerts")["alerts"]
    rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--topic", t,
                          "--rate", 400, "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 0, err
    msgs = read_topic(services, t, 200)
    run = json.loads((tmp_path / "replay.json").read_text())
    assert run["seconds"] >= 0.45                         # 199 gaps of 2.5 ms
    stamps = sorted(default_codec().decode(m.value())[1]["alertProducedUs"] for m in msgs)
    assert (stamps[-1] - stamps[0]) / 1e6 >= 199 / 400 * 0.95


def test_speed_maps_survey_time_to_wall_time(services, topics, tmp_path, capsys):
    ds = make_dataset(3, 20, span=2.0, seed=6)           # 2 survey days
    t = topics("alerts")["alerts"]
    speed = 86400 * 4.0                                  # 4 survey days per wall second
    rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--topic", t,
                          "--speed", speed, "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 0, err
    recs = [default_codec().decode(m.value())[1] for m in read_topic(services, t, 60)]
    recs.sort(key=lambda r: r["midpointMjdTai"])
    first = recs[0]
    for r in recs[1:]:   # never early: wall gap >= survey gap / speed (0.5 ms scheduling slack)
        wall = (r["alertProducedUs"] - first["alertProducedUs"]) / 1e6
        survey = (r["midpointMjdTai"] - first["midpointMjdTai"]) * 86400 / speed
        assert wall >= survey - 0.002
    span = (recs[-1]["midpointMjdTai"] - first["midpointMjdTai"]) * 86400 / speed
    assert json.loads((tmp_path / "replay.json").read_text())["seconds"] >= span * 0.95


# ---------------------------------------------------------------------------- archival files

def test_archival_files_stream(services, topics, tmp_path, capsys):
    a = tmp_path / "OB120026.dat"
    a.write_text("# OGLE photometry\nHJD mag err\n2456003.5 17.00 0.01\n2456001.5 17.40 0.01\n"
                 "2456002.5 17.20 0.02  # peak side\n")
    b = tmp_path / "KMT-B.csv"
    b.write_text("time,mag,err\n6001.0,18.0,0.03\n6002.25,18.1,0.03\n")
    t = topics("alerts", partitions=3)["alerts"]
    rc, out, err = replay(capsys, "--photometry", a, b, "--topic", t,
                          "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 0, err
    groups = by_key(read_topic(services, t, 5))
    ra = groups[str(pf.object_id_for(a)).encode()]
    rb = groups[str(pf.object_id_for(b)).encode()]
    assert [r["midpointMjdTai"] for r in ra] == [56001.0, 56002.0, 56003.0]
    assert [r["midpointMjdTai"] for r in rb] == [56000.5, 56001.75]
    assert [r["scienceFlux"] for r in ra] == mag_to_njy([17.4, 17.2, 17.0]).tolist()
    truth = read_jsonl(tmp_path / "truth.jsonl")
    assert {r["source"] for r in truth} == {str(a), str(b)}
    assert all(r["label"] is None and r["t0"] is None for r in truth)


def test_bad_archival_file_errors_and_produces_nothing(services, topics, fresh_topic, tmp_path,
                                                       capsys):
    good = tmp_path / "good.dat"
    good.write_text("2456001.5 17.4 0.01\n2456002.5 17.2 0.01\n")
    bad = tmp_path / "bad.dat"
    bad.write_text("# header comment\n2456001.5 17.4 0.01\n2456002.5 17.2 0.01\n"
                   "2456003.5 17.1 oops\n")
    t = topics("alerts")["alerts"]
    new = fresh_topic()
    for topic in (t, new):
        rc, out, err = replay(capsys, "--photometry", good, bad, "--topic", topic,
                              "--truth-out", tmp_path / "x" / "truth.jsonl")
        assert rc == 3
        assert f"{bad}:4:" in err and "not a number" in err and "Traceback" not in err
    assert high_watermarks(services, t) == 0
    assert _partitions(services, new) is None            # not even the topic was created
    assert not (tmp_path / "x").exists()


def _bad_npz(tmp_path, kind):
    ds = make_dataset(3, 10, seed=7)
    path = ds.save(tmp_path / f"{kind}.npz")
    if kind == "corrupt":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "missing":
        path.unlink()
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if kind == "nan_time":
            arrays["time"][4] = np.nan
        elif kind == "short_mag":
            arrays["mag"] = arrays["mag"][:-1]
        np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("kind, match", [
    ("missing", "not found"), ("corrupt", "not a readable dataset"),
    ("nan_time", "non-finite value"), ("short_mag", "mag has length")])
def test_bad_dataset_produces_nothing(services, topics, tmp_path, capsys, kind, match):
    t = topics("alerts")["alerts"]
    rc, out, err = replay(capsys, "--data", _bad_npz(tmp_path, kind), "--topic", t,
                          "--truth-out", tmp_path / "x" / "truth.jsonl")
    assert rc == 3 and match in err and "Traceback" not in err, err
    assert high_watermarks(services, t) == 0
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- delivery, signals

def test_undelivered_alerts_exit_nonzero_with_the_count(services, tmp_path, capsys):
    t = unique("tiny")
    admin = AdminClient(services.kafka.client_config())
    for f in admin.create_topics([NewTopic(t, 1, 1, config={"max.message.bytes": "60"})]).values():
        f.result()
    try:
        ds = make_dataset(2, 10, seed=8)
        rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--topic", t,
                              "--truth-out", tmp_path / "truth.jsonl")
        assert rc == 3                          # Kafka refused them (too large): bad input
        assert "20 alert(s) and 0 truth record(s) not delivered" in err
        assert "too large" in err
        assert json.loads((tmp_path / "replay.json").read_text())["counts"]["alerts_undelivered"] == 20
    finally:
        for f in admin.delete_topics([t]).values():
            f.result()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_flushes_what_was_sent_and_exits_130(services, topics, tmp_path, sig):
    ds = make_dataset(4, 500, span=1000.0, seed=9)          # 2000 alerts at 100/s: 20 s if left alone
    t = topics("alerts")["alerts"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ulens.cli", "replay", "--data", str(ds.save(tmp_path / "d.npz")),
         "--topic", t, "--rate", "100", "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while high_watermarks(services, t) < 20 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"interrupted ({sig.name})" in err and "events started" in err and "survey date MJD" in err
    runs = list((tmp_path / "runs").glob("replay_*/replay.json"))
    assert len(runs) == 1
    run = json.loads(runs[0].read_text())
    n = run["counts"]["alerts_produced"]
    assert run["interrupted"] and 20 <= n < 2000 and run["counts"]["alerts_delivered"] == n
    read_topic(services, t, n)                               # everything sent was flushed
    truth = read_jsonl(runs[0].parent / "truth.jsonl")
    assert sum(r["n_points"] for r in truth) == n
    assert f"replay: {n} alerts" in out
