"""Shared test helpers. Test alerts are built only here, through the real schema."""
from __future__ import annotations

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
