"""The broker on Redis Cluster and a three-broker Kafka, with nodes SIGKILLed mid-stream.

One simulated dataset (``N_PSPL`` + ``N_BINARY`` thesis-survey events) is replayed by the
real ``ulens replay`` into an alert topic of ``PARTITIONS`` partitions (replication factor
3) and consumed by a real ``ulens consume`` with ``redis.cluster: true``. Mid-stream (once
the group has committed ``KAFKA_KILL_AT`` and then ``REDIS_KILL_AT`` of the stream):

* the Kafka broker leading partition 0 of the alert topic is SIGKILLed: the other two
  (``min.insync.replicas`` 2) carry on, the replay's ``acks=all`` producer and the
  consumer (its group coordinator too, if it was there) move to the new leaders;
* a Redis primary (the one holding the most event keys) is SIGKILLed: its replica takes
  over its slots after ``services.cluster_node_timeout_ms``; meanwhile the consumer's
  batches on those slots fail and are retried (``broker.retry``);
* both are started again by ``ulens services up --cluster``, as an operator would; the old
  primary rejoins as its replica's replica.

Then, once the group's committed offsets reach the end: every alert's point is in Redis
(each event's stored points equal the dataset's, bit for bit, all scored: nothing lost,
nothing twice); each event that triggered has exactly one trigger id on the trigger topic,
the one of its Redis outbox record (status sent), and no other event has one
(re-deliveries of that id are counted, as the guarantees tests define them); the dead-letter
topic is empty; the consumer never exited. The figures are printed ("cluster tier figures").
"""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import redis

from broker import state as st
from broker.consumer import redis_client
from tests.faults.conftest import ConsumerProc, committed, read_all, write_config
from tests.faults.test_service_faults import (one_trigger_per_event, replay, replay_done, simulated,
                                              trigger_messages)
from tests.helpers import signal_and_wait, unique
from ulens import services_cluster as cl

pytestmark = pytest.mark.cluster

N_PSPL, N_BINARY, SIM_SEED = 4, 4, 23
PARTITIONS = 3
REPLAY_RATE = 180                    # alerts/s: the stream lasts ~55 s, the faults and the restart land in it
KAFKA_KILL_AT, REDIS_KILL_AT = 0.2, 0.45   # shares of the stream committed before each kill
RESTART_AFTER_S = 6.0                # after the Redis kill: its replica has taken over by then
STEP_TIMEOUT_S = 180.0
MODEL = "models/tdcnn-baseline"      # trained on the thesis survey: about half the events fire
CONSUMER = {"batch_size": 500, "poll_timeout_s": 0.2, "log_interval_s": 0.5, "session_timeout_s": 6.0,
            "rejoin_after_s": 60.0}
FIGURES: dict = {}


def _create_topics(bootstrap: str, names: dict[str, int]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(n, num_partitions=p, replication_factor=3)
                                  for n, p in names.items()], operation_timeout=30).values():
        f.result(60)


def _leader(bootstrap: str, topic: str, partition: int) -> int:
    from confluent_kafka.admin import AdminClient
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=30)
    return md.topics[topic].partitions[partition].leader


def _kill(pid: int) -> None:
    signal_and_wait(pid, signal.SIGKILL, "a killed node")


def _primary_with_most(settings, prefix: str) -> tuple[int, int]:
    """(port, replica port) of the primary that holds the most of ``prefix``'s event keys."""
    best = None
    for port in settings.services.cluster_redis_ports():
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        info = r.info("replication")
        if info["role"] != "master" or not info.get("connected_slaves"):
            continue
        n = sum(1 for _ in r.scan_iter(match=f"{prefix}:ev:*", count=1000))
        replica = int(info["slave0"]["port"]) if isinstance(info["slave0"], dict) else \
            int(str(info["slave0"]).split("port=")[1].split(",")[0])
        if best is None or n > best[0]:
            best = (n, port, replica)
    assert best is not None, "no primary with a replica"
    return best[1], best[2]


def _committed_total(bootstrap: str, topic: str, group: str) -> int:
    """The group's committed offsets summed; asked again while the group's coordinator
    moves (the test's own lookup, right after a broker kill: NOT_COORDINATOR)."""
    from confluent_kafka import KafkaException
    deadline = time.monotonic() + 60
    while True:
        try:
            return sum(max(o, 0) for o in committed(bootstrap, topic, group).values())
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_committed(bootstrap, topic, group, want: int, consumer: ConsumerProc, rep) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while _committed_total(bootstrap, topic, group) < want:
        assert consumer.alive(), f"consumer exited: {consumer.log()[-3000:]}"
        assert time.monotonic() < deadline, f"committed offsets did not reach {want}: {consumer.log()[-3000:]}"
        time.sleep(0.2)


def _stored(client, prefix: str) -> dict:
    ids = [st.object_id_of(k) for k in client.scan_iter(match=f"{prefix}:ev:*", count=1000)]
    return {o: st.read_event(client, prefix, o) for o in sorted(ids)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return simulated(tmp_path_factory.mktemp("cluster-data") / "events.npz", N_PSPL, N_BINARY, SIM_SEED)


def test_kafka_leader_and_redis_primary_killed_mid_stream(cluster_services, dataset, tmp_path):
    s = cluster_services
    boot = s.kafka.bootstrap_servers
    name = unique("cl")
    alerts, triggers, dlq, group = f"{name}.alerts", f"{name}.triggers", f"{name}.dlq", f"{name}-group"
    _create_topics(boot, {alerts: PARTITIONS, triggers: 1, dlq: 1})
    conf = write_config(tmp_path / "consumer.yaml", {
        "kafka": {"bootstrap_servers": boot, "topics": {"alerts": alerts, "triggers": triggers, "dead_letter": dlq}},
        "redis": {"url": s.redis.url, "cluster": True, "key_prefix": name},
        "model": {"path": MODEL}, "consumer": CONSUMER})
    oids = dataset["order"]
    n = sum(len(dataset["events"][o][0]) for o in oids)
    consumer = ConsumerProc(conf, alerts, group, tmp_path, "consumer").start()
    rep = replay(conf, dataset["path"], alerts, tmp_path, rate=REPLAY_RATE)
    t0 = time.monotonic()
    figures = {"events": len(oids), "alerts": n, "partitions": PARTITIONS}
    try:
        # 1. the leader of partition 0 of the alert topic
        _wait_committed(boot, alerts, group, int(KAFKA_KILL_AT * n), consumer, rep)
        assert rep.poll() is None, "the replay ended before the Kafka kill: lower REPLAY_RATE"
        leader = _leader(boot, alerts, 0)
        done = _committed_total(boot, alerts, group)
        _kill(cl.pids(s)[f"kafka-{leader}"])
        figures["kafka kill"] = {"broker": leader, "at_s": round(time.monotonic() - t0, 1), "committed": done}
        new_leader = None
        deadline = time.monotonic() + 60
        while new_leader in (None, -1, leader):
            assert time.monotonic() < deadline, "no new leader for partition 0"
            time.sleep(0.2)
            new_leader = _leader(boot, alerts, 0)
        figures["kafka kill"]["new_leader"] = new_leader
        figures["kafka kill"]["new_leader_after_s"] = round(time.monotonic() - t0 - figures["kafka kill"]["at_s"], 1)

        # 2. a Redis primary (the one with the most event keys)
        _wait_committed(boot, alerts, group, int(REDIS_KILL_AT * n), consumer, rep)
        assert rep.poll() is None, "the replay ended before the Redis kill: lower REPLAY_RATE"
        port, replica = _primary_with_most(s, name)
        done = _committed_total(boot, alerts, group)
        t_kill = time.monotonic()
        _kill(cl.pids(s)[f"redis-{port}"])
        figures["redis kill"] = {"primary": port, "replica": replica, "at_s": round(t_kill - t0, 1),
                                 "committed": done}
        deadline = time.monotonic() + 60
        while True:
            try:
                if redis.Redis(host="127.0.0.1", port=replica, socket_timeout=2).info("replication")["role"] == "master":
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, f"replica {replica} did not take over"
            time.sleep(0.1)
        figures["redis kill"]["replica_primary_after_s"] = round(time.monotonic() - t_kill, 1)
        time.sleep(max(0.0, RESTART_AFTER_S - (time.monotonic() - t_kill)))

        # 3. both started again, as an operator would
        t_up = time.monotonic()
        live = rep.poll() is None
        info = cl.up(s, quiet=True)
        assert sorted(info["started"]) == sorted([f"kafka-{leader}", f"redis-{port}"]), info["started"]
        figures["restarted"] = {"at_s": round(t_up - t0, 1), "up_took_s": round(time.monotonic() - t_up, 1),
                                "replay_running_at_restart": live}
        role = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).info("replication")["role"]
        figures["restarted"]["old_primary_is_now"] = role

        report = replay_done(rep, tmp_path, alerts, n, timeout=STEP_TIMEOUT_S)
        _wait_committed(boot, alerts, group, n, consumer, rep)
        figures["stream_s"] = round(time.monotonic() - t0, 1)
        figures["replay"] = report["counts"]
    finally:
        if rep.poll() is None:
            rep.kill()
        consumer.stop()
    assert consumer.proc.returncode == 0, consumer.log()[-3000:]
    summary = consumer.summary()
    figures["consumer"] = {k: summary[k] for k in ("alerts", "points", "duplicates", "dead_letters",
                                                   "triggers", "retries", "batches")}

    # every point stored, once, scored
    client = redis_client(s.replace(redis={"key_prefix": name}))
    stored = _stored(client, name)
    assert set(stored) == set(oids), sorted(set(stored) ^ set(oids))[:5]
    lost = dup = 0
    for o in oids:
        t, mag, err = dataset["events"][o]
        v = stored[o]
        lost += len(np.setdiff1d(t, v.points["t"]))
        dup += v.header.n_total - len(t)
        assert np.array_equal(v.points["t"], t) and np.array_equal(v.points["mag"], mag) \
            and np.array_equal(v.points["err"], err), o
        assert v.header.n_dropped == 0 and v.header.n_scored == v.header.n_total, o
    figures["points stored"] = sum(len(v.points) for v in stored.values())
    figures["points lost"], figures["points duplicated"] = lost, dup
    assert (lost, dup) == (0, 0) and figures["points stored"] == n

    # one trigger id per triggering event, that of its outbox record
    trig, redelivered = one_trigger_per_event(trigger_messages(boot, triggers))
    outbox = {o: v.trigger["triggerId"] for o, v in stored.items() if v.trigger is not None}
    assert all(stored[o].trigger_status == "sent" for o in outbox)
    assert trig == outbox
    assert {o for o, v in stored.items() if v.header.triggered} == set(outbox)
    figures["triggering events"], figures["trigger re-deliveries"] = len(trig), redelivered
    assert trig, "no event triggered: the trigger check proves nothing (change SIM_SEED or MODEL)"
    figures["dead letters"] = len(read_all(boot, dlq))
    assert figures["dead letters"] == 0
    FIGURES.update(figures)
    print("cluster tier figures:", json.dumps(FIGURES))
    for k in list(client.scan_iter(match=f"{name}:*", count=1000)):
        client.delete(k)


@pytest.fixture(scope="module", autouse=True)
def closing_figures(request):
    yield
    if FIGURES:
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["", "cluster tier figures:"] + [f"  {k}: {v}" for k, v in FIGURES.items()]
        for line in lines:
            (tr.write_line(line) if tr is not None else print(line))
