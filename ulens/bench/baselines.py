"""The consumers the broker is compared with in the same run: the no-op floor (the same
consume() call, nothing done) and the naive consumer (what the broker replaces)."""
from __future__ import annotations

import struct
import threading
import time
from typing import Optional

import numpy as np


class NoopConsumer:
    """Transport floor: the broker's own poll (``broker.kafka_io.poll_batch``: wait only
    for the first message, then take what has arrived), doing nothing with the alerts."""

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
        from broker.kafka_io import poll_batch

        try:
            while self.n < n_alerts and not self.stop.is_set():
                msgs = [m for m in poll_batch(self.c, self.batch, self.timeout) if m.error() is None]
                if msgs:
                    now_ms = time.time() * 1000.0
                    self.latency_ms.append(np.fromiter((now_ms - m.timestamp()[1] for m in msgs),
                                                       dtype=np.float64, count=len(msgs)))
                    self.n += len(msgs)
        finally:
            self.c.close()


class NaiveConsumer:
    """What the broker replaces: per message, read the whole light curve from Redis, run the
    model over its full length, produce a trigger if it fires, commit per message. It reads
    both formats with the broker's codec (a Rubin packet whole, by fastavro) and keeps each
    point's band (the model may read it), not the packet's history."""

    POINT = struct.Struct("<dffB")

    def __init__(self, settings, artifact, topic: str, triggers_topic: str, group: str, prefix: str):
        from broker.consumer import consumer_config, producer_config, redis_client
        from broker.triggers import Rule
        from broker.schema_registry import codec_for
        from confluent_kafka import Consumer, Producer

        self.artifact = artifact
        dec = artifact.decision
        self.rule = Rule("naive", artifact.threshold, settings.consumer.min_points,
                         int(dec.get("smooth_window", 5)))
        self.codec = codec_for(settings)
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
        from broker import state as st
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
        band = int(st.band_codes([rec["band"]])[0])
        pipe.rpush(key, self.POINT.pack(rec["midpointMjdTai"], mag[0], err[0], band))
        pipe.lrange(key, 0, -1)
        pipe.exists(tkey)
        _, raw, triggered = pipe.execute()
        pts = np.frombuffer(b"".join(raw), dtype=[("t", "<f8"), ("mag", "<f4"), ("err", "<f4"), ("band", "u1")])
        x = self.artifact.inputs(pts["t"], pts["mag"], pts["err"], band=pts["band"])[None]
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
