"""Fixtures: the real Kafka and Redis, found running or started for the session.

Bring your own cluster: set ULENS_KAFKA_BOOTSTRAP / ULENS_REDIS_URL and the suite
uses them and starts nothing. Otherwise it uses what `ulens services up` runs, or
starts the local services itself and stops (only) what it started at the end.
Each test gets its own topic names, group ids and Redis key prefix.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import config as cfg
from tests.helpers import unique

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _answering(settings: cfg.Settings) -> bool:
    import redis
    from confluent_kafka.admin import AdminClient
    try:
        redis.Redis.from_url(settings.redis.url, socket_timeout=2,
                             **settings.redis.client_kwargs()).ping()
        AdminClient(settings.kafka.client_config()).list_topics(timeout=5)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def services():
    """Settings pointing at a running Kafka and Redis, with ``consumer.rule: tdcnn``: the
    engine's tests drive the TD-CNN path with the models they build or load (the default
    rule is pspl-fit; its own tests, the demo's and the real-data tier set or read the
    rule themselves)."""
    from ulens import services as svc

    def load():
        return cfg.load().replace(consumer={"rule": "tdcnn"})

    settings = load()
    started: tuple[str, ...] = ()
    if not _answering(settings):
        if os.environ.get("ULENS_KAFKA_BOOTSTRAP") or os.environ.get("ULENS_REDIS_URL"):
            pytest.fail("ULENS_KAFKA_BOOTSTRAP / ULENS_REDIS_URL are set but do not answer")
        info = svc.up(settings, quiet=True)
        started = tuple(n for n in ("kafka", "redis") if info[f"{n}_started"])
        settings = load()
    yield settings
    if started:
        svc.down(settings, only=started, quiet=True)


@pytest.fixture
def topics(services):
    """Create fresh topics: ``topics(n_partitions=1, **names)`` -> dict of real names."""
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(services.kafka.client_config())
    made: list[str] = []

    def make(*names: str, partitions: int = 1) -> dict[str, str]:
        real = {n: unique(n) for n in names}
        futs = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1)
                                    for t in real.values()], operation_timeout=30)
        for f in futs.values():
            f.result(timeout=60)
        made.extend(real.values())
        return real

    yield make
    if made:
        for f in admin.delete_topics(made, operation_timeout=30).values():
            try:
                f.result(timeout=60)
            except Exception:
                pass


@pytest.fixture
def redis_client(services):
    import redis
    return redis.Redis.from_url(services.redis.url, **services.redis.client_kwargs())


@pytest.fixture
def key_prefix(redis_client):
    """A Redis key prefix of this test alone; its keys are deleted afterwards."""
    prefix = unique("rk")
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)
