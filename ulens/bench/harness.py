"""What every benchmark shares: result rows, the machine's context, cached datasets and
the streams cut from them, and :class:`Run` (the topics, groups, Redis prefixes and
subprocesses of one run, all deleted at its end)."""
from __future__ import annotations

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
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np


SIM_DEFAULTS = {"parameter_set": "baseline", "cadence_mask_prob": 0.2, "mag_error_std": 0.05}


def positive_ints(what: str):
    """An argparse type: comma-separated integers >= 1 (``what`` names them in the error)."""
    import argparse

    def parse(text: str) -> list[int]:
        try:
            out = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not out or min(out) < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {text!r}")
        return out

    return parse


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def dataset_path(cache_dir: Path, n_pspl: int, n_binary: int, seed: int, survey: str = "thesis") -> Path:
    d = SIM_DEFAULTS
    where = "" if survey == "thesis" else f"_{survey}"
    return Path(cache_dir) / (f"sim{where}_pspl{n_pspl}_bin{n_binary}_seed{seed}_{d['parameter_set']}"
                              f"_mask{d['cadence_mask_prob']}_err{d['mag_error_std']}_tol0.01.npz")


def cached_dataset(cache_dir: Path, events: int, seed: int, workers: Optional[int],
                   survey: str = "thesis") -> Path:
    """The benchmark dataset (half binary) of a survey profile, simulated once and cached
    by its parameters."""
    from training.simulate import SimulationConfig, simulate

    n_bin = events // 2
    n_pspl = events - n_bin
    path = dataset_path(cache_dir, n_pspl, n_bin, seed, survey)
    if path.exists():
        return path
    log(f"simulating {n_pspl} PSPL + {n_bin} binary events (seed {seed}, survey {survey}) once into {path}")
    t0 = time.perf_counter()
    cfg = SimulationConfig(survey=survey, parameter_set=SIM_DEFAULTS["parameter_set"], seed=seed,
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
                                     consumer={"group": self.group(what),
                                               "rule": getattr(self.args, "rule", None)
                                               or self.settings.consumer.rule})

    def config_file(self, s, name: str) -> Path:
        """A YAML file for a `ulens` subprocess: the user's file with these names over it."""
        import yaml

        base = self.args.config or os.environ.get("ULENS_CONFIG")
        data = yaml.safe_load(Path(base).read_text()) or {} if base else {}
        for section, vals in (("kafka", {"topics": dataclasses.asdict(s.kafka.topics)}),
                              ("redis", {"key_prefix": s.redis.key_prefix}),
                              ("consumer", {"group": s.consumer.group, "rule": s.consumer.rule})):
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


def timed_broker_class():
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


def profile_report(prof: cProfile.Profile, path: Optional[Path], top: int = 30,
                    what: str = "throughput") -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)      # --profile DIR need not exist
        prof.dump_stats(str(path))
        log(f"profile written to {path} (python -m pstats {path})")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        print(f"\n--- profile of the consumer {what} run, sorted by {key} ---\n{s.getvalue()}",
              file=sys.stderr)


def run_codec():
    from schemas import default_codec
    return default_codec()


def load_dataset(path):
    from training.dataset import load
    return load(path)


ROW_KEYS = ("name", "value", "unit", "baseline", "ratio")
