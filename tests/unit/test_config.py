"""The typed config loader: defaults, merge, env overrides, and errors that name the key."""
import json

import pytest

import config as cfg


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_load_and_resolve_auto(tmp_path):
    s = cfg.load(env={})
    assert s.kafka.topics.alerts == "alerts"
    assert s.kafka.partitions.alerts >= 1
    assert s.consumer.rule == "pspl-fit"
    assert s.kafka.bootstrap_servers != "auto" and s.redis.url.startswith("redis://")


def test_user_file_merges_over_defaults(tmp_path):
    p = write(tmp_path, "consumer:\n  group: g1\n  min_points: 20\nreplay:\n  speed: 86400\n")
    s = cfg.load(p, env={})
    assert s.consumer.group == "g1" and s.consumer.min_points == 20
    assert s.consumer.batch_size == cfg.ConsumerSettings().batch_size
    assert s.replay.speed == 86400.0
    assert s.sources[-1] == str(p)


@pytest.mark.parametrize("text, needle", [
    ("consumer:\n  groop: x\n", "unknown key consumer.groop"),
    ("kafak: {}\n", "unknown key kafak"),
    ("consumer:\n  batch_size: many\n", "consumer.batch_size must be an integer"),
    ("consumer:\n  batch_size: 0\n", "consumer.batch_size = 0 is out of range"),
    ("consumer:\n  threshold: 1.5\n", "consumer.threshold = 1.5 is out of range"),
    ("consumer:\n  device: tpu\n", "consumer.device must be one of"),
    ("replay:\n  detections_only: 'false'\n", "replay.detections_only must be true or false"),
    ("replay:\n  speed: fast\n", "replay.speed must be a positive number or 'max'"),
    ("replay:\n  speed: -3\n", "replay.speed must be positive"),
    ("kafka:\n  topics: [a, b]\n", "kafka.topics must be a mapping"),
    ("services:\n  kafka_port: 70000\n", "services.kafka_port = 70000 is out of range"),
])
def test_bad_values_name_the_key_and_the_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.load(p, env={})
    assert needle in str(ei.value)
    assert str(p) in str(ei.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load(write(tmp_path, "a: [\n"), env={})
    with pytest.raises(cfg.ConfigError, match="cannot read config file"):
        cfg.load(tmp_path / "nope.yaml", env={})


def test_env_overrides_bootstrap_and_redis_url(tmp_path):
    s = cfg.load(env={"ULENS_KAFKA_BOOTSTRAP": "k1:9000,k2:9000",
                      "ULENS_REDIS_URL": "rediss://r.example:6380/2"})
    assert s.kafka.bootstrap_servers == "k1:9000,k2:9000"
    assert s.redis.url == "rediss://r.example:6380/2"


def test_env_config_file_is_used(tmp_path):
    p = write(tmp_path, "consumer:\n  group: from-env\n")
    assert cfg.load(env={"ULENS_CONFIG": str(p)}).consumer.group == "from-env"


def test_auto_uses_recorded_endpoints(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "endpoints.json").write_text(json.dumps(
        {"kafka_bootstrap": "127.0.0.1:19999", "redis_url": "redis://127.0.0.1:16399/0"}))
    s = cfg.load(write(tmp_path, f"services:\n  state_dir: {state}\n"), env={})
    assert s.kafka.bootstrap_servers == "127.0.0.1:19999"
    assert s.redis.url == "redis://127.0.0.1:16399/0"


def test_bad_redis_scheme(tmp_path):
    with pytest.raises(cfg.ConfigError, match="redis.url must start with"):
        cfg.load(env={"ULENS_REDIS_URL": "http://x"})


def test_secrets_come_from_env_only(tmp_path, monkeypatch):
    # There is no config key for a password: a file that sets one is rejected.
    with pytest.raises(cfg.ConfigError, match="unknown key kafka.sasl_password"):
        cfg.load(write(tmp_path, "kafka:\n  sasl_password: hunter2\n"), env={})
    p = write(tmp_path, "kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n"
                        "  sasl_username: broker\n  ssl_ca_location: /etc/ca.pem\n")
    s = cfg.load(p, env={})
    monkeypatch.delenv("ULENS_KAFKA_SASL_PASSWORD", raising=False)
    with pytest.raises(cfg.ConfigError, match="ULENS_KAFKA_SASL_PASSWORD"):
        s.kafka.client_config()
    monkeypatch.setenv("ULENS_KAFKA_SASL_PASSWORD", "s3cret")
    conf = s.kafka.client_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "broker" and conf["sasl.password"] == "s3cret"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    monkeypatch.setenv("ULENS_REDIS_PASSWORD", "r3dis")
    assert cfg.load(env={}).redis.client_kwargs()["password"] == "r3dis"


def test_replace_returns_changed_copy():
    s = cfg.load(env={})
    t = s.replace(consumer={"group": "other"})
    assert t.consumer.group == "other" and s.consumer.group != "other"


@pytest.mark.parametrize("url, masked", [
    ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://ops:pa:ss@r.example.org:6380/2", "rediss://ops:***@r.example.org:6380/2"),
    ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),          # up to the last @, as urllib
    ("redis://token@host/0", "redis://***@host/0"),
    ("redis://host:6379/0?password=secret&db=1", "redis://host:6379/0?password=***&db=1"),
    ("SASL_SSL://svc:secret@k1:9093,k2:9093", "SASL_SSL://svc:***@k1:9093,k2:9093"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),           # nothing to hide
    ("k1:9092,k2:9092", "k1:9092,k2:9092"),
    ("error at redis://u:secret@h:1/0: refused", "error at redis://u:***@h:1/0: refused"),
])
def test_mask_url_hides_credentials_only(url, masked):
    assert cfg.mask_url(url) == masked


def test_config_errors_mask_the_url(tmp_path):
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.load(env={"ULENS_REDIS_URL": "http://:hunter2@redis.example.org/0"})
    assert "hunter2" not in str(ei.value) and "http://:***@redis.example.org/0" in str(ei.value)


def test_an_unquoted_off_is_the_choice_off(tmp_path):
    """YAML 1.1 reads `off` as false; where "off" is a choice it means that choice."""
    import config as cfg

    f = tmp_path / "c.yaml"
    f.write_text("services:\n  redis_appendfsync: off\n")
    assert cfg.load(f, env={}).services.redis_appendfsync == "off"
    f.write_text("replay:\n  publish_truth: off\n")
    assert cfg.load(f, env={}).replay.publish_truth is False
