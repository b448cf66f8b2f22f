"""The consumer's guarantees under awkward input and state, against the real Kafka and
Redis (issue 13): a point from the future cannot block an event; a re-sent diaSourceId
with other content is a dead letter of its own; a header name that is not UTF-8 is
dead-lettered, not a crash on every restart; a score save run twice still produces every
trigger; a model, smoothing window or PSPL-fit parameter change on a live prefix is
handled, never a crash loop, never a second trigger; a flood of one dead-letter reason
stops the consumer before it commits; the consumer waits for its topic; a Redis that would
evict is refused, a full or snapshot-failing Redis is waited out with an alarm."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from broker import state as st
from broker.consumer import Broker
from broker.errors import BrokerError
from broker.flood import DeadLetterFlood
from broker.rule_psplfit import read_fit
from schemas import HEADER
from tests.helpers import free_ports, mock_alert, unique
from tests.integration.test_consumer import (CODEC, MIN_POINTS, SMOOTH, alerts_of, expected_triggers,
                                             make_events, model, offline_probs, produce, read_topic,
                                             settings_for, triggers_in)
from tests.unit.test_broker_inference import make_artifact
from training import decision, psplfit
from training.artifact import load_artifact, save_artifact

__all__ = ["model"]   # the module-scoped fixture of test_consumer, shared


def committed(settings, topic, group) -> int:
    c = Consumer({**settings.kafka.client_config(), "group.id": group})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        got = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return sum(max(tp.offset, 0) for tp in got)
    finally:
        c.close()


# --- item 7: times from the future ------------------------------------------------------
def test_a_point_from_the_future_cannot_block_an_event(services, topics, redis_client, key_prefix, model):
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"])
    ev = make_events(7, 1, lengths=(40, 41))[0]
    good = alerts_of([ev])
    key = good[0][0]
    future = mock_alert(diaObjectId=ev["oid"], diaSourceId=ev["oid"] * 100_000 + 99, midpointMjdTai=199_000.0)
    produce(settings, names["alerts"], good[:5] + [(key, future)] + good[5:])
    s = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert dict(s.dead_letters) == {"future_time": 1} and s.points == len(good)
    view = st.read_event(redis_client, key_prefix, ev["oid"])
    assert np.array_equal(view.points["t"], ev["t"])
    (dl,) = read_topic(settings, names["dlq"])
    assert dict(dl.headers())["dlq.reason"] == b"future_time"
    # null = no bound (a replay of a simulated survey placed in the future)
    names2 = topics("alerts", "triggers", "dlq")
    s2 = settings_for(services, key_prefix + "b", names2, model["threshold"], future_margin_s=None)
    produce(s2, names2["alerts"], [(key, future)])
    assert Broker(s2, art, group=unique("g")).run(until_idle=1.0).points == 1


# --- item 8: same diaSourceId, other content ----------------------------------------------
def test_a_resent_source_id_with_other_content_is_a_dead_letter(services, topics, redis_client, key_prefix,
                                                                 model):
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"])
    ev = make_events(8, 1, lengths=(30, 31))[0]
    good = alerts_of([ev])
    key, r5 = good[0][0], good[5][1]
    again = [(key, dict(r5)),                                                    # exact re-send
             (key, dict(r5, scienceFlux=r5["scienceFlux"] * 1.5)),               # other flux
             (key, dict(good[6][1], midpointMjdTai=good[6][1]["midpointMjdTai"] + 0.01)),  # other time
             (key, dict(good[-1][1], midpointMjdTai=good[-1][1]["midpointMjdTai"] + 3.0))]  # newest, later
    produce(settings, names["alerts"], good + again)
    s = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert (s.points, s.duplicates, dict(s.dead_letters)) == (len(good), 1, {"changed_resend": 3})
    assert np.array_equal(st.read_event(redis_client, key_prefix, ev["oid"]).points["t"], ev["t"])
    for m in read_topic(settings, names["dlq"]):
        h = dict(m.headers())
        assert h["dlq.reason"] == b"changed_resend" and b"diaSourceId" in h["dlq.detail"]


# --- item 6: poison pills -------------------------------------------------------------
class FailsOnce:
    """The broker's producer, whose first dead letter reports a delivery timeout (a
    transient Kafka fault: the whole batch is run again)."""

    def __init__(self, producer):
        self.producer, self.failed = producer, False

    def produce(self, topic, *args, on_delivery=None, **kw):
        from confluent_kafka import KafkaError

        if not self.failed and on_delivery is not None and "dlq" in topic:
            self.failed = True
            real = on_delivery

            def on_delivery(err, msg, _real=real):
                _real(KafkaError(KafkaError._MSG_TIMED_OUT), msg)
        return self.producer.produce(topic, *args, on_delivery=on_delivery, **kw)

    def __getattr__(self, name):
        return getattr(self.producer, name)


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by scripts/setup.sh")
def test_a_header_name_that_is_not_utf8_is_dead_lettered(services, topics, redis_client, key_prefix, model,
                                                          tmp_path):
    """confluent-kafka's Message.headers() raises on such a name (SystemError): the consumer
    exited 1 on it, and again at every restart; a second headers() call on that message (the
    batch retried after a fault) crashed the process. kcat writes the raw bytes."""
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"])
    ev = make_events(9, 1, lengths=(20, 21))[0]
    good = alerts_of([ev])
    produce(settings, names["alerts"], good[:10])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x17 not an alert")
    valid = tmp_path / "valid.bin"
    valid.write_bytes(CODEC.encode(good[10][1], "alert"))
    boot = settings.kafka.client_config()["bootstrap.servers"]
    for f in (bad, valid):       # a bad frame and a valid alert, both with the raw header name
        subprocess.run(["kcat", "-b", boot, "-P", "-t", names["alerts"], "-k", good[0][0].decode(),
                        "-H", b"\xff\xfe=1", str(f)], check=True, timeout=60)
    produce(settings, names["alerts"], good[11:])
    b = Broker(settings, art, group=unique("g"))
    b.producer = FailsOnce(b.producer)      # the batch with the bad messages is retried
    s = b.run(until_idle=1.0)
    assert b.producer.failed and s.retries["kafka"] >= 1
    # (the retried batch's points were stored by its first run: duplicates in the second)
    assert s.points + s.duplicates == len(good) and dict(s.dead_letters) == {"bad_magic_byte": 1}
    assert np.array_equal(st.read_event(redis_client, key_prefix, ev["oid"]).points["t"], ev["t"])
    # written at least once (the first run's delivery was reported failed, so written again)
    dls = read_topic(settings, names["dlq"])
    assert len({dict(d.headers())["dlq.source.offset"] for d in dls}) == 1 and len(dls) >= 1
    for dl in dls:
        h = dict(dl.headers())
        assert h["dlq.reason"] == b"bad_magic_byte" and dl.value() == bad.read_bytes()
        assert h["dlq.headers.unreadable"].startswith(b"SystemError")


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by scripts/setup.sh")
def test_reading_a_non_utf8_header_name_fails_cleanly_every_time(services, topics, tmp_path):
    """Called as msg.headers() from Python, CPython's specialised call site (after a few
    calls) skipped the error check, returned a list holding a NULL and the process crashed
    (seen only in long runs): message_headers must refuse such headers on every call."""
    from confluent_kafka import Consumer, TopicPartition

    from broker.validate import message_headers

    t = topics("raw")["raw"]
    f = tmp_path / "v.bin"
    f.write_bytes(b"x")
    boot = services.kafka.client_config()["bootstrap.servers"]
    subprocess.run(["kcat", "-b", boot, "-P", "-t", t, "-k", "1", "-H", b"\xff\xfe=1", str(f)],
                   check=True, timeout=60)
    c = Consumer({**services.kafka.client_config(), "group.id": unique("g"), "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(t, 0, 0)])
        seen = []
        for _ in range(40):                 # well past the interpreter's specialisation warm-up
            m = None
            for _ in range(60):
                m = c.poll(0.5)
                if m is not None and m.error() is None:
                    break
            assert m is not None and m.error() is None
            seen.append(message_headers(m))
            c.seek(TopicPartition(t, 0, 0))
    finally:
        c.close()
    assert all(h == [] and why.startswith("SystemError") for h, why in seen)


# --- item 3: a save run twice ---------------------------------------------------------------
@pytest.mark.parametrize("rule", ["tdcnn", "pspl-fit"])
def test_every_trigger_is_produced_when_the_save_runs_twice(services, topics, redis_client, key_prefix,
                                                             model, rule, monkeypatch):
    """As when redis-py replays a pipeline after a lost reply, or a chunk is retried: the
    second run of the script found the state already saved and the trigger was never produced."""
    from broker import rule_psplfit

    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"], rule=rule)
    produce(settings, names["alerts"], alerts_of(model["events"]))
    if rule == "tdcnn":
        orig = st.EventStore.save_scores
        monkeypatch.setattr(st.EventStore, "save_scores", lambda self, ups: (orig(self, ups), orig(self, ups))[1])
        expected = set(model["expected"])
    else:
        orig = rule_psplfit.PsplFitRule._save
        monkeypatch.setattr(rule_psplfit.PsplFitRule, "_save", lambda self, sv: (orig(self, sv), orig(self, sv))[1])
        params = psplfit.Params()
        stats = psplfit.run_curves([(e["t"], e["mag"], e["err"]) for e in model["events"]], params)
        expected = {e["oid"] for e, s in zip(model["events"], stats)
                    if psplfit.first_trigger(s, params.threshold) is not None}
    Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    got = [t["diaObjectId"] for t in triggers_in(settings, names["triggers"])]
    assert sorted(got) == sorted(expected)
    if rule == "tdcnn":
        assert expected and all(st.read_event(redis_client, key_prefix, o).trigger_status == "sent"
                                for o in expected)


# --- item 9: state that belongs to a model ------------------------------------------------
def test_switching_model_and_smoothing_window_on_a_live_prefix(services, topics, redis_client, key_prefix,
                                                               model, tmp_path):
    art_a = model["artifact"]
    # model B: other weights and a 3-point smoothing window
    b_dir = tmp_path / "b"
    make_artifact(b_dir, seed=8)
    card = (b_dir / "model_card.json")
    import json
    c = json.loads(card.read_text())
    c["decision"]["smooth_window"] = 3
    card.write_text(json.dumps(c))
    art_b = load_artifact(b_dir)
    events = model["events"]
    alerts = alerts_of(events)
    half = len(alerts) // 2
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"])
    produce(settings, names["alerts"], alerts[:half])
    group = unique("g")
    Broker(settings, art_a, group=group).run(until_idle=1.0)
    first = {t["diaObjectId"] for t in triggers_in(settings, names["triggers"])}
    produce(settings, names["alerts"], alerts[half:])
    s = Broker(settings, art_b, group=group).run(until_idle=1.0)
    touched = {int(k) for k, _ in alerts[half:]}
    assert s.rescored == len(touched) and s.points == len(alerts) - half
    probs_b = offline_probs(art_b, events)
    for ev in events:
        view = st.read_event(redis_client, key_prefix, ev["oid"])
        assert view.header.n_scored == len(ev["t"])
        if ev["oid"] in touched:        # every stored point scored by B (the others when touched)
            assert view.header.m == 3
            got = st.dequantize_probs(view.points["p"])
            assert np.all(np.abs(got - probs_b[ev["oid"]]) <= 0.5 / 254 + 1e-6)
            np.testing.assert_allclose(view.header.ring_valid(), probs_b[ev["oid"]][-3:], atol=1e-5)
    trig = triggers_in(settings, names["triggers"])
    ids = [t["diaObjectId"] for t in trig]
    assert len(ids) == len(set(ids))                     # never a second trigger for an event
    assert first <= set(ids)
    assert {t["modelVersion"] for t in trig if t["diaObjectId"] not in first} <= {art_b.version}


def test_changing_the_pspl_fit_parameters_on_a_live_prefix(services, topics, redis_client, key_prefix, model):
    art = model["artifact"]
    alerts = alerts_of(model["events"])
    half = len(alerts) // 2
    names = topics("alerts", "triggers", "dlq")
    s1 = settings_for(services, key_prefix, names, None, rule="pspl-fit")
    produce(s1, names["alerts"], alerts[:half])
    group = unique("g")
    Broker(s1, art, group=group).run(until_idle=1.0)
    s2 = s1.replace(consumer={"pspl_fit": s1.consumer.pspl_fit.__class__(window_max=16)})
    produce(s1, names["alerts"], alerts[half:])
    out = Broker(s2, art, group=group).run(until_idle=1.0)
    assert out.points == len(alerts) - half
    p2 = psplfit.Params(**{**psplfit.Params().__dict__, "window_max": 16})
    touched = {int(k) for k, _ in alerts[half:]}
    assert touched
    for ev in model["events"]:
        if ev["oid"] not in touched:
            continue
        got = read_fit(redis_client, key_prefix, p2, ev["oid"])
        assert got is not None and "state" in got     # a state of the new parameters, from the points
        assert got["state"]["n_done"] == len(ev["t"]) or got["state"]["flags"] & psplfit.TRIGGERED
        assert read_fit(redis_client, key_prefix, psplfit.Params(), ev["oid"])["state"]["n_done"] > 0
    ids = [t["diaObjectId"] for t in triggers_in(s1, names["triggers"])]
    assert len(ids) == len(set(ids))


# --- item 11: a producer's schema upgrade ---------------------------------------------------
def test_a_flood_of_one_dead_letter_reason_stops_the_consumer_before_it_commits(services, topics, key_prefix,
                                                                               model):
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"], batch_size=300,
                            flood_window=1000, flood_share=0.5)
    ev = make_events(11, 1, lengths=(1500, 1501))[0]
    alerts = alerts_of([ev])
    # 1201: a schema id nobody serves (a future lsst.v12_1; 1101 and 1000 are Rubin's, known)
    upgraded = [(k, HEADER.pack(0, 1201) + CODEC.encode(r, "alert")[HEADER.size:]) for k, r in alerts]
    produce(settings, names["alerts"], upgraded)
    group = unique("g")
    b = Broker(settings, art, group=group)
    with pytest.raises(DeadLetterFlood, match="unknown_schema_id") as info:
        b.run(until_idle=1.0)
    assert info.value.exit_code == 3
    done = committed(settings, names["alerts"], group)
    # three batches of 300 were dead-lettered and committed; the fourth crossed the line
    assert done == 900 and len(read_topic(settings, names["dlq"])) == 900
    # off (window 0): a stream like that is dead-lettered as before
    off = settings.replace(consumer={"flood_window": 0})
    s = Broker(off, art, group=group).run(until_idle=1.0)
    assert s.alerts == len(alerts) - 900 and dict(s.dead_letters) == {"unknown_schema_id": len(alerts) - 900}


# --- item 12: start before the topic exists ------------------------------------------------
def test_the_consumer_waits_for_its_topic(services, topics, redis_client, key_prefix, model):
    art = model["artifact"]
    names = {"alerts": unique("late-alerts"), **topics("triggers", "dlq")}
    settings = settings_for(services, key_prefix, names, model["threshold"])
    broker = Broker(settings, art, group=unique("g"))
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("s", broker.run(until_idle=3.0)))
    th.start()
    time.sleep(3.0)              # the consumer is up before the topic: it must not exit
    assert th.is_alive()
    admin = AdminClient(settings.kafka.client_config())
    admin.create_topics([NewTopic(names["alerts"], num_partitions=1, replication_factor=1)])[names["alerts"]].result()
    try:
        ev = make_events(12, 1, lengths=(30, 31))[0]
        produce(settings, names["alerts"], alerts_of([ev]))
        th.join(120)
        assert not th.is_alive() and out["s"].points == len(ev["t"])
    finally:
        admin.delete_topics([names["alerts"]])


# --- item 10: eviction, OOM and MISCONF ------------------------------------------------------
@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone (loopback, free port), for settings the shared one
    must not get; killed afterwards."""
    import redis

    port = free_ports(1)[0]
    data = tmp_path / "redis"
    data.mkdir()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
                             "--save", "", "--appendonly", "no", "--enable-protected-configs", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield client, f"redis://127.0.0.1:{port}/0", data
    proc.kill()
    proc.wait(10)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_a_redis_that_would_evict_light_curves_is_refused(services, topics, key_prefix, model, own_redis, policy):
    client, url, _ = own_redis
    client.config_set("maxmemory-policy", policy)
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"]).replace(redis={"url": url})
    with pytest.raises(BrokerError, match=f"maxmemory-policy is {policy}.*noeviction"):
        Broker(settings, model["artifact"], group=unique("g"))


@pytest.mark.parametrize("fault", ["oom", "misconf"])
def test_a_full_or_snapshot_failing_redis_is_waited_out_with_an_alarm(services, topics, key_prefix, model,
                                                                      own_redis, fault, tmp_path):
    client, url, data = own_redis
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq")
    settings = settings_for(services, key_prefix, names, model["threshold"], retry_for_s=120.0
                            ).replace(redis={"url": url})
    events = model["events"][:3]
    alerts = alerts_of(events)
    broker = Broker(settings, art, group=unique("g"))       # scripts loaded while Redis is fine
    if fault == "oom":
        client.config_set("maxmemory", 1)                   # every write refused: OOM
    else:
        gone = tmp_path / "gone"
        gone.mkdir()
        client.config_set("save", "3600 1")
        client.config_set("dir", str(gone))
        gone.rmdir()                                        # the snapshot cannot be written
        with pytest.raises(Exception):
            client.bgsave()
            for _ in range(100):                            # wait for the failed BGSAVE
                if client.info("persistence")["rdb_last_bgsave_status"] == "err":
                    raise RuntimeError("bgsave failed")
                time.sleep(0.05)
    produce(settings, names["alerts"], alerts)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("s", broker.run(until_idle=2.0)))
    th.start()
    deadline = time.monotonic() + 60
    while broker.summary.retries["redis"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert broker.summary.retries["redis"] >= 2 and th.is_alive()     # waiting, not crashing
    from prometheus_client import generate_latest
    page = generate_latest(broker.metrics.registry).decode()
    assert f'ulens_alarms_total{{reason="redis_{fault}"}}' in page
    if fault == "oom":
        client.config_set("maxmemory", 0)
    else:
        client.config_set("dir", str(data))
        client.bgsave()
        for _ in range(200):
            if client.info("persistence")["rdb_last_bgsave_status"] == "ok":
                break
            time.sleep(0.05)
    th.join(120)
    assert not th.is_alive() and out["s"].points == len(alerts)
    n_stored = sum(int(st.parse_header(client.get(f"{key_prefix}:ev:{e['oid']}")).n_total) for e in events)
    assert n_stored == len(alerts)


# --- a member the group left without any assignment joins again -----------------------------
def test_a_member_left_without_an_assignment_joins_again_with_a_new_client(services, topics, redis_client,
                                                                           key_prefix, model, caplog):
    """After a Kafka restart librdkafka's coordinator can stay stuck: the group took the
    member's partitions and no assignment ever comes back. Here the revocation is played to
    the broker (its rebalance callback) while librdkafka itself is fine, so no assignment
    follows either: after consumer.rejoin_after_s the broker joins again with a new client,
    gets the partitions back and reads on from the committed offsets: every point of both
    halves of the stream stored once, nothing dead-lettered."""
    art = model["artifact"]
    names = topics("alerts", "triggers", "dlq", partitions=2)
    settings = settings_for(services, key_prefix, names, model["threshold"], session_timeout_s=6.0,
                            rejoin_after_s=6.0)
    events = model["events"][:6]
    alerts = alerts_of(events)
    half = len(alerts) // 2
    produce(settings, names["alerts"], alerts[:half])
    b = Broker(settings, art, group=unique("g"))
    played = []
    process = b.process

    def process_then_lose_the_partitions(msgs):
        process(msgs)
        if not played:
            played.append(list(b.partitions))
            b._on_revoke(b.consumer, [TopicPartition(names["alerts"], p) for p in b.partitions])

    b.process = process_then_lose_the_partitions
    out = {}
    t = threading.Thread(target=lambda: out.update(s=b.run(until_idle=8.0)), daemon=True)
    with caplog.at_level("WARNING", logger="broker"):
        t.start()
        deadline = time.monotonic() + 90
        while not (b.rejoins and b.assigned.is_set()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.rejoins == 1 and b.assigned.is_set(), "no rejoin with a new client"
        produce(settings, names["alerts"], alerts[half:])
        t.join(120)
    assert not t.is_alive()
    s = out["s"]
    assert played and played[0]                   # it held partitions when they were taken
    assert any("joining again with a new client" in r.getMessage() for r in caplog.records)
    assert sum(s.dead_letters.values()) == 0 and s.points == len(alerts)
    for ev in events:
        view = st.read_event(redis_client, key_prefix, ev["oid"])
        assert view.header.n_total == len(ev["t"]) and view.header.n_scored == len(ev["t"])
