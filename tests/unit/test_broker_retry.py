"""Which faults the consumer waits out, and the backoff it waits with (pure logic)."""
import logging
import random

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException

from broker.errors import BrokerError, DeliveryError
from broker.retry import (Backoff, GaveUp, Interrupted, alarm_of, kafka_error_is_transient, retrying,
                          transient_cause)

log = logging.getLogger("test")


@pytest.mark.parametrize("exc,cause", [
    (redis.exceptions.ConnectionError("refused"), "redis"),
    (redis.exceptions.BusyLoadingError("LOADING"), "redis"),
    (redis.exceptions.TimeoutError("timed out"), "redis"),
    (redis.exceptions.ResponseError("ERR wrong number of arguments"), None),
    (KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)), "kafka"),
    (KafkaException(KafkaError(KafkaError._WAIT_COORD)), "kafka"),
    (KafkaException(KafkaError(KafkaError._TRANSPORT)), "kafka"),
    (KafkaException(KafkaError(KafkaError.UNKNOWN, retriable=True)), "kafka"),
    (KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)), None),
    (KafkaException(KafkaError(KafkaError._TRANSPORT, fatal=True)), None),
    (DeliveryError("timed out", transient=True), "kafka"),
    (DeliveryError("MSG_SIZE_TOO_LARGE"), None),
    (BrokerError("bad setting"), None),
    (ValueError("bug"), None),
])
def test_transient_cause(exc, cause):
    assert transient_cause(exc) == cause


def test_kafka_error_is_transient_never_for_none_or_fatal():
    assert not kafka_error_is_transient(None)
    assert not kafka_error_is_transient(KafkaError(KafkaError.NOT_COORDINATOR, fatal=True))
    assert kafka_error_is_transient(KafkaError(KafkaError.NOT_COORDINATOR))


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeStop:
    """A threading.Event stand-in whose wait() advances the fake clock instead of sleeping."""

    def __init__(self, clock, set_after=None):
        self.clock, self.waits, self.set_after = clock, [], set_after

    def is_set(self):
        return self.set_after is not None and len(self.waits) >= self.set_after

    def wait(self, s):
        self.waits.append(s)
        self.clock.t += s
        return self.is_set()


def test_backoff_doubles_with_jitter_up_to_the_cap_and_ends_with_the_budget():
    clock = Clock()
    b = Backoff(budget=100.0, clock=clock, rng=random.Random(1))
    delays = []
    while (d := b.next_delay()) is not None:
        delays.append(d)
        clock.t += d
    nominal = [min(30.0, 0.5 * 2 ** i) for i in range(len(delays))]
    for d, n in zip(delays[:-1], nominal):
        assert n / 2 <= d <= n
    assert delays[-1] <= nominal[-1]
    assert sum(delays) == pytest.approx(100.0)      # the last delay is cut to the budget
    assert max(delays) <= 30.0 and len(delays) > 6


def test_retrying_runs_the_same_work_again_until_it_succeeds():
    clock = Clock()
    stop = FakeStop(clock)
    calls, counted = [], []

    def work():
        calls.append(clock.t)
        if len(calls) < 4:
            raise redis.exceptions.ConnectionError("Connection refused")
        return "done"

    out = retrying("batch", work, budget=60, stop=stop, log=log, count=counted.append,
                   backoff=Backoff(60, clock=clock, rng=random.Random(0)))
    assert out == "done" and len(calls) == 4 and counted == ["redis"] * 3
    assert len(stop.waits) == 3 and stop.waits[1] > stop.waits[0] * 0.99 / 2


def test_retrying_gives_up_after_the_budget_with_the_cause():
    clock = Clock()
    stop = FakeStop(clock)

    def work():
        raise KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS))

    with pytest.raises(GaveUp, match=r"offset commit: kafka still failing after 20 s.*retry_for_s = 20"):
        retrying("offset commit", work, budget=20, stop=stop, log=log,
                 backoff=Backoff(20, clock=clock, rng=random.Random(0)))
    assert sum(stop.waits) == pytest.approx(20.0)
    assert transient_cause(GaveUp("x")) is None        # giving up is final


def test_retrying_does_not_retry_other_errors_or_when_stopping():
    clock = Clock()
    with pytest.raises(ValueError):
        retrying("batch", lambda: (_ for _ in ()).throw(ValueError("bug")), budget=60,
                 stop=FakeStop(clock), log=log)
    stop = FakeStop(clock, set_after=1)             # SIGTERM during the first wait

    def work():
        raise redis.exceptions.ConnectionError("down")

    with pytest.raises(Interrupted) as info:
        retrying("batch", work, budget=60, stop=stop, log=log)
    assert len(stop.waits) == 1
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    assert Interrupted.exit_code == 130 and GaveUp.exit_code == 4


def test_redis_out_of_memory_and_misconf_are_waited_out_with_an_alarm():
    oom = redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'.")
    misconf = redis.exceptions.ResponseError(
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.")
    assert (alarm_of(oom), alarm_of(misconf)) == ("redis_oom", "redis_misconf")
    in_pipeline = redis.exceptions.ResponseError("Command # 1 (EVALSHA abc 2 k:ev:1 k:tr:1) of pipeline "
                                                 "caused error: " + str(misconf))
    assert alarm_of(in_pipeline) == "redis_misconf"
    assert transient_cause(oom) == transient_cause(misconf) == "redis"
    assert alarm_of(redis.exceptions.ResponseError("WRONGTYPE")) is None
    # a wrong password is a ConnectionError to redis-py but no outage: it needs a person
    assert transient_cause(redis.exceptions.AuthenticationError("invalid password")) is None
    assert transient_cause(redis.exceptions.ResponseError("WRONGTYPE")) is None
    clock = Clock()
    stop = FakeStop(clock)
    tries, alarms = iter([oom, misconf, None]), []

    def work():
        e = next(tries)
        if e is not None:
            raise e
        return "ok"

    assert retrying("batch", work, budget=60, stop=stop, log=log, alarm=alarms.append) == "ok"
    assert alarms == ["redis_oom", "redis_misconf"]


def test_retrying_waits_with_the_given_wait():
    """The consumer passes a wait that polls Kafka (partitions paused) instead of sleeping."""
    clock = Clock()
    waited = []

    def wait(seconds):
        waited.append(seconds)
        clock.t += seconds
        return False

    tries = iter([redis.exceptions.ConnectionError("down"), None])

    def work():
        e = next(tries)
        if e is not None:
            raise e
        return 1

    assert retrying("batch", work, budget=60, stop=FakeStop(clock), log=log, wait=wait) == 1
    assert len(waited) == 1 and waited[0] > 0


def test_retry_budget_zero_fails_at_the_first_fault():
    with pytest.raises(GaveUp):
        retrying("batch", lambda: (_ for _ in ()).throw(redis.exceptions.ConnectionError("x")),
                 budget=0, stop=FakeStop(Clock()), log=log)
