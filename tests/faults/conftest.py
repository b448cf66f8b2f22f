"""Fault-injection tier: helpers and the private Kafka + Redis.

Tests that stop, restart or kill services never touch the shared Kafka (9092) and Redis
(6379): ``private_services`` starts an Apache Kafka and a redis-server of their own on
free loopback ports with a private state dir (``ulens.services.up`` with a temporary
config, as ``tests/integration/test_services_lifecycle.py`` does) and wipes them at the
end. Consumers run as real ``ulens consume`` subprocesses (killable with SIGKILL);
their logs go to files so a chatty process never blocks on a pipe.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml

import config as cfg
from tests.helpers import free_ports

REPO = Path(__file__).resolve().parents[2]

# A warm spare ``ulens consume``: it imports the broker (torch...), touches
# FAULTS_GO_FILE.ready, and waits for FAULTS_GO_FILE before it starts consuming, so a
# restart after a SIGKILL costs no Python start-up. Everything else is the command.
_SPARE = (
    "import os, sys, time\n"
    "go = os.environ['FAULTS_GO_FILE']\n"
    "import training.artifact, ulens.cli, broker.cli_consume\n"
    "open(go + '.ready', 'w').close()\n"
    "while not os.path.exists(go):\n"
    "    time.sleep(0.02)\n"
    "from ulens.cli import main\n"
    "sys.exit(main(['consume'] + sys.argv[1:]))\n")




def clean_env() -> dict:
    """The environment without ULENS_* (nothing points a subprocess at another cluster)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ULENS_")}
    env["PYTHONUNBUFFERED"] = "1"
    # one torch thread per consumer: Kafka, Redis, the replay and the test share the cores
    env["OMP_NUM_THREADS"] = "1"
    return env


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Private:
    """The private services: their config file, settings, ports and state dir."""
    config_file: Path
    settings: cfg.Settings
    base: dict            # the config file's content (addresses and services section)
    kafka_port: int
    controller_port: int
    redis_port: int
    state_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def redis(self, **kw):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.redis_port, **kw)

    def pid(self, name: str) -> Optional[int]:
        try:
            return int((self.state_dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def config(self, path: Path, **sections) -> Path:
        """A config file for a consumer/replay: the private addresses + ``sections``."""
        return write_config(path, merge(self.base, sections))


@pytest.fixture(scope="module")
def private_services(tmp_path_factory):
    """A Kafka and a Redis of this module alone (free ports, private state dir), wiped after.

    Skipped when ULENS_KAFKA_BOOTSTRAP / ULENS_REDIS_URL point the suite at your own cluster:
    then the suite starts nothing (README), and these tests need services they may kill."""
    from ulens import services as svc

    if os.environ.get("ULENS_KAFKA_BOOTSTRAP") or os.environ.get("ULENS_REDIS_URL"):
        pytest.skip("ULENS_KAFKA_BOOTSTRAP/ULENS_REDIS_URL set: the suite starts no services")
    kport, cport, rport = free_ports(3)
    root = tmp_path_factory.mktemp("private-services")
    state = root / "state"
    base = {"kafka": {"bootstrap_servers": f"127.0.0.1:{kport}"},
            "redis": {"url": f"redis://127.0.0.1:{rport}/0"},
            "services": {"state_dir": str(state), "kafka_port": kport, "kafka_controller_port": cport,
                         "redis_port": rport, "kafka_heap_mb": 512},
            # the tier's capacities and figures are the TD-CNN path's; the pspl-fit rule's
            # exactly-once under crashes: tests/integration/test_consumer_guarantees.py
            "consumer": {"rule": "tdcnn"}}
    conf = write_config(root / "services.yaml", base)
    settings = cfg.load(conf, env=clean_env())
    assert settings.kafka.bootstrap_servers == f"127.0.0.1:{kport}"
    try:
        svc.up(settings, quiet=True)
        yield Private(conf, settings, base, kport, cport, rport, state)
    finally:
        svc.down(settings, wipe=True, quiet=True)


# --- consumers as subprocesses -------------------------------------------------------
LOG_LINE = re.compile(r"appended (\d+), duplicates (\d+), dead letters (\d+), triggers (\d+)")


class ConsumerProc:
    """One ``ulens consume`` process; stdout/stderr in files under ``log_dir``."""

    def __init__(self, conf: Path, topic: str, group: str, log_dir: Path, name: str, *,
                 until_idle: Optional[float] = None,
                 extra: tuple = (), env: Optional[dict] = None, spare: bool = False):
        self.env = clean_env() if env is None else dict(env)
        self.go_file = log_dir / f"{name}.go" if spare else None
        if spare:
            self.env["FAULTS_GO_FILE"] = str(self.go_file)
        self.args = ["--config", str(conf), "--topic", topic, "--group", group, "--device", "cpu",
                     *(["--until-idle", str(until_idle)] if until_idle is not None else []), *extra]
        self.out = log_dir / f"{name}.out"
        self.err = log_dir / f"{name}.err"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "ConsumerProc":
        cmd = ([sys.executable, "-c", _SPARE] if self.go_file is not None
               else [sys.executable, "-m", "ulens.cli", "consume"]) + self.args
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                         cwd=REPO, env=self.env)
        return self

    def go(self, timeout: float = 180) -> "ConsumerProc":
        """A spare: wait until it has imported the broker, then let it start consuming."""
        ready = Path(str(self.go_file) + ".ready")
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert self.alive(), f"spare consumer died: {self.log()[-3000:]}"
            assert time.monotonic() < deadline, "spare consumer not ready"
            time.sleep(0.05)
        self.go_file.touch()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """Wait until ``pattern`` (regex) appears in the log; False if the process ends first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if rx.search(self.log()):
                return True
            if not self.alive():
                return bool(rx.search(self.log()))
            time.sleep(0.1)
        return False

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill9()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"consumer did not exit within {timeout} s; log:\n{self.log()[-3000:]}")

    def summary(self) -> Optional[dict]:
        lines = [x for x in self.out.read_text().splitlines() if x.startswith("{")] if self.out.exists() else []
        return json.loads(lines[-1]) if lines else None

    def logged_counts(self) -> dict:
        """appended/duplicates/dead letters/triggers summed over the interval log lines."""
        tot = np.zeros(4, dtype=np.int64)
        for m in LOG_LINE.finditer(self.log()):
            tot += np.array([int(g) for g in m.groups()])
        return dict(zip(("appended", "duplicates", "dead_letters", "triggers"), tot.tolist()))

    def rss_kb(self) -> Optional[int]:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


# --- Kafka helpers -------------------------------------------------------------------
def kafka_conf(client) -> dict:
    """librdkafka settings from a bootstrap address or a client config (SASL/SSL included)."""
    return dict(client) if isinstance(client, dict) else {"bootstrap.servers": client}


def create_topics(bootstrap: str, names: dict[str, int]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(kafka_conf(bootstrap))
    futs = admin.create_topics([NewTopic(n, num_partitions=p, replication_factor=1)
                                for n, p in names.items()], operation_timeout=30)
    for f in futs.values():
        f.result(60)


def watermarks(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({**kafka_conf(bootstrap), "group.id": "faults-watermarks"})
    try:
        parts = c.list_topics(topic, timeout=30).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30) for p in parts}
    finally:
        c.close()


def read_all(bootstrap: str, topic: str, timeout: float = 120.0) -> list:
    """Every message now in ``topic`` (all partitions, up to the high watermarks)."""
    from confluent_kafka import Consumer, TopicPartition
    marks = watermarks(bootstrap, topic)
    want = {p: hi for p, (lo, hi) in marks.items() if hi > lo}
    if not want:
        return []
    c = Consumer({**kafka_conf(bootstrap), "group.id": "faults-reader", "enable.auto.commit": False,
                  "fetch.max.bytes": 8 << 20, "max.partition.fetch.bytes": 4 << 20})
    c.assign([TopicPartition(topic, p, marks[p][0]) for p in want])
    out, pos = [], {p: marks[p][0] for p in want}
    deadline = time.monotonic() + timeout
    try:
        while any(pos[p] < want[p] for p in want):
            assert time.monotonic() < deadline, f"{topic}: read {len(out)} messages, positions {pos} of {want}"
            for m in c.consume(num_messages=10_000, timeout=1.0):
                assert m.error() is None, m.error()
                out.append(m)
                pos[m.partition()] = m.offset() + 1
    finally:
        c.close()
    return out


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed offset per partition (-1001 = none)."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({**kafka_conf(bootstrap), "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=30).topics[topic].partitions
        return {tp.partition: tp.offset
                for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=30)}
    finally:
        c.close()


def produce(bootstrap: str, topic: str, items, extra: Optional[dict] = None) -> int:
    """items: (key, value[, headers]); waits for every delivery; returns how many."""
    from confluent_kafka import Producer
    p = Producer({**kafka_conf(bootstrap), "acks": "all", "enable.idempotence": True,
                  "linger.ms": 20, **(extra or {})})
    errors, n = [], 0
    for it in items:
        while True:
            try:
                p.produce(topic, key=it[0], value=it[1], headers=it[2] if len(it) > 2 else None,
                          on_delivery=lambda err, msg: errors.append(err) if err else None)
                break
            except BufferError:
                p.poll(0.05)
        n += 1
        if n % 1000 == 0:
            p.poll(0)
    assert p.flush(120) == 0 and not errors, errors[:3]
    return n


# --- Redis helpers -------------------------------------------------------------------
def redis_dump(client, prefix: str) -> dict[bytes, bytes]:
    return {k: client.get(k) for k in sorted(client.scan_iter(match=f"{prefix}:*", count=1000))}


def stored_events(client, prefix: str) -> dict:
    """{diaObjectId: EventView} of every event under ``prefix``."""
    from broker import state as st
    ids = [int(k.decode().rsplit(":", 1)[1]) for k in client.scan_iter(match=f"{prefix}:ev:*", count=1000)]
    return {o: st.read_event(client, prefix, o) for o in sorted(ids)}


def assert_committed_are_persisted(bootstrap: str, topic: str, group: str, client, prefix: str,
                                   alerts_by_offset: dict) -> int:
    """Every alert below the group's committed offsets has its point in Redis.

    Offsets are read first, Redis second: a consumer commits only after its Redis write,
    so a committed offset whose point is missing is a lost point. Returns how many
    committed alerts were checked.
    """
    done = committed(bootstrap, topic, group)
    events = stored_events(client, prefix)
    times = {o: set(v.points["t"].tolist()) for o, v in events.items()}
    checked, missing = 0, []
    for (p, off), (oid, t) in alerts_by_offset.items():
        if off < done.get(p, -1):
            checked += 1
            if t not in times.get(oid, ()):
                missing.append((p, off, oid, t))
    assert not missing, f"{len(missing)} committed alert(s) not in Redis, e.g. {missing[:5]}"
    return checked
