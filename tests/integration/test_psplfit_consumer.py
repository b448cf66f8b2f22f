"""The classical PSPL-fit rule in the broker, against the real Kafka and Redis.

Light curves (MJD times, float32 magnitudes as the broker derives them) go through the
stream; the expected triggers come from ``training.psplfit.run_curves`` on the same
arrays (the offline evaluation's function). A consumer stopped half-way and restarted
gives the same triggers as an uninterrupted one, and as the offline rule.
"""
from __future__ import annotations

import numpy as np
import pytest

from broker.consumer import Broker
from broker.rule_psplfit import read_fit
from followup.lightcurve import event_dict
from tests.helpers import unique
from tests.integration.test_consumer import (alerts_of, choose_threshold, expected_triggers, offline_probs,
                                             produce, settings_for, triggers_in)
from tests.unit.test_broker_inference import make_artifact
from training import physics, psplfit

MJD0 = 60000.0  # in the past: the broker refuses times after now (consumer.future_margin_s)


def make_events(seed=21):
    """Eight 300-point events over 200 d: PSPL, caustic-crossing binaries, bumps near the peak."""
    rng = np.random.default_rng(seed)
    events = []
    for k in range(8):
        t = np.sort(rng.choice(np.arange(0.0, 200.0, 0.5), 300, replace=False))
        t0, u0, tE, fs = rng.uniform(70, 130), rng.uniform(0.02, 0.4), rng.uniform(12, 35), rng.uniform(0.6, 1)
        if k in (1, 4):
            A = physics.binary_magnification(t, t0, 0.1, 30.0, 1.0, 0.5, 0.6 if k == 1 else 3.0, 0.01)
        else:
            A = physics.pspl_magnification(t, t0, u0, tE)
        mag = physics.flux_to_mag(physics.flux(A, fs), rng.uniform(18, 20))
        if k in (2, 6):
            mag = mag - 0.7 * np.exp(-0.5 * ((t - t0 - rng.uniform(-0.3, 0.3) * tE) / 1.5) ** 2)
        mag = (mag + rng.normal(0, 0.05, len(t))).astype(np.float32)
        events.append({"oid": 7100 + k, "t": MJD0 + t, "mag": mag, "err": np.full(len(t), 0.05, np.float32)})
    return events


@pytest.fixture(scope="module")
def fit_case(tmp_path_factory):
    art = make_artifact(tmp_path_factory.mktemp("model"), seed=10)
    events = make_events()
    params = psplfit.Params()
    stats = psplfit.run_curves([(e["t"], e["mag"], e["err"]) for e in events], params)
    expected = {}
    for e, s in zip(events, stats):
        j = psplfit.first_trigger(s, params.threshold)
        if j is not None:
            expected[e["oid"]] = (j, float(s[j]))
    assert 0 < len(expected) < len(events)
    return {"artifact": art, "events": events, "expected": expected, "params": params}


def _names(topics, alerts_topic):
    made = topics("triggers", "dlq")
    return {"alerts": alerts_topic, **made}


def _by_event(trigs):
    out = {}
    for t in trigs:
        assert (t["diaObjectId"], t["rule"]) not in out          # one trigger per event and rule
        out[(t["diaObjectId"], t["rule"])] = t
    return out


def test_stop_and_restart_gives_the_triggers_of_an_uninterrupted_run(services, topics, redis_client,
                                                                       key_prefix, fit_case):
    art, events, expected = fit_case["artifact"], fit_case["events"], fit_case["expected"]
    alerts_topic = topics("alerts", partitions=2)["alerts"]
    alerts = alerts_of(events)
    produce(services, alerts_topic, alerts)

    # uninterrupted
    na = _names(topics, alerts_topic)
    sa = settings_for(services, key_prefix + "a", na, None, rule="pspl-fit")
    s1 = Broker(sa, art, group=unique("g")).run(until_idle=1.0)
    assert s1.alerts == len(alerts) and s1.triggers == len(expected)
    assert set(s1.rule_seconds) == {"pspl-fit"} and s1.busy_seconds > s1.rule_seconds["pspl-fit"] > 0
    ta = _by_event(triggers_in(sa, na["triggers"]))

    # half, stop, restart (other batch sizes), same group and Redis
    nb = _names(topics, alerts_topic)
    sb = settings_for(services, key_prefix + "b", nb, None, rule="pspl-fit", batch_size=37)
    g = unique("g")
    half = Broker(sb, art, group=g).run(max_alerts=len(alerts) // 2)
    assert half.alerts == len(alerts) // 2
    rest = Broker(sb.replace(consumer={"batch_size": 113}), art, group=g).run(until_idle=1.0)
    assert half.alerts + rest.alerts == len(alerts)
    tb = _by_event(triggers_in(sb, nb["triggers"]))

    assert set(ta) == set(tb) == {(o, "pspl-fit") for o in expected}
    version = fit_case["params"].version
    for (oid, _), t in ta.items():
        j, stat = expected[oid]
        u = tb[(oid, "pspl-fit")]
        for k in ("triggerId", "diaSourceId", "nPoints", "midpointMjdTai", "probability", "threshold",
                  "ra", "dec", "band", "mag", "t0", "u0", "tE", "peakMag", "psplChi2Dof", "summary"):
            assert t[k] == u[k]      # the rule's own fit (v2 estimate) does not depend on batching
        assert t["t0"] is not None and f"(D={t['probability']:.1f} >= " in t["summary"]
        assert t["nPoints"] == j + 1 and t["diaSourceId"] == oid * 100_000 + j
        assert t["probability"] == pytest.approx(stat, rel=1e-9)
        assert t["modelVersion"] == version and t["rule"] == "pspl-fit"

    # the state: every point fitted (or the event fired), outbox sent, TTL set
    for e in events:
        got = read_fit(redis_client, key_prefix + "b", fit_case["params"], e["oid"])
        s = got["state"]
        assert got["ttl_s"] > 0
        if e["oid"] in expected:
            assert s["n_done"] == expected[e["oid"]][0] + 1 and s["flags"] & psplfit.TRIGGERED
            assert got["trigger_status"] == "sent"
            # what `ulens events show|plot` and the dashboard show: the rule's trigger
            view = event_dict(redis_client, key_prefix + "b", e["oid"])
            assert view["trigger"] == got["trigger"] and view["trigger_status"] == "sent"
        else:
            assert s["n_done"] == len(e["t"]) and "trigger" not in got

    # the alerts once more from the beginning (new group): nothing changes
    again = Broker(sb, art, group=unique("g")).run(until_idle=1.0)
    assert again.duplicates == len(alerts) and again.triggers == 0


def test_both_rules_one_trigger_per_event_and_rule(services, topics, key_prefix, fit_case):
    art, events, expected = fit_case["artifact"], fit_case["events"], fit_case["expected"]
    probs = offline_probs(art, events)
    thr = choose_threshold(probs)
    expected_td = expected_triggers(probs, thr)
    names = topics("alerts", "triggers", "dlq", partitions=2)
    produce(services, names["alerts"], alerts_of(events))
    s = settings_for(services, key_prefix, names, thr, rule="both")
    summary = Broker(s, art, group=unique("g")).run(until_idle=1.0)
    assert set(summary.rule_seconds) == {"tdcnn", "pspl-fit"}
    trig = _by_event(triggers_in(s, names["triggers"]))
    assert {r for _, r in trig} <= {"tdcnn", "pspl-fit"}
    fit = {o: t for (o, r), t in trig.items() if r == "pspl-fit"}
    tdcnn = {o: t for (o, r), t in trig.items() if r == "tdcnn"}
    # each rule fires where it fires alone: the other rule running beside it changes nothing
    assert set(fit) == set(expected) and set(tdcnn) == set(expected_td)
    for oid, (j, _) in expected.items():
        assert fit[oid]["nPoints"] == j + 1
    for oid, (j, _) in expected_td.items():
        assert tdcnn[oid]["nPoints"] == j + 1 and tdcnn[oid]["modelVersion"] == art.version
    both = set(fit) & set(tdcnn)
    assert both, "no event fired under both rules: change the seed"
    for o in both:
        assert fit[o]["triggerId"] != tdcnn[o]["triggerId"]
