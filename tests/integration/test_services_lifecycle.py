"""`ulens services` on a private state dir and free ports: up, reuse, down by pid, data kept, wipe."""
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient, NewTopic

import config as cfg
from tests.helpers import free_ports
from ulens import services as svc




def alive(pid):
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_up_down_lifecycle(tmp_path):
    kport, cport, rport = free_ports(3)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"services:\n  state_dir: {tmp_path / 'state'}\n  kafka_port: {kport}\n"
                    f"  kafka_controller_port: {cport}\n  redis_port: {rport}\n  kafka_heap_mb: 384\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ULENS_")}
    settings = cfg.load(conf, env=env)
    try:
        info = svc.up(settings, quiet=True)
        assert info["kafka_started"] and info["redis_started"]
        # every command now finds them without flags, through the recorded endpoints
        found = cfg.load(conf, env=env)
        assert found.kafka.bootstrap_servers == f"127.0.0.1:{kport}"
        assert found.redis.url == f"redis://127.0.0.1:{rport}/0"
        assert {"alerts", "triggers", "alerts.dlq", "truth"} <= set(
            AdminClient({"bootstrap.servers": found.kafka.bootstrap_servers}).list_topics(timeout=10).topics)
        admin = AdminClient({"bootstrap.servers": found.kafka.bootstrap_servers})
        admin.create_topics([NewTopic("kept", 1, 1)])["kept"].result()
        r = redis.Redis(port=rport)
        r.set("kept", b"yes")
        r.save()

        again = svc.up(settings, quiet=True)
        assert not again["kafka_started"] and not again["redis_started"]
        assert again["kafka_pid"] == info["kafka_pid"]

        stopped = svc.down(settings, quiet=True)
        assert sorted(stopped) == ["kafka", "redis"]
        assert not alive(info["kafka_pid"]) and not alive(info["redis_pid"])
        assert not settings.services.endpoints_file.exists()

        # data is kept between ups
        svc.up(settings, quiet=True)
        assert "kept" in AdminClient({"bootstrap.servers": f"127.0.0.1:{kport}"}).list_topics(timeout=10).topics
        assert redis.Redis(port=rport).get("kept") == b"yes"
    finally:
        svc.down(settings, wipe=True, quiet=True)
    assert not (tmp_path / "state" / "kafka").exists()
    assert not (tmp_path / "state" / "redis").exists()


# --- Redis persistence as shipped (README, "Durability") --------------------------------
@pytest.fixture()
def redis_only(tmp_path, monkeypatch):
    """``svc.up`` with Kafka left out (so these tests take seconds): a settings factory
    over one private state dir and Redis port; everything it starts is stopped after."""
    monkeypatch.setattr(svc, "_start_kafka", lambda s, p: (None, False))
    real_wait = svc._wait
    monkeypatch.setattr(svc, "_wait", lambda pred, timeout, what, *a: None if what == "Kafka"
                        else real_wait(pred, timeout, what, *a))
    monkeypatch.setattr(svc, "ensure_topics", lambda settings: [])
    (rport,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ULENS_")}
    made = []

    def settings(appendfsync=None):
        conf = tmp_path / "c.yaml"
        conf.write_text(f"services:\n  state_dir: {tmp_path / 'state'}\n  redis_port: {rport}\n"
                        + (f"  redis_appendfsync: '{appendfsync}'\n" if appendfsync else ""))   # YAML: a bare off is false
        made.append(cfg.load(conf, env=env))
        return made[-1]
    yield settings
    if made:
        svc.down(made[-1], wipe=True, quiet=True)


def _kill9_redis(settings):
    pid = int((settings.services.state_path / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_up_starts_redis_with_aof_and_a_kill9_loses_nothing(redis_only):
    s = redis_only()                        # the shipped default: appendfsync everysec
    assert s.services.redis_appendfsync == "everysec"
    svc.up(s, quiet=True)
    r = redis.Redis(port=s.services.redis_port)
    assert r.config_get("append*") == {**r.config_get("append*"), "appendonly": "yes", "appendfsync": "everysec"}
    assert r.config_get("aof-use-rdb-preamble")["aof-use-rdb-preamble"] == "yes"
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert svc.status(s)["redis"]["persistence"] == "aof everysec"
    r.mset({f"k{i}": i for i in range(1000)})      # acknowledged: in the kernel, not yet fsynced
    _kill9_redis(s)
    assert svc.up(s, quiet=True)["redis_started"]
    assert redis.Redis(port=s.services.redis_port).dbsize() == 1000


def test_changing_the_persistence_setting_keeps_the_data(redis_only):
    """Redis starts from the AOF or from dump.rdb, never both: a data dir written in one
    mode and started in the other must be carried over, at start and on a running server."""
    off = redis_only("off")
    svc.up(off, quiet=True)
    port = off.services.redis_port
    r = redis.Redis(port=port)
    assert r.config_get("appendonly")["appendonly"] == "no"
    r.set("from-rdb-era", 1)
    svc.down(off, quiet=True)               # SIGTERM: Redis saves dump.rdb on the way out
    state = off.services.state_path / "redis"
    assert (state / "dump.rdb").exists() and not (state / svc.AOF_MANIFEST).exists()

    on = redis_only("everysec")             # an RDB-only data dir started with AOF
    svc.up(on, quiet=True)
    r = redis.Redis(port=port)
    assert r.config_get("appendonly")["appendonly"] == "yes" and (state / svc.AOF_MANIFEST).exists()
    assert r.get("from-rdb-era") == b"1"
    r.set("from-aof-era", 2)                # in the AOF only (no snapshot since)
    _kill9_redis(on)

    svc.up(redis_only("off"), quiet=True)   # an AOF data dir started without AOF
    r = redis.Redis(port=port)
    assert r.config_get("appendonly")["appendonly"] == "no"
    assert (r.get("from-rdb-era"), r.get("from-aof-era")) == (b"1", b"2")
    assert not (state / "appendonlydir").exists()   # stale now: removed
    r.set("from-second-rdb-era", 3)

    svc.up(redis_only("always"), quiet=True)   # on a running server: switched at runtime
    r = redis.Redis(port=port)
    assert r.config_get("append*")["appendonly"] == "yes"
    assert r.config_get("append*")["appendfsync"] == "always"
    _kill9_redis(on)
    svc.up(redis_only("always"), quiet=True)
    assert redis.Redis(port=port).mget("from-rdb-era", "from-aof-era", "from-second-rdb-era") == [b"1", b"2", b"3"]
