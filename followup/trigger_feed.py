"""The dashboard's list of triggers: a background thread reading the trigger topic.

It reads every retained trigger from the beginning with a fresh consumer group of its own
(nothing committed, so the broker's group and other readers are untouched) and keeps
them in memory, newest first, decoded like `ulens subscribe` does
(``broker.cli_subscribe.decode_trigger``). A topic that does not exist yet (a broker that
has not fired) is waited for; Kafka being away is shown as the feed's state, and
librdkafka reconnects by itself. The light curves are not here: the page reads them from
Redis, so both work after the broker has stopped.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from typing import Optional

POLL_S = 0.5


class TriggerFeed:
    """``start()`` the reader; ``snapshot()`` the triggers (newest first) and the state."""

    def __init__(self, kafka_config: dict, topic: str, max_triggers: int = 10_000):
        self.kafka_config = dict(kafka_config)
        self.topic = topic
        self._triggers: deque = deque(maxlen=max_triggers)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.state = "starting"
        self.undecodable = 0
        self.last_message_at: Optional[float] = None     # wall clock, seconds

    def start(self) -> "TriggerFeed":
        self._thread = threading.Thread(target=self._run, name="trigger-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> tuple[list[dict], dict]:
        """(triggers newest first, {"state", "count", "undecodable", "last_message_at"})."""
        with self._lock:
            items = list(self._triggers)
        items.reverse()
        return items, {"state": self.state, "count": len(items), "undecodable": self.undecodable,
                       "last_message_at": self.last_message_at}

    def find(self, object_id: int) -> Optional[dict]:
        """The newest trigger of an event (an event fires at most once per rule)."""
        with self._lock:
            for rec in reversed(self._triggers):
                if rec["diaObjectId"] == object_id:
                    return rec
        return None

    def _run(self) -> None:
        from confluent_kafka import Consumer, KafkaError

        from broker.cli_subscribe import decode_trigger, latency_ms
        from schemas import CodecError, default_codec

        codec = default_codec()
        consumer = Consumer({**self.kafka_config, "group.id": f"ulens-dashboard-{uuid.uuid4().hex[:12]}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "allow.auto.create.topics": False})
        try:
            consumer.subscribe([self.topic])
            self.state = "waiting for the topic"
            while not self._stop.is_set():
                msg = consumer.poll(POLL_S)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                        self.state = "waiting for the topic"
                    elif err.code() != KafkaError._PARTITION_EOF:
                        self.state = f"Kafka: {err.str()}"
                    continue
                self.state = "reading"
                self.last_message_at = time.time()
                try:
                    sid, rec = decode_trigger(codec, msg.value())
                except CodecError:
                    self.undecodable += 1
                    continue
                rec = dict(rec, schemaId=sid, latencyMs=latency_ms(rec) if rec["alertProducedUs"] > 0 else None)
                with self._lock:
                    self._triggers.append(rec)
        except Exception as exc:        # shown on the page; the server keeps serving Redis
            self.state = f"stopped: {type(exc).__name__}: {exc}"
        finally:
            consumer.close()
