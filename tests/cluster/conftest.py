"""Cluster tier: the broker on a Redis Cluster and a three-broker Kafka (``ulens services
up --cluster``), with a Kafka partition leader and a Redis primary SIGKILLed mid-stream.

Not part of the default run or ``.ci/run`` (12 service processes beside the shared ones,
about 3 minutes on 2 cores): every test here is marked ``cluster`` and skipped unless the
marker expression selects it::

    .venv/bin/pytest -m cluster tests/cluster

The cluster is the one of the configuration (``services.cluster_*`` ports, state under
``<services.state_dir>/cluster``): used when it is up and healthy (and left running),
else started (a node found dead is started again); when none of it ran, it is stopped
and wiped (``down --cluster --wipe``) at the end of the module.
"""
from __future__ import annotations

import os

import pytest

import config as cfg

_SKIP = "the cluster tier runs only when selected: pytest -m cluster tests/cluster (tests/cluster/README.md)"


def pytest_collection_modifyitems(config, items):
    # the tests carry the marker themselves (pytestmark), so -m cluster selects them
    selected = "cluster" in (config.getoption("-m") or "")
    for item in items:
        if not selected and "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=_SKIP))


@pytest.fixture(scope="module")
def cluster_services():
    """Settings of the local cluster (redis.cluster true, its addresses), started if needed."""
    from tests.faults.conftest import clean_env
    from ulens import services_cluster as cl

    if os.environ.get("ULENS_KAFKA_BOOTSTRAP") or os.environ.get("ULENS_REDIS_URL"):
        pytest.skip("ULENS_KAFKA_BOOTSTRAP/ULENS_REDIS_URL set: the suite starts no services")
    base = cfg.load(env=clean_env())
    before = cl.status(base)
    # nothing of it running: started here and wiped at the end; partly running (a node
    # left dead): started again and left running, like a healthy one
    started = not any(x["running"] for x in {**before["kafka"], **before["redis"]}.values())
    if not before["healthy"]:
        cl.up(base, quiet=True)
    s = cl.status(base)
    assert s["healthy"], s
    settings = base.replace(kafka={"bootstrap_servers": s["kafka_bootstrap"]},
                            redis={"url": s["redis_url"], "cluster": True})
    try:
        yield settings
    finally:
        if started:
            cl.down(base, wipe=True, quiet=True)
