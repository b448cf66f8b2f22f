"""`ulens rekey` against the real Kafka: unkeyed Rubin packets on 8 partitions -> keyed."""
from __future__ import annotations

import random
from collections import defaultdict

import pytest

from broker.rekey import Rekeyer
from schemas import Codec
from tests.helpers import unique
from tests.rubin_schema import rubin_packet, rubin_schema

RUBIN_ID = 4242
N_OBJECTS, N_VISITS = 12, 6


@pytest.fixture(scope="module")
def codec():
    c = Codec()
    c.add_schema(RUBIN_ID, rubin_schema())
    return c


def _settings(services, t, **rekey):
    return services.replace(kafka={"topics": services.kafka.topics.__class__(
        alerts=t["out"], triggers=t["out"] + "-tr", dead_letter=t["dlq"], truth=t["out"] + "-t")},
        rekey={"topic": t["src"], "group": unique("rekey"), "poll_timeout_s": 0.2, **rekey})


def _produce_source(services, codec, topic):
    """Visit by visit, each packet on a random one of 8 partitions, with no key."""
    from confluent_kafka import Producer
    p = Producer(services.kafka.client_config())
    rng = random.Random(3)
    sent = []
    for v in range(N_VISITS):
        for o in range(N_OBJECTS):
            oid = 1000 + o
            sid = oid * 100 + v
            value = codec.encode(rubin_packet(oid, sid, 60000.0 + v, in_source=o % 2 == 0),
                                 schema_id=RUBIN_ID)
            part = rng.randrange(8)
            p.produce(topic, value=value, partition=part, headers=[("h", str(sid).encode())])
            sent.append((oid, sid, value, part))
    bad = [codec.encode(rubin_packet(None, 1, 60000.0), schema_id=RUBIN_ID), b"\x07garbage"]
    for value in bad:
        p.produce(topic, value=value, partition=0)
    assert p.flush(30) == 0
    return sent, bad


def _read_all(services, topic, n, timeout=60):
    import time

    from confluent_kafka import Consumer
    c = Consumer({**services.kafka.client_config(), "group.id": unique("read"),
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    got = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:       # at least n, then until 2 s without a message
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got.append(m)
            quiet_since = time.monotonic()
        elif len(got) >= n and time.monotonic() - quiet_since >= 2.0:
            break
    c.close()
    return got


def test_rekey_puts_each_object_on_one_partition_in_order(services, topics, codec):
    t = topics("src", partitions=8)
    t.update(topics("out", partitions=4))
    t.update(topics("dlq"))
    sent, bad = _produce_source(services, codec, t["src"])
    summary = Rekeyer(_settings(services, t), codec=codec).run(until_idle=3.0)
    assert summary.produced == len(sent)
    assert summary.dead_letters == {"no_object_id": 1, "bad_magic_byte": 1}
    out = _read_all(services, t["out"], len(sent))
    assert len(out) == len(sent)
    original = {sid: value for _, sid, value, _ in sent}
    source_part = {sid: part for _, sid, _, part in sent}
    parts, order = defaultdict(set), defaultdict(list)
    for m in sorted(out, key=lambda m: (m.partition(), m.offset())):
        sid = int(dict(m.headers())["h"])
        assert m.value() == original[sid]                 # bytes unchanged, headers copied
        oid = int(m.key())
        assert oid == sid // 100
        parts[oid].add(m.partition())
        order[oid].append(sid)
    assert all(len(p) == 1 for p in parts.values())
    # source order: the packets of an object that share a source partition come out in
    # that partition's order (across source partitions a backlog may interleave: rekey.py)
    for oid, sids in order.items():
        assert sorted(sids) == [oid * 100 + v for v in range(N_VISITS)]
        for sp in range(8):
            same = [x for x in sids if source_part[x] == sp]
            assert same == sorted(same), (oid, sp, sids)
    dlq = _read_all(services, t["dlq"], 2)
    assert sorted(dict(m.headers())["dlq.reason"] for m in dlq) == [b"bad_magic_byte", b"no_object_id"]


def test_a_crash_before_the_commit_reproduces_at_most_that_batch(services, topics, codec, monkeypatch):
    t = topics("src", partitions=8)
    t.update(topics("out", partitions=4))
    t.update(topics("dlq"))
    sent, _ = _produce_source(services, codec, t["src"])
    settings = _settings(services, t, batch_size=10)
    first = Rekeyer(settings, codec=codec)
    calls = {"n": 0}
    real = Rekeyer._commit

    def crash_on_third(self, msgs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("crash before the commit")
        return real(self, msgs)

    monkeypatch.setattr(Rekeyer, "_commit", crash_on_third)
    with pytest.raises(RuntimeError):
        first.run(until_idle=3.0)
    monkeypatch.setattr(Rekeyer, "_commit", real)
    second = Rekeyer(settings, codec=codec).run(until_idle=3.0)
    committed = first.summary.messages               # two batches (of at most 10) committed
    assert 2 <= committed <= 20
    assert second.messages == len(sent) + 2 - committed   # restarts from the last commit
    out = _read_all(services, t["out"], len(sent), timeout=30)
    sids = [int(dict(m.headers())["h"]) for m in out]
    assert set(sids) == {sid for _, sid, _, _ in sent}  # nothing lost
    assert len(sids) - len(set(sids)) <= 10          # duplicates: at most the uncommitted batch
