"""Redis Cluster key layout, pure: hash tags, slot groups, the client's URL and CONFIG GET
(broker.state.keys, broker.cluster); the config keys that select it."""
from __future__ import annotations

import json

import pytest
from redis.crc import key_slot

import config as cfg
from broker import state as st
from broker.cluster import merge_config, startup_nodes
from broker.errors import BrokerError
from broker.state.keys import CLUSTER_BUCKETS, KeyLayout, object_id_of, wait_marker

IDS = [5, 1_000_001, 2**62 + 17, 609_782_345_678_901_234, 256, 512, 7]


def _all_keys(layout: KeyLayout, oid: int) -> list[str]:
    return [layout.event(oid), layout.trigger(oid), layout.psplfit_state("ab12cd34", oid),
            layout.psplfit_trigger(oid)]


def test_single_redis_keys_are_the_historical_names():
    lay = KeyLayout("ulens")
    assert not lay.cluster
    assert _all_keys(lay, 1000001) == ["ulens:ev:1000001", "ulens:tr:1000001", "ulens:pf:ab12cd34:1000001",
                                       "ulens:tp:1000001"]
    assert lay.event(42) == st.event_key("ulens", 42) and lay.trigger(42) == st.trigger_key("ulens", 42)
    assert lay.psplfit_state("h", 42) == st.psplfit_state_key("ulens", "h", 42)
    assert lay.psplfit_trigger(42) == st.psplfit_trigger_key("ulens", 42)
    assert KeyLayout.of(None, "ulens") == lay           # anything but a RedisCluster client


@pytest.mark.parametrize("buckets", [CLUSTER_BUCKETS, 0, 3])
def test_every_key_of_an_event_shares_one_slot(buckets):
    lay = KeyLayout("p", buckets)
    for oid in IDS:
        slots = {key_slot(k.encode()) for k in _all_keys(lay, oid)}
        assert slots == {lay.slot(oid)}, (oid, slots)
        assert key_slot(wait_marker(lay.event(oid)).encode()) == lay.slot(oid)


def test_bucketed_keys_name_the_bucket_and_stay_unique():
    lay = KeyLayout("p", CLUSTER_BUCKETS)
    assert lay.event(1000001) == f"p:ev:{{{1000001 % 256}}}:1000001"
    assert lay.psplfit_state("h", 1000001) == f"p:pf:h:{{{1000001 % 256}}}:1000001"
    assert len({lay.event(o) for o in range(10_000)}) == 10_000
    assert len({lay.slot(o) for o in range(10_000)}) == CLUSTER_BUCKETS   # no two buckets share a slot
    assert KeyLayout("p", 0).event(77) == "p:ev:{77}"


@pytest.mark.parametrize("buckets", [None, CLUSTER_BUCKETS, 0])
def test_object_id_from_any_key(buckets):
    lay = KeyLayout("a:b", buckets)
    for oid in IDS:
        for k in _all_keys(lay, oid):
            assert object_id_of(k) == oid and object_id_of(k.encode()) == oid
    assert lay.pattern() == "a:b:ev:*"


def _check_groups(lay: KeyLayout, ids: list[int], chunk: int) -> list[list[int]]:
    groups = lay.slot_groups(ids, chunk)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(ids)))          # every event once
    for g in groups:
        assert 1 <= len(g) <= chunk and g == sorted(g)    # batch order kept inside a call
        if lay.cluster:
            assert len({lay.slot(ids[i]) for i in g}) == 1
    return groups


def test_single_redis_groups_are_consecutive_chunks():
    ids = list(range(1000, 1600))
    groups = _check_groups(KeyLayout("p"), ids, 256)
    assert groups == [list(range(0, 256)), list(range(256, 512)), list(range(512, 600))]
    assert KeyLayout("p").slot_groups([], 256) == []


def test_cluster_groups_one_slot_each_and_chunked():
    ids = [10_000_000 + 7919 * k for k in range(2000)]
    bucketed = _check_groups(KeyLayout("p", CLUSTER_BUCKETS), ids, 256)
    assert len(bucketed) == CLUSTER_BUCKETS               # 2,000 events: one call per bucket
    per_event = _check_groups(KeyLayout("p", 0), ids, 256)
    assert len(per_event) > 1800                          # nearly one call per event
    # many events of one bucket: chunked
    same = [3 + 256 * k for k in range(600)]
    groups = _check_groups(KeyLayout("p", CLUSTER_BUCKETS), same, 256)
    assert [len(g) for g in groups] == [256, 256, 88]


def test_cluster_config_answer_is_the_nodes_common_one():
    same = {"a:1": {"maxmemory-policy": "noeviction", "appendonly": "yes"},
            "a:2": {"maxmemory-policy": "noeviction", "appendonly": "yes"}}
    assert merge_config(same) == {"maxmemory-policy": "noeviction", "appendonly": "yes"}
    differ = {**same, "a:3": {"maxmemory-policy": "allkeys-lru", "appendonly": "yes"}}
    with pytest.raises(BrokerError, match=r"disagree on maxmemory-policy: a:1 noeviction.*a:3 allkeys-lru"):
        merge_config(differ)


def test_cluster_url_names_one_or_several_nodes():
    assert startup_nodes("redis://127.0.0.1:17001/0") == ([("127.0.0.1", 17001)], False, {})
    assert startup_nodes("rediss://u:p%40ss@h1:1,h2:2/0") == ([("h1", 1), ("h2", 2)], True,
                                                            {"username": "u", "password": "p@ss"})
    with pytest.raises(BrokerError, match="database 0 only"):
        startup_nodes("redis://h:1/3")
    with pytest.raises(BrokerError, match="not host:port"):
        startup_nodes("redis://h1:1,h2/0")


def test_redis_cluster_setting_and_its_auto_addresses(tmp_path):
    assert cfg.load(env={}).redis.cluster is False
    state = tmp_path / "state"
    (state / "cluster").mkdir(parents=True)
    (state / "endpoints.json").write_text(json.dumps({"kafka_bootstrap": "127.0.0.1:9092",
                                                      "redis_url": "redis://127.0.0.1:6379/0"}))
    (state / "cluster" / "endpoints.json").write_text(json.dumps(
        {"kafka_bootstrap": "127.0.0.1:19192,127.0.0.1:19193,127.0.0.1:19194",
         "redis_url": "redis://127.0.0.1:17001,127.0.0.1:17002/0"}))
    single = tmp_path / "single.yaml"
    single.write_text(f"services:\n  state_dir: {state}\n")
    s = cfg.load(single, env={})
    assert (s.kafka.bootstrap_servers, s.redis.url) == ("127.0.0.1:9092", "redis://127.0.0.1:6379/0")
    clustered = tmp_path / "cluster.yaml"
    clustered.write_text(f"services:\n  state_dir: {state}\nredis:\n  cluster: true\n")
    s = cfg.load(clustered, env={})
    assert s.redis.cluster is True
    assert s.kafka.bootstrap_servers == "127.0.0.1:19192,127.0.0.1:19193,127.0.0.1:19194"
    assert s.redis.url == "redis://127.0.0.1:17001,127.0.0.1:17002/0"
    bad = tmp_path / "bad.yaml"
    bad.write_text("redis:\n  cluster: yes please\n")
    with pytest.raises(cfg.ConfigError, match="redis.cluster must be true or false"):
        cfg.load(bad, env={})
    ports = cfg.ServicesSettings()
    assert ports.cluster_redis_ports() == [17001 + i for i in range(6)]
    assert ports.cluster_kafka_ports() + ports.cluster_controller_ports() == list(range(19192, 19198))
