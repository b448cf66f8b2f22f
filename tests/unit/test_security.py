"""Security properties that need no services.

* Artifacts are data: a checkpoint that carries code is refused by ``load_artifact``
  (``weights_only=True``) and the code never runs; nothing in the packages unpickles.
* Kafka SASL_SSL and Redis password/TLS settings reach every client the broker, the
  replay and the tools build; passwords come from the environment only.
* The local services listen on loopback only (``ulens services`` and docker-compose).
* No secret is kept in a file of the repository.

(`tests/unit/test_artifact.py` already checks that a code-carrying ``weights.pt`` is
refused with an error naming the file; here: that the payload never runs, and other
shapes of pickled code.)
"""
from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import config as cfg

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "replay", "training", "schemas", "config", "ulens")
SASL_ENV = "ULENS_KAFKA_SASL_PASSWORD"
REDIS_ENV = "ULENS_REDIS_PASSWORD"


# --- artifacts are data ----------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file (stands for any code execution)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture()
def artifact_dir(tmp_path):
    from training.artifact import save_artifact
    from training.features import CHANNELS
    from training.model import TDCNN
    from training.scalers import TwoStageScaler

    torch.manual_seed(0)
    model = TDCNN(conv_channels=(8, 8, 4), fc_units=8)
    sc = TwoStageScaler.fit(np.random.default_rng(0).normal(size=(50, 3)), channels=CHANNELS)
    return save_artifact(tmp_path / "art", model, {"threshold": 0.5}, sc), model


@pytest.mark.parametrize("shape", ["payload_in_state_dict", "whole_module", "payload_as_tensor_attr"])
def test_checkpoint_carrying_code_is_refused_and_never_runs(artifact_dir, tmp_path, shape):
    from training.artifact import ArtifactError, load_artifact

    d, model = artifact_dir
    marker = tmp_path / "pwned"
    if shape == "payload_in_state_dict":
        obj = {**model.state_dict(), "evil": _Payload(marker)}
    elif shape == "whole_module":        # torch.save(model): the pickled class, not a state_dict
        obj = model
    else:
        obj = model.state_dict()
        obj["hook"] = [_Payload(marker), torch.zeros(1)]
    torch.save(obj, d / "weights.pt")
    with pytest.raises(ArtifactError, match="weights.pt"):
        load_artifact(d)
    assert not marker.exists(), "the checkpoint's code ran while loading"
    # the same payload does run under a plain (unsafe) load: the test payload is real
    if shape != "whole_module":
        torch.load(d / "weights.pt", weights_only=False)
        assert marker.exists()


def _sources():
    for pkg in PACKAGES:
        yield from sorted((REPO / pkg).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


UNPICKLERS = re.compile(r"^(c?pickle|dill|cloudpickle|joblib|marshal|shelve|_pickle)\.(load|loads|Unpickler|open)$")


def test_no_unpickling_anywhere_in_the_packages():
    """No pickle/dill/joblib/marshal loads, torch.load only with weights_only=True, np.load
    never with allow_pickle, yaml only through safe_load, no eval/exec."""
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            name = _call_name(node)
            kw = {k.arg: k.value for k in node.keywords}
            if UNPICKLERS.match(name):
                bad.append(f"{where} {name}()")
            if name.endswith("torch.load"):
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{where} torch.load without weights_only=True")
            if name in ("np.load", "numpy.load"):
                v = kw.get("allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(f"{where} np.load with allow_pickle")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                bad.append(f"{where} {name}")
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "__import__"):
                bad.append(f"{where} {node.func.id}()")
    assert not bad, bad


# --- Kafka SASL_SSL and Redis password/TLS reach the clients ----------------------------
def _secure_settings(tmp_path, monkeypatch, **redis) -> cfg.Settings:
    monkeypatch.setenv(SASL_ENV, "kafka-pw-from-env")
    monkeypatch.setenv(REDIS_ENV, "redis-pw-from-env")
    for k in ("ULENS_KAFKA_BOOTSTRAP", "ULENS_REDIS_URL", "ULENS_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    ca = tmp_path / "ca.pem"
    ca.write_text("not a real CA\n")
    conf = tmp_path / "secure.yaml"
    conf.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": "broker1.example.org:9093,broker2.example.org:9093",
                  "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                  "sasl_username": "ulens", "ssl_ca_location": str(ca)},
        "redis": {"url": "rediss://redis.example.org:6380/0", "ssl_ca_certs": str(ca), **redis}}))
    return cfg.load(conf)


def _assert_secure(conf: dict, tmp_path):
    assert conf["bootstrap.servers"] == "broker1.example.org:9093,broker2.example.org:9093"
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["sasl.username"] == "ulens"
    assert conf["sasl.password"] == "kafka-pw-from-env"
    assert conf["ssl.ca.location"] == str(tmp_path / "ca.pem")


class _Captured(Exception):
    pass


def _capture(store: list):
    def fake(conf, *a, **kw):
        store.append(dict(conf))
        raise _Captured()
    return fake


def test_kafka_sasl_ssl_reaches_every_client(tmp_path, monkeypatch):
    import confluent_kafka
    from broker.consumer import consumer_config, producer_config
    from broker.report import read_triggers
    from replay import producer as rp
    from ulens import cli

    s = _secure_settings(tmp_path, monkeypatch)
    _assert_secure(consumer_config(s, "g"), tmp_path)          # the broker's consumer ...
    _assert_secure(producer_config(s), tmp_path)               # ... and its producer
    got: list = []
    monkeypatch.setattr(rp, "Producer", _capture(got))
    monkeypatch.setattr(rp, "AdminClient", _capture(got))
    with pytest.raises(_Captured):                             # the replay's producer
        rp.make_producer(s.kafka.client_config(), rp.Delivery())
    with pytest.raises(_Captured):                             # the replay's topic admin
        rp.existing_partitions(s.kafka.client_config(), "alerts")
    monkeypatch.setattr(confluent_kafka, "Consumer", _capture(got))
    with pytest.raises(_Captured):                             # the report's trigger reader
        read_triggers(s)
    with pytest.raises(_Captured):                             # `ulens subscribe`
        cli.main(["subscribe", "--config", str(tmp_path / "secure.yaml")])
    assert len(got) == 4
    for conf in got:
        _assert_secure(conf, tmp_path)


def test_every_kafka_client_in_the_packages_is_built_from_the_shared_config():
    """Each Consumer/Producer/AdminClient built by broker/ or replay/ gets its settings through
    ``settings.kafka.client_config()`` (where SASL/SSL are applied), none from scratch."""
    sites = []
    for pkg in ("broker", "replay"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            src = path.read_text()
            tree = ast.parse(src)
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                body = ast.get_source_segment(src, fn)
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and _call_name(node).split(".")[-1] in (
                            "Consumer", "Producer", "AdminClient"):
                        sites.append(f"{path.relative_to(REPO)}:{node.lineno}")
                        assert re.search(r"client_config|consumer_config\(|producer_config\(", body), \
                            f"{sites[-1]}: a Kafka client not built from settings.kafka.client_config()"
    assert len(sites) >= 5, sites


def test_sasl_without_password_in_the_environment_is_an_error(tmp_path, monkeypatch):
    s = _secure_settings(tmp_path, monkeypatch)
    monkeypatch.delenv(SASL_ENV)
    with pytest.raises(cfg.ConfigError, match=SASL_ENV):
        s.kafka.client_config()


def test_redis_password_and_tls_reach_the_client(tmp_path, monkeypatch):
    import redis

    from broker.consumer import redis_client

    s = _secure_settings(tmp_path, monkeypatch)
    client = redis_client(s)                                   # builds, connects lazily
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    kw = pool.connection_kwargs
    assert (kw["host"], kw["port"], kw.get("db", 0)) == ("redis.example.org", 6380, 0)
    assert kw["password"] == "redis-pw-from-env"
    assert kw["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert kw.get("ssl_cert_reqs", "required") in ("required", __import__("ssl").CERT_REQUIRED)
    monkeypatch.delenv(REDIS_ENV)
    assert "password" not in redis_client(s).connection_pool.connection_kwargs


def test_configuration_has_no_secret_key(tmp_path):
    import typing
    names = []

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            names.append(prefix + f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
    walk(cfg.Settings)
    assert "kafka.sasl_username" in names and "redis.url" in names
    assert not [n for n in names if re.search(r"passw|secret|token|credential|api_?key", n, re.I)], names
    for section, key in (("kafka", "sasl_password"), ("redis", "password")):
        f = tmp_path / f"{key}.yaml"
        f.write_text(yaml.safe_dump({section: {key: "hunter2"}}))
        with pytest.raises(cfg.ConfigError, match=f"unknown key {section}.{key}"):
            cfg.load(f, env={})


def test_password_in_a_configured_url_is_refused(tmp_path):
    f = tmp_path / "url.yaml"
    f.write_text(yaml.safe_dump({"redis": {"url": "redis://:hunter2@127.0.0.1:6379/0"}}))
    with pytest.raises(cfg.ConfigError, match="redis.url"):
        cfg.load(f, env={})


# --- local services listen on loopback only ---------------------------------------------
def test_local_services_are_configured_on_loopback_only(tmp_path, monkeypatch):
    from ulens import services as svc

    settings = cfg.load(env={}).replace(services={"state_dir": str(tmp_path / "state"),
                                                  "cache_dir": str(tmp_path / "cache")})
    spawned = []
    monkeypatch.setattr(svc, "_check_port_free", lambda port, what, last_pid=None: None)
    monkeypatch.setattr(svc.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(svc, "fetch_kafka", lambda s, quiet=False: tmp_path / "libs")
    monkeypatch.setattr(svc.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(svc, "_spawn", lambda cmd, log, pid_file, cwd: spawned.append(cmd) or 4242)
    paths = svc.Paths(settings.services.state_path)
    paths.state.mkdir(parents=True)
    svc._start_kafka(settings.services, paths)
    svc._start_redis(settings.services, paths)
    assert len(spawned) == 2
    props = dict(line.split("=", 1) for line in
                 (paths.kafka_dir() / "server.properties").read_text().splitlines() if "=" in line)
    for key in ("listeners", "advertised.listeners", "controller.quorum.voters"):
        hosts = re.findall(r"(?://|@)([^:/,]*):\d+", props[key])
        assert hosts and set(hosts) == {"127.0.0.1"}, (key, props[key])
    rconf = (paths.redis_dir() / "redis.conf").read_text().splitlines()
    assert "bind 127.0.0.1" in rconf and "protected-mode yes" in rconf
    assert [x for x in rconf if x.startswith("bind ")] == ["bind 127.0.0.1"]
    assert svc.HOST == "127.0.0.1"


def test_docker_compose_publishes_on_loopback_only():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    ports = [(name, p) for name, s in compose["services"].items() for p in s.get("ports", [])]
    assert ports, "no published ports?"
    for name, p in ports:
        assert str(p).startswith("127.0.0.1:"), f"service {name} publishes {p} on every interface"


# --- no secret in the repository ---------------------------------------------------------
SECRET_KEY = re.compile(
    r"""(?ix) ["']? [\w.-]*(password|passwd|secret|token|api[_-]?key|credentials?)[\w.-]* ["']?
        \s* [:=] \s* (?P<value>[^\s,#}]+)""")
HARMLESS = re.compile(r"""(?ix) ^(null|none|~|""|''|false|true|\$\{?\w+\}?|os\.environ.*|env\b.*|
                      password|<[^>]*>|\.\.\.|\(|\[|\{)""")


def test_no_secret_in_repository_files():
    """Tracked YAML/JSON/TOML/INI/env/Python/shell files outside tests/ hold no password-like
    key with a literal value (the test suite's own fake passwords are the exception)."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    exts = (".yaml", ".yml", ".json", ".toml", ".ini", ".cfg", ".env", ".py", ".sh", ".properties")
    hits = []
    for name in files:
        if name.startswith("tests/") or not name.endswith(exts) or not (REPO / name).is_file():
            continue
        text = (REPO / name).read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            for m in SECRET_KEY.finditer(line):
                value = m.group("value").strip("\"'")
                if value and not HARMLESS.match(value) and not value.startswith(("os.", "self.", "kw[")):
                    hits.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not hits, hits
    assert (REPO / "config" / "default.yaml").read_text().count("password") >= 1  # documented as env-only


def test_metrics_listener_binds_loopback_unless_told():
    from broker.metrics import Metrics
    server, _ = Metrics().serve(0)                 # port 0: any free one
    try:
        assert server.socket.getsockname()[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    assert cfg.load(env={}).consumer.metrics_host == "127.0.0.1"


def test_torch_floor_excludes_the_weights_only_escapes():
    """torch.load(weights_only=True) is how artifacts are read (training/artifact.py):
    CVE-2025-32434 (fixed in 2.6.0) and CVE-2026-24747 (fixed in 2.10.0) break it."""
    import tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"torch\b", d))
    floor = re.search(r">=\s*([\d.]+)", spec).group(1)
    assert tuple(int(x) for x in floor.split(".")) >= (2, 10), spec
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= (2, 10), torch.__version__
