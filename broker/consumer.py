"""The consumer loop: thin orchestration of Kafka, Redis and the pure parts.

Per poll batch: decode + validate (``validate``) -> one Redis round trip appending every
point idempotently (``state``) -> one batched model pass over the events that got a new
point (``inference``) -> decision (``triggers``) -> one Redis round trip storing
probabilities and trigger flags -> produce triggers and dead letters, flush, check every
delivery -> mark triggers sent -> commit the batch's offsets synchronously. Any failure
before the commit raises: nothing is committed. A transient fault (Redis restarting or
unreachable, the Kafka broker restarting: ``broker.retry``) runs the same batch again with
backoff for up to ``consumer.retry_for_s``, which the idempotent state turns into no-ops
for the work already done; any other failure stops the consumer and a restart re-reads
the batch. ``consumer.rule`` picks the decision rule(s):
``tdcnn`` (the model pass above), ``pspl-fit`` (``broker.rule_psplfit``: a robust PSPL
refit per new point, its own state and trigger keys) or ``both``; each rule's time is
recorded (``RuleCost``) for the cost per alert.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from broker import state as st
from broker.errors import BrokerError, DeliveryError
from broker.flood import FloodGuard
from broker.known_history import KnownHistory
from broker.kafka_io import commit_offsets, poll_batch, without_error_events
from broker.retry import kafka_error_is_transient, retrying
from broker.inference import Job, Scorer
from broker.metrics import Interval, Metrics
from broker.rule_psplfit import PsplFitRule, RuleCost, params_from_settings
from broker.trigger_fields import as_latest
from broker.triggers import decide_many, stored_curves, tdcnn_rule, trigger_at
from broker.validate import (Rejected, append_outcomes, dead_letter, message_headers, mjd_now,
                             validate_batch)
from broker.schema_registry import codec_for, resolve_ids

log = logging.getLogger("broker")


def consumer_config(settings, group: str) -> dict:
    """librdkafka consumer settings: the shared client config (SASL/SSL) + group semantics."""
    c = settings.consumer
    return {**settings.kafka.client_config(), "group.id": group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False,
            # heartbeats (librdkafka's 3 s, at most a third of the session) also tell a
            # member that a rebalance started. A member waiting out a fault keeps polling
            # with its partitions paused (Broker._wait_polling), so an outage longer than
            # max.poll.interval.ms does not cost it its membership.
            "session.timeout.ms": int(c.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(min(3.0, c.session_timeout_s / 3) * 1000),
            "max.poll.interval.ms": int(c.max_poll_interval_s * 1000)}


def producer_config(settings) -> dict:
    # message.timeout.ms: how long librdkafka keeps retrying a trigger or dead letter (a broker
    # restart included) before it reports a failure; the batch's commit waits for that report
    return {**settings.kafka.client_config(), "acks": "all", "enable.idempotence": True,
            "linger.ms": 5, "message.timeout.ms": 300_000}


def redis_client(settings):
    """Redis client from ``redis.url`` (rediss:// = TLS) with password/CA and the socket
    timeout from the settings; with ``redis.cluster`` a Redis Cluster client
    (``broker.cluster.cluster_client``: redis-py's ``RedisCluster``, the same arguments).
    redis-py's own retries are off: the consumer's retry loop (``broker.retry``) waits out
    faults, logs them, and stops promptly when asked."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if settings.redis.cluster:
        from broker.cluster import cluster_client
        return cluster_client(settings.redis.url, retry=Retry(NoBackoff(), 0),
                              **settings.redis.client_kwargs())
    return redis.Redis.from_url(settings.redis.url, retry=Retry(NoBackoff(), 0),
                                **settings.redis.client_kwargs())


def check_redis(client) -> None:
    """Refuse a Redis that would evict live light curves (every key has a TTL, so a
    volatile-* policy evicts them as readily as allkeys-*); warn when it runs without AOF.
    A Redis that does not answer CONFIG GET (a managed service) gets a warning."""
    import redis

    try:
        conf = {**client.config_get("maxmemory-policy"), **client.config_get("appendonly")}
    except redis.exceptions.ResponseError as exc:
        log.warning("cannot read the Redis configuration (%s): make sure its maxmemory-policy is "
                    "noeviction and AOF is on (README, Durability)", exc)
        return
    policy = str(conf.get("maxmemory-policy", ""))
    if policy.startswith(("volatile", "allkeys")):
        raise BrokerError(f"Redis maxmemory-policy is {policy}: at maxmemory it would evict live "
                          "light curves and trigger records whose offsets are committed (lost for "
                          "good). Set it to noeviction (CONFIG SET maxmemory-policy noeviction): a "
                          "full Redis then refuses writes and the consumer waits with an alarm")
    if str(conf.get("appendonly", "")) == "no":
        log.warning("Redis runs without AOF (appendonly no): a Redis crash loses the points "
                    "written since its last snapshot, whose offsets are already committed "
                    "(README, Durability)")


@dataclass
class BatchCounts:
    """What one batch did to the state (counted once, fed to metrics, summary and log)."""
    points: int = 0          # appended (history included)
    duplicates: int = 0
    backfilled: int = 0      # of them, history points (a new event, visits between alerts)
    history_known: int = 0   # history points the events had already
    dropped: int = 0         # oldest points trimmed (redis.max_points)
    rescored: int = 0        # events scored again (another model)


@dataclass
class Summary:
    alerts: int = 0
    points: int = 0
    duplicates: int = 0
    backfilled: int = 0                                        # history points appended
    history_skipped: Tally = field(default_factory=Tally)      # history points left out, by reason
    rescored: int = 0                                          # events met scored by another model
    dead_letters: Tally = field(default_factory=Tally)
    triggers: int = 0
    batches: int = 0
    retries: Tally = field(default_factory=Tally)              # by cause: redis, kafka
    uncommitted: int = 0                                       # batches left to the next owner
    seconds: float = 0.0
    busy_seconds: float = 0.0                                  # inside process(), all batches
    first_batch_unix: Optional[float] = None                   # wall clock at the first batch's start
    last_batch_unix: Optional[float] = None                    # and at the last one's end
    rule_seconds: dict = field(default_factory=dict)           # per decision rule (RuleCost)

    def as_dict(self) -> dict:
        return {"alerts": self.alerts, "points": self.points, "duplicates": self.duplicates,
                "backfilled": self.backfilled, "history_skipped": dict(self.history_skipped),
                "rescored": self.rescored,
                "dead_letters": dict(self.dead_letters), "triggers": self.triggers,
                "batches": self.batches, "retries": dict(self.retries),
                "uncommitted": self.uncommitted, "seconds": round(self.seconds, 3),
                "busy_seconds": round(self.busy_seconds, 3),
                "first_batch_unix": self.first_batch_unix, "last_batch_unix": self.last_batch_unix,
                "rule_seconds": {k: round(v, 3) for k, v in self.rule_seconds.items()}}


class Broker:
    """One consumer-group member. ``run()`` until idle, a count, or ``stop()``/a signal."""

    def __init__(self, settings, artifact, *, topic: Optional[str] = None, group: Optional[str] = None,
                 metrics_port: Optional[int] = None, redis=None):
        from confluent_kafka import Consumer, Producer

        self.settings = settings
        c = settings.consumer
        self.topic = topic or settings.kafka.topics.alerts
        self.group = settings.consumer_group(group)
        self.codec = codec_for(settings)     # + kafka.schema_registry for unknown ids
        self.artifact = artifact
        self.rule = tdcnn_rule(c, artifact.card)
        self.summary = Summary()
        self.known = KnownHistory()          # history the state has (broker.known_history)
        self.metrics = Metrics()
        self.assigned = threading.Event()
        self._stop = threading.Event()
        # partitions paused (waiting out a fault) or possibly given back paused (a rebalance
        # after the broker once paused) and not resumed since
        self._paused = False
        self._ever_paused = False
        self.partitions: list[int] = []      # currently assigned partitions of the topic
        self.consumer = None
        client = redis if redis is not None else redis_client(settings)
        reference_points = int(artifact.card["reference_points"])

        def open_store():
            check_redis(client)
            return st.EventStore(
                client, settings.redis.key_prefix, settings.redis.event_ttl_s, settings.redis.max_points,
                reference_points=reference_points, receptive_field=artifact.receptive_field,
                smooth_window=self.rule.smooth, trigger_ttl_s=settings.redis.trigger_ttl_s,
                model_tag=st.model_tag(artifact.version, self.rule.smooth, reference_points))

        self.store = self._retrying("start-up (Redis)", open_store)
        self.rules = c.rules                 # ("tdcnn",), ("pspl-fit",) or both
        self.scorer = Scorer(artifact) if "tdcnn" in self.rules else None
        self.cost = RuleCost(self.metrics.registry)
        self.psplfit = PsplFitRule(self.store, params_from_settings(settings),
                                   trigger_ttl_s=settings.redis.trigger_ttl_s) \
            if "pspl-fit" in self.rules else None
        self.flood = FloodGuard(c.flood_window, c.flood_share)
        self.metrics_server = self.metrics.serve(metrics_port, c.metrics_host) if metrics_port else None
        self._delivery_errors: list = []
        # each rejected message's headers, read once per batch: confluent-kafka caches a
        # header list it failed to build (a name that is not UTF-8) with a NULL inside, and
        # a second headers() call on that message (a batch retried) crashes the process
        self._headers: dict[tuple, tuple] = {}
        pconf = producer_config(settings)
        self._message_timeout_s = pconf["message.timeout.ms"] / 1000.0
        self.producer = Producer(pconf)
        self.consumer = Consumer(consumer_config(settings, self.group))
        self._assigned_at: Optional[float] = None
        # when the group took this member's partitions with no assignment since (the
        # rejoin watchdog, consumer.rejoin_after_s); None while an assignment holds
        self._revoked_at: Optional[float] = None
        self.rejoins = 0
        self._subscribed = False
        self._interval = Interval()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------
    def _on_assign(self, consumer, partitions) -> None:
        if consumer is not self.consumer:
            return                       # a replaced client closing (_rejoin_if_stuck)
        if self._ever_paused:
            self._paused = True          # a partition paused before may come back paused
        self.partitions = sorted(p.partition for p in partitions)
        log.info("assigned %d partition(s) of %s: %s", len(partitions), self.topic, self.partitions)
        self._assigned_at = time.monotonic()
        self._revoked_at = None          # any assignment, even an empty one: the group works
        self.assigned.set()
        self.known.forget()

    def _on_revoke(self, consumer, partitions) -> None:
        # every batch is committed before the next poll, except one waiting out a fault
        # (polled by _wait_polling): its commit is then refused and the next owner re-reads it
        if consumer is not self.consumer:
            return                       # a replaced client closing (_rejoin_if_stuck)
        self.known.forget()
        gone = {p.partition for p in partitions}
        self.partitions = [p for p in self.partitions if p not in gone]
        if not self.partitions:      # (a session lost in an outage, say) idle time waits for
            self.assigned.clear()    # the next assignment
            self._revoked_at = time.monotonic()

    def _rejoin_if_stuck(self) -> None:
        """Join again with a new client when the group took this member's partitions and no
        assignment (not even an empty one) came for ``consumer.rejoin_after_s``: after a
        Kafka restart librdkafka's group coordinator handle can stay stuck (requests queued,
        never sent: "GroupCoordinator: Timed out 0 in-flight, 0 retry-queued, 1 out-queue"),
        and the member would wait forever. Every batch is committed before the next poll, so
        the new client resumes at the committed offsets: nothing is lost or read twice
        beyond at-least-once."""
        from confluent_kafka import Consumer

        since = self._revoked_at
        if since is None or time.monotonic() - since < self.settings.consumer.rejoin_after:
            return
        log.warning("no assignment for %.0f s since the group took this member's partitions "
                    "(librdkafka's coordinator stuck after a Kafka restart?): joining again with "
                    "a new client", time.monotonic() - since)
        old = self.consumer
        # close the stuck client aside: its close may wait on the coordinator it cannot reach
        threading.Thread(target=_close_quietly, args=(old,), name="consumer-close", daemon=True).start()
        self.consumer = Consumer(consumer_config(self.settings, self.group))
        self._subscribed = False
        self._paused = False
        self.partitions = []
        self._revoked_at = time.monotonic()   # the next watch starts now
        self.rejoins += 1
        self.subscribe(None)

    def stop(self, *_args) -> None:
        """Ask the loop to finish the current batch, commit and close."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def close(self) -> None:
        if self._closed or self.consumer is None:
            return
        self._closed = True
        try:
            self.producer.flush(10)
        finally:
            self.consumer.close()
            if self.metrics_server is not None:
                server, thread = self.metrics_server
                server.shutdown()
                thread.join(5)

    def run(self, until_idle: Optional[float] = None, max_alerts: Optional[int] = None) -> Summary:
        c = self.settings.consumer
        started = time.monotonic()
        idle_from: Optional[float] = None  # nothing read since then (counted once assigned)
        try:
            if not self._subscribed and not self.subscribe(None if until_idle is None else until_idle + 60.0):
                return self.summary
            while not self._stop.is_set():
                if self._paused:             # a rebalance after a wait: nothing stays paused
                    self._resume()
                self._rejoin_if_stuck()
                want = c.batch_size
                if max_alerts is not None:
                    want = min(want, max_alerts - self.summary.alerts)
                    if want <= 0:
                        break
                msgs = poll_batch(self.consumer, want, c.poll_timeout_s)
                now = time.monotonic()
                if msgs:
                    self._headers.clear()
                    self._retrying("batch", lambda: self.process(msgs))
                    idle_from = None
                elif until_idle is not None:
                    # joining the group takes seconds: the idle clock starts (again) at each
                    # assignment (give up waiting for a first one a minute later). Idle and
                    # caught up (no lag) ends the run; idle with lag unknown or left (Kafka
                    # restarting, a batch left uncommitted by a rebalance) waits up to a
                    # minute more for the stream to come back.
                    if self.assigned.is_set():
                        idle_from = max(idle_from or now, self._assigned_at or now)
                        idle = now - idle_from
                        if idle >= until_idle and (idle >= until_idle + 60.0 or self.lag() == 0):
                            break
                    elif now - started >= until_idle + 60.0:
                        break
                self._maybe_log()
        finally:
            self.summary.seconds = time.monotonic() - started
            self._maybe_log(force=True)
            self.close()
        return self.summary

    def subscribe(self, give_up_after: Optional[float] = None) -> bool:
        """Wait until the alert topic exists (a broker started before the replay, say), then
        subscribe. False when it did not appear within ``give_up_after`` s or a stop came."""
        waited, said = 0.0, -1e9
        while not self._stop.is_set():
            md = self._retrying("topic metadata (Kafka)", lambda: self.consumer.list_topics(self.topic, timeout=10))
            t = md.topics.get(self.topic)
            if t is not None and t.error is None and t.partitions:
                self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
                self._subscribed = True
                return True
            if give_up_after is not None and waited >= give_up_after:
                log.warning("topic %r did not appear within %.0f s: nothing consumed", self.topic, waited)
                return False
            if waited - said >= 30.0:
                log.info("waiting for topic %r to be created (%s)", self.topic,
                         t.error.str() if t is not None and t.error is not None else "not there yet")
                said = waited
            self._stop.wait(1.0)
            waited += 1.0
        return False

    def _retrying(self, what: str, fn):
        """``fn()`` retried through transient Redis/Kafka faults (``broker.retry``), serving
        the consumer group meanwhile; paused partitions are resumed once it succeeded."""
        out = retrying(what, fn, budget=self.settings.consumer.retry_for_s, stop=self._stop,
                       log=log, count=self._count_retry, alarm=self._count_alarm,
                       wait=self._wait_polling)
        self._resume()
        return out

    def _count_retry(self, cause: str) -> None:
        self.known.forget()                  # a Redis that restarted may have lost its last writes
        self.summary.retries[cause] += 1
        self.metrics.retries.labels(cause).inc()

    def _count_alarm(self, name: str) -> None:
        self.metrics.alarms.labels(name).inc()

    # --- serving the group while a batch waits (max.poll.interval.ms) -----------------
    def _wait_polling(self, seconds: float) -> bool:
        """Wait ``seconds`` while polling Kafka, so that a long outage does not exceed
        max.poll.interval.ms (librdkafka would then leave the group). The assigned partitions
        are paused, so a poll returns no message; one that still comes (a partition assigned
        by a rebalance meanwhile) is sought back to its offset and its partition paused: it
        is read again after the fault. True when a stop was asked for."""
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._keep_alive(min(left, 1.0))
        return True

    def _keep_alive(self, timeout: float = 0.0) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        if self.consumer is None or not self._subscribed:
            if timeout:
                self._stop.wait(timeout)
            return
        try:
            parts = self.consumer.assignment()   # pausing a paused partition changes nothing
            if parts:
                self.consumer.pause(parts)
                self._paused = self._ever_paused = True
            m = self.consumer.poll(timeout)
        except KafkaException as exc:   # the broker away too: librdkafka reconnects by itself
            log.debug("poll while waiting: %s", exc)
            self._stop.wait(timeout)
            return
        if m is None:
            return
        if m.error() is not None:
            log.debug("poll while waiting: %s", m.error().str())
            return
        tp = TopicPartition(m.topic(), m.partition(), m.offset())
        try:
            self.consumer.seek(tp)
        except KafkaException as exc:
            log.warning("could not seek %s[%d] back to %d while waiting (%s): the next owner or "
                        "restart re-reads it from the last commit", m.topic(), m.partition(),
                        m.offset(), exc)
        self.consumer.pause([TopicPartition(m.topic(), m.partition())])
        self._paused = self._ever_paused = True

    def _resume(self) -> None:
        """Resume every assigned partition once a wait is over (or after a rebalance once the
        broker has paused): a rebalance during an outage can take a paused partition away
        and give it back (or the session may have been lost and the assignment empty when
        the wait ended), and librdkafka may keep a partition's pause across that; a
        partition left paused would never be read again."""
        from confluent_kafka import KafkaException

        if not self._paused or self.consumer is None:
            return
        self._paused = False
        parts = self.consumer.assignment()
        if parts:
            try:
                self.consumer.resume(parts)
            except KafkaException as exc:
                log.warning("resuming %d partition(s): %s", len(parts), exc)

    # --- one batch -----------------------------------------------------------------
    def process(self, msgs: list) -> None:
        """One poll batch, as the pipeline it is: validate, append, score and decide, guard
        against a flood of dead letters, deliver, commit, count."""
        t0 = time.perf_counter()
        msgs = without_error_events(msgs, self.topic, log)
        if not msgs:
            return
        c = self.settings.consumer
        max_mjd = None if c.future_margin_s is None else mjd_now() + c.future_margin_s / 86400.0
        values = [m.value() for m in msgs]
        resolve_ids(self.codec, values)   # a registry outage raises here (retried), not a dead letter
        batch = validate_batch(self.codec, values, [m.key() for m in msgs], max_mjd,
                               lambda i: msgs[i].timestamp()[1] * 1000)
        points, kept = batch.points, batch.kept
        dead: list[tuple[int, Rejected]] = sorted(batch.rejected.items())
        n = BatchCounts()
        send = self.known.unknown(points.object_id, points.time, points.kind)
        if send is not None:             # history the state has: not sent to Redis again
            n.history_known += int(np.count_nonzero(~send))
            points, kept = points.select(send), np.asarray(kept)[send].tolist()
        triggers: list[dict] = []
        if len(points):
            touched = self._append(points, kept, dead, n)
            if self.scorer is not None:
                with self.cost.timing("tdcnn"):
                    triggers += self._score_and_decide(touched, points)
            if self.psplfit is not None:
                with self.cost.timing("pspl-fit"):
                    triggers += self.psplfit.process(touched, points)
        reasons = Tally(r.reason for _, r in dead)
        alarm = self.flood.check(len(msgs), reasons)
        if alarm is not None:
            example = next(r.detail for _, r in dead if r.reason == alarm.reason)
            raise alarm.error(example)
        self._deliver(msgs, dead, triggers)
        self._retrying("offset commit", lambda: self._commit(msgs))
        self.flood.add(len(msgs), reasons)
        self._account(msgs, points, n, reasons, len(triggers), time.perf_counter() - t0,
                      batch.history_skipped)

    def _append(self, points, kept, dead: list, n: "BatchCounts") -> list[tuple]:
        """Append every point (one Redis round trip); [(AppendResult, the event's rows in
        ``points``)] per event. Dead letters from the state go to ``dead``."""
        order = np.argsort(points.object_id, kind="stable")
        uniq, starts, counts = np.unique(points.object_id[order], return_index=True, return_counts=True)
        packed = st.pack_points(points.source_id[order], points.time[order], points.mag[order],
                                points.mag_err[order], points.band[order],
                                None if points.kind is None else points.kind[order])
        results = self.store.append(uniq.tolist(), counts.tolist(), packed)
        self.known.learn(results)
        touched = []
        history = None if points.kind is None else points.kind == st.KIND_HISTORY
        if history is not None and not history.any():
            history = None
        for e, res in enumerate(results):
            rows = order[starts[e]:starts[e] + counts[e]]
            app, dup, bad, known = append_outcomes(res.statuses, rows, points, kept)
            n.points += app
            n.duplicates += dup
            n.history_known += known
            if history is not None and app:
                n.backfilled += int(np.count_nonzero(
                    history[rows] & (np.frombuffer(res.statuses, np.uint8) == st.APPENDED[0])))
            dead += bad
            n.dropped += res.dropped_now
            if res.rescored:
                n.rescored += 1
                log.info("event %d was scored by another model (or smoothing window): its %d "
                         "stored points are scored again by %s", res.object_id,
                         res.header.n_total - res.header.n_dropped, self.artifact.version)
            touched.append((res, rows))
        return touched

    def _score_and_decide(self, touched: list[tuple], points) -> list[dict]:
        """Model pass, decision, score write-back; the triggers to produce now (new ones and
        those still pending in an outbox)."""
        out: list[dict] = []
        pending = [res.object_id for res, _ in touched if res.trigger_status == b"P"]
        jobs, owners = [], []
        for res, rows in touched:
            h = res.header
            if h.n_scored < h.n_total:
                w = res.window
                jobs.append(Job(h.n_scored, res.start, w["t"].astype(np.float64),
                                w["mag"].astype(np.float32), w["err"].astype(np.float32),
                                h.references, st.band_of(w["band"])))
                owners.append((res, rows))
        if jobs:
            probs = self.scorer.score(jobs)
            heads = [res.header for res, _ in owners]
            rings = np.frombuffer(b"".join(h.ring_bytes for h in heads), dtype="<f4")
            decisions = decide_many(
                rings.reshape(len(heads), self.rule.smooth), np.array([h.n_scored for h in heads]), probs,
                np.array([h.triggered or res.trigger_status != b"\0" for h, (res, _) in zip(heads, owners)]),
                self.rule)
            updates = []
            curves = stored_curves(self.store, [res for (res, _), d in zip(owners, decisions)
                                                if d.fire is not None])
            for job, (res, rows), p, d in zip(jobs, owners, probs, decisions):
                h = res.header
                trig = None
                if d.fire is not None:
                    g = h.n_scored + d.fire
                    trig = trigger_at(res.object_id, res.window[g - res.start], points, rows, self.rule,
                                      d.score, g, self.artifact.version, curve=curves[res.object_id])
                updates.append(st.ScoreUpdate(res.object_id, h.n_scored, p, d.ring, trig))
            codes = self.store.save_scores(updates)
            for u, code in zip(updates, codes):
                if code == st.TRIG_NEW:
                    out.append(u.trigger)
                elif code == st.TRIG_PENDING:
                    pending.append(u.object_id)
                elif code in (st.TRIG_CONFLICT, st.TRIG_GONE):
                    log.warning("event %d: scores not stored (%s): it was reset, rescored by another "
                                "model or expired meanwhile", u.object_id,
                                "conflict" if code == st.TRIG_CONFLICT else "gone")
            self.metrics.scored.inc(sum(len(p) for p in probs))
        new_ids = {t["diaObjectId"] for t in out}
        pending = sorted(set(pending) - new_ids)
        if pending:
            got = self.store.pending_triggers(pending)
            if got:
                log.info("re-producing %d trigger(s) whose delivery was not confirmed", len(got))
            out.extend(got.values())
        return out

    def _deliver(self, msgs, dead, triggers) -> None:
        """Produce dead letters and triggers, flush, and fail on any delivery error."""
        topics = self.settings.kafka.topics
        self._delivery_errors.clear()
        cb = self._on_delivery
        for i, rej in dead:
            m = msgs[i]
            where = (m.topic(), m.partition(), m.offset())
            if where not in self._headers:
                self._headers[where] = message_headers(m)
            headers, unreadable = self._headers[where]
            d = dead_letter(m.key(), m.value(), headers, rej.reason, rej.detail, m.topic(),
                            m.partition(), m.offset(), self.group, headers_error=unreadable)
            self.producer.produce(topics.dead_letter, key=d.key, value=d.value, headers=d.headers,
                                  on_delivery=cb)
        sent_ids, sent_fit = [], []
        for rec in triggers:
            rec = dict(as_latest(rec), triggerProducedUs=int(time.time() * 1e6))  # v1 outbox too
            self.producer.produce(topics.triggers, key=str(rec["diaObjectId"]).encode(),
                                  value=self.codec.encode(rec, "trigger"), on_delivery=cb)
            (sent_fit if rec["rule"] == PsplFitRule.name else sent_ids).append(rec["diaObjectId"])
        if not dead and not triggers:
            return
        # librdkafka reports every message within message.timeout.ms (retrying meanwhile,
        # through a broker restart too), so this wait ends; a stop request cuts it short.
        # The consumer keeps polling (partitions paused) so the wait never costs its membership.
        deadline = time.monotonic() + self._message_timeout_s + 5.0
        left = self.producer.flush(1.0)
        while left and not self._stop.is_set() and time.monotonic() < deadline:
            self._keep_alive()
            left = self.producer.flush(1.0)
        self._resume()
        errors = self._delivery_errors
        if left or errors:
            raise DeliveryError(
                f"{left} message(s) not delivered yet, errors: "
                f"{[f'{t}: {e}' for t, e in errors[:3]]}; batch not committed",
                transient=all(kafka_error_is_transient(e) for _, e in errors))
        self.store.mark_sent(sent_ids)
        if sent_fit:
            self.psplfit.mark_sent(sent_fit)

    def _account(self, msgs, points, n: "BatchCounts", reasons: Tally, n_triggers: int,
                 elapsed: float, history_skipped: Optional[dict] = None) -> None:
        """The batch's counts, once, into the metrics, the summary and the log interval."""
        m, s, iv = self.metrics, self.summary, self._interval
        n_dead = sum(reasons.values())
        m.alerts.inc(len(msgs)); m.points.inc(n.points); m.duplicates.inc(n.duplicates)
        if n.backfilled:
            m.history.labels("appended").inc(n.backfilled)
        if n.history_known:
            m.history.labels("known").inc(n.history_known)
        for reason, k in (history_skipped or {}).items():
            m.history.labels(reason).inc(k)
            s.history_skipped[reason] += k
        s.backfilled += n.backfilled
        m.dropped.inc(n.dropped); m.triggers.inc(n_triggers); m.batch_seconds.observe(elapsed)
        m.rescored.inc(n.rescored)
        for reason, k in reasons.items():
            m.dead_letters.labels(reason).inc(k)
        s.alerts += len(msgs); s.points += n.points; s.duplicates += n.duplicates
        s.rescored += n.rescored
        s.dead_letters.update(reasons); s.triggers += n_triggers; s.batches += 1
        s.busy_seconds += elapsed; s.rule_seconds = dict(self.cost.seconds)
        s.last_batch_unix = time.time()
        if s.first_batch_unix is None:
            s.first_batch_unix = s.last_batch_unix - elapsed
        iv.alerts += len(msgs); iv.points += n.points; iv.duplicates += n.duplicates
        iv.dead_letters += n_dead; iv.triggers += n_triggers; iv.batches += 1
        iv.busy_s += elapsed
        live = points.produced_us if points.kind is None else \
            points.produced_us[points.kind == st.KIND_LIVE]          # one per alert
        iv.add_latencies(live, int(time.time() * 1e6))

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._delivery_errors.append((msg.topic(), err))

    def _commit(self, msgs) -> None:
        """Commit the batch's offsets. Transient errors raise (``_retrying`` runs it again);
        after a rebalance took the partitions away the batch stays uncommitted: their next
        owner re-reads it from the last commit and the idempotent state absorbs it."""
        err = commit_offsets(self.consumer, msgs)
        if err is not None:
            self._left_uncommitted(err)

    def _left_uncommitted(self, err) -> None:
        self.summary.uncommitted += 1
        log.warning("offset commit refused after a rebalance (%s): this batch stays uncommitted; "
                    "the partitions' next owner re-reads it and the stored state absorbs it", err.str())

    # --- reporting -----------------------------------------------------------------
    def lag(self) -> Optional[int]:
        """Messages behind the high watermarks of the assigned partitions (cheap, cached)."""
        try:
            parts = self.consumer.assignment()
            if not parts:
                return 0
            total = 0
            positions = self.consumer.position(parts)
            # nothing consumed yet from a partition since this process got it (a restart
            # that is caught up, say): its position is unset, so count from the group's commit
            unset = [tp for tp in positions if tp.offset < 0]
            committed = {(tp.topic, tp.partition): tp.offset
                         for tp in (self.consumer.committed(unset, timeout=2.0) if unset else [])}
            for tp in positions:
                lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
                if hi < 0:
                    lo, hi = self.consumer.get_watermark_offsets(tp, timeout=1.0)
                pos = tp.offset
                if pos < 0:
                    pos = committed.get((tp.topic, tp.partition), -1)
                if pos < 0:
                    pos = lo        # no commit either: auto.offset.reset = earliest
                total += max(hi - pos, 0)
            return total
        except Exception:  # reporting must never stop the loop
            return None

    def _maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        iv = self._interval
        if not force and now - iv.started < self.settings.consumer.log_interval_s:
            return
        if force and iv.alerts == 0:
            return
        lag = self.lag() if not self._closed else None
        if lag is not None:
            self.metrics.lag.set(lag)
        p50, p99 = iv.latency_percentiles()
        self.metrics.latency_p50.set(p50 / 1e3)
        self.metrics.latency_p99.set(p99 / 1e3)
        log.info("%s", iv.line(lag, now))
        self._interval = Interval(started=now)


def _close_quietly(consumer) -> None:
    try:
        consumer.close()
    except Exception as exc:  # a stuck client's close may fail: it is replaced already
        log.info("closing the replaced Kafka client: %s", exc)


def load_model(settings, path=None, device: Optional[str] = None):
    """The artifact the broker runs (``--model`` or ``model.path``)."""
    import torch

    from training.artifact import load_artifact

    # Beside Kafka and Redis on a small machine, extra torch threads spin against them:
    # one thread measured 1.8-3.4x faster than two here (docs/BENCHMARKS_HISTORY.md).
    torch.set_num_threads(settings.consumer.torch_threads)
    art = load_artifact(path or settings.model.resolved, device or settings.consumer.device)
    if art.needs_pspl_d:
        # its inputs at each point include the PSPL fit's D at every earlier point of the
        # window, which the broker does not keep yet (training.features, feature set v3)
        raise BrokerError(f"model {art.version} reads the PSPL-fit statistic (feature set v3), "
                          "which the broker cannot serve yet; it is for offline evaluation "
                          "(ulens evaluate)")
    return art


__all__ = ["Broker", "Summary", "consumer_config", "producer_config", "redis_client", "load_model",
           "BrokerError"]
