"""A stalled Redis and an outage longer than Kafka's poll interval (issue 13, items 4 and 5),
on a private Kafka and Redis (``private_services``).

* Redis SIGSTOPped for 60 s (a hung server, a black-holed network): the consumer's Redis
  calls time out (``redis.socket_timeout_s``), it logs retries instead of blocking forever,
  and it keeps polling Kafka with its partitions paused, so an outage six times longer
  than ``consumer.max_poll_interval_s`` (10 s here) costs it neither its membership nor
  its run: after SIGCONT it finishes the stream, exits 0, nothing lost or duplicated.
* SIGTERM while Redis is stalled: the consumer exits within seconds (130: interrupted,
  nothing of the batch committed); every committed alert is in Redis, and a new consumer
  finishes the stream with nothing lost.
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import numpy as np
import pytest

from schemas import default_codec
from tests.faults.conftest import (ConsumerProc, assert_committed_are_persisted, committed, create_topics,
                                   produce, stored_events, watermarks)
from training.photometry import mag_to_njy

pytestmark = pytest.mark.faults

CODEC = default_codec()
EVENTS, POINTS = 40, 150                    # 6,000 alerts
STALL_S = 60.0
MAX_POLL_S = 10.0                           # librdkafka's max.poll.interval.ms, lowered
CONSUMER = {"batch_size": 200, "poll_timeout_s": 0.2, "log_interval_s": 0.5, "session_timeout_s": 6.0,
            "max_poll_interval_s": MAX_POLL_S, "retry_for_s": 300.0}
REDIS = {"socket_timeout_s": 2.0}
STEP_TIMEOUT_S = 240.0


def alerts(first_oid: int):
    """(key, value) of EVENTS constant-ish events, POINTS each, interleaved in time; and
    {(oid, time)} of every point."""
    out, points = [], set()
    for k in range(POINTS):
        for e in range(EVENTS):
            oid = first_oid + e
            t = 60000.0 + e * 1e-4 + 0.5 * k
            mag = np.float32(19.0 + 0.2 * np.sin(0.07 * k + e))
            flux, ferr = mag_to_njy(np.array([mag]), np.array([np.float32(0.05)]))
            rec = {"diaSourceId": oid * 100_000 + k, "diaObjectId": oid, "midpointMjdTai": t, "band": "i",
                   "ra": 268.5, "dec": -29.0, "psfFlux": float(flux[0]) * 0.1, "psfFluxErr": float(ferr[0]),
                   "scienceFlux": float(flux[0]), "scienceFluxErr": float(ferr[0]),
                   "alertProducedUs": time.time_ns() // 1000, "prvDiaSources": None}
            out.append((str(oid).encode(), CODEC.encode(rec, "alert")))
            points.add((oid, t))
    return out, points


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stored_points(client, prefix: str) -> int:
    return sum(len(v.points) for v in stored_events(client, prefix).values())


@contextmanager
def consuming_then_stalled(p, c: ConsumerProc, prefix: str):
    """Wait until the consumer ``c`` stores points, then SIGSTOP the private redis-server;
    SIGCONT it when the block ends (whatever happens in it)."""
    client = p.redis()
    wait_until(lambda: stored_points(client, prefix) > 500, STEP_TIMEOUT_S, "the consumer to get going")
    pid = p.pid("redis")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def setup_stream(p, tmp_path, name: str, first_oid: int):
    topic, prefix, group = f"{name}.alerts", f"{name}-state", f"{name}-group"
    create_topics(p.bootstrap, {topic: 2, f"{name}.triggers": 1, f"{name}.dlq": 1})
    conf = p.config(tmp_path / f"{name}.yaml", consumer=CONSUMER,
                    redis={**REDIS, "key_prefix": prefix},
                    kafka={"topics": {"triggers": f"{name}.triggers", "dead_letter": f"{name}.dlq"}})
    items, points = alerts(first_oid)
    return topic, prefix, group, conf, items, points


def test_redis_stalled_longer_than_the_poll_interval_is_ridden_out(private_services, tmp_path):
    p = private_services
    topic, prefix, group, conf, items, points = setup_stream(p, tmp_path, "stall", 81_000)
    produce(p.bootstrap, topic, items[:len(items) // 2])
    client = p.redis()
    c = ConsumerProc(conf, topic, group, tmp_path, "stall", until_idle=5.0).start()
    try:
        with consuming_then_stalled(p, c, prefix):
            t_stop = time.monotonic()
            produce(p.bootstrap, topic, items[len(items) // 2:])        # the stream goes on meanwhile
            while time.monotonic() - t_stop < STALL_S:
                assert c.alive(), f"consumer exited during the stall:\n{c.log()[-3000:]}"
                time.sleep(1.0)
            retries_logged = c.log().count("redis unavailable")
        rc = c.wait(STEP_TIMEOUT_S)
    finally:
        c.stop()
    log = c.log()
    assert rc == 0, log[-3000:]
    assert retries_logged >= 3, log[-3000:]                    # it said so instead of hanging
    assert "MAX_POLL" not in log and "max.poll" not in log, log[-3000:]
    s = c.summary()
    assert s["uncommitted"] == 0 and s["retries"].get("redis", 0) >= 3
    # nothing lost, nothing twice: exactly the stream's points, all committed
    got = {(o, float(t)) for o, v in stored_events(client, prefix).items() for t in v.points["t"]}
    assert got == points
    marks = watermarks(p.bootstrap, topic)
    assert committed(p.bootstrap, topic, group) == {q: hi for q, (lo, hi) in marks.items()}
    print(f"\nstall figures: Redis stopped {STALL_S:.0f} s (max.poll.interval {MAX_POLL_S:.0f} s), "
          f"{retries_logged} retries logged during it, {len(points)} points stored, 0 lost")


def test_sigterm_while_redis_is_stalled_exits_promptly_and_loses_nothing(private_services, tmp_path):
    p = private_services
    topic, prefix, group, conf, items, points = setup_stream(p, tmp_path, "term", 82_000)
    produce(p.bootstrap, topic, items)
    client = p.redis()
    c = ConsumerProc(conf, topic, group, tmp_path, "term").start()
    try:
        with consuming_then_stalled(p, c, prefix):
            assert c.wait_for("redis unavailable", 60), c.log()[-3000:]
            t0 = time.monotonic()
            c.proc.send_signal(signal.SIGTERM)
            rc = c.wait(60)
            took = time.monotonic() - t0
    finally:
        c.stop()
    assert rc == 130, c.log()[-3000:]
    assert took < 2 * REDIS["socket_timeout_s"] + 10, took
    assert "interrupted" in c.log().lower() or "stopped while" in c.log(), c.log()[-2000:]
    # every committed alert is in Redis; a new consumer finishes with nothing lost
    by_offset = {}
    from confluent_kafka import Consumer, TopicPartition
    reader = Consumer({"bootstrap.servers": p.bootstrap, "group.id": "term-reader", "enable.auto.commit": False})
    try:
        marks = watermarks(p.bootstrap, topic)
        reader.assign([TopicPartition(topic, q, lo) for q, (lo, hi) in marks.items()])
        left = sum(hi - lo for lo, hi in marks.values())
        while left:
            for m in reader.consume(1000, 2.0):
                rec = CODEC.decode_kind(m.value(), "alert")
                by_offset[(m.partition(), m.offset())] = (rec["diaObjectId"], rec["midpointMjdTai"])
                left -= 1
    finally:
        reader.close()
    checked = assert_committed_are_persisted(p.bootstrap, topic, group, client, prefix, by_offset)
    rest = ConsumerProc(conf, topic, group, tmp_path, "term2", until_idle=3.0).start()
    assert rest.wait(STEP_TIMEOUT_S) == 0, rest.log()[-3000:]
    got = {(o, float(t)) for o, v in stored_events(client, prefix).items() for t in v.points["t"]}
    assert got == points
    print(f"\nSIGTERM figures: exited {rc} {took:.1f} s after SIGTERM with Redis stalled; "
          f"{checked} committed alerts checked in Redis, {len(points)} points in the end, 0 lost")
