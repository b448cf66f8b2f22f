"""`ulens services` on a private state dir and free ports: up, reuse, down by pid, data kept, wipe."""
import os
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
