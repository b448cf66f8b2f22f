"""The one typed configuration loader.

`load()` reads ``config/default.yaml``, merges an optional user file over it,
applies the environment overrides and returns a frozen :class:`Settings`.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the key and the file. This module is also the one place that learns where
the services listen (``auto`` addresses resolve to what ``ulens services up``
recorded).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

DEFAULT_FILE = "default.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""
    exit_code = 3      # `ulens`: bad input or configuration (ulens/cli.py, EXIT_CODES)


# The user info of a URL (user and password, or a lone token, before the netloc's last "@"
# as urllib parses it) and secret query parameters (redis-py hands any query parameter
# to the client, a password included): what mask_url hides.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)(?P<info>[^/?#\s]*)@")
_SECRET_PARAMS = ("password", "passwd", "pwd", "pass", "token", "secret")
_URL_QUERY_MASK = re.compile(r"(?P<key>[?&](?:" + "|".join(_SECRET_PARAMS) + r")=)[^&#\s]*", re.I)


def mask_url(text: str) -> str:
    """``text`` with every credential in the URLs it holds replaced by ``***``.

    ``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0``, ``user:pw@`` ->
    ``user:***@``, a lone ``token@`` -> ``***@``; a password in the query string too.
    Used wherever an address is printed or logged (a password may come in
    ULENS_REDIS_URL); text without credentials is returned unchanged."""
    def userinfo(m: re.Match) -> str:
        user, colon, _ = m.group("info").partition(":")
        return f"{m.group('scheme')}{user + ':***' if colon else '***'}@"
    return _URL_QUERY_MASK.sub(r"\g<key>***", _URL_USERINFO.sub(userinfo, text))


def rng(lo=None, hi=None, choices=None):
    """Field metadata: the allowed range or choices of a value (checked by the loader)."""
    return {"lo": lo, "hi": hi, "choices": choices}


@dataclass(frozen=True)
class Topics:
    alerts: str = "alerts"
    triggers: str = "triggers"
    dead_letter: str = "alerts.dlq"
    truth: str = "truth"


@dataclass(frozen=True)
class Partitions:
    alerts: int = field(default=4, metadata=rng(1, 1024))
    triggers: int = field(default=1, metadata=rng(1, 1024))
    dead_letter: int = field(default=1, metadata=rng(1, 1024))
    truth: int = field(default=1, metadata=rng(1, 1024))


def kafka_client_config(bootstrap_servers: str, security_protocol: str, sasl_mechanism: Optional[str],
                        sasl_username: Optional[str], ssl_ca_location: Optional[str],
                        env_var: str, where: str = "kafka") -> dict:
    """librdkafka connection settings (address, security); the SASL password is read from
    the environment variable ``env_var`` here, never from a file. ``where``: the
    config section named in errors."""
    conf = {"bootstrap.servers": bootstrap_servers, "security.protocol": security_protocol}
    if security_protocol.startswith("SASL"):
        if not sasl_mechanism or not sasl_username:
            raise ConfigError(f"{where}.sasl_mechanism and {where}.sasl_username are required "
                              f"with security_protocol {security_protocol}")
        password = os.environ.get(env_var)
        if not password:
            raise ConfigError(f"env {env_var} is not set but "
                              f"{where}.security_protocol is {security_protocol}")
        conf.update({"sasl.mechanism": sasl_mechanism, "sasl.username": sasl_username,
                     "sasl.password": password})
    if ssl_ca_location:
        conf["ssl.ca.location"] = ssl_ca_location
    return conf


def user_prefixed(group: str, username: Optional[str], where: str = "kafka") -> str:
    """``group`` prefixed with the SASL user name (``alice-<group>``), as Rubin's stream
    requires of consumer groups (they must start with the user name); a group that already
    starts with it is kept."""
    if not username:
        raise ConfigError(f"group_prefix_user needs {where}.sasl_username")
    return group if group.startswith(username) else f"{username}-{group}"


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = (None, "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class SchemaRegistrySettings:
    """A Confluent-compatible Schema Registry asked for schema ids the codec does not know
    (Rubin's packets); ``url`` null = off. Basic-auth password: env
    ULENS_SCHEMA_REGISTRY_PASSWORD only."""
    url: Optional[str] = None
    basic_auth_user: Optional[str] = None
    ssl_ca_location: Optional[str] = None
    timeout_s: float = field(default=10.0, metadata=rng(0.1, 600.0))

    def __post_init__(self):
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"kafka.schema_registry.url must start with http:// or https://, "
                              f"got {mask_url(self.url)!r}")
        if self.url is not None and "@" in self.url.split("//", 1)[-1].split("/", 1)[0]:
            raise ConfigError("kafka.schema_registry.url must not carry credentials; set "
                              "basic_auth_user and env ULENS_SCHEMA_REGISTRY_PASSWORD instead")


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "auto"
    security_protocol: str = field(default="PLAINTEXT", metadata=rng(choices=SECURITY_PROTOCOLS))
    sasl_mechanism: Optional[str] = field(default=None, metadata=rng(choices=SASL_MECHANISMS))
    sasl_username: Optional[str] = None
    ssl_ca_location: Optional[str] = None
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    topics: Topics = Topics()
    partitions: Partitions = Partitions()

    def client_config(self) -> dict:
        """librdkafka settings shared by producers, consumers and admin clients.

        The SASL password is read from the environment (ULENS_KAFKA_SASL_PASSWORD) here,
        never from a file.
        """
        return kafka_client_config(self.bootstrap_servers, self.security_protocol,
                                   self.sasl_mechanism, self.sasl_username, self.ssl_ca_location,
                                   "ULENS_KAFKA_SASL_PASSWORD")


@dataclass(frozen=True)
class RedisSettings:
    url: str = "auto"
    key_prefix: str = "ulens"
    event_ttl_s: int = field(default=31_536_000, metadata=rng(1, None))
    trigger_ttl_s: int = field(default=94_608_000, metadata=rng(1, None))
    max_points: int = field(default=2000, metadata=rng(16, 1_000_000))
    ssl_ca_certs: Optional[str] = None
    socket_timeout_s: float = field(default=5.0, metadata=rng(0.1, 3600.0))
    # Redis Cluster (redis-py's RedisCluster, hash-tagged keys: broker.state.keys)
    cluster: bool = False

    def client_kwargs(self) -> dict:
        """Arguments for ``redis.Redis.from_url``; the password from the environment only."""
        kw: dict[str, Any] = {}
        password = os.environ.get("ULENS_REDIS_PASSWORD")
        if password:
            kw["password"] = password
        if self.url.startswith("rediss://") and self.ssl_ca_certs:
            kw["ssl_ca_certs"] = self.ssl_ca_certs
        # a stalled Redis (SIGSTOP, a black-holed network) raises TimeoutError after this
        # instead of blocking forever: the consumer's retry loop takes it from there
        kw["socket_timeout"] = kw["socket_connect_timeout"] = self.socket_timeout_s
        return kw


@dataclass(frozen=True)
class ServicesSettings:
    state_dir: str = "~/.local/state/ulens"
    cache_dir: str = "~/.cache/ulens"
    kafka_version: str = "4.1.1"
    kafka_port: int = field(default=9092, metadata=rng(1, 65535))
    kafka_controller_port: int = field(default=9093, metadata=rng(1, 65535))
    kafka_heap_mb: int = field(default=768, metadata=rng(128, 65536))
    redis_port: int = field(default=6379, metadata=rng(1, 65535))
    redis_appendfsync: str = field(default="everysec", metadata=rng(choices=("always", "everysec", "off")))
    start_timeout_s: float = field(default=90.0, metadata=rng(1, 3600))
    # `ulens services up --cluster` (config/default.yaml): base ports, heap, replicas per primary
    cluster_kafka_port: int = field(default=19192, metadata=rng(1, 65530))
    cluster_kafka_heap_mb: int = field(default=512, metadata=rng(128, 65536))
    cluster_redis_port: int = field(default=17001, metadata=rng(1, 55530))
    cluster_redis_replicas: int = field(default=1, metadata=rng(0, 1))
    cluster_node_timeout_ms: int = field(default=3000, metadata=rng(500, 600_000))

    @property
    def state_path(self) -> Path:
        return Path(os.path.expanduser(self.state_dir))

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))

    @property
    def endpoints_file(self) -> Path:
        """Where `ulens services up` records the addresses it listens on."""
        return self.state_path / "endpoints.json"

    @property
    def cluster_state_path(self) -> Path:
        """Data, logs and pids of `ulens services up --cluster`."""
        return self.state_path / "cluster"

    @property
    def cluster_endpoints_file(self) -> Path:
        """Where `ulens services up --cluster` records the addresses it listens on."""
        return self.cluster_state_path / "endpoints.json"

    def cluster_kafka_ports(self) -> list[int]:
        return [self.cluster_kafka_port + i for i in range(3)]

    def cluster_controller_ports(self) -> list[int]:
        return [self.cluster_kafka_port + 3 + i for i in range(3)]

    def cluster_redis_ports(self) -> list[int]:
        """The primaries first, then their replicas (``redis-cli --cluster create`` order)."""
        return [self.cluster_redis_port + i for i in range(3 * (1 + self.cluster_redis_replicas))]


@dataclass(frozen=True)
class ModelSettings:
    path: str = "models/tdcnn-lsst"

    @property
    def resolved(self) -> Path:
        p = Path(os.path.expanduser(self.path))
        return p if p.is_absolute() else REPO_ROOT / p


@dataclass(frozen=True)
class PsplFitSettings:
    """The classical rule (``consumer.rule: pspl-fit | both``): see ``training.psplfit``."""
    threshold: float = field(default=19.9, metadata=rng(1.0, 1e9))
    min_points: int = field(default=12, metadata=rng(8, 100_000))
    window_min: int = field(default=2, metadata=rng(1, 256))
    window_max: int = field(default=32, metadata=rng(1, 256))
    active_sigma: float = field(default=1.5, metadata=rng(0.0, 1000.0))
    event_dchi2: float = field(default=50.0, metadata=rng(0.0, 1e9))
    robust_c: float = field(default=2.0, metadata=rng(0.1, 100.0))
    fs_max: float = field(default=1.25, metadata=rng(1.0, 100.0))
    steps_per_point: int = field(default=1, metadata=rng(1, 10))
    refit_level: float = field(default=10.0, metadata=rng(1.0, 1e9))
    refit_cooldown: int = field(default=4, metadata=rng(1, 100_000))
    restart_growth: float = field(default=1.25, metadata=rng(1.01, 100.0))
    restart_keep: int = field(default=3, metadata=rng(1, 64))
    restart_iter: int = field(default=8, metadata=rng(1, 100))

    def __post_init__(self):
        if self.window_min > self.window_max:
            raise ConfigError(f"consumer.pspl_fit.window_min = {self.window_min} must be <= "
                              f"window_max = {self.window_max}")
        if self.threshold < self.refit_level:
            raise ConfigError(f"consumer.pspl_fit.threshold = {self.threshold} must be >= "
                              f"refit_level = {self.refit_level} (only refit-confirmed deviations fire)")


RULES = ("tdcnn", "pspl-fit", "both")


@dataclass(frozen=True)
class ConsumerSettings:
    group: str = "ulens-broker"
    group_prefix_user: bool = False
    batch_size: int = field(default=2000, metadata=rng(1, 1_000_000))
    poll_timeout_s: float = field(default=0.5, metadata=rng(0.0, 60.0))
    rule: str = field(default="pspl-fit", metadata=rng(choices=RULES))
    threshold: Optional[float] = field(default=None, metadata=rng(0.0, 1.0))
    min_points: int = field(default=10, metadata=rng(1, 100_000))
    device: str = field(default="auto", metadata=rng(choices=("auto", "cpu", "cuda")))
    torch_threads: int = field(default=1, metadata=rng(1, 256))
    log_interval_s: float = field(default=5.0, metadata=rng(0.1, 3600))
    metrics_port: Optional[int] = field(default=None, metadata=rng(1, 65535))
    metrics_host: str = "127.0.0.1"
    session_timeout_s: float = field(default=45.0, metadata=rng(1.0, 3600.0))
    max_poll_interval_s: float = field(default=300.0, metadata=rng(1.0, 86_400.0))
    rejoin_after_s: Optional[float] = field(default=None, metadata=rng(1.0, 86_400.0))
    retry_for_s: float = field(default=600.0, metadata=rng(0.0, 86_400.0))
    future_margin_s: Optional[float] = field(default=3600.0, metadata=rng(0.0, None))
    flood_window: int = field(default=1000, metadata=rng(0, 10_000_000))
    flood_share: float = field(default=0.5, metadata=rng(0.0, 1.0))
    pspl_fit: PsplFitSettings = PsplFitSettings()

    def __post_init__(self):
        if self.max_poll_interval_s < self.session_timeout_s:
            raise ConfigError(f"consumer.max_poll_interval_s = {self.max_poll_interval_s:g} must be >= "
                              f"session_timeout_s = {self.session_timeout_s:g} (librdkafka refuses less)")
        if self.rejoin_after_s is not None and self.rejoin_after_s < self.session_timeout_s:
            raise ConfigError(f"consumer.rejoin_after_s = {self.rejoin_after_s:g} must be >= "
                              f"session_timeout_s = {self.session_timeout_s:g} (a rebalance takes that long)")

    @property
    def rejoin_after(self) -> float:
        """Seconds without any assignment after the group took this member's partitions
        before the consumer joins again with a new client (``rejoin_after_s``; default
        max_poll_interval_s + session_timeout_s, the longest a rebalance may legitimately
        take: every member has max.poll.interval to rejoin)."""
        return self.rejoin_after_s if self.rejoin_after_s is not None else \
            self.max_poll_interval_s + self.session_timeout_s

    @property
    def rules(self) -> tuple[str, ...]:
        """The decision rules this consumer runs: ``both`` = both, TD-CNN first."""
        return ("tdcnn", "pspl-fit") if self.rule == "both" else (self.rule,)


@dataclass(frozen=True)
class RekeySource:
    """The cluster ``ulens rekey`` reads from (Rubin's): its own address and security.
    ``bootstrap_servers`` null = our own cluster, with the ``kafka`` section's settings."""
    bootstrap_servers: Optional[str] = None
    security_protocol: str = field(default="PLAINTEXT", metadata=rng(choices=SECURITY_PROTOCOLS))
    sasl_mechanism: Optional[str] = field(default=None, metadata=rng(choices=SASL_MECHANISMS))
    sasl_username: Optional[str] = None
    ssl_ca_location: Optional[str] = None


@dataclass(frozen=True)
class RekeySettings:
    """``ulens rekey``: the unkeyed source stream re-produced to ``kafka.topics.alerts``
    keyed by diaObjectId."""
    topic: str = "alerts-simulated"
    group: str = "ulens-rekey"
    group_prefix_user: bool = False
    batch_size: int = field(default=2000, metadata=rng(1, 1_000_000))
    poll_timeout_s: float = field(default=0.5, metadata=rng(0.0, 60.0))
    retry_for_s: float = field(default=600.0, metadata=rng(0.0, 86_400.0))
    source: RekeySource = RekeySource()


@dataclass(frozen=True)
class ReplaySettings:
    speed: Union[float, str] = "max"
    rate: Optional[float] = field(default=None, metadata=rng(0.001, None))
    start_mjd: float = field(default=57000.0, metadata=rng(0.0, 100_000.0))
    history_points: int = field(default=0, metadata=rng(0, 10_000))
    detections_only: bool = False
    snr_threshold: float = field(default=5.0, metadata=rng(0.0, None))
    publish_truth: bool = False


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    services: ServicesSettings = ServicesSettings()
    model: ModelSettings = ModelSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    rekey: RekeySettings = RekeySettings()
    replay: ReplaySettings = ReplaySettings()
    sources: tuple = ()

    def consumer_group(self, group: Optional[str] = None) -> str:
        """The broker's group id: ``group`` or ``consumer.group``, prefixed with
        ``kafka.sasl_username`` when ``consumer.group_prefix_user``."""
        g = group or self.consumer.group
        return user_prefixed(g, self.kafka.sasl_username) if self.consumer.group_prefix_user else g

    def rekey_source_config(self) -> dict:
        """librdkafka connection settings of the cluster ``ulens rekey`` reads from; the
        password of a SASL source: env ULENS_REKEY_SASL_PASSWORD only."""
        src = self.rekey.source
        if src.bootstrap_servers is None:
            return self.kafka.client_config()
        return kafka_client_config(src.bootstrap_servers, src.security_protocol, src.sasl_mechanism,
                                   src.sasl_username, src.ssl_ca_location,
                                   "ULENS_REKEY_SASL_PASSWORD", where="rekey.source")

    def rekey_group(self, group: Optional[str] = None) -> str:
        """The rekey stage's group id on the source cluster (prefixed with the source's
        user name when ``rekey.group_prefix_user``)."""
        g = group or self.rekey.group
        if not self.rekey.group_prefix_user:
            return g
        src = self.rekey.source
        if src.bootstrap_servers is None:
            return user_prefixed(g, self.kafka.sasl_username)
        return user_prefixed(g, src.sasl_username, where="rekey.source")

    def replace(self, **sections) -> "Settings":
        """A copy with some sections' fields changed: ``s.replace(consumer={"group": "g"})``."""
        changed = {name: dataclasses.replace(getattr(self, name), **vals)
                   for name, vals in sections.items()}
        return dataclasses.replace(self, **changed)


def _check_value(key: str, tp: Any, value: Any, meta: dict, src: str) -> Any:
    """Validate one leaf value against its annotation and range; return it (coerced)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        if key.endswith(".speed") and isinstance(value, str):
            if value != "max":
                raise ConfigError(f"{src}: {key} must be a positive number or 'max', got {value!r}")
            return value
        tp = next(a for a in args if a is not type(None) and a is not str) \
            if any(a not in (type(None), str) for a in args) else str
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {key} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: {key} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: {key} must be a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if value is False and "off" in (meta.get("choices") or ()):
            value = "off"       # YAML 1.1 reads an unquoted off as false
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {key} must be a string, got {value!r}")
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{src}: {key} must be one of {list(choices)}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{src}: {key} = {value!r} is out of range "
                              f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
    if key.endswith(".speed") and isinstance(value, float) and value <= 0:
        raise ConfigError(f"{src}: {key} must be positive, got {value!r}")
    return value


def _dict_of_dataclass(tp) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1])


def build(cls, data: Any, src: str):
    """A frozen dataclass ``cls`` from a mapping, as strictly as the configuration: unknown
    keys, wrong types and out-of-range values (field metadata ``_rng``) raise ConfigError
    naming the key and ``src``; ``dict[str, Dataclass]`` fields are mappings of those. For
    other parts' data files (the survey profiles)."""
    return _build(cls, data, "", src, cls())


def read_yaml(path) -> dict:
    """A YAML mapping from ``path`` (ConfigError naming the file when it cannot be read)."""
    return _read_yaml(Path(path))


def _build(cls, data: Any, prefix: str, src: str, base):
    """Build dataclass ``cls`` from mapping ``data`` over instance ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: {prefix or 'the file'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "sources"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{src}: unknown key {where}{unknown[0]} "
                          f"(known: {', '.join(sorted(fields))})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        current = getattr(base, name)
        if name not in data:
            values[name] = current
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], data[name], key, src, current)
        elif _dict_of_dataclass(hints[name]):
            item = typing.get_args(hints[name])[1]
            if not isinstance(data[name], dict) or not data[name]:
                raise ConfigError(f"{src}: {key} must be a non-empty mapping of names to settings")
            values[name] = {str(k): _build(item, v, f"{key}.{k}", src, item())
                            for k, v in data[name].items()}
        else:
            values[name] = _check_value(key, hints[name], data[name], dict(f.metadata), src)
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as exc:   # a cross-field check (__post_init__) of this section
        raise ConfigError(f"{src}: {exc}") from None


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return data if data is not None else {}


def _recorded_endpoints(services: ServicesSettings, path: Optional[Path] = None) -> dict:
    try:
        return json.loads((path or services.endpoints_file).read_text())
    except (OSError, ValueError):
        return {}


def load(path: Optional[os.PathLike | str] = None, *, env: Optional[dict] = None) -> Settings:
    """Load the defaults, merge ``path`` (or env ULENS_CONFIG) over them, apply env overrides."""
    env = os.environ if env is None else env
    default_path = Path(str(resources.files("config").joinpath(DEFAULT_FILE)))
    settings = _build(Settings, _read_yaml(default_path), "", str(default_path), Settings())
    sources = [str(default_path)]
    user = path or env.get("ULENS_CONFIG")
    if user:
        user_path = Path(user)
        settings = _build(Settings, _read_yaml(user_path), "", str(user_path), settings)
        sources.append(str(user_path))

    kafka_bs = env.get("ULENS_KAFKA_BOOTSTRAP") or settings.kafka.bootstrap_servers
    if "@" in settings.redis.url.split("//", 1)[-1].split("/", 1)[0]:
        # A password in a URL in a file is a secret in a file: only the environment may
        # carry one (ULENS_REDIS_PASSWORD, or a full URL in ULENS_REDIS_URL).
        raise ConfigError(f"{sources[-1]}: redis.url must not "
                          "carry credentials; set env ULENS_REDIS_PASSWORD instead")
    redis_url = env.get("ULENS_REDIS_URL") or settings.redis.url
    if "auto" in (kafka_bs, redis_url):
        svc = settings.services
        if settings.redis.cluster:      # what `ulens services up --cluster` started
            recorded = _recorded_endpoints(svc, svc.cluster_endpoints_file)
            default_bs = ",".join(f"127.0.0.1:{p}" for p in svc.cluster_kafka_ports())
            default_url = f"redis://127.0.0.1:{svc.cluster_redis_port}/0"
        else:
            recorded = _recorded_endpoints(svc, svc.endpoints_file)
            default_bs = f"127.0.0.1:{svc.kafka_port}"
            default_url = f"redis://127.0.0.1:{svc.redis_port}/0"
        if kafka_bs == "auto":
            kafka_bs = recorded.get("kafka_bootstrap") or default_bs
        if redis_url == "auto":
            redis_url = recorded.get("redis_url") or default_url
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url must start with redis://, rediss:// or unix://, "
                          f"got {mask_url(redis_url)!r}")
    return dataclasses.replace(
        settings,
        kafka=dataclasses.replace(settings.kafka, bootstrap_servers=kafka_bs),
        redis=dataclasses.replace(settings.redis, url=redis_url),
        sources=tuple(sources))
