"""Prometheus metrics and the periodic log line.

Counters are incremented once per batch (not per alert), so metrics cost nothing
measurable. Each :class:`Metrics` has its own registry, so several brokers can live in
one process (tests).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.alerts = Counter("ulens_alerts", "Alerts (Kafka messages) consumed", registry=r)
        self.points = Counter("ulens_points_appended", "Points appended to light curves", registry=r)
        self.duplicates = Counter("ulens_duplicates", "Re-delivered points already stored", registry=r)
        self.history = Counter("ulens_history_points", "Points of alert packets' history: "
                               "appended (backfill, visits between alerts), known (the event has "
                               "them), or left out (no_flux, nonpositive_flux, bad_value, "
                               "not_before_the_alert)", ["outcome"], registry=r)
        self.dropped = Counter("ulens_points_dropped", "Oldest points dropped (redis.max_points)",
                               registry=r)
        self.dead_letters = Counter("ulens_dead_letters", "Messages sent to the dead-letter topic",
                                    ["reason"], registry=r)
        self.retries = Counter("ulens_retries", "Batches or commits run again after a transient "
                               "Redis or Kafka fault", ["cause"], registry=r)
        self.triggers = Counter("ulens_triggers", "Triggers produced", registry=r)
        self.scored = Counter("ulens_points_scored", "Points given a model probability", registry=r)
        self.rescored = Counter("ulens_events_rescored", "Events met scored by another model (or "
                                "smoothing window) and scored again", registry=r)
        self.alarms = Counter("ulens_alarms", "Retries of a fault that needs a person (Redis out of "
                              "memory, or refusing writes after a failed snapshot)", ["reason"],
                              registry=r)
        self.batch_seconds = Histogram(
            "ulens_batch_seconds", "Wall time to process one poll batch (decode to commit)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=r)
        self.latency_p50 = Gauge("ulens_alert_latency_p50_seconds",
                                 "Median of commit time minus alertProducedUs, last log interval",
                                 registry=r)
        self.latency_p99 = Gauge("ulens_alert_latency_p99_seconds",
                                 "99th percentile of commit time minus alertProducedUs, last log "
                                 "interval", registry=r)
        self.lag = Gauge("ulens_consumer_lag", "Messages behind the high watermark (assigned partitions)",
                         registry=r)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Serve /metrics on ``host:port`` (loopback unless ``consumer.metrics_host`` says
        otherwise: the counters name topics and groups, so they are not for every interface)."""
        return start_http_server(port, addr=host, registry=self.registry)


@dataclass
class Interval:
    """Counts and latencies since the last log line."""
    started: float = field(default_factory=time.monotonic)
    alerts: int = 0
    points: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    triggers: int = 0
    batches: int = 0
    busy_s: float = 0.0
    latencies_ms: list = field(default_factory=list)

    def add_latencies(self, produced_us: np.ndarray, now_us: int) -> None:
        if len(produced_us):
            self.latencies_ms.append((now_us - np.asarray(produced_us, dtype=np.int64)) / 1000.0)

    def latency_percentiles(self) -> tuple[float, float]:
        """(p50, p99) in ms of the interval's alerts (NaN when none)."""
        if not self.latencies_ms:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.concatenate(self.latencies_ms), [50, 99])
        return float(p50), float(p99)

    def line(self, lag: Optional[int], now: Optional[float] = None) -> str:
        dt = max((now or time.monotonic()) - self.started, 1e-9)
        p50, p99 = self.latency_percentiles()
        return (f"{self.alerts / dt:,.0f} alerts/s ({self.alerts} in {dt:.1f} s, {self.batches} batches, "
                f"busy {100 * self.busy_s / dt:.0f}%), appended {self.points}, duplicates "
                f"{self.duplicates}, dead letters {self.dead_letters}, triggers {self.triggers}, "
                f"lag {'?' if lag is None else lag}, latency p50 {p50:.0f} ms p99 {p99:.0f} ms")
