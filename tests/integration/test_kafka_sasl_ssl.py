"""The broker's Kafka settings against a real SASL_SSL (SCRAM-SHA-512) listener, as Rubin
serves its stream: a private single-node Kafka (KRaft, the Maven jars of ulens.services)
on free loopback ports, a self-signed certificate from keytool, SCRAM credentials added
at format time (kafka-storage format --add-scram)."""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest

import config as cfg
from broker.consumer import consumer_config
from ulens import services as svc

PASSWORD = "alice-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory):
    java, keytool = shutil.which("java"), shutil.which("keytool")
    if not java or not keytool:
        pytest.skip("needs a JDK (java, keytool)")
    s = cfg.load(env={}).services
    libs = svc.fetch_kafka(s)
    root = tmp_path_factory.mktemp("sasl-kafka")
    ks, pem, store_pw = root / "server.p12", root / "ca.pem", uuid.uuid4().hex
    subprocess.run([keytool, "-genkeypair", "-alias", "kafka", "-keyalg", "RSA", "-keysize", "2048",
                    "-validity", "2", "-dname", "CN=127.0.0.1", "-ext", "SAN=ip:127.0.0.1,dns:localhost",
                    "-ext", "BC=ca:true", "-keystore", str(ks), "-storetype", "PKCS12",
                    "-storepass", store_pw], check=True, capture_output=True, timeout=60)
    subprocess.run([keytool, "-exportcert", "-rfc", "-alias", "kafka", "-keystore", str(ks),
                    "-storepass", store_pw, "-file", str(pem)], check=True, capture_output=True, timeout=60)
    sport, iport, cport = svc.free_ports(3)
    props = root / "server.properties"
    props.write_text("\n".join([
        "process.roles=broker,controller", "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{cport}",
        f"listeners=SASL_SSL://127.0.0.1:{sport},INTERNAL://127.0.0.1:{iport},CONTROLLER://127.0.0.1:{cport}",
        f"advertised.listeners=SASL_SSL://127.0.0.1:{sport},INTERNAL://127.0.0.1:{iport}",
        "controller.listener.names=CONTROLLER", "inter.broker.listener.name=INTERNAL",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms=SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"ssl.keystore.location={ks}", "ssl.keystore.type=PKCS12", f"ssl.keystore.password={store_pw}",
        f"log.dirs={root / 'data'}", "num.partitions=1", "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=1", "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1", "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1", "group.initial.rebalance.delay.ms=0", ""]))
    (root / "log4j2.yaml").write_text(svc.LOG4J2)
    cp = f"{libs}/*"
    fmt = subprocess.run([java, "-cp", cp, "kafka.tools.StorageTool", "format", "-t", uuid.uuid4().hex[:22],
                          "-c", str(props), "--add-scram",
                          f"SCRAM-SHA-512=[name=alice,password={PASSWORD}]"],
                         capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    log = root / "kafka.log"
    pid = svc._spawn([java, "-Xmx384m", "-Djava.awt.headless=true",
                      f"-Dlog4j2.configurationFile={root / 'log4j2.yaml'}", "-cp", cp, "kafka.Kafka",
                      str(props)], log, root / "kafka.pid", root)
    try:
        deadline = time.monotonic() + 120
        while not svc._port_open(sport):
            assert svc._alive(pid, "kafka.Kafka"), log.read_text()[-3000:]
            assert time.monotonic() < deadline, "SASL_SSL Kafka did not start"
            time.sleep(0.25)
        yield {"bootstrap": f"127.0.0.1:{sport}", "ca": str(pem)}
    finally:
        import os
        import signal
        os.kill(pid, signal.SIGTERM)
        for _ in range(60):
            if not svc._alive(pid, "kafka.Kafka"):
                break
            time.sleep(0.5)
        else:
            os.kill(pid, signal.SIGKILL)


def _settings(tmp_path, sasl_kafka):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"""
kafka:
  bootstrap_servers: "{sasl_kafka['bootstrap']}"
  security_protocol: SASL_SSL
  sasl_mechanism: SCRAM-SHA-512
  sasl_username: alice
  ssl_ca_location: "{sasl_kafka['ca']}"
consumer: {{group_prefix_user: true}}
""")
    return cfg.load(conf, env={})


def test_consumer_config_reads_over_scram_sha_512_and_ssl(sasl_kafka, tmp_path, monkeypatch):
    from confluent_kafka import Consumer, Producer
    monkeypatch.setenv("ULENS_KAFKA_SASL_PASSWORD", PASSWORD)
    s = _settings(tmp_path, sasl_kafka)
    assert s.consumer_group() == "alice-ulens-broker"
    topic = "sasl-" + uuid.uuid4().hex[:8]
    p = Producer(s.kafka.client_config())
    p.produce(topic, key=b"1", value=b"hello")
    assert p.flush(60) == 0
    c = Consumer(consumer_config(s, s.consumer_group()))
    c.subscribe([topic])
    deadline = time.monotonic() + 60
    got = None
    while got is None and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got = m
    c.close()
    assert got is not None and got.value() == b"hello"


def test_a_wrong_password_fails_with_an_authentication_error(sasl_kafka, tmp_path, monkeypatch):
    from confluent_kafka import Consumer, KafkaError
    monkeypatch.setenv("ULENS_KAFKA_SASL_PASSWORD", "wrong")
    s = _settings(tmp_path, sasl_kafka)
    errors = []
    c = Consumer({**consumer_config(s, s.consumer_group()), "error_cb": errors.append})
    c.subscribe(["sasl-any"])
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline:
        assert c.poll(0.5) is None          # nothing is read without a login
    c.close()
    assert errors and errors[0].code() == KafkaError._AUTHENTICATION, errors
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in errors[0].str()
