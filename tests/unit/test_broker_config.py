"""The broker's Kafka and Redis clients carry the SASL/SSL and password/TLS settings."""
import config as cfg
from broker.consumer import consumer_config, producer_config, redis_client


def _settings(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return cfg.load(p, env={})


def test_kafka_sasl_ssl_reaches_consumer_and_producer(tmp_path, monkeypatch):
    monkeypatch.setenv("ULENS_KAFKA_SASL_PASSWORD", "s3cret")
    s = _settings(tmp_path, "kafka:\n  bootstrap_servers: kafka.example:9094\n"
                            "  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n"
                            "  sasl_username: broker\n  ssl_ca_location: /etc/ca.pem\n")
    for conf in (consumer_config(s, "g1"), producer_config(s)):
        assert conf["bootstrap.servers"] == "kafka.example:9094"
        assert conf["security.protocol"] == "SASL_SSL"
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
        assert conf["sasl.username"] == "broker" and conf["sasl.password"] == "s3cret"
        assert conf["ssl.ca.location"] == "/etc/ca.pem"
    c = consumer_config(s, "g1")
    assert c["group.id"] == "g1" and c["enable.auto.commit"] is False
    p = producer_config(s)
    assert p["acks"] == "all" and p["enable.idempotence"] is True


def test_redis_password_and_tls_reach_the_client(tmp_path, monkeypatch):
    monkeypatch.setenv("ULENS_REDIS_PASSWORD", "hunter2")
    s = _settings(tmp_path, "redis:\n  url: rediss://redis.example:6380/2\n  ssl_ca_certs: /etc/rca.pem\n")
    client = redis_client(s)
    kw = client.connection_pool.connection_kwargs
    assert kw["password"] == "hunter2" and kw["ssl_ca_certs"] == "/etc/rca.pem"
    assert kw["host"] == "redis.example" and kw["port"] == 6380 and kw["db"] == 2
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"


def test_plaintext_defaults_have_no_secrets(tmp_path, monkeypatch):
    monkeypatch.delenv("ULENS_KAFKA_SASL_PASSWORD", raising=False)
    monkeypatch.delenv("ULENS_REDIS_PASSWORD", raising=False)
    s = _settings(tmp_path, "kafka:\n  bootstrap_servers: k:9092\nredis:\n  url: redis://r:6379/0\n")
    assert "sasl.password" not in consumer_config(s, "g")
    assert "password" not in redis_client(s).connection_pool.connection_kwargs


def test_group_session_reaches_the_consumer(tmp_path):
    from confluent_kafka import Consumer

    s = _settings(tmp_path, "kafka:\n  bootstrap_servers: k:9092\nconsumer:\n  session_timeout_s: 6\n")
    c = consumer_config(s, "g")
    assert c["session.timeout.ms"] == 6000 and c["heartbeat.interval.ms"] == 2000
    Consumer(c).close()                    # librdkafka accepts the combination
    d = consumer_config(_settings(tmp_path, "kafka:\n  bootstrap_servers: k:9092\n"), "g")
    assert d["session.timeout.ms"] == 45_000 and d["heartbeat.interval.ms"] == 3000
