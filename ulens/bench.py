"""`ulens bench consumer|replay|inference|simulate|memory [--json]`: measured, not estimated.

Every benchmark prints rows ``{"name", "value", "unit", "baseline", "ratio"}`` (optional
``note``; ``ratio = value / baseline``), preceded by one ``context`` row with the machine
(nproc, load average before and after, torch threads, date, versions). ``--json`` prints
one JSON object per line; otherwise a table. Each figure is compared with a baseline
measured in the same run, on the same data and machine (see docs/BENCHMARKS.md).

Data: one simulated dataset (``--events``, half binary, fixed ``--seed``) is cached under
``--cache-dir`` (default ``<services.cache_dir>/bench``), keyed by its parameters, with the
streams cut from it (the first ``--alerts`` alerts in survey-time order). Topics, consumer
groups and Redis keys of a run carry a unique tag and are deleted at the end.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import io
import json
import math
import os
import platform
import pstats
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np

HELP = ("throughput and latency benchmarks (consumer, replay, inference, simulate, memory), each "
        "against a baseline measured in the same run, with the machine's context")

BENCHMARKS = ("consumer", "replay", "inference", "simulate", "memory")
ROW_KEYS = ("name", "value", "unit", "baseline", "ratio")
SIM_DEFAULTS = {"parameter_set": "baseline", "cadence_mask_prob": 0.2, "mag_error_std": 0.05}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- rows

def make_row(name: str, value, unit: str, baseline=None, ratio=None, note: Optional[str] = None,
             **extra) -> dict:
    """One result row; ``ratio`` defaults to value / baseline (None without a baseline)."""
    value = _num(value)
    baseline = _num(baseline)
    if ratio is None and value is not None and baseline not in (None, 0.0):
        ratio = value / baseline
    row = {"name": name, "value": value, "unit": unit, "baseline": baseline,
           "ratio": None if ratio is None else round(float(ratio), 4)}
    if note:
        row["note"] = note
    row.update(extra)
    return row


def _num(x):
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, 4) if abs(x) < 1e6 else round(x, 1)


def context_row(before: dict, after: Optional[dict] = None) -> dict:
    ctx = dict(before)
    if after:
        ctx["loadavg_after"] = after["loadavg"]
        ctx["finished_utc"] = after["date_utc"]
        ctx["seconds"] = round(after["t"] - before["t"], 1)
    ctx.pop("t", None)
    ctx["loadavg_before"] = ctx.pop("loadavg")
    return {"name": "context", "value": None, "unit": None, "baseline": None, "ratio": None,
            "context": ctx}


def machine_context() -> dict:
    """What the figures depend on: cores, load, torch threads, versions, date."""
    import torch

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    return {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "t": time.monotonic(), "host": platform.node(), "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu, "memory_gb": mem_gb,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "git": _git_head(), "git_modified": _git_modified()}


def _git_head() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_modified() -> Optional[list]:
    """Tracked files that differ from HEAD (the figures measure the working tree)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
        return [line[3:] for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return None


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["name"] == "context":
            c = r["context"]
            lines.append(f"# {c.get('date_utc')}  {c.get('host')}  nproc {c.get('nproc')}  "
                         f"torch threads {c.get('torch_threads')}  cuda {c.get('cuda')}  "
                         f"load before {c.get('loadavg_before')} after {c.get('loadavg_after')}  "
                         f"git {c.get('git')}")
    body = [r for r in rows if r["name"] != "context"]
    if not body:
        return "\n".join(lines)
    w = max(len(r["name"]) for r in body)
    fmt = lambda v: "-" if v is None else (f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}")  # noqa: E731
    lines.append(f"{'name':<{w}}  {'value':>12} {'unit':<10} {'baseline':>12} {'ratio':>8}  note")
    for r in body:
        lines.append(f"{r['name']:<{w}}  {fmt(r['value']):>12} {r['unit'] or '':<10} "
                     f"{fmt(r['baseline']):>12} {fmt(r['ratio']):>8}  {r.get('note', '')}")
    return "\n".join(lines)


def timed_rate(fn: Callable[[], int], min_seconds: float, max_reps: int = 100_000) -> tuple[float, int, float]:
    """Call ``fn`` (returns items done) until ``min_seconds`` passed: (items/s, items, seconds)."""
    done = reps = 0
    t0 = time.perf_counter()
    while True:
        done += fn()
        reps += 1
        el = time.perf_counter() - t0
        if el >= min_seconds or reps >= max_reps:
            return done / el, done, el


def percentiles(values, qs=(50, 99)) -> list[Optional[float]]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [None for _ in qs]
    return [float(x) for x in np.percentile(v, qs)]


# ----------------------------------------------------------------------------- data

def dataset_path(cache_dir: Path, n_pspl: int, n_binary: int, seed: int) -> Path:
    d = SIM_DEFAULTS
    return Path(cache_dir) / (f"sim_pspl{n_pspl}_bin{n_binary}_seed{seed}_{d['parameter_set']}"
                              f"_mask{d['cadence_mask_prob']}_err{d['mag_error_std']}_tol0.01.npz")


def cached_dataset(cache_dir: Path, events: int, seed: int, workers: Optional[int]) -> Path:
    """The benchmark dataset (half binary), simulated once and cached by its parameters."""
    from training.simulate import SimulationConfig, simulate

    n_bin = events // 2
    n_pspl = events - n_bin
    path = dataset_path(cache_dir, n_pspl, n_bin, seed)
    if path.exists():
        return path
    log(f"simulating {n_pspl} PSPL + {n_bin} binary events (seed {seed}) once into {path}")
    t0 = time.perf_counter()
    cfg = SimulationConfig(parameter_set=SIM_DEFAULTS["parameter_set"], seed=seed,
                           cadence_mask_prob=SIM_DEFAULTS["cadence_mask_prob"],
                           mag_error_std=SIM_DEFAULTS["mag_error_std"])
    ds = simulate(n_pspl, n_bin, cfg, workers=workers, command="ulens bench (dataset cache)")
    ds.save(path)
    log(f"simulated in {time.perf_counter() - t0:.0f} s")
    return path


def first_alerts(ds, n_alerts: int):
    """The points of the first ``n_alerts`` alerts in the replay's order (survey time, ties by
    event order then point), as a dataset of per-event prefixes; events left empty go."""
    from training.dataset import Dataset

    p = len(ds.time)
    if not 0 < n_alerts <= p:
        raise ValueError(f"bench: --alerts must be in 1..{p} (points in the dataset), got {n_alerts}")
    order = np.argsort(ds.time, kind="stable")
    keep = np.zeros(p, dtype=bool)
    keep[order[:n_alerts]] = True
    lens = ds.lengths()
    ev = np.repeat(np.arange(ds.n_events), lens)
    counts = np.bincount(ev[keep], minlength=ds.n_events)
    offsets = np.zeros(ds.n_events + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    meta = dict(ds.meta, bench_cut=f"first {n_alerts} alerts in survey-time order")
    cut = Dataset(offsets=offsets, time=ds.time[keep], mag=ds.mag[keep], mag_err=ds.mag_err[keep],
                  mag_model=ds.mag_model[keep], mag_pspl=ds.mag_pspl[keep], event_id=ds.event_id,
                  label=ds.label, params=ds.params, meta=meta)
    nz = np.flatnonzero(counts > 0)
    return cut if len(nz) == ds.n_events else cut.subset(nz)


def tiled_events(ds, n_events: int, points: int, id_base: int = 10**12):
    """``n_events`` events made of the first ``points`` points of the dataset's events, reused
    in turn, with new unique ids ``id_base + i`` (for load that needs many live events)."""
    from training.dataset import Dataset

    lens = ds.lengths()
    src = np.flatnonzero(lens >= points)
    if len(src) == 0:
        raise ValueError(f"bench: no event has {points} points")
    pick = src[np.arange(n_events) % len(src)]
    take = (ds.offsets[pick][:, None] + np.arange(points)[None, :]).ravel()
    offsets = np.arange(n_events + 1, dtype=np.int64) * points
    return Dataset(offsets=offsets, time=ds.time[take], mag=ds.mag[take], mag_err=ds.mag_err[take],
                   mag_model=ds.mag_model[take], mag_pspl=ds.mag_pspl[take],
                   event_id=id_base + np.arange(n_events, dtype=np.int64), label=ds.label[pick],
                   params={k: v[pick] for k, v in ds.params.items()},
                   meta=dict(ds.meta, bench_cut=f"{n_events} events x first {points} points, tiled"))


def drop_first(ds, n_points: int):
    """Each event without its first ``n_points`` points (events with no point left go)."""
    from training.dataset import Dataset

    lens = ds.lengths()
    idx = np.arange(len(ds.time)) - np.repeat(ds.offsets[:-1], lens)
    keep = idx >= n_points
    counts = np.maximum(lens - n_points, 0)
    offsets = np.zeros(ds.n_events + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = Dataset(offsets=offsets, time=ds.time[keep], mag=ds.mag[keep], mag_err=ds.mag_err[keep],
                  mag_model=ds.mag_model[keep], mag_pspl=ds.mag_pspl[keep], event_id=ds.event_id,
                  label=ds.label, params=ds.params,
                  meta=dict(ds.meta, bench_cut=f"points {n_points}.. of each event"))
    nz = np.flatnonzero(counts > 0)
    return out if len(nz) == ds.n_events else out.subset(nz)


def warm_state(store, artifact, ds, n_points: int, start_mjd: float, rule,
               chunk: int = 500) -> int:
    """Put each event's first ``n_points`` points into Redis through the broker's state path
    (``EventStore.append``) and store their model probabilities and decisions
    (``save_scores``, triggers marked sent), as if the broker had already consumed them. Their diaSourceIds are ``id * 100000 + 90000 + i``
    (apart from the replay's, which number the stream's points from 0)."""
    from broker import state as st
    from broker.triggers import trigger_record
    from broker.validate import magnitudes
    from training import decision
    from training.photometry import mag_to_njy

    smooth = rule.smooth

    lens = ds.lengths()
    events = np.flatnonzero(lens >= n_points)
    for lo in range(0, len(events), chunk):
        ev = events[lo:lo + chunk]
        take = (ds.offsets[ev][:, None] + np.arange(n_points)[None, :])
        t = start_mjd + ds.time[take]
        mag, err = magnitudes(*mag_to_njy(ds.mag[take].astype(np.float64), ds.mag_err[take]))
        oids = ds.event_id[ev]
        sid = oids[:, None] * 100_000 + 90_000 + np.arange(n_points)[None, :]
        store.append(oids.tolist(), [n_points] * len(ev),
                     st.pack_points(sid.ravel(), t.ravel(), mag.ravel(), err.ravel()))
        x = np.stack([artifact.inputs(t[i], mag[i], err[i]) for i in range(len(ev))])
        probs = artifact.predict(x)
        ups = []
        for i, o in enumerate(oids.tolist()):
            ring = np.zeros(smooth, dtype=np.float32)
            ring[:] = probs[i, -smooth:]
            j = decision.first_trigger(probs[i], rule.threshold, rule.min_points, rule.smooth)
            trig = None if j is None else trigger_record(o, int(sid[i, j]), rule, float(
                decision.score(probs[i], rule.smooth)[j]), j + 1, float(t[i, j]), 0, artifact.version)
            ups.append(st.ScoreUpdate(o, 0, probs[i], ring, trig))
        codes = store.save_scores(ups)
        store.mark_sent([u.object_id for u, c in zip(ups, codes) if c == st.TRIG_NEW])
    return len(events)


def cached_derived(path: Path, build: Callable):
    if not path.exists():
        build().save(path)
    return path


# ----------------------------------------------------------------------------- services

class Run:
    """Names, subprocesses and cleanup of one benchmark run (topics, groups, Redis keys)."""

    def __init__(self, args):
        import config as cfg

        self.args = args
        self.settings = cfg.load(args.config)
        self.tag = f"bench-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.tmp = Path(tempfile.mkdtemp(prefix="ulens-bench-"))
        self.cache = Path(os.path.expanduser(args.cache_dir)) if args.cache_dir else \
            self.settings.services.cache_path / "bench"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.topics: list[str] = []
        self.groups: list[str] = []
        self.prefixes: list[str] = []
        self._redis = None

    @property
    def client(self) -> dict:
        return self.settings.kafka.client_config()

    @property
    def redis(self):
        if self._redis is None:
            from broker.consumer import redis_client
            self._redis = redis_client(self.settings)
        return self._redis

    def name(self, what: str) -> str:
        return f"{self.tag}.{what}"

    def topic(self, what: str, partitions: Optional[int] = None) -> str:
        from replay.producer import ensure_topic

        t = self.name(what)
        ensure_topic(self.client, t, partitions or self.settings.kafka.partitions.alerts)
        self.topics.append(t)
        return t

    def group(self, what: str) -> str:
        g = self.name(what)
        self.groups.append(g)
        return g

    def prefix(self, what: str) -> str:
        p = f"{self.settings.redis.key_prefix}:{self.tag}:{what}"
        self.prefixes.append(p)
        return p

    def broker_settings(self, alerts: str, what: str):
        """Settings for a broker on ``alerts`` with its own triggers/DLQ topics, group, prefix."""
        k = self.settings.kafka
        topics = dataclasses.replace(k.topics, alerts=alerts,
                                     triggers=self.topic(f"{what}.triggers", k.partitions.triggers),
                                     dead_letter=self.topic(f"{what}.dlq", k.partitions.dead_letter))
        return self.settings.replace(kafka={"topics": topics},
                                     redis={"key_prefix": self.prefix(what)},
                                     consumer={"group": self.group(what)})

    def config_file(self, s, name: str) -> Path:
        """A YAML file for a `ulens` subprocess: the user's file with these names over it."""
        import yaml

        base = self.args.config or os.environ.get("ULENS_CONFIG")
        data = yaml.safe_load(Path(base).read_text()) or {} if base else {}
        for section, vals in (("kafka", {"topics": dataclasses.asdict(s.kafka.topics)}),
                              ("redis", {"key_prefix": s.redis.key_prefix}),
                              ("consumer", {"group": s.consumer.group})):
            cur = data.setdefault(section, {})
            for key, v in vals.items():
                if isinstance(v, dict):
                    cur.setdefault(key, {}).update(v)
                else:
                    cur[key] = v
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def ulens(self, argv: list[str], config: Optional[Path] = None) -> list[str]:
        conf = config or self.args.config
        return [sys.executable, "-m", "ulens.cli", argv[0], *(["--config", str(conf)] if conf else []),
                *argv[1:]]

    def replay(self, data: Path, topic: str, extra: list[str] = (), popen: bool = False):
        """`ulens replay` as its own process; returns its replay.json (or the Popen)."""
        folder = self.tmp / f"replay-{uuid.uuid4().hex[:6]}"
        cmd = self.ulens(["replay", "--data", str(data), "--topic", topic, "--speed", "max",
                          "--no-progress", "--truth-out", str(folder / "truth.jsonl"), *extra])
        if popen:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            proc.report_path = folder / "replay.json"   # type: ignore[attr-defined]
            return proc
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"replay failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return json.loads((folder / "replay.json").read_text())

    def cleanup(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.client, "log_level": 4})
        if self.groups:
            try:
                for f in admin.delete_consumer_groups(self.groups, request_timeout=30).values():
                    try:
                        f.result()
                    except Exception:
                        pass
            except Exception as exc:  # never fail a run on cleanup
                log(f"cleanup: consumer groups not deleted: {exc}")
        if self.topics:
            for f in admin.delete_topics(self.topics, operation_timeout=30).values():
                try:
                    f.result()
                except Exception:
                    pass
        n = 0
        for p in self.prefixes:
            n += delete_prefix(self.redis, p)
        shutil.rmtree(self.tmp, ignore_errors=True)
        log(f"cleanup: deleted {len(self.topics)} topics, {len(self.groups)} groups, {n} Redis keys")


def delete_prefix(r, prefix: str) -> int:
    n = 0
    batch = []
    for k in r.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(k)
        if len(batch) >= 5000:
            n += r.unlink(*batch)
            batch = []
    if batch:
        n += r.unlink(*batch)
    return n


def read_topic(client: dict, topic: str, timeout_s: float = 30.0) -> list:
    """Every message of ``topic`` from the beginning up to its high watermarks."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({**client, "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        ends = {}
        for p in md.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi > lo:
                ends[p] = hi
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out, done = [], set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends) and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is None:
                    out.append(m)
                    if m.offset() >= ends[m.partition()] - 1:
                        done.add(m.partition())
        return out
    finally:
        c.close()


# ----------------------------------------------------------------------------- consumer

def _timed_broker_class():
    from broker.consumer import Broker

    class TimedBroker(Broker):
        """The real broker; records when batches arrive and finish (and per-alert latency)."""

        def __init__(self, *a, record_latency: bool = False, **kw):
            super().__init__(*a, **kw)
            self.record_latency = record_latency
            self.t_first: Optional[float] = None
            self.t_last: Optional[float] = None
            self.latency_ms: list[np.ndarray] = []
            self.batches: list[tuple[int, float]] = []

        def process(self, msgs):
            t = time.perf_counter()
            if self.t_first is None:
                self.t_first = t
            super().process(msgs)
            self.t_last = time.perf_counter()
            self.batches.append((len(msgs), self.t_last - t))
            if self.record_latency:
                # Kafka CreateTime (ms) is stamped by the replay's producer at produce(),
                # microseconds after alertProducedUs; "processed" = batch committed.
                now_ms = time.time() * 1000.0
                self.latency_ms.append(np.fromiter((now_ms - m.timestamp()[1] for m in msgs),
                                                   dtype=np.float64, count=len(msgs)))

    return TimedBroker


class NoopConsumer:
    """Transport floor: the same consume() call as the broker, doing nothing with the alerts."""

    def __init__(self, settings, topic: str, group: str):
        from broker.consumer import consumer_config
        from confluent_kafka import Consumer

        self.batch = settings.consumer.batch_size
        self.timeout = settings.consumer.poll_timeout_s
        self.assigned = threading.Event()
        self.c = Consumer(consumer_config(settings, group))
        self.c.subscribe([topic], on_assign=lambda c, p: self.assigned.set())
        self.latency_ms: list[np.ndarray] = []
        self.n = 0
        self.stop = threading.Event()

    def run(self, n_alerts: int) -> None:
        try:
            while self.n < n_alerts and not self.stop.is_set():
                msgs = [m for m in self.c.consume(self.batch, self.timeout) if m.error() is None]
                if msgs:
                    now_ms = time.time() * 1000.0
                    self.latency_ms.append(np.fromiter((now_ms - m.timestamp()[1] for m in msgs),
                                                       dtype=np.float64, count=len(msgs)))
                    self.n += len(msgs)
        finally:
            self.c.close()


class NaiveConsumer:
    """What the broker replaces: per message, read the whole light curve from Redis, run the
    model over its full length, produce a trigger if it fires, commit per message."""

    POINT = struct.Struct("<dff")

    def __init__(self, settings, artifact, topic: str, triggers_topic: str, group: str, prefix: str):
        from broker.consumer import consumer_config, producer_config, redis_client
        from broker.triggers import Rule
        from confluent_kafka import Consumer, Producer
        from schemas import default_codec

        self.artifact = artifact
        dec = artifact.decision
        self.rule = Rule("naive", artifact.threshold, settings.consumer.min_points,
                         int(dec.get("smooth_window", 5)))
        self.codec = default_codec()
        self.r = redis_client(settings)
        self.prefix = prefix
        self.triggers_topic = triggers_topic
        self.producer = Producer(producer_config(settings))
        self.c = Consumer(consumer_config(settings, group))
        self.c.subscribe([topic])
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.alerts = self.triggers = self.rejected = 0

    def handle(self, msg) -> None:
        from broker import validate as v
        from broker.triggers import trigger_record
        from training import decision

        rec = v.decode(self.codec, msg.value())
        if isinstance(rec, v.Rejected) or v.check_record(rec, msg.key()) is not None:
            self.rejected += 1
            return
        mag, err = v.magnitudes(np.array([rec["scienceFlux"]]), np.array([rec["scienceFluxErr"]]))
        oid = rec["diaObjectId"]
        key, tkey = f"{self.prefix}:lc:{oid}", f"{self.prefix}:tr:{oid}"
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(key, self.POINT.pack(rec["midpointMjdTai"], mag[0], err[0]))
        pipe.lrange(key, 0, -1)
        pipe.exists(tkey)
        _, raw, triggered = pipe.execute()
        pts = np.frombuffer(b"".join(raw), dtype=[("t", "<f8"), ("mag", "<f4"), ("err", "<f4")])
        x = self.artifact.inputs(pts["t"], pts["mag"], pts["err"])[None]
        probs = self.artifact.predict(x)[0]
        n = len(probs)
        score = float(decision.score(probs, self.rule.smooth)[-1])
        if not triggered and n >= self.rule.min_points and score >= self.rule.threshold:
            trig = trigger_record(oid, rec["diaSourceId"], self.rule, score, n,
                                  rec["midpointMjdTai"], rec["alertProducedUs"], self.artifact.version)
            trig["triggerProducedUs"] = int(time.time() * 1e6)
            self.producer.produce(self.triggers_topic, key=str(oid).encode(),
                                  value=self.codec.encode(trig, "trigger"))
            if self.producer.flush(30):
                raise RuntimeError("naive consumer: trigger not delivered")
            self.r.set(tkey, b"1")
            self.triggers += 1

    def run(self, n_alerts: int, idle_s: float = 60.0) -> None:
        last = time.monotonic()
        try:
            while self.alerts < n_alerts:
                msg = self.c.poll(0.5)
                if msg is None:
                    if time.monotonic() - last > idle_s:
                        raise RuntimeError(f"naive consumer: idle after {self.alerts} of {n_alerts}")
                    continue
                if msg.error() is not None:
                    continue
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                self.handle(msg)
                self.c.commit(message=msg, asynchronous=False)
                self.alerts += 1
                self.t_last = time.perf_counter()
                last = time.monotonic()
        finally:
            self.c.close()


def _profile_report(prof: cProfile.Profile, path: Optional[Path], top: int = 30,
                    what: str = "throughput") -> None:
    if path is not None:
        prof.dump_stats(str(path))
        log(f"profile written to {path} (python -m pstats {path})")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        print(f"\n--- profile of the consumer {what} run, sorted by {key} ---\n{s.getvalue()}",
              file=sys.stderr)


def bench_consumer(run: Run, a) -> list[dict]:
    from broker.consumer import load_model

    TimedBroker = _timed_broker_class()
    rows: list[dict] = []
    full = cached_dataset(run.cache, a.events, a.seed, a.workers)
    stream = cached_derived(Path(str(full).replace(".npz", f"_first{a.alerts}.npz")),
                            lambda: first_alerts(_load(full), a.alerts))
    sds = _load(stream)
    n = len(sds.time)
    lens = sds.lengths()
    log(f"stream: {n} alerts over {sds.n_events} events ({lens.min()}..{lens.max()} points each, "
        f"survey days {sds.time.min():.1f}..{sds.time.max():.1f})")
    artifact = load_model(run.settings)

    # 1. throughput: pre-produce, then one broker from start to the last commit
    topic = run.topic("consumer.alerts")
    rep = run.replay(stream, topic)
    log(f"pre-produced {rep['counts']['alerts_delivered']} alerts to {topic} "
        f"({rep['kafka']['partitions']} partitions) at {rep['alerts_per_s']:,.0f} alerts/s")
    s1 = run.broker_settings(topic, "consumer")
    t_make = time.perf_counter()
    broker = TimedBroker(s1, artifact, topic=topic)
    prof = cProfile.Profile() if a.profile else None
    log(f"consumer: throughput run over {n} alerts")
    if prof:
        prof.enable()
    summary = broker.run(until_idle=60.0, max_alerts=n)
    if prof:
        prof.disable()
    t_end = time.perf_counter()
    if summary.alerts != n:
        raise RuntimeError(f"consumer read {summary.alerts} of {n} alerts")
    busy = broker.t_last - broker.t_first
    rate = n / busy
    trig_msgs = read_topic(run.client, s1.kafka.topics.triggers)
    dlq = sum(summary.dead_letters.values())
    log(f"consumer: {n} alerts in {busy:.2f} s = {rate:,.0f} alerts/s; {summary.triggers} triggers "
        f"({len(trig_msgs)} on the topic), {dlq} dead letters; with startup {t_end - t_make:.2f} s")
    sizes = np.array([b for b, _ in broker.batches])
    if prof:
        _profile_report(prof, Path(a.profile) / "consumer_throughput.prof" if a.profile != "-" else None)

    # 1b. steady state: the same number of alerts after each event's first --warm-points
    # points, which are put into Redis (with their probabilities) beforehand
    steady = None
    if a.warm_points:
        from broker import state as st

        w = a.warm_points
        sstream = cached_derived(Path(str(full).replace(".npz", f"_from{w}_first{a.warm_alerts}.npz")),
                                 lambda: first_alerts(drop_first(_load(full), w), a.warm_alerts))
        wds = _load(sstream)
        stopic = run.topic("steady.alerts")
        run.replay(sstream, stopic)
        s2 = run.broker_settings(stopic, "steady")
        sb = TimedBroker(s2, artifact, topic=stopic)
        log(f"consumer: warming {wds.n_events} events with {w} points each in Redis")
        store = st.EventStore(sb.store.r, s2.redis.key_prefix, s2.redis.event_ttl_s, s2.redis.max_points,
                              reference_points=int(artifact.card["reference_points"]),
                              receptive_field=artifact.receptive_field, smooth_window=sb.rule.smooth)
        full_ds = _load(full)
        keep_ids = np.isin(full_ds.event_id, wds.event_id)
        warm_state(store, artifact, full_ds.subset(np.flatnonzero(keep_ids)), w,
                   run.settings.replay.start_mjd, sb.rule)
        del full_ds
        wl = wds.lengths()
        log(f"consumer: steady-state run over {len(wds.time)} alerts (points {w}..{w + wl.max() - 1})")
        sprof = cProfile.Profile() if a.profile else None
        if sprof:
            sprof.enable()
        ss = sb.run(until_idle=60.0, max_alerts=len(wds.time))
        if sprof:
            sprof.disable()
            _profile_report(sprof, Path(a.profile) / "consumer_warm.prof" if a.profile != "-" else None,
                            what="warm")
        if ss.alerts != len(wds.time):
            raise RuntimeError(f"steady run read {ss.alerts} of {len(wds.time)} alerts")
        sbusy = sb.t_last - sb.t_first
        steady = (len(wds.time) / sbusy, sbusy, ss, wds.n_events, wl)
        log(f"consumer: steady state {steady[0]:,.0f} alerts/s, {ss.triggers} triggers, "
            f"{sum(ss.dead_letters.values())} dead letters")

    # 2. the naive consumer on a smaller stream: the first events of the same cut
    n_rate, naive_note = None, "no naive run (--naive-alerts 0)"
    if a.naive_alerts > 0:
        k = int(np.searchsorted(np.cumsum(lens), a.naive_alerts) + 1)
        k = min(k, sds.n_events)
        n_naive = int(lens[:k].sum())
        ntopic = run.topic("naive.alerts")
        run.replay(stream, ntopic, ["--limit-events", str(k)])
        nconf = run.broker_settings(ntopic, "naive")
        naive = NaiveConsumer(nconf, artifact, ntopic, nconf.kafka.topics.triggers,
                              nconf.consumer.group, nconf.redis.key_prefix)
        log(f"naive consumer: {n_naive} alerts of the first {k} events")
        naive.run(n_naive)
        n_rate = naive.alerts / (naive.t_last - naive.t_first)
        log(f"naive consumer: {n_rate:,.1f} alerts/s, {naive.triggers} triggers")
        naive_note = (f"baseline: naive consumer (per message: whole curve from Redis, full-length "
                      f"model, commit) on {n_naive} alerts of {k} events of the same stream, "
                      f"{naive.triggers} triggers")

    rows.append(make_row("consumer.throughput", rate, "alerts/s", n_rate,
                         note=f"{n} alerts, {sds.n_events} events ({lens.min()}-{lens.max()} points), "
                              f"first batch to last commit {busy:.2f} s, {summary.triggers} triggers, "
                              f"{dlq} dead letters, {len(sizes)} batches (mean {sizes.mean():.0f} "
                              f"alerts); {naive_note}",
                         target=">= 10,000 alerts/s, >= 20x naive"))
    rows.append(make_row("consumer.throughput_incl_startup", n / (t_end - t_make), "alerts/s", rate,
                         note=f"from Broker() (Kafka group join) to close: {t_end - t_make:.2f} s; "
                              "baseline: consumer.throughput (first batch to last commit)"))
    if steady is not None:
        srate, sbusy, ss, sev, wl = steady
        rows.append(make_row("consumer.throughput_warm", srate, "alerts/s", rate,
                             note=f"{int(wl.sum())} alerts of {sev} events whose first "
                                  f"{a.warm_points} points (and probabilities) were already in "
                                  f"Redis: points {a.warm_points}..{a.warm_points + wl.max() - 1}, "
                                  f"every window a tail window of the receptive field; {sbusy:.2f} s, "
                                  f"{ss.triggers} triggers; baseline: consumer.throughput (young "
                                  "events, same run)"))

    # 3. latency at a fixed offered rate, a replay running concurrently
    lt = run.topic("latency.alerts")
    s3 = run.broker_settings(lt, "latency")
    k_lat = a.latency_events or min(sds.n_events, int(np.searchsorted(
        np.cumsum(lens), a.rate * a.latency_seconds) + 1))
    limit = ["--limit-events", str(k_lat)]
    n_lat = int(lens[:k_lat].sum())
    lb = TimedBroker(s3, artifact, topic=lt, record_latency=True)
    floor = NoopConsumer(run.settings, lt, run.group("latency.noop"))
    res: dict = {}
    th = threading.Thread(target=lambda: res.__setitem__("s", lb.run(max_alerts=n_lat)), daemon=True)
    tf = threading.Thread(target=floor.run, args=(n_lat,), daemon=True)
    th.start()
    tf.start()
    if not (lb.assigned.wait(60) and floor.assigned.wait(60)):
        lb.stop()
        floor.stop.set()
        raise RuntimeError("latency run: no partition assignment within 60 s")
    log(f"latency: replay of {n_lat} alerts at --rate {a.rate:g} while the broker consumes")
    proc = run.replay(stream, lt, ["--rate", str(a.rate), *limit], popen=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        lb.stop()
        floor.stop.set()
        raise RuntimeError(f"latency replay failed: {err.strip()[-2000:]}")
    rep3 = json.loads(proc.report_path.read_text())
    th.join(120)
    tf.join(30)
    if th.is_alive():
        lb.stop()
        th.join(30)
        raise RuntimeError(f"latency run: broker processed {lb.summary.alerts} of {n_lat} alerts")
    floor.stop.set()
    lat = np.concatenate(lb.latency_ms) if lb.latency_ms else np.zeros(0)
    flat = np.concatenate(floor.latency_ms) if floor.latency_ms else np.zeros(0)
    trig = [run_codec().decode_kind(m.value(), "trigger") for m in read_topic(run.client, s3.kafka.topics.triggers)]
    a2t = [(t["triggerProducedUs"] - t["alertProducedUs"]) / 1000.0 for t in trig if t["alertProducedUs"] > 0]
    p50, p99 = percentiles(lat)
    f50, f99 = percentiles(flat)
    t50, t99 = percentiles(a2t)
    lsz = np.array([b for b, _ in lb.batches])
    lsec = np.array([s for _, s in lb.batches])
    offered = rep3["alerts_per_s"]
    common = (f"offered {offered:,.0f} alerts/s (replay --rate {a.rate:g}), {n_lat} alerts; "
              f"{len(lsz)} batches, mean {lsz.mean():.0f} alerts, processing mean "
              f"{1000 * lsec.mean():.0f} ms p99 {1000 * np.percentile(lsec, 99):.0f} ms; config "
              f"batch_size {run.settings.consumer.batch_size}, poll_timeout_s "
              f"{run.settings.consumer.poll_timeout_s}")
    rows.append(make_row("consumer.latency.offered_rate", offered, "alerts/s", rate,
                         note="what the concurrent `ulens replay --rate` achieved; baseline: the "
                              "consumer's throughput on the same stream (consumer.throughput): a "
                              "ratio above 1 means the consumer was overloaded and latency grows "
                              "with the length of the run"))
    rows.append(make_row("consumer.latency.alert_to_processed.p50", p50, "ms", f50,
                         note="alert produced (Kafka CreateTime) -> batch committed; baseline: a "
                              "no-op consumer of the same topic with the same consume() call; " + common))
    rows.append(make_row("consumer.latency.alert_to_processed.p99", p99, "ms", f99))
    rows.append(make_row("consumer.latency.alert_to_trigger.p50", t50, "ms", f50,
                         note=f"{len(a2t)} triggers: triggerProducedUs - alertProducedUs of the "
                              "deciding alert; baseline: the no-op consumer's p50"))
    rows.append(make_row("consumer.latency.alert_to_trigger.p99", t99, "ms", f99,
                         target="<= 250 ms at 3,000 alerts/s offered",
                         note=f"{len(a2t)} triggers (p99 of so few is close to their maximum, "
                              f"{max(a2t) if a2t else float('nan'):.0f} ms); baseline: the no-op consumer's p99"))
    return rows


def run_codec():
    from schemas import default_codec
    return default_codec()


def _load(path):
    from training.dataset import load
    return load(path)


# ----------------------------------------------------------------------------- replay

def bench_replay(run: Run, a) -> list[dict]:
    from replay.stream import from_dataset, plan

    full = cached_dataset(run.cache, a.events, a.seed, a.workers)
    stream = cached_derived(Path(str(full).replace(".npz", f"_first{a.alerts}.npz")),
                            lambda: first_alerts(_load(full), a.alerts))
    r = run.settings.replay
    # baseline: the replay loop without Kafka: the same records, built and encoded
    lc = from_dataset(_load(stream), r.start_mjd, source=str(stream))
    p = plan(lc, history=r.history_points, detections_only=r.detections_only,
             snr_threshold=r.snr_threshold)
    codec = run_codec()
    sid = codec.schema_id("alert")
    enc = codec.encode
    now_ns = time.time_ns
    log(f"replay: encode-only baseline over {p.n_alerts} alerts")
    t0 = time.perf_counter()
    nbytes = n = 0
    for _key, _mjd, rec in p.records(union_tuples=True):
        rec["alertProducedUs"] = now_ns() // 1000
        nbytes += len(enc(rec, schema_id=sid))
        n += 1
    enc_rate = n / (time.perf_counter() - t0)
    del p, lc
    topic = run.topic("replay.alerts")
    log(f"replay: `ulens replay --speed max` of the same {n} alerts to {topic}")
    t1 = time.perf_counter()
    rep = run.replay(stream, topic)
    wall = time.perf_counter() - t1
    if rep["counts"]["alerts_delivered"] != n:
        raise RuntimeError(f"replay delivered {rep['counts']['alerts_delivered']} of {n}")
    return [
        make_row("replay.throughput", rep["alerts_per_s"], "alerts/s", enc_rate,
                 note=f"`ulens replay --speed max`, {n} alerts ({nbytes / n:.0f} B each) to "
                      f"{rep['kafka']['partitions']} partitions, produce loop + flush "
                      f"{rep['seconds']:.2f} s, all delivered (acks=all); baseline: the same "
                      "records built and fastavro-encoded, no Kafka, in the bench process",
                 target=">= 50,000 alerts/s"),
        make_row("replay.throughput_incl_startup", n / wall, "alerts/s", rep["alerts_per_s"],
                 note=f"whole `ulens replay` process {wall:.2f} s (imports, dataset load, plan, "
                      "topic check, truth file); baseline: the produce loop alone"),
    ]


# ----------------------------------------------------------------------------- inference

def inference_rows(artifact, x_full: np.ndarray, batch_sizes: list[int], min_seconds: float,
                   device: str) -> list[dict]:
    """events/s of full-length ``predict`` and windowed ``predict_last`` per batch size."""
    rf = artifact.receptive_field
    t_len = x_full.shape[1]
    x_win = np.ascontiguousarray(x_full[:, -rf:])
    rows, full_rate = [], {}
    artifact.predict(x_full[:1])       # warm-up (allocator, kernels)
    artifact.predict_last(x_win[:1])

    def batch(x, b):
        reps = -(-b // len(x))
        return np.ascontiguousarray(np.concatenate([x] * reps)[:b]) if reps > 1 else x[:b].copy()

    for b in batch_sizes:
        xf, xw = batch(x_full, b), batch(x_win, b)
        artifact.predict(xf[:min(b, 16)])
        full_rate[b], _, _ = timed_rate(lambda: (artifact.predict(xf), b)[1], min_seconds)
        artifact.predict_last(xw[:min(b, 16)])
        win, _, _ = timed_rate(lambda: (artifact.predict_last(xw, n_last=1), b)[1], min_seconds)
        b1 = full_rate[batch_sizes[0]]
        rows.append(make_row(f"inference.{device}.full.b{b}", full_rate[b], "events/s",
                             b1 if b != batch_sizes[0] else None,
                             note=(f"artifact.predict over {t_len} points, batch {b}"
                                   + (f"; baseline: batch {batch_sizes[0]}" if b != batch_sizes[0] else ""))))
        rows.append(make_row(f"inference.{device}.windowed.b{b}", win, "events/s", full_rate[b],
                             note=f"artifact.predict_last (dependency cone of the newest output) "
                                  f"over the last {rf} points, batch {b}; baseline: full length, "
                                  "same batch"))
        log(f"inference {device} b{b}: full {full_rate[b]:,.0f}/s, windowed {win:,.0f}/s")
    return rows


def bench_inference(run: Run, a) -> list[dict]:
    import torch

    from training.artifact import load_artifact

    full = cached_dataset(run.cache, a.events, a.seed, a.workers)
    ds = _load(full)
    length = a.length
    idx = np.flatnonzero(ds.lengths() >= length)[:256]
    if len(idx) == 0:
        raise ValueError(f"bench: no event with {length} points")
    model_dir = a.model or run.settings.model.resolved
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        art = load_artifact(model_dir, device)
        x = np.stack([art.inputs(*(arr[:length] for arr in ds.event(int(i)))) for i in idx])
        rows += inference_rows(art, x, a.batch_sizes, a.min_seconds, device)
    return rows


# ----------------------------------------------------------------------------- simulate

def simulate_rows(n_binary: int, n_pspl: int, seed: int, workers: int = 1,
                  surveys: tuple = ("thesis",)) -> list[dict]:
    """Events simulated per second per core for each survey profile and class, against the
    magnification alone on the same parameters and epochs (the part no simulator avoids).
    Rows ``simulate.<kind>`` are the thesis survey's (named as before the profiles)."""
    from training import physics
    from training.simulate import SimulationConfig, simulate

    rows = []
    for survey in surveys:
        cfg = SimulationConfig(survey=survey, parameter_set=SIM_DEFAULTS["parameter_set"], seed=seed,
                               cadence_mask_prob=SIM_DEFAULTS["cadence_mask_prob"],
                               mag_error_std=SIM_DEFAULTS["mag_error_std"])
        prefix = "simulate" if survey == "thesis" else f"simulate.{survey}"
        for kind, n in (("binary", n_binary), ("pspl", n_pspl)):
            if n <= 0:
                continue
            t0 = time.perf_counter()
            ds = simulate(n if kind == "pspl" else 0, n if kind == "binary" else 0, cfg, workers=workers)
            sim_rate = n / (time.perf_counter() - t0)
            par = ds.params
            # baseline: the magnification alone, same parameters and epochs, this process
            t0 = time.perf_counter()
            for i in range(ds.n_events):
                t = ds.event(i)[0]
                if kind == "binary":
                    physics.binary_magnification(t, par["t0"][i], par["u0"][i], par["tE"][i], par["s"][i],
                                                 par["q"][i], par["alpha"][i], par["rho"][i], tol=cfg.vbm_tol)
                else:
                    physics.pspl_magnification(t, par["t0"][i], par["u0"][i], par["tE"][i])
            base = n / (time.perf_counter() - t0)
            what = "VBMicrolensing BinaryLightCurve" if kind == "binary" else "numpy PSPL A(u)"
            rows.append(make_row(f"{prefix}.{kind}", sim_rate, "events/s/core", base,
                                 note=f"survey {survey}: training.simulate.simulate, {n} events, "
                                      f"workers={workers} (~{ds.lengths().mean():.0f} visits each, process "
                                      f"start included); baseline: {what} alone on the same parameters"))
            if kind == "binary" and survey == "thesis":
                rows.append(_vbm_plus_fit_row(ds, cfg, base))
            log(f"simulate {survey} {kind}: {sim_rate:,.1f}/s vs {what} alone {base:,.1f}/s")
    return rows


def _vbm_plus_fit_row(ds, cfg, base: float) -> dict:
    """VBMicrolensing + the PSPL fit for dchi2 on the thesis events (the two big costs)."""
    from training import detectability, physics

    par = ds.params
    t0 = time.perf_counter()
    for i in range(ds.n_events):
        t = ds.event(i)[0]
        A = physics.binary_magnification(t, par["t0"][i], par["u0"][i], par["tE"][i], par["s"][i],
                                         par["q"][i], par["alpha"][i], par["rho"][i], tol=cfg.vbm_tol)
        detectability.detectability(t, physics.flux(A, par["fs"][i]), cfg.mag_error_std,
                                    true_params=(par["t0"][i], par["u0"][i], par["tE"][i]))
    return make_row("simulate.binary.vbm_plus_dchi2_fit", ds.n_events / (time.perf_counter() - t0),
                    "events/s/core", base, note="VBMicrolensing + the PSPL fit for dchi2 (the two big "
                    "costs of a binary), same events; baseline: VBMicrolensing alone")


def bench_simulate(run: Run, a) -> list[dict]:
    return simulate_rows(a.sim_binary, a.sim_pspl, a.seed + 1000, workers=1, surveys=tuple(a.sim_surveys))


# ----------------------------------------------------------------------------- memory

def _watch_peak(proc: subprocess.Popen, every: float = 0.2) -> dict:
    """Poll /proc/<pid>/status until the process ends: peak RSS (VmHWM) in MiB."""
    peak = {"hwm_mib": 0.0, "rss_mib": 0.0, "samples": []}
    t0 = time.monotonic()
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak["hwm_mib"] = max(peak["hwm_mib"], int(line.split()[1]) / 1024)
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                    peak["rss_mib"] = max(peak["rss_mib"], rss)
                    peak["samples"].append((time.monotonic() - t0, rss))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(every)
    return peak


def rss_trajectory(samples: list, parts: int = 4) -> str:
    """RSS at even fractions of the run, e.g. '25%: 700, 50%: 900, ...' (MiB)."""
    if not samples:
        return "no samples"
    t_end = samples[-1][0]
    out = []
    for k in range(1, parts + 1):
        t = t_end * k / parts
        rss = next((r for s, r in samples if s >= t), samples[-1][1])
        out.append(f"{100 * k // parts}%: {rss:.0f}")
    return ", ".join(out)


def _consume_process(run: Run, data: Path, what: str, n_alerts: int) -> tuple[dict, dict, int]:
    """Produce ``data``, run `ulens consume` as its own process over it: (peak, summary, used_memory delta)."""
    topic = run.topic(f"{what}.alerts")
    run.replay(data, topic)
    s = run.broker_settings(topic, what)
    conf = run.config_file(s, what)
    r = run.redis
    before = int(r.info("memory")["used_memory"])
    proc = subprocess.Popen(run.ulens(["consume", "--until-idle", "30", "--max-alerts", str(n_alerts)],
                                      conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder: dict = {}
    reader = threading.Thread(target=lambda: holder.__setitem__("io", proc.communicate()), daemon=True)
    reader.start()
    peak = _watch_peak(proc)
    reader.join(60)
    out, err = holder.get("io", ("", ""))
    if proc.returncode != 0:
        raise RuntimeError(f"ulens consume failed ({proc.returncode}): {err.strip()[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    after = int(r.info("memory")["used_memory"])
    return peak, summary, after - before


def bench_memory(run: Run, a) -> list[dict]:
    from broker import state as st
    from training.artifact import load_artifact

    rows = []
    full = cached_dataset(run.cache, a.events, a.seed, a.workers)
    ds = _load(full)
    pts = a.memory_points
    big = cached_derived(Path(str(full).replace(".npz", f"_tiled{a.memory_events}x{pts}.npz")),
                         lambda: tiled_events(ds, a.memory_events, pts))
    small_n = max(1, a.memory_events // 100)
    small = cached_derived(Path(str(full).replace(".npz", f"_tiled{small_n}x{pts}.npz")),
                           lambda: tiled_events(ds, small_n, pts, id_base=2 * 10**12))
    log(f"memory: `ulens consume` over {small_n} events x {pts} points (baseline), then "
        f"{a.memory_events} x {pts}")
    p_small, _, _ = _consume_process(run, small, "memsmall", small_n * pts)
    p_big, sum_big, delta = _consume_process(run, big, "membig", a.memory_events * pts)
    prefix = run.prefixes[-1]
    keys = [f"{prefix}:ev:{10**12 + i}" for i in range(0, a.memory_events, max(1, a.memory_events // 1000))]
    usage = [run.redis.memory_usage(k, samples=0) or 0 for k in keys]
    rows.append(make_row("memory.consumer_peak_rss", p_big["hwm_mib"], "MiB", p_small["hwm_mib"],
                         note=f"`ulens consume` process (VmHWM) after {sum_big['alerts']} alerts = "
                              f"{a.memory_events} live events x {pts} points; RSS (MiB) through the "
                              f"run {rss_trajectory(p_big['samples'])}; baseline: the same command "
                              f"over {small_n} events x {pts} points"))
    rows.append(make_row(f"memory.redis_per_event_{pts}pts", float(np.mean(usage)), "bytes",
                         delta / a.memory_events,
                         note=f"MEMORY USAGE of {len(keys)} event keys after {pts} points; baseline: "
                              f"INFO used_memory delta / {a.memory_events} events over the run (other "
                              "clients of this Redis count too)"))

    # 100 points per event through the state path (the broker's append script), vs a list
    n_ev, n_pts = a.redis_events, 100
    art = load_artifact(a.model or run.settings.model.resolved, "cpu")
    sub = tiled_events(ds, n_ev, n_pts, id_base=3 * 10**12)
    prefix = run.prefix("mem100")
    store = st.EventStore(run.redis, prefix, run.settings.redis.event_ttl_s, run.settings.redis.max_points,
                          reference_points=int(art.card["reference_points"]),
                          receptive_field=art.receptive_field,
                          smooth_window=int(art.decision.get("smooth_window", 5)))
    oids = sub.event_id.tolist()
    t_pts = sub.time.reshape(n_ev, n_pts) + run.settings.replay.start_mjd
    m_pts = sub.mag.reshape(n_ev, n_pts)
    e_pts = sub.mag_err.reshape(n_ev, n_pts)
    sid = (sub.event_id[:, None] * 100_000 + np.arange(n_pts)[None, :])
    naive = run.redis.pipeline(transaction=False)
    for j in range(n_pts):   # one point per event per round, as the stream delivers them
        store.append(oids, [1] * n_ev, st.pack_points(sid[:, j], t_pts[:, j], m_pts[:, j], e_pts[:, j]))
        for o in range(n_ev):
            naive.rpush(f"{prefix}:list:{oids[o]}", struct.pack("<qdff", int(sid[o, j]), t_pts[o, j],
                                                                m_pts[o, j], e_pts[o, j]))
        naive.execute()
    ev = [run.redis.memory_usage(store.event_key(o), samples=0) for o in oids]
    lst = [run.redis.memory_usage(f"{prefix}:list:{o}", samples=0) for o in oids]
    rows.append(make_row("memory.redis_per_event_100pts", float(np.mean(ev)), "bytes", float(np.mean(lst)),
                         note=f"MEMORY USAGE of {n_ev} event keys after 100 points appended one at a "
                              "time by the broker's state script (broker.state.EventStore.append); "
                              "baseline: a Redis list of the same 100 points (24 B each, RPUSH)",
                         target="<= 2 KB per live event of 100 points"))
    log(f"memory: consumer peak {p_big['hwm_mib']:.0f} MiB (small {p_small['hwm_mib']:.0f}); Redis "
        f"{np.mean(ev):.0f} B/event at 100 points (list {np.mean(lst):.0f} B)")
    return rows


# ----------------------------------------------------------------------------- command

def _sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", nargs="+", choices=BENCHMARKS + ("all",),
                   help="which benchmarks to run (all = every one, in this order)")
    p.add_argument("--json", action="store_true", help="one JSON row per line (else a table)")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the JSON rows here")
    p.add_argument("--cache-dir", default=None,
                   help="simulated datasets are cached here [default <services.cache_dir>/bench]")
    p.add_argument("--events", type=int, default=5000, help="events in the cached dataset (half binary)")
    p.add_argument("--seed", type=int, default=1, help="simulation seed of the cached dataset")
    p.add_argument("--workers", type=int, default=None, help="processes for the one-off simulation")
    p.add_argument("--model", default=None, help="model artifact [config model.path]")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in this process (the in-process consumer, inference) "
                        "[torch's default]")
    g = p.add_argument_group("consumer / replay")
    g.add_argument("--alerts", type=int, default=200_000,
                   help="alerts in the stream: the first N in survey-time order over all events")
    g.add_argument("--warm-points", type=int, default=120,
                   help="second consumer run: the same number of alerts after each event's first N "
                        "points, put in Redis beforehand (0 = skip)")
    g.add_argument("--warm-alerts", type=int, default=60_000, help="alerts in that second run")
    g.add_argument("--naive-alerts", type=int, default=1000,
                   help="alerts (of the first events of the same stream) for the naive consumer")
    g.add_argument("--rate", type=float, default=3000.0, help="offered alerts/s in the latency run")
    g.add_argument("--latency-seconds", type=float, default=30.0,
                   help="latency run: replay the first events of the stream making about "
                        "rate x seconds alerts")
    g.add_argument("--latency-events", type=int, default=None,
                   help="latency run: replay exactly the first N events instead")
    g.add_argument("--profile", metavar="DIR", default=None,
                   help="cProfile the consumer throughput run; write DIR/consumer_throughput.prof "
                        "('-' = print only) and print the top functions on stderr")
    g = p.add_argument_group("inference")
    g.add_argument("--batch-sizes", type=_sizes, default=[1, 16, 256, 4096], help="comma-separated")
    g.add_argument("--length", type=int, default=1200, help="full light-curve length in points")
    g.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    g = p.add_argument_group("simulate")
    g.add_argument("--sim-binary", type=int, default=64, help="binary events (workers=1)")
    g.add_argument("--sim-pspl", type=int, default=2048, help="PSPL events (workers=1)")
    g.add_argument("--sim-surveys", type=lambda v: [x for x in v.split(",") if x], default=["thesis", "lsst", "roman"],
                   metavar="NAMES", help="survey profiles, comma-separated (training/surveys)")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-events", type=int, default=100_000, help="live events held by the consumer")
    g.add_argument("--memory-points", type=int, default=2, help="points per event in that run")
    g.add_argument("--redis-events", type=int, default=1000, help="events grown to 100 points for "
                   "the per-event Redis figure")


def run(args) -> int:
    from config import mask_url
    from ulens.cli import EXIT_OK, EXIT_UNEXPECTED, exit_code_for

    which = list(BENCHMARKS) if "all" in args.benchmark else \
        [b for b in BENCHMARKS if b in args.benchmark]
    if args.torch_threads is not None:
        import torch
        torch.set_num_threads(args.torch_threads)
    before = machine_context()
    rows: list[dict] = []
    r = Run(args)
    fns = {"consumer": bench_consumer, "replay": bench_replay, "inference": bench_inference,
           "simulate": bench_simulate, "memory": bench_memory}
    failed = []
    try:
        for b in which:
            log(f"== {b} (load average {os.getloadavg()[0]:.2f})")
            t0 = time.perf_counter()
            try:
                got = fns[b](r, args)
            except Exception as exc:   # report the others; a failed benchmark is an error row
                failed.append(exc)
                what = mask_url(f"{type(exc).__name__}: {exc}")
                log(f"{b} failed: {what}")
                got = [make_row(f"{b}.error", None, None, note=what)]
            rows += got
            log(f"== {b} done in {time.perf_counter() - t0:.0f} s")
    finally:
        r.cleanup()
    rows.insert(0, context_row(before, machine_context()))
    rows[0]["context"]["benchmarks"] = which
    rows[0]["context"]["argv"] = " ".join(["ulens", "bench", *sys.argv[2:]]) \
        if sys.argv[1:2] == ["bench"] else None
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
    if args.output:
        Path(args.output).write_text("".join(json.dumps(row) + "\n" for row in rows))
    # the first failure's status in the `ulens` table (4: services unavailable...), else 1
    return (exit_code_for(failed[0]) or EXIT_UNEXPECTED) if failed else EXIT_OK
