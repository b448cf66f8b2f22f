"""Triggers v2 on the real Kafka and Redis: what the consumer produces carries the alert's
coordinates, the deciding point's band and magnitude, the bands seen, the causal PSPL
estimate and a summary; a v1 trigger left in the Redis outbox before the upgrade is
produced as v2 with the new fields null; the README's subscriber reads v1 and v2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from broker import state as st
from broker import trigger_fields as tf
from broker.consumer import Broker
from schemas import HEADER, default_codec, samples
from tests.helpers import mock_alert, unique
from tests.integration.test_consumer import (choose_threshold, expected_triggers, make_events,
                                             offline_probs, produce, read_topic, settings_for)
from tests.unit.test_broker_inference import make_artifact
from training.photometry import mag_to_njy

REPO = Path(__file__).resolve().parents[2]
CODEC = default_codec()


def with_sky(events, seed=11):
    """Each event a position and a band per point (g, r, i in turn, some runs of one)."""
    rng = np.random.default_rng(seed)
    for ev in events:
        ev["ra"], ev["dec"] = float(rng.uniform(260, 275)), float(rng.uniform(-35, -25))
        ev["band"] = np.array(list("gri"))[rng.integers(0, 3, len(ev["t"]))]
    return events


def sky_alerts(events):
    out = []
    for ev in events:
        flux, ferr = mag_to_njy(ev["mag"], ev["err"])
        for i in range(len(ev["t"])):
            out.append((float(ev["t"][i]), ev["oid"], i, mock_alert(
                diaObjectId=ev["oid"], diaSourceId=ev["oid"] * 100_000 + i, midpointMjdTai=float(ev["t"][i]),
                scienceFlux=float(flux[i]), scienceFluxErr=float(ferr[i]), psfFlux=float(flux[i]) * 0.1,
                psfFluxErr=float(ferr[i]), ra=ev["ra"], dec=ev["dec"], band=str(ev["band"][i]))))
    out.sort(key=lambda x: (x[0], x[1], x[2]))
    return [(str(r["diaObjectId"]).encode(), r) for _, _, _, r in out]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    art = make_artifact(tmp_path_factory.mktemp("model"), seed=7)
    events = with_sky(make_events(3, 10))
    probs = offline_probs(art, events)
    thr = choose_threshold(probs)
    return {"artifact": art, "events": events, "threshold": thr, "expected": expected_triggers(probs, thr)}


def test_consumer_triggers_carry_coordinates_band_mag_estimate_and_summary(
        services, topics, redis_client, key_prefix, model):
    art, events = model["artifact"], model["events"]
    names = topics("alerts", "triggers", "dlq", partitions=2)
    settings = settings_for(services, key_prefix, names, model["threshold"])
    produce(settings, names["alerts"], sky_alerts(events))
    s = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert sum(s.dead_letters.values()) == 0
    msgs = read_topic(settings, names["triggers"])
    expected = model["expected"]
    assert 0 < len(expected) == len(msgs)
    by_oid = {ev["oid"]: ev for ev in events}
    fitted = 0
    for m in msgs:
        sid, t = CODEC.decode(m.value())
        assert sid == CODEC.schema_id("trigger") == 4
        ev = by_oid[t["diaObjectId"]]
        j = expected[t["diaObjectId"]][0]
        assert t["nPoints"] == j + 1
        assert (t["ra"], t["dec"]) == (ev["ra"], ev["dec"])              # the alert's, exactly
        assert t["band"] == ev["band"][j]
        view = st.read_event(redis_client, key_prefix, t["diaObjectId"])
        assert t["mag"] == pytest.approx(float(ev["mag"][j]), abs=1e-4)
        assert t["mag"] == float(view.points["mag"][j]) and t["magErr"] == float(view.points["err"][j])
        assert t["nBands"] == len(set(ev["band"][:j + 1]))
        # the causal estimate: the fit of the stored points up to the deciding one
        e = tf.fit_estimate(view.points[:j + 1])
        if e is None:
            assert t["t0"] is None and "PSPL fit failed" in t["summary"]
        else:
            fitted += 1
            assert (t["t0"], t["u0"], t["tE"], t["peakMag"]) == (e.t0, e.u0, e.tE, e.peak_mag)
            assert t["peakMjdTai"] == t["t0"]
        assert t["summary"].startswith(f"binary candidate {t['diaObjectId']} at RA {ev['ra']:.5f} "
                                       f"Dec {ev['dec']:+.5f}, {t['band']}={t['mag']:.2f} (P=")
        assert t["summary"] == tf.summary_line(t)
        assert view.trigger["summary"] == t["summary"]                    # the outbox holds v2
    assert fitted == len(msgs)                                            # >= 10 points: fits


def test_a_v1_trigger_left_in_the_outbox_is_produced_as_v2(services, topics, redis_client, key_prefix,
                                                           model):
    """Decided and stored in the outbox as JSON by a v1 consumer, not confirmed sent
    before the upgrade: the upgraded consumer re-produces it, as v2, when the event's next
    alert arrives. (The event triggers in a first run; its outbox entry is then replaced
    by a v1 record with status pending, as an old consumer that crashed would leave it.)"""
    import dataclasses

    art, events = model["artifact"], model["events"]
    oid, (j, _) = next((o, x) for o, x in sorted(model["expected"].items())
                       if x[0] < len(next(e for e in events if e["oid"] == o)["t"]) - 2)
    ev = next(e for e in events if e["oid"] == oid)
    names = topics("alerts", "triggers", "dlq", "triggers2", partitions=1)
    settings = settings_for(services, key_prefix, names, model["threshold"])
    alerts = sky_alerts([ev])
    produce(settings, names["alerts"], alerts[:-1])
    Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert len(read_topic(settings, names["triggers"])) == 1
    v1 = {k: v for k, v in samples(2)[0].items() if k != "triggerProducedUs"}
    v1 = dict(v1, diaObjectId=oid, diaSourceId=oid * 100_000 + j, nPoints=j + 1)
    redis_client.set(st.trigger_key(key_prefix, oid), b"P" + json.dumps(v1, sort_keys=True).encode())
    topics2 = dataclasses.replace(settings.kafka.topics, triggers=names["triggers2"])
    settings2 = settings.replace(kafka={"topics": topics2})
    produce(settings, names["alerts"], alerts[-1:])
    Broker(settings2, art, group=unique("g")).run(until_idle=1.0)
    msgs = read_topic(settings, names["triggers2"])
    assert len(msgs) == 1
    sid, t = CODEC.decode(msgs[0].value())
    assert sid == 4
    assert {k: t[k] for k in v1} == v1
    assert all(t[k] is None for k in ("ra", "dec", "band", "mag", "t0", "u0", "tE", "peakMag", "nBands"))
    assert t["summary"] == (f"binary candidate {oid} at unknown position (P=0.973 >= 0.900 after "
                            f"{j + 1} points); no PSPL estimate")
    assert st.read_event(redis_client, key_prefix, oid).trigger_status == "sent"


def test_readme_subscriber_reads_v1_and_v2(services, topics):
    names = topics("triggers")
    v1, v2 = samples(2)[0], samples(4)[0]
    p = Producer(services.kafka.client_config())
    for sid, rec in ((2, v1), (4, dict(v2, triggerId="other"))):
        p.produce(names["triggers"], key=str(rec["diaObjectId"]).encode(), value=CODEC.encode(rec, schema_id=sid))
    assert p.flush(30) == 0
    env = {**os.environ, "ULENS_KAFKA_BOOTSTRAP": services.kafka.bootstrap_servers,
           "TRIGGER_TOPIC": names["triggers"], "GROUP": unique("readme"), "STOP_AFTER": "2",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "subscribe_triggers.py")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("binary candidate 1000001: P=0.973 at MJD 61001.9000 after 412 points")
    assert lines[1].startswith(v2["summary"] + " (")
    assert lines[2].startswith("  RA 268.12345 Dec -29.54321  t0 61010.40  u0 0.120  tE 23.4 d")
    assert HEADER.unpack_from(CODEC.encode(v1, schema_id=2))[1] == 2      # still written as v1 here
