"""The broker against the real Kafka and Redis.

Alerts are built in the test through the schema codec (the broker never imports the
replay). The model is a real, randomly initialised TD-CNN artifact; the threshold is
chosen so that about half of the events fire, with a margin, and every expectation is
computed offline with ``artifact.predict`` over whole light curves and
``training.decision.first_trigger``.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import socket
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import generate_latest

from broker import state as st
from broker.consumer import Broker
from broker.inference import Job, Scorer
from schemas import HEADER, default_codec
from tests.helpers import mock_alert, unique
from tests.integration.test_foundation import consume_all
from tests.unit.test_broker_inference import light_curve, make_artifact
from training import decision
from training.features import REFERENCE_POINTS
from training.photometry import mag_to_njy
from ulens import cli

REPO = Path(__file__).resolve().parents[2]
CODEC = default_codec()
MIN_POINTS, SMOOTH = 10, 5


# --- data and expectations -----------------------------------------------------------
def make_events(seed: int, n_events: int, lengths=(30, 260)):
    rng = np.random.default_rng(seed)
    events = []
    for e in range(n_events):
        t, mag, err = light_curve(rng, int(rng.integers(*lengths)), t0=60000.0 + rng.uniform(0, 50))
        events.append({"oid": 5000 + seed * 100 + e, "t": t, "mag": mag, "err": err})
    return events


def alerts_of(events):
    """(key, record) for every point, interleaved in time order like the replay."""
    out = []
    for ev in events:
        flux, ferr = mag_to_njy(ev["mag"], ev["err"])
        for i in range(len(ev["t"])):
            out.append((float(ev["t"][i]), ev["oid"], i, mock_alert(
                diaObjectId=ev["oid"], diaSourceId=ev["oid"] * 100_000 + i,
                midpointMjdTai=float(ev["t"][i]), scienceFlux=float(flux[i]),
                scienceFluxErr=float(ferr[i]), psfFlux=float(flux[i]) * 0.1, psfFluxErr=float(ferr[i]))))
    out.sort(key=lambda x: (x[0], x[1], x[2]))
    return [(str(r["diaObjectId"]).encode(), r) for _, _, _, r in out]


def offline_probs(artifact, events):
    return {ev["oid"]: artifact.predict(artifact.inputs(ev["t"], ev["mag"], ev["err"])[None])[0]
            for ev in events}


def choose_threshold(probs: dict) -> float:
    """A threshold near the median event score, far (in score) from every eligible point."""
    scores = {o: decision.score(p, SMOOTH)[MIN_POINTS - 1:] for o, p in probs.items()}
    ev = np.sort([s.max() for s in scores.values()])
    allpts = np.concatenate(list(scores.values()))
    best, margin = None, -1.0
    for a, b in zip(ev[len(ev) // 4: 3 * len(ev) // 4], ev[len(ev) // 4 + 1: 3 * len(ev) // 4 + 1]):
        thr = (a + b) / 2
        m = np.min(np.abs(allpts - thr))
        if m > margin:
            best, margin = thr, m
    assert margin > 1e-5, "no threshold with a safe margin; change the seed"
    return float(best)


def expected_triggers(probs: dict, thr: float) -> dict:
    out = {}
    for o, p in probs.items():
        j = decision.first_trigger(p, thr, MIN_POINTS, SMOOTH)
        if j is not None:
            out[o] = (j, float(decision.score(p, SMOOTH)[j]))
    return out


# --- Kafka helpers -------------------------------------------------------------------
def produce(settings, topic, items):
    """items: (key, record-or-bytes[, headers]); waits for every delivery."""
    p = Producer({**settings.kafka.client_config(), "acks": "all", "enable.idempotence": True})
    errors = []
    for it in items:
        key, val = it[0], it[1]
        headers = it[2] if len(it) > 2 else None
        value = val if isinstance(val, bytes) else CODEC.encode(val, "alert")
        p.produce(topic, key=key, value=value, headers=headers,
                  on_delivery=lambda err, msg: errors.append(err) if err else None)
        p.poll(0)
    assert p.flush(30) == 0 and not errors


def read_topic(settings, topic):
    """Every message currently in ``topic``."""
    c = Consumer({**settings.kafka.client_config(), "group.id": unique("count")})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        total = 0
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += hi - lo
    finally:
        c.close()
    return consume_all(settings, topic, total) if total else []


def triggers_in(settings, topic):
    return [CODEC.decode_kind(m.value(), "trigger") for m in read_topic(settings, topic)]


def settings_for(services, prefix, names, threshold, **consumer):
    topics = dataclasses.replace(services.kafka.topics, alerts=names["alerts"],
                                 triggers=names["triggers"], dead_letter=names["dlq"])
    return services.replace(kafka={"topics": topics}, redis={"key_prefix": prefix},
                            consumer={"batch_size": 300, "poll_timeout_s": 0.2, "log_interval_s": 2.0,
                                      "threshold": threshold, "min_points": MIN_POINTS, **consumer})


def redis_dump(client, prefix):
    return {k: client.get(k) for k in sorted(client.scan_iter(match=f"{prefix}:*", count=1000))}


# --- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    art_dir = tmp_path_factory.mktemp("model")
    art = make_artifact(art_dir, seed=7)
    events = make_events(1, 12)
    probs = offline_probs(art, events)
    thr = choose_threshold(probs)
    return {"artifact": art, "artifact_dir": art_dir, "events": events, "probs": probs,
            "threshold": thr, "expected": expected_triggers(probs, thr)}


# --- tests ---------------------------------------------------------------------------
def test_stream_state_triggers_and_replay_from_the_beginning(services, topics, redis_client, key_prefix, model):
    art, events = model["artifact"], model["events"]
    names = topics("alerts", "triggers", "dlq", partitions=3)
    settings = settings_for(services, key_prefix, names, model["threshold"])
    alerts = alerts_of(events)
    produce(settings, names["alerts"], alerts)

    s1 = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert (s1.alerts, s1.points, s1.duplicates, sum(s1.dead_letters.values())) == (len(alerts), len(alerts), 0, 0)

    # Redis holds exactly each event's points, all scored, probabilities as offline
    for ev in events:
        view = st.read_event(redis_client, key_prefix, ev["oid"])
        n = len(ev["t"])
        assert (view.header.n_total, view.header.n_scored, view.header.n_dropped, view.first_index) == (n, n, 0, 0)
        assert np.array_equal(view.points["t"], ev["t"])
        assert np.array_equal(view.points["mag"], ev["mag"]) and np.array_equal(view.points["err"], ev["err"])
        assert np.all(np.abs(st.dequantize_probs(view.points["p"]) - model["probs"][ev["oid"]]) <= 0.5 / 254 + 1e-6)
        assert view.ttl_s > 0
        ring = view.header.ring_valid()
        np.testing.assert_allclose(ring, model["probs"][ev["oid"]][-SMOOTH:], atol=1e-5)

    # at most one trigger per event, at the point the offline rule fires
    trig = triggers_in(settings, names["triggers"])
    by_event = {t["diaObjectId"]: t for t in trig}
    assert len(by_event) == len(trig)
    expected = model["expected"]
    assert 0 < len(expected) < len(events)
    assert set(by_event) == set(expected)
    for oid, (j, score) in expected.items():
        t = by_event[oid]
        assert t["nPoints"] == j + 1 and t["diaSourceId"] == oid * 100_000 + j
        assert t["probability"] == pytest.approx(score, abs=1e-5)
        assert t["modelVersion"] == art.version and t["rule"] == "tdcnn"
        assert t["triggerProducedUs"] >= t["alertProducedUs"] > 0
        view = st.read_event(redis_client, key_prefix, oid)
        assert view.header.triggered and view.trigger_status == "sent"
        assert view.trigger["triggerId"] == t["triggerId"]

    # the same topic again from the beginning (new group), same Redis: nothing changes
    before = redis_dump(redis_client, key_prefix)
    s2 = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert (s2.alerts, s2.points, s2.duplicates, s2.triggers) == (len(alerts), 0, len(alerts), 0)
    assert redis_dump(redis_client, key_prefix) == before
    assert len(triggers_in(settings, names["triggers"])) == len(trig)


def test_bad_input_goes_to_the_dead_letter_topic(services, topics, redis_client, key_prefix, model):
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq", partitions=1)
    settings = settings_for(services, key_prefix, names, model["threshold"])
    ev = make_events(5, 1, lengths=(40, 41))[0]
    good = alerts_of([ev])
    key = good[0][0]
    wrong_schema = HEADER.pack(0, 999) + CODEC.encode(good[0][1], "alert")[HEADER.size:]
    missing = CODEC.encode(good[0][1], "alert")[:-12]   # a body that ends before its last fields
    bad = [
        (key, b"\x17 garbage bytes \xff\xfe", [("trace", b"t1")]),
        (key, wrong_schema),
        (key, mock_alert(diaObjectId=ev["oid"], diaSourceId=1, midpointMjdTai=61500.0, scienceFlux=float("nan"))),
        (key, mock_alert(diaObjectId=ev["oid"], diaSourceId=2, midpointMjdTai=61500.0, scienceFluxErr=-3.0)),
        (key, missing),
        # an earlier time than the event's newest point, and no stored point has it
        (key, mock_alert(diaObjectId=ev["oid"], diaSourceId=3, midpointMjdTai=float(ev["t"][5]) + 1e-3)),
    ]
    reasons = ["bad_magic_byte", "unknown_schema_id", "nonfinite_value", "nonpositive_error",
               "truncated_frame", "out_of_order"]
    items = list(good[:10]) + bad[:3] + list(good[10:20]) + bad[3:] + list(good[20:])
    reason_at = {}  # single partition: offset = position in items
    for b, r in zip(bad, reasons):
        reason_at[next(n for n, it in enumerate(items) if it is b)] = r
    produce(settings, names["alerts"], items)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broker = Broker(settings, art, group=unique("g"), metrics_port=port)
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "ulens_alerts_total 0.0" in page and "ulens_batch_seconds_bucket" in page
    s = broker.run(until_idle=1.0)
    assert s.points == len(good) and s.alerts == len(items)
    assert dict(s.dead_letters) == {r: 1 for r in reasons}
    metrics = generate_latest(broker.metrics.registry).decode()
    assert f"ulens_alerts_total {float(len(items))}" in metrics
    assert 'ulens_dead_letters_total{reason="out_of_order"} 1.0' in metrics
    assert f"ulens_points_appended_total {float(len(good))}" in metrics

    view = st.read_event(redis_client, key_prefix, ev["oid"])
    assert np.array_equal(view.points["t"], ev["t"]) and view.header.n_scored == len(good)

    dlq = read_topic(settings, names["dlq"])
    assert len(dlq) == len(bad)
    for m in dlq:
        h = dict(m.headers())
        src = int(h["dlq.source.offset"])
        orig = items[src]
        value = orig[1] if isinstance(orig[1], bytes) else CODEC.encode(orig[1], "alert")
        assert m.value() == value and m.key() == orig[0]
        assert h["dlq.source.topic"].decode() == names["alerts"] and h["dlq.source.partition"] == b"0"
        assert h["dlq.reason"].decode() == reason_at[src] and h["dlq.detail"]
    first = [m for m in dlq if dict(m.headers())["dlq.reason"] == b"bad_magic_byte"][0]
    assert dict(first.headers())["trace"] == b"t1"


def test_two_consumers_split_partitions_and_reach_the_same_state(services, topics, redis_client,
                                                                   key_prefix, tmp_path):
    """Two consumers that split the partitions store what one stores and send the same
    triggers: the same bytes but for the probabilities, which differ within
    PROB_TOLERANCE (other batches round differently, training.model)."""
    import torch

    from tests.helpers import assert_states_match
    from training.artifact import load_artifact, save_artifact
    from training.model import PROB_TOLERANCE

    events = make_events(2, 10)
    # The same decisions are promised only where no smoothed score lies within the
    # tolerance of the threshold. The random model's P(binary) all lie in 0.503-0.508, its
    # events' best scores ~1e-5 apart: spread them (last layer scaled by 300 and centred on
    # the median best score) so that a threshold can keep that distance from every score.
    base = make_artifact(tmp_path / "random", seed=7)
    probs = offline_probs(base, events)
    best = np.median([decision.score(p, SMOOTH)[MIN_POINTS - 1:].max() for p in probs.values()])
    with torch.no_grad():
        fc = base.model.head[3]
        fc.weight.mul_(300.0)
        fc.bias.mul_(300.0).add_(torch.tensor([0.5, -0.5]) * 300.0 * float(np.log(best / (1 - best))))
    save_artifact(tmp_path / "spread", base.model, {"name": "random-7-spread"}, base.scalers)
    art = load_artifact(tmp_path / "spread")
    probs = offline_probs(art, events)
    thr = choose_threshold(probs)
    scores = np.concatenate([decision.score(p, SMOOTH)[MIN_POINTS - 1:] for p in probs.values()])
    assert np.abs(scores - thr).min() > PROB_TOLERANCE, "a score at the threshold; change the seed"
    alerts = alerts_of(events)
    two = topics("alerts", "triggers", "dlq", partitions=4)
    s_two = settings_for(services, key_prefix + ":two", two, thr, batch_size=100)
    group = unique("g")
    brokers = [Broker(s_two, art, group=group) for _ in range(2)]
    summaries = [None, None]

    def work(i):
        summaries[i] = brokers[i].run(until_idle=5.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    # produce once the group has settled: both members hold partitions, all four taken
    waiter = threading.Event()

    def settled():
        return sorted(brokers[0].partitions + brokers[1].partitions) == [0, 1, 2, 3] \
            and all(b.partitions for b in brokers)
    for _ in range(600):
        if settled():
            break
        waiter.wait(0.1)
    assert settled(), "the two consumers never split the partitions"
    produce(s_two, two["alerts"], alerts)
    for t in threads:
        t.join(120)
    assert all(s is not None for s in summaries)
    assert sum(s.alerts for s in summaries) == len(alerts)
    assert all(s.alerts > 0 for s in summaries), [s.alerts for s in summaries]

    one = topics("alerts", "triggers", "dlq", partitions=4)
    s_one = settings_for(services, key_prefix + ":one", one, thr)
    produce(s_one, one["alerts"], alerts)
    Broker(s_one, art, group=unique("g")).run(until_idle=1.0)

    dump_two = {k.split(b":two:", 1)[1]: v for k, v in redis_dump(redis_client, key_prefix + ":two").items()}
    dump_one = {k.split(b":one:", 1)[1]: v for k, v in redis_dump(redis_client, key_prefix + ":one").items()}
    ev_keys = [k for k in dump_one if k.startswith(b"ev:")]
    assert len(ev_keys) == len(events)
    assert_states_match(dump_two, dump_one, PROB_TOLERANCE)
    t_two = sorted(triggers_in(s_two, two["triggers"]), key=lambda t: t["diaObjectId"])
    t_one = sorted(triggers_in(s_one, one["triggers"]), key=lambda t: t["diaObjectId"])
    ids = lambda ts: [(t["diaObjectId"], t["nPoints"], t["triggerId"]) for t in ts]
    assert ids(t_two) == ids(t_one) and t_one
    assert all(abs(a["probability"] - b["probability"]) <= PROB_TOLERANCE for a, b in zip(t_two, t_one))
    assert len({t["diaObjectId"] for t in t_two}) == len(t_two)


def test_windowed_inference_through_redis_equals_the_full_curve(redis_client, key_prefix, model):
    """Chunked appends through the Lua scripts, trimming to max_points, vs predict on the whole curve."""
    art = model["artifact"]
    rng = np.random.default_rng(21)
    t, mag, err = light_curve(rng, 450)
    full = art.predict(art.inputs(t, mag, err)[None])[0]
    store = st.EventStore(redis_client, key_prefix, 600, 120, reference_points=REFERENCE_POINTS,
                          receptive_field=art.receptive_field, smooth_window=SMOOTH)
    scorer = Scorer(art)
    got = []
    pos = 0
    ids = np.arange(len(t)) + 900_000
    while pos < len(t):
        size = int(min(len(t) - pos, rng.integers(1, 30)))
        sl = slice(pos, pos + size)
        # each chunk arrives twice (a re-delivery): the second time everything is a duplicate
        for attempt in range(2):
            (res,) = store.append([77], [size], st.pack_points(ids[sl], t[sl], mag[sl], err[sl]))
            assert res.statuses == (st.APPENDED if attempt == 0 else st.DUPLICATE) * size
            if attempt:
                assert len(res.window) == 0
                continue
            h = res.header
            job = Job(h.n_scored, res.start, res.window["t"].copy(), res.window["mag"].copy(),
                      res.window["err"].copy(), h.references, res.window["band"].copy())
            (p,) = scorer.score([job])
            store.save_scores([st.ScoreUpdate(77, h.n_scored, p, np.zeros(SMOOTH, np.float32))])
            got.append(p)
        pos += size
    np.testing.assert_allclose(np.concatenate(got), full, atol=1e-5, rtol=0)
    view = store.read(77)
    assert view.header.n_total == len(t) and view.header.n_dropped > 0
    assert view.header.n_dropped + len(view.points) == len(t)
    assert len(view.points) <= 120 + 30
    # one band (unknown: pack_points without bands): its reference, the median of the first K
    assert view.header.references[st.N_SLOTS - 1] == float(np.median(mag[:REFERENCE_POINTS].astype(np.float64)))
    assert list(view.header.band_counts) == [0] * (st.N_SLOTS - 1) + [len(t)]
    assert np.array_equal(view.points["t"], t[view.first_index:])
    # out of order: earlier than the newest point, no stored point at that time
    late = view.points["t"][-3] + 1e-4
    (res,) = store.append([77], [3], st.pack_points([1, 2, 3], [late, float(t[-1]), float(t[0])],
                                                    mag[:3], err[:3]))
    # late: out of order; same time as the newest point with another id: conflict;
    # older than every stored point after points were dropped: a duplicate we cannot verify
    assert res.statuses == st.OUT_OF_ORDER + st.CONFLICT + st.DUPLICATE_UNVERIFIED


def test_trigger_outbox_survives_a_crash_before_delivery(redis_client, key_prefix):
    """Decided (SET NX) but never confirmed sent: the next touch of the event reports it pending."""
    store = st.EventStore(redis_client, key_prefix, 600, 2000, reference_points=10,
                          receptive_field=97, smooth_window=5)
    (res,) = store.append([9], [1], st.pack_points([90], [60000.0], [np.float32(20)], [np.float32(0.1)]))
    trig = {"triggerId": "abc", "diaObjectId": 9}
    codes = store.save_scores([st.ScoreUpdate(9, 0, np.array([0.9], np.float32),
                                              np.full(5, 0.9, np.float32), trig)])
    assert codes == [st.TRIG_NEW]
    # "crash": not marked sent. A re-delivered alert touches the event:
    (res,) = store.append([9], [1], st.pack_points([90], [60000.0], [np.float32(20)], [np.float32(0.1)]))
    assert res.statuses == st.DUPLICATE and res.trigger_status == b"P" and res.header.triggered
    assert store.pending_triggers([9]) == {9: trig}
    # a second decision for the same event cannot create another trigger
    (res,) = store.append([9], [1], st.pack_points([91], [60001.0], [np.float32(20)], [np.float32(0.1)]))
    assert store.save_scores([st.ScoreUpdate(9, 1, np.array([0.9], np.float32), np.full(5, 0.9, np.float32),
                                             {"triggerId": "other"})]) == [st.TRIG_PENDING]
    assert store.mark_sent([9]) == 1
    assert store.pending_triggers([9]) == {} and store.read(9).trigger_status == "sent"


def test_memory_of_a_100_point_event_is_under_3_3_kb(redis_client, key_prefix):
    """26 bytes a point (the diaSourceId and band are stored for idempotency by source and
    per-band curves) and a 136-byte header (per-band references and counts): a 2,736-byte
    value sits in jemalloc's 3,072-byte class, plus the key."""
    store = st.EventStore(redis_client, key_prefix, 600, 2000, reference_points=10,
                          receptive_field=97, smooth_window=5)
    rng = np.random.default_rng(0)
    t, mag, err = light_curve(rng, 100)
    oid = 1234567890123
    for i in range(0, 100, 7):
        sl = slice(i, min(i + 7, 100))
        store.append([oid], [len(t[sl])], st.pack_points(np.arange(len(t))[sl], t[sl], mag[sl], err[sl]))
    used = redis_client.memory_usage(store.event_key(oid), samples=0)
    assert redis_client.strlen(store.event_key(oid)) == st.header_size(5) + 100 * st.RECORD.itemsize == 2736
    assert used <= 3300, used
    print(f"MEMORY USAGE of a 100-point event: {used} bytes")


def test_cli_events_show_and_subscribe(services, topics, key_prefix, model, tmp_path, capsys):
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq", partitions=1)
    settings = settings_for(services, key_prefix, names, model["threshold"])
    events = model["events"][:3]
    produce(settings, names["alerts"], alerts_of(events))
    Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"redis:\n  key_prefix: {key_prefix}\nkafka:\n  topics:\n    triggers: {names['triggers']}\n")
    oid = events[0]["oid"]
    assert cli.main(["events", "--config", str(conf), "show", str(oid), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["diaObjectId"] == oid and d["n_total"] == len(events[0]["t"]) and len(d["points"]) == d["n_total"]
    assert d["points"][0]["p_binary"] is not None
    assert cli.main(["events", "--config", str(conf), "show", str(oid), "--last", "3"]) == 0
    out = capsys.readouterr().out
    assert f"event {oid}" in out and "P(binary)" in out
    assert cli.main(["events", "--config", str(conf), "show", "999999999"]) == 3
    assert "no event 999999999" in capsys.readouterr().err

    n_trig = len([o for o in model["expected"] if o in {e["oid"] for e in events}])
    assert cli.main(["subscribe", "--config", str(conf), "--from-beginning", "--json",
                     "--until-idle", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == n_trig and all(x["latencyMs"] >= 0 for x in lines)
    if n_trig:
        assert cli.main(["subscribe", "--config", str(conf), "--from-beginning", "--max", "1"]) == 0
        assert "MJD" in capsys.readouterr().out


def test_consume_command_stops_gracefully_on_sigterm(services, topics, key_prefix, model, tmp_path):
    names = topics("alerts", "triggers", "dlq", partitions=1)
    settings = settings_for(services, key_prefix, names, model["threshold"])
    events = model["events"][:2]
    alerts = alerts_of(events)
    produce(settings, names["alerts"], alerts)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"redis:\n  key_prefix: {key_prefix}\nconsumer:\n  threshold: {model['threshold']}\n"
                    f"  log_interval_s: 0.5\n  batch_size: 50\n"
                    f"kafka:\n  topics:\n    triggers: {names['triggers']}\n    dead_letter: {names['dlq']}\n")
    group = unique("g")
    proc = subprocess.Popen([str(REPO / ".venv/bin/ulens"), "consume", "--config", str(conf),
                             "--model", str(model["artifact_dir"]), "--topic", names["alerts"], "--group", group,
                             "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "alerts/s" in line and "alerts/s (0 in" not in line:  # it is consuming
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(seen) + err
    summary = json.loads(out.strip().splitlines()[-1])
    assert 0 < summary["alerts"] <= len(alerts)
    # what it consumed was committed: a new member of the group starts after it
    rest = Broker(settings, model["artifact"], group=group).run(until_idle=1.0)
    assert rest.alerts == len(alerts) - summary["alerts"] and rest.duplicates == 0
