"""Shared test helpers. Test alerts are built only here, through the real schema."""
from __future__ import annotations

import socket
import time
import uuid

from schemas import default_codec, samples


def mock_alert(**overrides) -> dict:
    """A valid alert record (schema 'latest'), with fields overridden."""
    codec = default_codec()
    record = dict(samples(codec.schema_id("alert"))[0])
    record["alertProducedUs"] = int(time.time() * 1e6)
    record.update(overrides)
    codec.encode(record, "alert")  # fail early if an override breaks the schema
    return record


def unique(name: str) -> str:
    """A name no other test (or earlier run) uses: topics, groups, key prefixes."""
    return f"test-{name}-{uuid.uuid4().hex[:10]}"


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (for private services in tests)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
