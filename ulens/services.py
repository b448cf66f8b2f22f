"""Local Apache Kafka (KRaft, one node) and Redis on loopback, without Docker
(``--cluster``: three Kafka brokers and a Redis Cluster, ``ulens.services_cluster``).

Kafka's jars are resolved from Maven Central with the installed Maven into
``services.cache_dir``; the broker runs on the installed JDK. ``redis-server``
comes from Debian's package. Everything a run writes (data, logs, pid files and
the recorded addresses) lives under ``services.state_dir``, outside the repository.
`down` stops exactly the processes `up` started, by pid.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import config as cfg

HELP = "start, stop and inspect the local Apache Kafka (KRaft) and Redis on 127.0.0.1"
HOST = "127.0.0.1"


class ServiceError(OSError):
    """A local service cannot be fetched, started or stopped; the message says why."""
    exit_code = 4      # `ulens`: services unavailable (ulens/cli.py, EXIT_CODES)


class PortInUse(ServiceError):
    pass


POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.ulens</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
"""

LOG4J2 = """Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        Pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka
        level: INFO
      - name: org.apache.kafka
        level: WARN
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
"""


@dataclass
class Paths:
    state: Path

    def kafka_dir(self) -> Path:
        return self.state / "kafka"

    def redis_dir(self) -> Path:
        return self.state / "redis"

    def logs(self) -> Path:
        return self.state / "logs"

    def pid(self, name: str) -> Path:
        return self.state / f"{name}.pid"


def _paths(s: cfg.ServicesSettings) -> Paths:
    return Paths(s.state_path)


# --- fetching Kafka ----------------------------------------------------------------

def fetch_kafka(s: cfg.ServicesSettings, quiet: bool = False) -> Path:
    """Resolve the Kafka jars from Maven Central into the cache (once); return the libs dir."""
    libs = s.cache_path / f"kafka-{s.kafka_version}" / "libs"
    if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise ServiceError("Maven (mvn) is not installed: it is needed once to fetch Apache Kafka "
                           "from Maven Central (apt-get install maven)")
    work = libs.parent
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(POM.format(version=s.kafka_version))
    tmp = work / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"fetching Apache Kafka {s.kafka_version} from Maven Central into {work} ...", flush=True)
    proc = subprocess.run([mvn, "-q", "-B", "dependency:copy-dependencies",
                           f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"],
                          cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServiceError(f"mvn could not resolve org.apache.kafka:kafka_2.13:{s.kafka_version}:\n"
                           + (proc.stdout + proc.stderr)[-2000:])
    tmp.replace(libs)
    return libs


# --- process helpers -----------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (private services: tests, benchmarks)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None, marker: str) -> bool:
    """True when ``pid`` runs and its command line contains ``marker`` (guards pid reuse)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie has exited
            return False
    except (OSError, IndexError):
        pass
    return marker in cmdline


def _check_port_free(port: int, what: str, last_pid: int | None = None) -> None:
    """PortInUse when something answers on ``port``. ``last_pid``: the process ulens ran
    there before, found not running: killed a moment ago, its other threads may still hold
    the port after its main thread shows as a zombie (20 of 30 redis-servers killed with
    SIGKILL still accepted connections then), so while it is in /proc this waits a little."""
    deadline = time.monotonic() + 5
    while _port_open(port):
        if last_pid and Path(f"/proc/{last_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        raise PortInUse(f"port {port} on {HOST} (for {what}) is already in use by a process "
                        "that ulens did not start; stop it or choose another port in the config "
                        f"(services.*_port)")


def _spawn(cmd: list[str], log: Path, pid_file: Path, cwd: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, start_new_session=True)
    # Popen returns while the kernel is still inside exec, when /proc/PID/cmdline can read
    # empty: _alive (which _wait asks) would take the new process for dead.
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                break
        except OSError:
            break
        time.sleep(0.005)
    pid_file.write_text(str(proc.pid))
    return proc.pid


def _wait(pred, timeout: float, what: str, pid: int, marker: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if not _alive(pid, marker):
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise ServiceError(f"{what} exited during start-up; last lines of {log}:\n{tail}")
        time.sleep(0.25)
    raise ServiceError(f"{what} did not answer within {timeout:.0f} s; see {log}")


# --- Kafka ---------------------------------------------------------------------------

def _kafka_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    from confluent_kafka.admin import AdminClient
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)
        return True
    except Exception:
        return False


def _start_kafka(s: cfg.ServicesSettings, p: Paths) -> tuple[int, bool]:
    pid = _read_pid(p.pid("kafka"))
    if _alive(pid, "kafka.Kafka"):
        return pid, False
    _check_port_free(s.kafka_port, "Kafka", pid)
    _check_port_free(s.kafka_controller_port, "the Kafka controller", pid)
    java = shutil.which("java")
    if not java:
        raise ServiceError("java is not installed: Apache Kafka needs a JDK (17 or newer)")
    libs = fetch_kafka(s)
    kdir = p.kafka_dir()
    data = kdir / "data"
    kdir.mkdir(parents=True, exist_ok=True)
    props = kdir / "server.properties"
    props.write_text("\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{HOST}:{s.kafka_controller_port}",
        f"listeners=PLAINTEXT://{HOST}:{s.kafka_port},CONTROLLER://{HOST}:{s.kafka_controller_port}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{s.kafka_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=1",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        "log.retention.hours=168",
        "message.max.bytes=2097152",
        "",
    ]))
    (kdir / "log4j2.yaml").write_text(LOG4J2)
    cp = f"{libs}/*"
    if not (data / "meta.properties").exists():
        cluster_id = uuid.uuid4().hex[:22]
        proc = subprocess.run([java, "-cp", cp, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                               "-c", str(props), "--ignore-formatted"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError("formatting the Kafka storage failed:\n" + (proc.stdout + proc.stderr)[-2000:])
    log = p.logs() / "kafka.log"
    cmd = [java, f"-Xmx{s.kafka_heap_mb}m", f"-Xms{min(s.kafka_heap_mb, 256)}m", "-XX:+UseG1GC",
           "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={kdir / 'log4j2.yaml'}",
           "-cp", cp, "kafka.Kafka", str(props)]
    return _spawn(cmd, log, p.pid("kafka"), kdir), True


# --- Redis ---------------------------------------------------------------------------

def _redis(port: int, timeout: float = 1.0):
    """A client of the local server that does not retry: a probe says whether it answers
    now (redis-py's default retries a refused connection with backoff for ~10 s)."""
    import redis
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=None)


def _redis_answers(port: int) -> bool:
    try:
        return bool(_redis(port).ping())
    except Exception:
        return False


# Redis 7's multi-part AOF: the manifest names the files; without it there is no AOF.
AOF_MANIFEST = "appendonlydir/appendonly.aof.manifest"


def _redis_conf(s: cfg.ServicesSettings, rdir: Path) -> str:
    """redis.conf of the local server. Persistence follows ``services.redis_appendfsync``
    (README, "Durability"): AOF with that fsync policy, or ``off`` = RDB snapshots only."""
    aof = s.redis_appendfsync != "off"
    lines = [f"bind {HOST}", f"port {s.redis_port}", "protected-mode yes", f"dir {rdir}",
             # snapshots in every mode: the only persistence with `off` (a change is saved
             # within 300 s, within 60 s under load), backups otherwise
             "daemonize no", "save 300 1 60 1000", "dbfilename dump.rdb",
             f"appendonly {'yes' if aof else 'no'}"]
    if aof:
        # no-appendfsync-on-rewrite no: `always` keeps fsyncing while a rewrite or a
        # snapshot runs (yes would make it `no` for that time)
        lines += [f"appendfsync {s.redis_appendfsync}", "aof-use-rdb-preamble yes",
                  "no-appendfsync-on-rewrite no"]
    return "\n".join(lines + ["maxmemory-policy noeviction", ""])


def _start_redis(s: cfg.ServicesSettings, p: Paths) -> tuple[int, bool]:
    pid = _read_pid(p.pid("redis"))
    if _alive(pid, "redis-server"):
        return pid, False
    _check_port_free(s.redis_port, "Redis", pid)
    exe = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not exe:
        raise ServiceError("redis-server is not installed (apt-get install redis-server)")
    rdir = p.redis_dir()
    rdir.mkdir(parents=True, exist_ok=True)
    conf = rdir / "redis.conf"
    conf.write_text(_redis_conf(s, rdir))
    # Redis loads only the file of the mode it starts in (the AOF with appendonly yes,
    # dump.rdb with no): started in AOF mode over a data dir that has only dump.rdb it
    # comes up empty, and overwrites dump.rdb at its next snapshot (Redis 7.0; see
    # tests/integration/test_services_lifecycle.py). So after a change of mode it starts
    # once in the mode its data is in, and _apply_persistence switches it at runtime
    # (CONFIG SET appendonly), which carries the data over.
    want_aof = s.redis_appendfsync != "off"
    has_aof = (rdir / AOF_MANIFEST).exists()
    if want_aof and not has_aof and (rdir / "dump.rdb").exists():
        old_mode = ["--appendonly", "no"]
    elif not want_aof and has_aof:
        old_mode = ["--appendonly", "yes"]
    else:
        old_mode = []
    log = p.logs() / "redis.log"
    return _spawn([exe, str(conf), *old_mode], log, p.pid("redis"), rdir), True


def _redis_persistence(port: int) -> str | None:
    """What the server at ``port`` runs with: "aof <appendfsync>", "rdb" (snapshots only),
    or None when it does not answer."""
    try:
        got = _redis(port, timeout=2).config_get("append*")
    except Exception:
        return None
    return f"aof {got['appendfsync']}" if got.get("appendonly") == "yes" else "rdb"


def _apply_persistence(s: cfg.ServicesSettings, p: Paths) -> None:
    """Bring the running redis-server to ``services.redis_appendfsync`` at runtime, data
    kept: a server started before in the other mode (an older `up`, or the setting
    changed) is switched with CONFIG SET, and this returns once the switch is on disk."""
    import redis
    r = _redis(s.redis_port, timeout=60)
    want_aof = s.redis_appendfsync != "off"
    if want_aof:
        r.config_set("appendfsync", s.redis_appendfsync)
    if (r.config_get("appendonly")["appendonly"] == "yes") == want_aof:
        return
    deadline = time.monotonic() + s.start_timeout_s
    if want_aof:
        # Redis writes a new AOF from memory in the background and appends to it from now on
        before = int(r.info("persistence")["aof_rewrites"])
        r.config_set("appendonly", "yes")
        while True:
            info = r.info("persistence")
            if (int(info["aof_rewrites"]) > before and not info["aof_rewrite_in_progress"]
                    and not info["aof_rewrite_scheduled"]):
                if info["aof_last_bgrewrite_status"] != "ok" or not (p.redis_dir() / AOF_MANIFEST).exists():
                    raise ServiceError(f"redis-server could not switch to AOF; see {p.logs() / 'redis.log'}")
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"redis-server did not finish writing its AOF within "
                                   f"{s.start_timeout_s:.0f} s; see {p.logs() / 'redis.log'}")
            time.sleep(0.1)
    r.config_set("appendonly", "no")
    while True:   # a snapshot of everything, now that the AOF is no longer written
        try:
            r.save()
            break
        except redis.ResponseError as exc:   # an automatic snapshot is running: wait for it
            if "in progress" not in str(exc) or time.monotonic() > deadline:
                raise ServiceError(f"redis-server could not save its snapshot: {exc}") from None
            time.sleep(0.2)
    # the AOF is stale from now on: a later switch back to AOF must start from dump.rdb
    shutil.rmtree(p.redis_dir() / "appendonlydir", ignore_errors=True)


# --- public API ----------------------------------------------------------------------

def ensure_topics(settings: cfg.Settings, timeout: float = 30.0, replication_factor: int = 1) -> list[str]:
    """Create the configured topics that do not exist yet (``replication_factor``: 3 on the
    local cluster); return the names created."""
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(settings.kafka.client_config())
    existing = set(admin.list_topics(timeout=timeout).topics)
    t, n = settings.kafka.topics, settings.kafka.partitions
    wanted = [(t.alerts, n.alerts, {}), (t.triggers, n.triggers, {}),
              (t.dead_letter, n.dead_letter, {}), (t.truth, n.truth, {"cleanup.policy": "compact"})]
    new = [NewTopic(name, num_partitions=parts, replication_factor=replication_factor, config=conf)
           for name, parts, conf in wanted if name not in existing]
    if new:
        for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
            try:
                fut.result()
            except Exception as exc:  # a concurrent creator is fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise ServiceError(f"cannot create topic {name}: {exc}") from None
    return [x.topic for x in new]


def up(settings: cfg.Settings, quiet: bool = False) -> dict:
    """Start whatever is not running, wait until both answer, record the endpoints."""
    s = settings.services
    p = _paths(s)
    p.state.mkdir(parents=True, exist_ok=True)
    kpid, kstarted = _start_kafka(s, p)
    rpid, rstarted = _start_redis(s, p)
    bootstrap = f"{HOST}:{s.kafka_port}"
    redis_url = f"redis://{HOST}:{s.redis_port}/0"
    _wait(lambda: _redis_answers(s.redis_port), s.start_timeout_s, "redis-server", rpid,
          "redis-server", p.logs() / "redis.log")
    _apply_persistence(s, p)
    _wait(lambda: _port_open(s.kafka_port) and _kafka_answers(bootstrap), s.start_timeout_s, "Kafka", kpid, "kafka.Kafka",
          p.logs() / "kafka.log")
    endpoints = {"kafka_bootstrap": bootstrap, "redis_url": redis_url,
                 "kafka_pid": kpid, "redis_pid": rpid,
                 "kafka_log": str(p.logs() / "kafka.log"), "redis_log": str(p.logs() / "redis.log")}
    s.endpoints_file.write_text(json.dumps(endpoints, indent=2))
    created = ensure_topics(settings.replace(kafka={"bootstrap_servers": bootstrap,
                                                    "security_protocol": "PLAINTEXT"}))
    if not quiet:
        for name, pid, started, where in (("kafka", kpid, kstarted, bootstrap),
                                          ("redis", rpid, rstarted, redis_url)):
            print(f"{name:<6} {'started' if started else 'already running'}  pid {pid}  {where}")
        if created:
            print(f"topics created: {', '.join(created)}")
    return {"kafka_started": kstarted, "redis_started": rstarted, **endpoints}


def _stop(pid: int | None, marker: str, timeout: float = 30.0) -> bool:
    if not _alive(pid, marker):
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid, marker):
        time.sleep(0.2)
    if _alive(pid, marker):
        os.killpg(pid, signal.SIGKILL)
    return True


def down(settings: cfg.Settings, wipe: bool = False, only: tuple[str, ...] = ("kafka", "redis"),
         quiet: bool = False) -> list[str]:
    """Stop the processes `up` started (by pid); with ``wipe`` also delete their data."""
    s = settings.services
    p = _paths(s)
    stopped = []
    for name, marker in (("kafka", "kafka.Kafka"), ("redis", "redis-server")):
        if name not in only:
            continue
        if _stop(_read_pid(p.pid(name)), marker):
            stopped.append(name)
        p.pid(name).unlink(missing_ok=True)
        if not quiet:
            print(f"{name:<6} {'stopped' if name in stopped else 'was not running'}")
    if set(only) == {"kafka", "redis"}:
        s.endpoints_file.unlink(missing_ok=True)
    if wipe:
        for d in (p.kafka_dir(), p.redis_dir()):
            if any(n in only for n in ("kafka", "redis") if d.name == n):
                shutil.rmtree(d, ignore_errors=True)
        if not quiet:
            print(f"wiped data under {p.state}")
    return stopped


def status(settings: cfg.Settings) -> dict:
    s = settings.services
    p = _paths(s)
    kpid, rpid = _read_pid(p.pid("kafka")), _read_pid(p.pid("redis"))
    bootstrap = f"{HOST}:{s.kafka_port}"
    redis_up = _redis_answers(s.redis_port)
    return {
        "kafka": {"running": _alive(kpid, "kafka.Kafka"), "pid": kpid, "address": bootstrap,
                  "answering": _port_open(s.kafka_port) and _kafka_answers(bootstrap),
                  "log": str(p.logs() / "kafka.log"), "data": str(p.kafka_dir() / "data")},
        "redis": {"running": _alive(rpid, "redis-server"), "pid": rpid,
                  "address": f"redis://{HOST}:{s.redis_port}/0",
                  "answering": redis_up,
                  "persistence": _redis_persistence(s.redis_port) if redis_up else None,
                  "log": str(p.logs() / "redis.log"), "data": str(p.redis_dir())},
        # the addresses may come from the environment with a password in them
        "config_uses": {"kafka": cfg.mask_url(settings.kafka.bootstrap_servers),
                        "redis": cfg.mask_url(settings.redis.url)},
    }


# --- command -------------------------------------------------------------------------

CLUSTER_HELP = ("the local cluster instead of the single-node services (which it leaves alone): "
                "three Kafka brokers (KRaft, each also a controller; replication factor 3, "
                "min.insync.replicas 2) on services.cluster_kafka_port .. +2 (controllers +3 .. +5) "
                "and a Redis Cluster of three primaries on services.cluster_redis_port .. +2 with "
                "services.cluster_redis_replicas replica(s) each on the next ports; state under "
                "<services.state_dir>/cluster. A broker uses it with redis.cluster: true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = sub.add_parser("up", help="fetch Kafka if needed, start Kafka and Redis, wait until both answer "
                       "(--cluster: every cluster node that does not run, the Redis Cluster formed once)")
    u.add_argument("--cluster", action="store_true", help=CLUSTER_HELP)
    d = sub.add_parser("down", help="stop the Kafka and Redis processes that `up` started")
    d.add_argument("--wipe", action="store_true", help="also delete their data (topics, Redis state)")
    d.add_argument("--cluster", action="store_true", help="stop the local cluster's processes instead "
                   "(by pid); with --wipe delete <services.state_dir>/cluster")
    st = sub.add_parser("status", help="say what runs where, whether it answers, the Redis persistence and "
                        "the log paths; exit status 4 when one does not answer")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument("--cluster", action="store_true", help="the local cluster's nodes instead (Redis role "
                    "and cluster state, Kafka brokers in the metadata); exit status 4 unless all "
                    "three brokers are in the metadata and every Redis node says cluster_state ok")
    sub.add_parser("fetch", help="only resolve the Kafka jars from Maven Central into the cache")


def run(args: argparse.Namespace) -> int:
    settings = cfg.load(args.config)
    if getattr(args, "cluster", False):
        from ulens import services_cluster as cl
        if args.action == "up":
            cl.up(settings)
        elif args.action == "down":
            cl.down(settings, wipe=args.wipe)
        else:
            st = cl.status(settings)
            print(json.dumps(st, indent=2)) if args.json else cl.print_status(st)
            return 0 if st["healthy"] else ServiceError.exit_code
        return 0
    if args.action == "up":
        up(settings)
    elif args.action == "down":
        down(settings, wipe=args.wipe)
    elif args.action == "fetch":
        print(fetch_kafka(settings.services))
    else:
        st = status(settings)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            for name in ("kafka", "redis"):
                x = st[name]
                state = "running" if x["running"] else "stopped"
                ans = "answering" if x["answering"] else "not answering"
                persistence = f", persistence {x['persistence']}" if x.get("persistence") else ""
                print(f"{name:<6} {state:<8} pid {x['pid'] or '-':<8} {x['address']:<26} {ans}{persistence}\n"
                      f"       log  {x['log']}\n       data {x['data']}")
            print(f"config uses kafka {st['config_uses']['kafka']}, redis {st['config_uses']['redis']}")
        # one not answering: services unavailable
        return 0 if st["kafka"]["answering"] and st["redis"]["answering"] else ServiceError.exit_code
    return 0

