"""Fuzz: malformed messages interleaved with a valid stream, against the real `ulens consume`.

Every malformed message is built so that its dead-letter reason is known by construction
(a set of two for frames cut or filled with random bytes: ``truncated_frame`` or
``bad_body``). Re-sent valid alerts are duplicates, not malformed: they are counted
separately. The shared Kafka and Redis are used (no restarts): topics, group and key
prefix of this test alone.

Asserted exactly: the consumer exits 0 (by idleness); every malformed message is in the
dead-letter topic once, with its key, value, original headers and a reason of its
category; every valid point is in Redis (times, magnitudes, errors bit for bit) and
nothing else is; valid + dead letters + duplicates = produced.
"""
from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest

import config as cfg
from broker.consumer import Broker, load_model
from schemas import HEADER, default_codec, samples
from tests.faults.conftest import ConsumerProc, read_all, produce, stored_events, write_config
from tests.helpers import mock_alert, unique
from training.photometry import mag_to_njy

pytestmark = pytest.mark.faults

SEED = 20261127
N_EVENTS = 300                 # valid events ...
POINTS = (15, 31)              # ... of 15..30 points each (about 6,700 valid alerts)
BIG_ALERT_BYTES = 1_900_000    # one valid alert near Kafka's message.max.bytes (2 MiB locally)
UNTIL_IDLE_S = 5.0
CONSUMER_TIMEOUT_S = 240

# malformed messages per category: (count, allowed dead-letter reasons)
MALFORMED = {
    "random_bytes":     (1500, {"bad_magic_byte"}),       # first byte != 0
    "short_frame":      (300, {"truncated_frame"}),       # 0..4 bytes, or no value at all
    "truncated_alert":  (1500, {"truncated_frame", "bad_body"}),
    "random_body":      (1000, {"truncated_frame", "bad_body"}),  # valid header, random body
    "wrong_magic":      (700, {"bad_magic_byte"}),
    "unknown_schema":   (700, {"unknown_schema_id"}),
    "wrong_kind":       (300, {"wrong_kind"}),            # a trigger / truth record
    "trailing_bytes":   (500, {"bad_body"}),
    "nonfinite":        (1200, {"nonfinite_value"}),      # NaN, +inf, -inf
    "nonpositive_err":  (500, {"nonpositive_error"}),
    "nonpositive_flux": (400, {"nonpositive_flux"}),
    "absurd":           (1500, {"absurd_value"}),         # times, positions, bands, huge values
    "negative_id":      (300, {"bad_id"}),
    "bad_key":          (400, {"bad_key"}),
    "out_of_order":     (300, {"out_of_order"}),          # earlier than the newest, matches none
    "duplicate_time":   (200, {"duplicate_time"}),        # the newest time, another diaSourceId
}
N_DUPLICATES = 600             # valid alerts sent again (idempotently ignored)
FIRST_OID = 7_100_000_000

CODEC = default_codec()
FIELDS_FINITE = ("midpointMjdTai", "scienceFlux", "scienceFluxErr", "psfFlux", "psfFluxErr", "ra", "dec")


def make_events(rng):
    events = []
    for e in range(N_EVENTS):
        n = int(rng.integers(*POINTS))
        t = 60000.0 + rng.uniform(0, 30) + np.cumsum(rng.uniform(0.05, 2.0, n))
        u = np.sqrt(rng.uniform(0.05, 1.0) ** 2 + ((t - rng.uniform(t[0], t[-1])) / rng.uniform(5, 60)) ** 2)
        amp = (u ** 2 + 2) / (u * np.sqrt(u ** 2 + 4))
        err = rng.uniform(0.01, 0.1, n).astype(np.float32)
        mag = (rng.uniform(17, 21) - 2.5 * np.log10(amp) + rng.normal(0, err)).astype(np.float32)
        flux, ferr = mag_to_njy(mag, err)
        oid = FIRST_OID + e
        recs = [mock_alert(diaObjectId=oid, diaSourceId=oid * 1000 + i, midpointMjdTai=float(t[i]),
                           scienceFlux=float(flux[i]), scienceFluxErr=float(ferr[i]),
                           psfFlux=float(flux[i]) * 0.1, psfFluxErr=float(ferr[i]), alertProducedUs=1)
                for i in range(n)]
        events.append({"oid": oid, "t": t, "mag": mag, "err": err, "recs": recs})
    return events


def enc(rec) -> bytes:
    return CODEC.encode(rec, "alert")


def key_of(oid) -> bytes:
    return str(oid).encode()


def build_stream(rng, big_bytes: int = BIG_ALERT_BYTES):
    """(items, kinds): items = (key, value, headers) in produce order; kinds[fuzz id] = category."""
    events = make_events(rng)
    template = dict(samples(CODEC.schema_id("alert"))[0], alertProducedUs=1)
    # valid stream: every event's points interleaved in time order
    order = sorted(((ev["t"][i], e, i) for e, ev in enumerate(events) for i in range(len(ev["t"]))))
    # messages tied to a point of an event go right after it: {(event, point): [items]}
    after: dict[tuple[int, int], list] = {}
    loose: list = []          # malformed messages placed anywhere
    kinds: dict[str, str] = {}
    next_oid = [FIRST_OID + 10_000_000]

    def fresh_oid():
        next_oid[0] += 1
        return next_oid[0]

    def tag(kind, key, value, where=None):
        fid = str(len(kinds))
        kinds[fid] = kind
        item = (key, value, [("fuzz.id", fid.encode()), ("fuzz.kind", kind.encode())])
        (after.setdefault(where, []) if where is not None else loose).append(item)

    def rec(**over):
        oid = over.pop("diaObjectId", None) or fresh_oid()
        r = dict(template, diaObjectId=oid, diaSourceId=oid * 1000 + 1, **over)
        return r

    counts = {k: n for k, (n, _) in MALFORMED.items()}
    for _ in range(counts["random_bytes"]):
        b = bytearray(rng.bytes(int(rng.integers(5, 400))))
        b[0] = int(rng.integers(1, 256))
        tag("random_bytes", rng.bytes(int(rng.integers(0, 12))) or None, bytes(b))
    for i in range(counts["short_frame"]):
        n = i % 6   # 0..4 bytes, and 5 = no value at all (a tombstone)
        tag("short_frame", key_of(fresh_oid()), None if n == 5 else bytes([0]) + rng.bytes(n - 1) if n else b"")
    for _ in range(counts["truncated_alert"]):
        v = enc(rec(midpointMjdTai=60000.0 + rng.uniform(0, 50)))
        tag("truncated_alert", key_of(fresh_oid()), v[:int(rng.integers(HEADER.size, len(v)))])
    n_body = 0
    while n_body < counts["random_body"]:
        v = HEADER.pack(0, CODEC.schema_id("alert")) + rng.bytes(int(rng.integers(0, 200)))
        try:
            CODEC.decode(v)
            continue          # random bytes that happen to decode are not "malformed" by construction
        except Exception:
            pass
        tag("random_body", key_of(fresh_oid()), v)
        n_body += 1
    for _ in range(counts["wrong_magic"]):
        r = rec()
        v = bytearray(enc(r))
        v[0] = int(rng.integers(1, 256))
        tag("wrong_magic", key_of(r["diaObjectId"]), bytes(v))
    known = {CODEC.schema_id(k) for k in ("alert", "trigger", "truth")}
    for _ in range(counts["unknown_schema"]):
        r = rec()
        sid = int(rng.integers(0, 2 ** 32))
        while sid in known:
            sid = int(rng.integers(0, 2 ** 32))
        tag("unknown_schema", key_of(r["diaObjectId"]), HEADER.pack(0, sid) + enc(r)[HEADER.size:])
    trig_sample = samples(CODEC.schema_id("trigger"))[0]
    truth_samples = samples(CODEC.schema_id("truth"))
    for i in range(counts["wrong_kind"]):
        if i % 2:
            v = CODEC.encode(dict(trig_sample, diaObjectId=fresh_oid()), "trigger")
        else:
            v = CODEC.encode(truth_samples[i % len(truth_samples)], "truth")
        tag("wrong_kind", key_of(fresh_oid()), v)
    for _ in range(counts["trailing_bytes"]):
        r = rec()
        tag("trailing_bytes", key_of(r["diaObjectId"]), enc(r) + rng.bytes(int(rng.integers(1, 60))))
    for i in range(counts["nonfinite"]):
        r = rec(**{FIELDS_FINITE[i % len(FIELDS_FINITE)]: (math.nan, math.inf, -math.inf)[(i // 7) % 3]})
        tag("nonfinite", key_of(r["diaObjectId"]), enc(r))
    for i in range(counts["nonpositive_err"]):
        field = ("scienceFluxErr", "psfFluxErr")[i % 2]
        r = rec(**{field: (0.0, -1.0, -1e300, -5e-324)[(i // 2) % 4]})
        tag("nonpositive_err", key_of(r["diaObjectId"]), enc(r))
    for i in range(counts["nonpositive_flux"]):
        r = rec(scienceFlux=(0.0, -0.0, -3.5, -1e308)[i % 4])
        tag("nonpositive_flux", key_of(r["diaObjectId"]), enc(r))
    absurd = [{"midpointMjdTai": 2_460_000.5}, {"midpointMjdTai": 1.8e9}, {"midpointMjdTai": -1.0},
              {"midpointMjdTai": 1e308}, {"ra": 360.5}, {"ra": -0.1}, {"dec": 90.01}, {"dec": -1e6},
              {"band": "q"}, {"band": ""}, {"band": "R"}, {"band": "x" * 10_000},
              {"scienceFlux": 1e30},                       # magnitude below 0
              {"scienceFlux": 1e-30},                      # magnitude above 40
              {"scienceFlux": 5e-324},                     # denormal: magnitude about 838
              {"scienceFlux": 1e3, "scienceFluxErr": 1e12},  # magnitude error above 10
              {"scienceFlux": 1.7e308, "scienceFluxErr": 1.7e308}]
    for i in range(counts["absurd"]):
        r = rec(**absurd[i % len(absurd)])
        tag("absurd", key_of(r["diaObjectId"]), enc(r))
    for i in range(counts["negative_id"]):
        oid = fresh_oid()
        r = dict(template, diaObjectId=(-oid, oid, oid)[i % 3],
                 diaSourceId=(oid * 1000, -1, -(2 ** 63))[i % 3])
        tag("negative_id", key_of(r["diaObjectId"]), enc(r))
    for i in range(counts["bad_key"]):
        r = rec()
        key = (None, key_of(r["diaObjectId"] + 1), b" " + key_of(r["diaObjectId"]), b"\xff\x00")[i % 4]
        tag("bad_key", key, enc(r))
    # tied to valid events: out of order, same time with another id, duplicates
    def pick(min_index):
        while True:
            e = int(rng.integers(0, N_EVENTS))
            n = len(events[e]["t"])
            if n > min_index:
                return e, int(rng.integers(min_index, n))

    for j in range(counts["out_of_order"]):
        e, k = pick(2)
        ev = events[e]
        t = (ev["t"][k - 2] + ev["t"][k - 1]) / 2    # between two points, after the newer one
        r = dict(ev["recs"][k - 1], diaSourceId=ev["oid"] * 1000 + 500 + j % 400, midpointMjdTai=float(t))
        tag("out_of_order", key_of(ev["oid"]), enc(r), where=(e, k - 1))
    for j in range(counts["duplicate_time"]):
        e, k = pick(0)
        ev = events[e]
        r = dict(ev["recs"][k], diaSourceId=ev["oid"] * 1000 + 900 + j % 99)
        tag("duplicate_time", key_of(ev["oid"]), enc(r), where=(e, k))
    n_dups = 0
    for j in range(N_DUPLICATES):
        e, k = pick(0)
        ev = events[e]
        # half right after the point (the newest), half some points later (an older one)
        later = min(len(ev["t"]) - 1, k + (int(rng.integers(1, 8)) if j % 2 else 0))
        after.setdefault((e, later), []).append((key_of(ev["oid"]), enc(ev["recs"][k]), [("fuzz.dup", b"1")]))
        n_dups += 1

    items = []
    for _, e, i in order:
        ev = events[e]
        items.append((key_of(ev["oid"]), enc(ev["recs"][i])))
        items.extend(after.get((e, i), []))
    # the loose malformed messages at random places (valid and tied items keep their order)
    slots = np.sort(rng.integers(0, len(items) + 1, len(loose)))
    perm = rng.permutation(len(loose))
    merged, pos = [], 0
    for s, m in zip(slots, perm):
        merged.extend(items[pos:s])
        merged.append(loose[m])
        pos = s
    merged.extend(items[pos:])
    # one valid alert near the size limit: a point of event 0 carrying a huge history
    ev = events[0]
    small = (key_of(ev["oid"]), enc(ev["recs"][3]))
    big_at = next(n for n, it in enumerate(merged) if it[:2] == small)
    prv = {"diaSourceId": 1, "midpointMjdTai": 60000.0, "band": "i", "psfFlux": 1.0, "psfFluxErr": 1.0,
           "scienceFlux": 1.0, "scienceFluxErr": 1.0}
    one = len(CODEC.encode(dict(ev["recs"][3], prvDiaSources=[prv] * 1000), "alert")) / 1000
    big = CODEC.encode(dict(ev["recs"][3], prvDiaSources=[prv] * int(big_bytes / one)), "alert")
    assert 0.9 * big_bytes < len(big) < 1.01 * big_bytes
    merged[big_at] = (merged[big_at][0], big, [("fuzz.big", b"1")])
    return events, merged, kinds, n_dups, len(big)


def max_message_bytes(client: dict) -> int:
    """The Kafka broker's message.max.bytes (librdkafka's default if it cannot be read)."""
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
    try:
        admin = AdminClient(client)
        broker = str(next(iter(admin.list_topics(timeout=10).brokers)))
        res = ConfigResource(ResourceType.BROKER, broker)
        return int(admin.describe_configs([res])[res].result(timeout=10)["message.max.bytes"].value)
    except Exception:
        return 1_000_000


def big_size(client: dict) -> int:
    """Near the size limit: BIG_ALERT_BYTES, or 93% of a smaller broker limit."""
    return min(BIG_ALERT_BYTES, int(0.93 * max_message_bytes(client)))


def consumer_config(services, path, names, prefix, **consumer):
    """A consumer config file for the shared services (their address and security settings)."""
    k, r = services.kafka, services.redis
    return write_config(path, {
        "kafka": {"bootstrap_servers": k.bootstrap_servers, "security_protocol": k.security_protocol,
                  "sasl_mechanism": k.sasl_mechanism, "sasl_username": k.sasl_username,
                  "ssl_ca_location": k.ssl_ca_location,
                  "topics": {"triggers": names["triggers"], "dead_letter": names["dlq"]}},
        "redis": {"url": r.url, "ssl_ca_certs": r.ssl_ca_certs, "key_prefix": prefix},
        "consumer": {"rule": services.consumer.rule, **consumer}})   # the fixture's rule (tdcnn)


def test_fuzz_malformed_messages_dead_lettered_valid_points_stored(services, topics, redis_client,
                                                                   key_prefix, tmp_path):
    client = services.kafka.client_config()
    rng = np.random.default_rng(SEED)
    events, items, kinds, n_dups, big_size_ = build_stream(rng, big_size(client))
    n_valid = sum(len(ev["t"]) for ev in events)
    n_bad = sum(n for n, _ in MALFORMED.values())
    assert len(kinds) == n_bad and len(items) == n_valid + n_bad + n_dups
    assert n_bad >= 10_000

    names = topics("alerts", "triggers", "dlq", partitions=4)
    produced = produce(client, names["alerts"], items, {"message.max.bytes": max_message_bytes(client)})
    assert produced == len(items)
    conf = consumer_config(services, tmp_path / "c.yaml", names, key_prefix, log_interval_s=2.0)
    proc = ConsumerProc(conf, names["alerts"], unique("g"), tmp_path, "fuzz", until_idle=UNTIL_IDLE_S,
                        env=os.environ.copy())
    rc = proc.start().wait(CONSUMER_TIMEOUT_S)
    assert rc == 0, proc.log()[-4000:]
    s = proc.summary()
    reasons = Counter(s["dead_letters"])
    print(f"fuzz: produced {produced} = {n_valid} valid + {n_bad} malformed + {n_dups} duplicates "
          f"(one valid alert of {big_size_} bytes); consumer summary {s}")

    # the counts add up exactly
    assert s["alerts"] == produced
    assert s["points"] == n_valid
    assert s["duplicates"] == n_dups
    assert sum(reasons.values()) == n_bad
    assert s["points"] + sum(reasons.values()) + s["duplicates"] == produced
    # per reason: exact where only one category can give it; the rest in total
    expected = Counter()
    for n, allowed in MALFORMED.values():
        expected[frozenset(allowed)] += n
    shared = set().union(*(a for a in expected if len(a) > 1))
    for allowed, n in expected.items():
        if len(allowed) == 1 and not allowed & shared:
            assert reasons[next(iter(allowed))] == n, (allowed, reasons)
    assert sum(reasons[r] for r in shared) == sum(n for a, n in expected.items() if a & shared)

    # every malformed message is in the dead-letter topic once, as sent, with a reason of its kind
    dlq = read_all(client, names["dlq"])
    assert len(dlq) == n_bad
    by_id = {}
    sent = {dict(it[2])["fuzz.id"].decode(): it for it in items if len(it) > 2 and "fuzz.id" in dict(it[2])}
    for m in dlq:
        h = dict(m.headers())
        fid = h["fuzz.id"].decode()
        assert fid not in by_id, f"fuzz message {fid} dead-lettered twice"
        by_id[fid] = m
        kind = kinds[fid]
        assert h["fuzz.kind"].decode() == kind
        assert h["dlq.reason"].decode() in MALFORMED[kind][1], (kind, h["dlq.reason"], h.get("dlq.detail"))
        assert h["dlq.detail"] and h["dlq.source.topic"].decode() == names["alerts"]
        key, value = sent[fid][0], sent[fid][1]
        assert m.key() == key and m.value() == value
    assert set(by_id) == set(kinds)
    per_kind = Counter((kinds[f], dict(m.headers())["dlq.reason"].decode()) for f, m in by_id.items())
    print("fuzz: dead letters by category and reason:", dict(sorted(per_kind.items())))

    # every valid point is in Redis, bit for bit, and nothing else is
    stored = stored_events(redis_client, key_prefix)
    assert set(stored) == {ev["oid"] for ev in events}
    for ev in events:
        v = stored[ev["oid"]]
        n = len(ev["t"])
        assert (v.header.n_total, v.header.n_scored, v.header.n_dropped) == (n, n, 0), ev["oid"]
        assert np.array_equal(v.points["t"], ev["t"])
        assert np.array_equal(v.points["mag"], ev["mag"]) and np.array_equal(v.points["err"], ev["err"])
        assert v.header.last_source_id == ev["oid"] * 1000 + n - 1


N_OVERSIZE_VALID = 30          # valid points around the oversized messages


def test_messages_near_the_size_limit_are_dead_lettered(services, topics, redis_client, key_prefix, tmp_path):
    """Malformed messages of ~1.9 MB (absurd band, junk frame, junk key) go to the dead
    letters like any other, and the valid points around them are stored."""
    client = services.kafka.client_config()
    size = big_size(client)
    rng = np.random.default_rng(SEED + 1)
    ev = make_events(rng)[0]
    n = min(N_OVERSIZE_VALID, len(ev["t"]))
    key = key_of(ev["oid"])
    huge = [
        ("absurd_value", key_of(FIRST_OID + 99), enc(dict(ev["recs"][0], diaObjectId=FIRST_OID + 99,
                                                          band="x" * size))),
        ("bad_magic_byte", key, b"\x07" + rng.bytes(size)),
        ("bad_key", rng.bytes(size), enc(dict(ev["recs"][0], diaObjectId=FIRST_OID + 98))),
    ]
    items = [(key, enc(r)) for r in ev["recs"][:n // 2]] + [(k, v) for _, k, v in huge] + \
            [(key, enc(r)) for r in ev["recs"][n // 2:n]]
    names = topics("alerts", "triggers", "dlq", partitions=1)
    produce(client, names["alerts"], items, {"message.max.bytes": max_message_bytes(client)})
    # the broker in this process (the same loop `ulens consume` runs): an exception = an exit
    settings = cfg.load(consumer_config(services, tmp_path / "c.yaml", names, key_prefix))
    s = Broker(settings, load_model(settings, device="cpu"), topic=names["alerts"],
               group=unique("g")).run(until_idle=2.0)
    assert (s.alerts, s.points, sum(s.dead_letters.values())) == (len(items), n, len(huge))
    dlq = read_all(client, names["dlq"])
    assert len(dlq) == len(huge)
    for (reason, k, v), m in zip(huge, sorted(dlq, key=lambda m: int(dict(m.headers())["dlq.source.offset"]))):
        h = dict(m.headers())
        assert h["dlq.reason"].decode() == reason
        for got, orig, name in ((m.value(), v, "value"), (m.key(), k, "key")):
            # the whole original, or a prefix that says how long the original was
            assert got == orig or (got == orig[:len(got)] and
                                   int(h[f"dlq.{name}.truncated"]) == len(orig)), name
    v = stored_events(redis_client, key_prefix)[ev["oid"]]
    assert np.array_equal(v.points["t"], ev["t"][:n])
