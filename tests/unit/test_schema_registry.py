"""The codec's schema-registry resolver (broker.schema_registry), over real HTTP.

No real Confluent-compatible registry could be run from the package registries reached
here, so these run the real ``SchemaRegistryClient`` against ``tests.registry_stub``:
- Apicurio Registry 3.3.3 (``io.apicurio:apicurio-registry-app``, Maven Central): only a
  plain jar (no ``-runner`` classifier); its dependencies do not resolve from Maven
  Central (``apicurio-registry-schema-util-provider:3.3.3`` and
  ``apicurio-registry-contracts-rules:3.3.3`` are missing there, the POM's fallback
  repository repo.eclipse.org is unreachable); no ``-runner``/``-all`` jar for 2.6.13.Final
  or 2.0.2.Final either.
- Karapace: ``pip download karapace``: "from versions: none".
- AxonOps Schema Registry (Go): the Go proxy answers 403 "not available".
"""
from __future__ import annotations

import socket

import pytest

from broker.errors import BrokerError, RegistryUnavailable
from broker.retry import transient_cause
from broker.schema_registry import client_conf, registry_resolver, resolve_ids
from schemas import Codec, HEADER, MAGIC, UnknownSchemaId
from tests.registry_stub import RegistryStub
from tests.rubin_schema import rubin_part, rubin_sample, rubin_schema

pytest.importorskip("confluent_kafka.schema_registry._sync.schema_registry_client")
pytest.importorskip("httpx2" if __import__("sys").version_info >= (3, 10) else "httpx")

RUBIN_ID = 4242


@pytest.fixture
def stub():
    s = RegistryStub()
    yield s
    s.stop()


def _codec(url: str, basic_auth_user=None) -> Codec:
    from types import SimpleNamespace

    from confluent_kafka.schema_registry import SchemaRegistryClient
    reg = SimpleNamespace(url=url, timeout_s=2.0, basic_auth_user=basic_auth_user, ssl_ca_location=None)
    return Codec(resolver=registry_resolver(SchemaRegistryClient(client_conf(reg))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode_rubin(record: dict) -> bytes:
    local = Codec()
    local.add_schema(RUBIN_ID, rubin_schema())
    return local.encode(record, schema_id=RUBIN_ID)


def test_schema_fetched_once_and_kept_after_the_registry_is_gone(stub):
    stub.register(RUBIN_ID, rubin_schema(), "alerts-value")
    data = _encode_rubin(rubin_sample())
    codec = _codec(stub.url)
    kind, rec = codec.decode_kinds(data, "rubin")
    assert kind == "rubin"
    assert rec["diaObject"]["diaObjectId"] == rubin_sample()["diaObject"]["diaObjectId"]
    codec.decode(data)
    assert stub.requests == [f"/schemas/ids/{RUBIN_ID}"]       # fetched once
    stub.stop()
    assert codec.decode(data)[0] == RUBIN_ID                     # kept: no registry needed


def test_unknown_id_is_asked_once_then_unknown_schema_id(stub):
    codec = _codec(stub.url)
    frame = HEADER.pack(MAGIC, 999) + b"\x00"
    for _ in range(3):
        with pytest.raises(UnknownSchemaId):
            codec.decode(frame)
    assert stub.requests == ["/schemas/ids/999"]


def test_unreachable_registry_is_transient_and_not_remembered():
    port = _free_port()
    codec = _codec(f"http://127.0.0.1:{port}")
    data = _encode_rubin(rubin_sample())
    with pytest.raises(RegistryUnavailable) as exc:
        resolve_ids(codec, [data])
    assert transient_cause(exc.value) == "registry"
    stub = RegistryStub(port=port)          # the registry comes back
    try:
        stub.register(RUBIN_ID, rubin_schema())
        resolve_ids(codec, [data, data, b"\x01junk", None])
        assert codec.decode(data)[0] == RUBIN_ID
        assert stub.requests == [f"/schemas/ids/{RUBIN_ID}"]
    finally:
        stub.stop()


def test_schema_references_are_inlined(stub):
    """A schema registered with references (named types under their own subjects)."""
    import json
    parts = ("diaSource", "diaForcedSource", "diaObject", "ssSource", "ssObject", "mpc_orbits")
    refs = []
    for n, name in enumerate(parts, start=1):
        stub.register(100 + n, rubin_part(name), f"lsst.v11_1.{name}", 1)
        refs.append({"name": f"lsst.v11_1.{name}", "subject": f"lsst.v11_1.{name}", "version": 1})
    main = rubin_part("alert")
    stub.register(RUBIN_ID, main, references=refs)
    codec = _codec(stub.url)
    assert codec.decode_kinds(_encode_rubin(rubin_sample()), "rubin")[0] == "rubin"


def test_basic_auth_password_from_the_environment_only(monkeypatch):
    stub = RegistryStub(auth=("alice", "s3cret"))
    try:
        stub.register(RUBIN_ID, rubin_schema())
        monkeypatch.delenv("ULENS_SCHEMA_REGISTRY_PASSWORD", raising=False)
        with pytest.raises(BrokerError, match="ULENS_SCHEMA_REGISTRY_PASSWORD"):
            _codec(stub.url, basic_auth_user="alice")
        monkeypatch.setenv("ULENS_SCHEMA_REGISTRY_PASSWORD", "wrong")
        with pytest.raises(BrokerError, match="refused"):
            _codec(stub.url, basic_auth_user="alice").known(RUBIN_ID)
        monkeypatch.setenv("ULENS_SCHEMA_REGISTRY_PASSWORD", "s3cret")
        assert _codec(stub.url, basic_auth_user="alice").known(RUBIN_ID)
    finally:
        stub.stop()


def test_codec_for_settings(tmp_path, monkeypatch):
    import config as cfg
    from broker.schema_registry import codec_for
    from schemas import default_codec, rubin

    # no registry: our schemas and Rubin's fetched ones (1101, 1000), nothing asked for more
    monkeypatch.setenv("ULENS_RUBIN_SCHEMAS", str(tmp_path / "none"))
    (tmp_path / "none").mkdir()
    plain = codec_for(cfg.load(env={}))
    assert plain is not default_codec() and plain._resolver is None
    assert plain.known(1) and not plain.known(rubin.schema_id(11, 1))
    monkeypatch.delenv("ULENS_RUBIN_SCHEMAS")
    if rubin.available():
        assert codec_for(cfg.load(env={})).kind_of(rubin.schema_id(11, 1)) == "rubin"
    conf = tmp_path / "c.yaml"
    conf.write_text("kafka:\n  schema_registry:\n    url: http://127.0.0.1:1\n")
    codec = codec_for(cfg.load(conf, env={}))
    assert codec is not default_codec() and codec._resolver is not None
    conf.write_text("kafka:\n  schema_registry:\n    url: http://u:p@127.0.0.1:1\n")
    with pytest.raises(cfg.ConfigError, match="credentials"):
        cfg.load(conf, env={})
