"""Rubin's own packets through the broker, against the real Kafka and Redis.

* Rubin's sample packet of every supported schema version (from the fetched
  lsst-alert-packet files: diaObjectId only in its diaObject, no scienceFlux) is decoded by
  the consumer and stored per band, its history included (detections: no forced point);
* history is used: a broker started after half of a stream of Rubin packets (the replay's
  ``--format rubin``) backfills each event from its packets' prvDiaForcedSources and
  prvDiaSources and decides on the second half exactly as a broker that saw it all: the
  same stored points, per-band references, triggers at the same points, probabilities
  within ``training.model.PROB_TOLERANCE``; the visits that were no detection are stored
  as forced photometry (the band byte's FORCED bit), the others as detections.
"""
from __future__ import annotations

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition

from broker import state as st
from broker.consumer import Broker
from schemas import Codec, rubin
from tests.helpers import assert_states_match, rubin_schemas, unique
from tests.integration.test_consumer import (choose_threshold, produce, redis_dump, settings_for,
                                             triggers_in)
from tests.integration.test_replay import replay
from tests.unit.test_broker_inference import make_artifact
from tests.unit.test_replay_stream import make_dataset
from training.model import PROB_TOLERANCE
from training.photometry import njy_to_mag


@pytest.mark.parametrize("version", rubin.SUPPORTED, ids=lambda v: f"{v[0]}.{v[1]}")
def test_rubins_sample_packet_is_stored_per_band(services, topics, redis_client, key_prefix, tmp_path,
                                                 version):
    rubin_schemas(version)
    codec = Codec()
    rubin.add_to(codec)
    sid = rubin.schema_id(*version)
    (sample,) = rubin.sample_packets(*version)
    assert sample["diaSource"]["diaObjectId"] is None and sample["diaSource"]["scienceFlux"] is None
    oid = sample["diaObject"]["diaObjectId"]
    names = topics("alerts", "triggers", "dlq", partitions=1)
    settings = settings_for(services, key_prefix, names, 0.5)
    produce(settings, names["alerts"], [(str(oid).encode(), codec.encode(sample, schema_id=sid))])
    art = make_artifact(tmp_path / "art", seed=1)
    s = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    history = sample["prvDiaSources"] or []
    assert (s.alerts, sum(s.dead_letters.values())) == (1, 0), s.dead_letters
    assert s.points == 1 + len(history) and s.backfilled == len(history)
    view = st.read_event(redis_client, key_prefix, oid)
    src = sorted(history + [sample["diaSource"]], key=lambda d: d["midpointMjdTai"])
    assert [int(i) for i in view.points["id"]] == [d["diaSourceId"] for d in src]
    assert list(view.points["t"]) == [d["midpointMjdTai"] for d in src]
    assert [st.band_name(int(b)) for b in view.points["band"]] == [d["band"] for d in src]
    # the sample's history is prvDiaSources only: every stored point is a detection
    assert not st.forced_of(view.points["band"]).any()
    assert not any(p["forced"] for p in view.to_dict()["points"])
    # no scienceFlux, no templateFlux in the sample: the difference flux's magnitude
    np.testing.assert_allclose(view.points["mag"], [njy_to_mag(d["psfFlux"]) for d in src], atol=1e-5)
    r = st.band_codes("r")[0]
    assert view.header.band_counts[r] == len(src) and view.header.n_scored == len(src)


def _offsets_at_half(settings, topic):
    """{partition: offset} half-way through each partition of ``topic``."""
    c = Consumer({**settings.kafka.client_config(), "group.id": unique("w")})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        out = {}
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[p] = lo + (hi - lo) // 2
        return out
    finally:
        c.close()


def _commit(settings, group, topic, offsets):
    c = Consumer({**settings.kafka.client_config(), "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        c.close()


def test_a_broker_started_mid_stream_backfills_and_decides_as_one_that_saw_it_all(
        services, topics, redis_client, tmp_path, capsys):
    rubin_schemas((11, 1))
    # 10 events, 160 visits each over 300 days (every packet's 365 days of history reach
    # back to the event's first visit), in g and i in turn
    ds = make_dataset(10, 160, span=300.0, seed=4, amplitude=2.5)
    ds.band = np.where(np.arange(len(ds.time)) % 2 == 0, 1, 3).astype(np.uint8)
    data = ds.save(tmp_path / "ds.npz")
    names = topics("alerts", "triggers", "dlq", partitions=2)
    rc, _, err = replay(capsys, "--data", data, "--topic", names["alerts"], "--format", "rubin",
                        "--truth-out", tmp_path / "run" / "truth.jsonl")
    assert rc == 0, err
    art = make_artifact(tmp_path / "art", seed=7)
    probs = {int(ds.event_id[i]): art.predict(art.inputs(*ds.event(i), band=ds.event_band(i))[None])[0]
             for i in range(ds.n_events)}
    thr = choose_threshold(probs)
    pa, pb = unique("a"), unique("b")
    tb = dict(names, **topics("triggers", "dlq"))          # B's own trigger and dead-letter topics
    sa = settings_for(services, pa, names, thr)
    sb = settings_for(services, pb, tb, thr)
    full = Broker(sa, art, group=unique("ga")).run(until_idle=1.0)
    assert sum(full.dead_letters.values()) == 0, full.dead_letters
    group_b = unique("gb")
    half = _offsets_at_half(sa, names["alerts"])
    _commit(sb, group_b, names["alerts"], half)
    late = Broker(sb, art, group=group_b).run(until_idle=1.0)
    assert late.alerts < full.alerts and late.backfilled > 0
    assert sum(late.dead_letters.values()) == 0, late.dead_letters
    # the same stored light curves (per band), scored alike
    dump_a = {k[len(pa) + 1:]: v for k, v in redis_dump(redis_client, pa).items()}
    dump_b = {k[len(pb) + 1:]: v for k, v in redis_dump(redis_client, pb).items()}
    ev_a = {k: v for k, v in dump_a.items() if k.startswith(b"ev:")}
    ev_b = {k: v for k, v in dump_b.items() if k.startswith(b"ev:")}
    assert ev_a.keys() == ev_b.keys() and len(ev_a) == ds.n_events
    assert_states_match(ev_a, ev_b, PROB_TOLERANCE)
    # the stored kinds: the packets' visits (diaSourceId = event * 100000 + visit index)
    # that were no detection came as prvDiaForcedSources and are stored forced
    kinds = set()
    for i in range(ds.n_events):
        view = st.read_event(redis_client, pa, int(ds.event_id[i]))
        visit = view.points["id"] % 100_000
        forced = st.forced_of(view.points["band"])
        assert list(forced) == list(~ds.detected[ds.offsets[i] + visit])
        kinds.update(forced.tolist())
    assert kinds == {False, True}
    # triggers at the same points (B decides a first-half trigger when it backfills)
    ta = {(t["diaObjectId"], t["diaSourceId"], t["nPoints"]) for t in triggers_in(sa, names["triggers"])}
    tb_ = {(t["diaObjectId"], t["diaSourceId"], t["nPoints"]) for t in triggers_in(sb, tb["triggers"])}
    assert 0 < len(ta) < ds.n_events and ta == tb_


@pytest.fixture(autouse=True)
def _drop_prefixes(redis_client):
    """Delete the Redis keys of the prefixes these tests make (``a``/``b`` brokers)."""
    yield
    for pattern in ("test-a-*", "test-b-*"):
        keys = list(redis_client.scan_iter(match=pattern, count=1000))
        if keys:
            redis_client.delete(*keys)
