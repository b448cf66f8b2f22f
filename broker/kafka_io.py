"""The Kafka side of a batch, shared by the consumer and the rekey stage: poll a batch,
drop librdkafka's error events, commit the batch's offsets."""
from __future__ import annotations

from typing import Optional

from broker.errors import BrokerError
from broker.retry import kafka_error_is_transient, rebalance_kafka_codes


def poll_batch(consumer, want: int, timeout_s: float) -> list:
    """Up to ``want`` messages: wait ``timeout_s`` only for the first, then take what has
    already arrived (``consume(n, timeout)`` would hold a half-full batch for the whole
    timeout and add that wait to every alert's latency)."""
    first = consumer.poll(timeout_s)
    msgs = [] if first is None else [first]
    if msgs and want > 1:
        msgs += consumer.consume(num_messages=want - 1, timeout=0)
    return msgs


def without_error_events(msgs: list, topic: str, log) -> list:
    """A poll batch's messages; librdkafka's error events are logged (transient: it
    reconnects by itself; a missing topic: waited for) or raised (anything else).
    The consumer and the rekey stage read their topics through this."""
    from confluent_kafka import KafkaError, KafkaException

    for m in msgs:
        err = m.error()
        if err is None or err.code() == KafkaError._PARTITION_EOF:
            continue
        if err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
            log.warning("topic %r: %s (waiting for it to come back)", topic, err.str())
            continue
        if not kafka_error_is_transient(err):
            raise KafkaException(err)
        # an event, not a message: librdkafka reconnects by itself (a broker restarting)
        log.warning("kafka: %s (the client reconnects by itself)", err.str())
    return [m for m in msgs if m.error() is None]


def commit_offsets(consumer, msgs) -> Optional[object]:
    """Commit the batch's offsets (each partition's highest + 1), synchronously. Returns
    None when committed, or the KafkaError when a rebalance took the partitions away and
    the batch stays uncommitted (their next owner reads it again from the last commit).
    Transient errors raise KafkaException (retry the commit); others BrokerError."""
    from confluent_kafka import KafkaException, TopicPartition

    last: dict[tuple[str, int], int] = {}
    for m in msgs:
        k = (m.topic(), m.partition())
        if m.offset() >= last.get(k, -1):
            last[k] = m.offset()
    try:
        done = consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()],
                               asynchronous=False)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if err is not None and err.code() in rebalance_kafka_codes():
            return err
        raise
    failed = [tp for tp in done or [] if tp.error is not None]
    if failed and all(tp.error.code() in rebalance_kafka_codes() for tp in failed):
        return failed[0].error
    if failed:
        tp = next(tp for tp in failed if tp.error.code() not in rebalance_kafka_codes())
        if kafka_error_is_transient(tp.error):
            raise KafkaException(tp.error)
        raise BrokerError(f"offset commit failed for {tp.topic}[{tp.partition}]: {tp.error}")
    return None
