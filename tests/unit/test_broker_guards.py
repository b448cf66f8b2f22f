"""Pure parts of the consumer's guards (no services): the flood guard, times from the
future, unreadable messages and headers, the append statuses' dead letters, the Redis
configuration check."""
from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from broker import state as st
from broker.consumer import check_redis
from broker.errors import BrokerError
from broker.flood import FloodGuard
from broker.validate import (Points, append_outcomes, check_record, dead_letter, message_headers, mjd_now,
                             validate_batch)
from schemas import default_codec
from tests.helpers import mock_alert

CODEC = default_codec()


# --- flood guard --------------------------------------------------------------------
def test_flood_guard_trips_when_one_reason_takes_the_share_of_the_window():
    g = FloodGuard(window=1000, share=0.5)
    for _ in range(3):                                  # 900 messages, all unknown_schema_id
        assert g.check(300, Counter(unknown_schema_id=300)) is None   # not a full window yet
        g.add(300, Counter(unknown_schema_id=300))
    f = g.check(300, Counter(unknown_schema_id=300))
    assert (f.reason, f.count, f.total) == ("unknown_schema_id", 1200, 1200)
    err = f.error("unknown schema id 1101")
    assert "unknown_schema_id" in str(err) and "1101" in str(err) and err.exit_code == 3


def test_flood_guard_ignores_a_mix_and_forgets_old_batches():
    g = FloodGuard(window=1000, share=0.5)
    mix = Counter(bad_body=100, out_of_order=100, future_time=100)   # 30% dead, no reason at 50%
    for _ in range(10):
        assert g.check(1000, mix) is None
        g.add(1000, mix)
    for _ in range(5):                                               # a clean hour
        g.add(1000, Counter())
    assert g.check(500, Counter(bad_key=400)) is None                # 400 of the last 1,500
    assert g.check(1000, Counter(bad_key=600)).reason == "bad_key"   # 600 of the last 1,000
    assert FloodGuard(window=0, share=0.5).check(10**6, Counter(x=10**6)) is None  # off


def test_flood_guard_check_counts_nothing():
    """A batch retried after a fault is judged again, counted once (add after its commit)."""
    g = FloodGuard(window=10, share=0.5)
    for _ in range(5):
        g.check(6, Counter(a=6))
    assert g.check(6, Counter(a=6)) is None                          # 6 < window 10
    g.add(6, Counter(a=6))
    assert g.check(6, Counter(a=6)).total == 12


# --- times from the future -------------------------------------------------------------
def test_mjd_now_and_the_future_bound():
    assert mjd_now(0.0) == 40587.0                                   # the Unix epoch
    assert mjd_now(1_796_083_200.0) == pytest.approx(61375.0)        # 2026-12-01
    rec = mock_alert(midpointMjdTai=61380.0)
    assert check_record(rec, str(rec["diaObjectId"]).encode(), max_mjd=None) is None
    bad = check_record(rec, str(rec["diaObjectId"]).encode(), max_mjd=61375.5)
    assert bad.reason == "future_time" and "61380" in bad.detail
    assert check_record(rec, str(rec["diaObjectId"]).encode(), max_mjd=61380.0) is None


def test_validate_batch_refuses_future_times_and_keeps_bands():
    recs = [mock_alert(diaSourceId=1, midpointMjdTai=60000.0, band="g"),
            mock_alert(diaSourceId=2, midpointMjdTai=199_000.0, band="i"),
            mock_alert(diaSourceId=3, midpointMjdTai=60001.0, band="y")]
    pts, kept, rejected = validate_batch(CODEC, [CODEC.encode(r, "alert") for r in recs],
                                         [str(r["diaObjectId"]).encode() for r in recs], max_mjd=61000.0)
    assert kept == [0, 2] and rejected[1].reason == "future_time"
    assert list(pts.band) == [1, 5]


def test_an_unexpected_error_while_reading_one_message_rejects_only_that_message(monkeypatch):
    import broker.validate as v

    recs = [mock_alert(diaSourceId=i, midpointMjdTai=60000.0 + i) for i in range(3)]
    real = v.check_record

    def boom(rec, key, max_mjd=None):
        if rec["diaSourceId"] == 1:
            raise RecursionError("deep")
        return real(rec, key, max_mjd)

    monkeypatch.setattr(v, "check_record", boom)
    pts, kept, rejected = validate_batch(CODEC, [CODEC.encode(r, "alert") for r in recs],
                                         [str(r["diaObjectId"]).encode() for r in recs])
    assert kept == [0, 2] and rejected[1].reason == "unreadable" and "RecursionError" in rejected[1].detail


# --- headers that cannot be read ---------------------------------------------------------
def test_unreadable_headers_are_left_out_and_said():
    class Msg:
        def headers(self):
            raise SystemError("<method 'headers'> returned a result with an exception set")

    headers, why = message_headers(Msg())
    assert headers == [] and why.startswith("SystemError")
    d = dead_letter(b"1", b"\x17x", headers, "bad_magic_byte", "magic 23", "alerts", 0, 5, "g",
                    headers_error=why)
    h = dict(d.headers)
    assert h["dlq.headers.unreadable"].startswith(b"SystemError") and d.value == b"\x17x"
    assert message_headers(SimpleNamespace(headers=lambda: None)) == ([], None)


# --- statuses of the append script -> dead letters ------------------------------------------
def test_append_outcomes_map_each_status():
    n = 6
    pts = Points(np.full(n, 7), np.arange(n) + 100, 60000.0 + np.arange(n), np.zeros(n, np.float32),
                 np.zeros(n, np.float32), np.zeros(n, np.int64), np.zeros(n, np.uint8),
                 np.zeros(n), np.zeros(n))
    kept = [10, 11, 12, 13, 14, 15]
    statuses = st.APPENDED + st.DUPLICATE + st.OUT_OF_ORDER + st.CONFLICT + st.DUPLICATE_UNVERIFIED + st.CHANGED
    app, dup, dead, _ = append_outcomes(statuses, np.arange(n), pts, kept)
    assert (app, dup) == (1, 2)
    assert [(i, r.reason) for i, r in dead] == [(12, "out_of_order"), (13, "duplicate_time"),
                                              (15, "changed_resend")]
    assert "diaSourceId 105" in dead[2][1].detail
    assert append_outcomes(st.APPENDED * 3, np.arange(3), pts, kept) == (3, 0, [], 0)
    with pytest.raises(ValueError):
        append_outcomes(b"9", np.arange(1), pts, kept)


# --- the Redis configuration check ---------------------------------------------------------
class FakeRedis:
    def __init__(self, **conf):
        self.conf = conf

    def config_get(self, name):
        if isinstance(self.conf.get(name), Exception):
            raise self.conf[name]
        return {name: self.conf.get(name, "")}


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-random", "volatile-lru", "volatile-ttl"])
def test_an_evicting_redis_is_refused(policy):
    with pytest.raises(BrokerError, match=f"maxmemory-policy is {policy}"):
        check_redis(FakeRedis(**{"maxmemory-policy": policy, "appendonly": "yes"}))


def test_a_redis_without_aof_or_config_access_is_a_warning(caplog):
    import redis

    with caplog.at_level(logging.WARNING, logger="broker"):
        check_redis(FakeRedis(**{"maxmemory-policy": "noeviction", "appendonly": "yes"}))
        assert not caplog.records
        check_redis(FakeRedis(**{"maxmemory-policy": "noeviction", "appendonly": "no"}))
        assert "without AOF" in caplog.records[-1].message
        check_redis(FakeRedis(**{"maxmemory-policy": redis.exceptions.ResponseError("unknown command 'CONFIG'")}))
        assert "cannot read the Redis configuration" in caplog.records[-1].message
