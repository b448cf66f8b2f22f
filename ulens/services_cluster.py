"""`ulens services up|down|status --cluster`: three Kafka brokers and a Redis Cluster on loopback.

Beside the single-node services (which keep their ports and state, untouched), from the
same Kafka jars and the same ``redis-server``:

* Kafka: three nodes, each broker and KRaft controller (a three-voter quorum), brokers on
  ``services.cluster_kafka_port`` .. +2, controllers on +3 .. +5; replication factor 3 and
  ``min.insync.replicas`` 2 for every topic (the configured ones are created so), so one
  broker may die with no acknowledged message lost and producers with ``acks=all`` going on;
  unclean leader election off.
* Redis: three primaries on ``services.cluster_redis_port`` .. +2 and, with
  ``services.cluster_redis_replicas: 1`` (the default), a replica of each on +3 .. +5
  (``redis-cli --cluster create``). Every node runs with AOF (``services.redis_appendfsync``)
  and ``maxmemory-policy noeviction``, like the single Redis. Why replicas: without them a
  killed primary's slots are gone until it restarts from its AOF (nothing lost, but every
  batch touching those slots waits); with them its replica takes over within
  ``services.cluster_node_timeout_ms`` and the old primary, started again, follows it. The
  broker waits for a replica after its writes (``broker.state.store.wait_for_replicas``), so
  a failover does not lose what it acknowledged.

Data, logs, pid files and the recorded addresses live under ``<services.state_dir>/cluster``.
`up` is idempotent: it starts what does not run (a node killed is started again and rejoins
from its own state), forms the Redis Cluster once, and waits until every node answers.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import config as cfg
from ulens import services as svc
from ulens.services import HOST, LOG4J2, ServiceError

KAFKA_MARKER = "kafka.Kafka"
REDIS_MARKER = "redis-server"


class ClusterPaths:
    def __init__(self, s: cfg.ServicesSettings):
        self.root = s.cluster_state_path

    def kafka_dir(self, i: int) -> Path:
        return self.root / f"kafka-{i}"

    def redis_dir(self, port: int) -> Path:
        return self.root / f"redis-{port}"

    def logs(self) -> Path:
        return self.root / "logs"

    def pid(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def kafka_log(self, i: int) -> Path:
        return self.logs() / f"kafka-{i}.log"

    def redis_log(self, port: int) -> Path:
        return self.logs() / f"redis-{port}.log"


def kafka_names() -> list[str]:
    return [f"kafka-{i}" for i in (1, 2, 3)]


def bootstrap(s: cfg.ServicesSettings) -> str:
    return ",".join(f"{HOST}:{p}" for p in s.cluster_kafka_ports())


def redis_url(s: cfg.ServicesSettings) -> str:
    """Every node as a startup node (any one that answers will do)."""
    return "redis://" + ",".join(f"{HOST}:{p}" for p in s.cluster_redis_ports()) + "/0"


# --- Kafka -----------------------------------------------------------------------------

def kafka_properties(s: cfg.ServicesSettings, i: int, data: Path) -> str:
    kp, cp = s.cluster_kafka_ports()[i - 1], s.cluster_controller_ports()[i - 1]
    voters = ",".join(f"{n}@{HOST}:{p}" for n, p in zip((1, 2, 3), s.cluster_controller_ports()))
    return "\n".join([
        "process.roles=broker,controller",
        f"node.id={i}",
        f"controller.quorum.voters={voters}",
        f"listeners=PLAINTEXT://{HOST}:{kp},CONTROLLER://{HOST}:{cp}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{kp}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=1",
        # every topic on all three brokers; a write is acknowledged (acks=all) once two have it
        "default.replication.factor=3",
        "min.insync.replicas=2",
        "unclean.leader.election.enable=false",
        "offsets.topic.replication.factor=3",
        "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=3",
        "transaction.state.log.min.isr=2",
        "share.coordinator.state.topic.replication.factor=3",
        "share.coordinator.state.topic.min.isr=2",
        "group.initial.rebalance.delay.ms=0",
        # a killed broker is fenced (its partitions led elsewhere) after 4 s, not 9
        "broker.session.timeout.ms=4000",
        "broker.heartbeat.interval.ms=1000",
        "auto.create.topics.enable=true",
        "log.retention.hours=168",
        "message.max.bytes=2097152",
        "",
    ])


def _start_kafka_node(s: cfg.ServicesSettings, p: ClusterPaths, i: int, cluster_id: str,
                      libs: Path, java: str) -> tuple[int, bool]:
    name = f"kafka-{i}"
    pid = svc._read_pid(p.pid(name))
    if svc._alive(pid, KAFKA_MARKER):
        return pid, False
    kp, cp = s.cluster_kafka_ports()[i - 1], s.cluster_controller_ports()[i - 1]
    svc._check_port_free(kp, f"Kafka broker {i} of the cluster (services.cluster_kafka_port + {i - 1})", pid)
    svc._check_port_free(cp, f"Kafka controller {i} of the cluster (services.cluster_kafka_port + {i + 2})", pid)
    kdir = p.kafka_dir(i)
    data = kdir / "data"
    kdir.mkdir(parents=True, exist_ok=True)
    props = kdir / "server.properties"
    props.write_text(kafka_properties(s, i, data))
    (kdir / "log4j2.yaml").write_text(LOG4J2)
    cp_arg = f"{libs}/*"
    if not (data / "meta.properties").exists():
        proc = subprocess.run([java, "-cp", cp_arg, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                               "-c", str(props), "--ignore-formatted"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"formatting the storage of Kafka node {i} ({data}) failed:\n"
                               + (proc.stdout + proc.stderr)[-2000:])
    heap = s.cluster_kafka_heap_mb
    cmd = [java, f"-Xmx{heap}m", f"-Xms{min(heap, 256)}m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={kdir / 'log4j2.yaml'}", "-cp", cp_arg, KAFKA_MARKER, str(props)]
    return svc._spawn(cmd, p.kafka_log(i), p.pid(name), kdir), True


def _kafka_brokers(boot: str, timeout: float = 3.0) -> int:
    """How many brokers the cluster's metadata lists (0: none answers)."""
    from confluent_kafka.admin import AdminClient
    try:
        return len(AdminClient({"bootstrap.servers": boot}).list_topics(timeout=timeout).brokers)
    except Exception:
        return 0


# --- Redis -----------------------------------------------------------------------------

def redis_conf(s: cfg.ServicesSettings, port: int, rdir: Path) -> str:
    """A cluster node's redis.conf: the single Redis's persistence and eviction policy,
    cluster mode on."""
    aof = s.redis_appendfsync != "off"
    lines = [f"bind {HOST}", f"port {port}", "protected-mode yes", f"dir {rdir}", "daemonize no",
             "save 300 1 60 1000", "dbfilename dump.rdb", f"appendonly {'yes' if aof else 'no'}"]
    if aof:
        lines += [f"appendfsync {s.redis_appendfsync}", "aof-use-rdb-preamble yes",
                  "no-appendfsync-on-rewrite no"]
    lines += ["maxmemory-policy noeviction",
              "cluster-enabled yes", "cluster-config-file nodes.conf",
              f"cluster-node-timeout {s.cluster_node_timeout_ms}",
              # a replica that lost touch with its primary for a while may still take over:
              # the broker's WAIT makes sure it has what was acknowledged
              "cluster-replica-validity-factor 0",
              "cluster-require-full-coverage yes"]
    return "\n".join(lines + [""])


def _start_redis_node(s: cfg.ServicesSettings, p: ClusterPaths, port: int, exe: str) -> tuple[int, bool]:
    name = f"redis-{port}"
    pid = svc._read_pid(p.pid(name))
    if svc._alive(pid, REDIS_MARKER):
        return pid, False
    svc._check_port_free(port, f"Redis Cluster node {name}", pid)
    svc._check_port_free(port + 10000, f"the cluster bus of Redis node {name} (its port + 10000)", pid)
    rdir = p.redis_dir(port)
    rdir.mkdir(parents=True, exist_ok=True)
    conf = rdir / "redis.conf"
    conf.write_text(redis_conf(s, port, rdir))
    return svc._spawn([exe, str(conf)], p.redis_log(port), p.pid(name), rdir), True


def _cluster_info(port: int) -> dict:
    try:
        raw = svc._redis(port, timeout=2).execute_command("CLUSTER INFO")
    except Exception:
        return {}
    if isinstance(raw, dict):       # redis-py parses the reply
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)


def _role(port: int) -> str | None:
    try:
        return str(svc._redis(port, timeout=2).info("replication").get("role"))
    except Exception:
        return None


def _form_cluster(s: cfg.ServicesSettings, p: ClusterPaths) -> bool:
    """``redis-cli --cluster create`` once; False when the nodes already form the cluster."""
    ports = s.cluster_redis_ports()
    infos = {port: _cluster_info(port) for port in ports}
    if any(int(i.get("cluster_slots_assigned", 0)) == 16384 for i in infos.values()):
        return False
    if any(int(i.get("cluster_known_nodes", 1)) > 1 or int(i.get("cluster_slots_assigned", 0)) for i in infos.values()):
        raise ServiceError(f"the Redis nodes under {p.root} form part of a cluster only (some "
                           "know each other or hold slots, no slot map is complete): run "
                           "`ulens services down --cluster --wipe` and `up --cluster` again")
    cli = shutil.which("redis-cli")
    if not cli:
        raise ServiceError("redis-cli is not installed (apt-get install redis-tools): it forms the cluster")
    cmd = [cli, "--cluster", "create", *[f"{HOST}:{port}" for port in ports],
           "--cluster-replicas", str(s.cluster_redis_replicas), "--cluster-yes"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    (p.logs() / "redis-cluster-create.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise ServiceError(f"`{' '.join(cmd)}` failed:\n" + (proc.stdout + proc.stderr)[-2000:])
    return True


def _cluster_ok(ports: list[int]) -> bool:
    return all(_cluster_info(port).get("cluster_state") == "ok" for port in ports)


# --- public API ------------------------------------------------------------------------

def up(settings: cfg.Settings, quiet: bool = False) -> dict:
    """Start every node that does not run, form the Redis Cluster once, wait until all
    answer, create the configured topics (replication factor 3), record the addresses."""
    s = settings.services
    p = ClusterPaths(s)
    p.root.mkdir(parents=True, exist_ok=True)
    java = shutil.which("java")
    if not java:
        raise ServiceError("java is not installed: Apache Kafka needs a JDK (17 or newer)")
    exe = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not exe:
        raise ServiceError("redis-server is not installed (apt-get install redis-server)")
    libs = svc.fetch_kafka(s, quiet=quiet)
    id_file = p.root / "kafka-cluster.id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:22])
    cluster_id = id_file.read_text().strip()
    started: dict[str, tuple[int, bool]] = {}
    for port in s.cluster_redis_ports():
        started[f"redis-{port}"] = _start_redis_node(s, p, port, exe)
    for i in (1, 2, 3):
        started[f"kafka-{i}"] = _start_kafka_node(s, p, i, cluster_id, libs, java)
    for port in s.cluster_redis_ports():
        pid = started[f"redis-{port}"][0]
        svc._wait(lambda port=port: svc._redis_answers(port), s.start_timeout_s,
                  f"redis-server on port {port} (cluster node)", pid, REDIS_MARKER, p.redis_log(port))
    formed = _form_cluster(s, p)
    deadline = time.monotonic() + s.start_timeout_s
    while not _cluster_ok(s.cluster_redis_ports()):
        if time.monotonic() > deadline:
            bad = [port for port in s.cluster_redis_ports()
                   if _cluster_info(port).get("cluster_state") != "ok"]
            raise ServiceError(f"the Redis Cluster is not ok on port(s) {bad} after "
                               f"{s.start_timeout_s:.0f} s; see {p.logs()}")
        time.sleep(0.25)
    boot = bootstrap(s)
    for i in (1, 2, 3):
        port = s.cluster_kafka_ports()[i - 1]
        svc._wait(lambda port=port: svc._port_open(port), s.start_timeout_s,
                  f"Kafka broker {i} (port {port})", started[f"kafka-{i}"][0], KAFKA_MARKER, p.kafka_log(i))
    svc._wait(lambda: _kafka_brokers(boot) == 3, s.start_timeout_s, "the three Kafka brokers (all in the metadata)",
              started["kafka-1"][0], KAFKA_MARKER, p.kafka_log(1))
    endpoints = {"kafka_bootstrap": boot, "redis_url": redis_url(s),
                 "pids": {n: pid for n, (pid, _) in started.items()}, "logs": str(p.logs())}
    s.cluster_endpoints_file.write_text(json.dumps(endpoints, indent=2))
    (p.root / "config.yaml").write_text(
        "# `ulens ... --config` this file: the broker on the local cluster (auto addresses)\n"
        "redis:\n  cluster: true\n")
    created = svc.ensure_topics(settings.replace(kafka={"bootstrap_servers": boot, "security_protocol": "PLAINTEXT"}),
                                replication_factor=3)
    if not quiet:
        for name, (pid, new) in started.items():
            print(f"{name:<12} {'started' if new else 'already running'}  pid {pid}")
        if formed:
            print(f"redis cluster formed: 3 primaries, {s.cluster_redis_replicas} replica(s) each")
        print(f"kafka  {boot}\nredis  {redis_url(s)}")
        if created:
            print(f"topics created (replication factor 3): {', '.join(created)}")
        print(f"a broker on it: --config {p.root / 'config.yaml'} (redis.cluster: true, auto addresses)")
    return {"started": [n for n, (_, new) in started.items() if new], "formed": formed, **endpoints}


def pids(settings: cfg.Settings) -> dict[str, int | None]:
    """{node name: pid from its pid file} (``kafka-1``.., ``redis-<port>``)."""
    s = settings.services
    p = ClusterPaths(s)
    names = kafka_names() + [f"redis-{port}" for port in s.cluster_redis_ports()]
    return {n: svc._read_pid(p.pid(n)) for n in names}


def down(settings: cfg.Settings, wipe: bool = False, quiet: bool = False) -> list[str]:
    """Stop every cluster process `up --cluster` started (by pid); ``wipe``: delete its state."""
    s = settings.services
    p = ClusterPaths(s)
    stopped = []
    for name, pid in pids(settings).items():
        marker = KAFKA_MARKER if name.startswith("kafka") else REDIS_MARKER
        if svc._stop(pid, marker):
            stopped.append(name)
        p.pid(name).unlink(missing_ok=True)
        if not quiet:
            print(f"{name:<12} {'stopped' if name in stopped else 'was not running'}")
    s.cluster_endpoints_file.unlink(missing_ok=True)
    if wipe:
        shutil.rmtree(p.root, ignore_errors=True)
        if not quiet:
            print(f"wiped {p.root}")
    return stopped


def status(settings: cfg.Settings) -> dict:
    s = settings.services
    p = ClusterPaths(s)
    ps = pids(settings)
    kafka = {}
    for i, port in zip((1, 2, 3), s.cluster_kafka_ports()):
        pid = ps[f"kafka-{i}"]
        kafka[f"kafka-{i}"] = {"running": svc._alive(pid, KAFKA_MARKER), "pid": pid,
                               "address": f"{HOST}:{port}", "answering": svc._port_open(port),
                               "log": str(p.kafka_log(i))}
    redis = {}
    for port in s.cluster_redis_ports():
        pid = ps[f"redis-{port}"]
        info = _cluster_info(port)
        redis[f"redis-{port}"] = {"running": svc._alive(pid, REDIS_MARKER), "pid": pid,
                                  "address": f"{HOST}:{port}", "answering": bool(info),
                                  "role": _role(port) if info else None,
                                  "cluster_state": info.get("cluster_state"),
                                  "log": str(p.redis_log(port))}
    boot = bootstrap(s)
    brokers = _kafka_brokers(boot) if any(k["answering"] for k in kafka.values()) else 0
    return {"kafka": kafka, "redis": redis, "kafka_brokers_in_metadata": brokers,
            "kafka_bootstrap": boot, "redis_url": redis_url(s), "state": str(p.root),
            "healthy": brokers == 3 and all(r["cluster_state"] == "ok" for r in redis.values())}


def print_status(st: dict) -> None:
    for name, x in {**st["kafka"], **st["redis"]}.items():
        state = "running" if x["running"] else "stopped"
        ans = "answering" if x["answering"] else "not answering"
        extra = f", {x['role']}, cluster {x['cluster_state']}" if x.get("role") else ""
        print(f"{name:<12} {state:<8} pid {x['pid'] or '-':<8} {x['address']:<16} {ans}{extra}")
    print(f"kafka brokers in the metadata: {st['kafka_brokers_in_metadata']} of 3")
    print(f"kafka {st['kafka_bootstrap']}\nredis {st['redis_url']}\nstate, logs: {st['state']}")
