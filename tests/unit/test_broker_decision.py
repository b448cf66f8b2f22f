"""The online decision equals training.decision on the whole run; trigger records."""
import numpy as np
import pytest

from broker.triggers import Rule, decide, decide_many, trigger_id, trigger_record
from schemas import default_codec
from training import decision
from training.model import PROB_TOLERANCE


def _online(probs, rule, chunks):
    """Feed probabilities chunk by chunk as the broker does; index where it fired."""
    ring = np.empty(0, dtype=np.float32)
    n = 0
    fired = None
    for size in chunks:
        new = probs[n:n + size]
        d = decide(ring, new, n, rule, triggered=fired is not None)
        if d.fire is not None:
            assert fired is None
            fired = n + d.fire
            assert d.score == pytest.approx(decision.score(probs, rule.smooth)[fired], abs=1e-12)
        ring = d.ring[rule.smooth - min(rule.smooth, n + size):]
        n += size
    return fired


@pytest.mark.parametrize("smooth,min_points", [(5, 10), (1, 1), (3, 20), (8, 2)])
def test_chunked_decision_equals_first_trigger(smooth, min_points):
    rng = np.random.default_rng(smooth * 100 + min_points)
    for trial in range(200):
        n = int(rng.integers(1, 120))
        probs = np.clip(rng.normal(0.4, 0.25, n), 0, 1).astype(np.float32)
        thr = float(rng.uniform(0.3, 0.9))
        rule = Rule("tdcnn", thr, min_points, smooth)
        chunks = []
        left = n
        while left:
            c = int(min(left, rng.integers(1, 7)))
            chunks.append(c)
            left -= c
        assert _online(probs, rule, chunks) == decision.first_trigger(probs, thr, min_points, smooth)


def test_already_triggered_never_fires_again():
    rule = Rule("tdcnn", 0.5, 1, 2)
    d = decide(np.array([0.9, 0.9], np.float32), np.array([0.99], np.float32), 10, rule, triggered=True)
    assert d.fire is None and list(d.ring) == pytest.approx([0.9, 0.99])


def test_min_points_counts_the_whole_event():
    rule = Rule("tdcnn", 0.5, 10, 5)
    p = np.full(3, 0.9, np.float32)
    assert decide(np.full(5, 0.9, np.float32), p, 5, rule).fire is None   # points 6..8
    assert decide(np.full(5, 0.9, np.float32), p, 8, rule).fire == 1      # point 10


def test_trigger_id_is_deterministic_per_event_rule_and_model():
    a = trigger_id(42, "tdcnn", "m-1")
    assert a == trigger_id(42, "tdcnn", "m-1")
    assert len({a, trigger_id(43, "tdcnn", "m-1"), trigger_id(42, "other", "m-1"),
                trigger_id(42, "tdcnn", "m-2")}) == 4


def test_trigger_record_matches_the_schema():
    rule = Rule("tdcnn", 0.7, 10, 5)
    rec = trigger_record(42, 4200012, rule, 0.81, 13, 61012.5, 1_700_000_000_000_000, "m-1")
    rec["triggerProducedUs"] = 1_700_000_000_100_000
    codec = default_codec()
    assert codec.decode_kind(codec.encode(rec, "trigger"), "trigger") == rec


@pytest.mark.parametrize("smooth", [1, 2, 5])
def test_decide_many_equals_decide_one_by_one(smooth):
    rng = np.random.default_rng(smooth)
    rule = Rule("tdcnn", 0.55, 10, smooth)
    e = 500
    n_before = rng.integers(0, 30, e)
    rings = rng.uniform(0, 1, (e, smooth)).astype(np.float32)
    new = [rng.uniform(0, 1, int(rng.choice([1, 1, 1, 2, 3]))).astype(np.float32) for _ in range(e)]
    trig = rng.uniform(size=e) < 0.2
    many = decide_many(rings, n_before, new, trig, rule)
    for i in range(e):
        k = int(min(smooth, n_before[i]))
        one = decide(rings[i][smooth - k:], new[i], int(n_before[i]), rule, bool(trig[i]))
        assert many[i].fire == one.fire
        assert np.array_equal(many[i].ring[smooth - min(smooth, n_before[i] + len(new[i])):],
                              one.ring[smooth - min(smooth, n_before[i] + len(new[i])):])
        if one.score is not None:
            assert many[i].score == pytest.approx(one.score, abs=1e-12)


def test_trigger_at_names_the_deciding_alert_or_the_best_knowledge():
    from types import SimpleNamespace

    from broker import state as st
    from broker.triggers import Rule, trigger_at

    rule = Rule("tdcnn", 0.5, 10, 5)
    pts = SimpleNamespace(time=np.array([1.0, 2.0, 3.0]), source_id=np.array([11, 12, 13]),
                          produced_us=np.array([100, 200, 300]), ra=np.array([1.0, 1.0, 1.0]),
                          dec=np.array([-2.0, -2.0, -2.0]))
    rec = np.zeros(1, dtype=st.RECORD)[0]
    rec["t"], rec["id"] = 3.0, 13
    t = trigger_at(7, rec, pts, [1, 2], rule, 0.9, 14, "v1")
    assert (t["diaSourceId"], t["alertProducedUs"], t["nPoints"], t["midpointMjdTai"]) == (13, 300, 15, 3.0)
    # decided late (its alert in an earlier batch): the stored point's id, no produce time
    rec["t"], rec["id"] = 9.0, 99
    late = trigger_at(7, rec, pts, [1, 2], rule, 0.9, 19, "v1")
    assert (late["diaSourceId"], late["alertProducedUs"], late["midpointMjdTai"]) == (99, 0, 9.0)
    assert late["triggerId"] == t["triggerId"]          # one id per (event, rule, model)


def _new_scores(ring, n_before, new, smooth):
    """The smoothed scores (float64) at an event's new points, from its ring and new values."""
    k = int(min(smooth, n_before))
    return decision.score(np.concatenate([ring[smooth - k:], new]), smooth)[k:]


@pytest.mark.parametrize("smooth", [1, 5])
def test_probabilities_within_the_tolerance_decide_the_same(smooth):
    """Two consumers may compute an event's P(binary) differently, within PROB_TOLERANCE
    (training.model). decide_many then fires at the same point, with scores within the
    tolerance, unless a smoothed score lies within PROB_TOLERANCE of the threshold: there
    the decision may go either way, and the constructed events below do flip, both ways."""
    tol, thr = PROB_TOLERANCE, 0.6
    rule = Rule("tdcnn", thr, 10, smooth)
    rng = np.random.default_rng(10 + smooth)
    e, near = 3000, 200
    n_before = rng.integers(0, 40, e + near)
    n_before[e:] = 30                                    # eligible, never young
    rings = rng.uniform(0, 1, (e + near, smooth))
    new = [rng.uniform(0, 1, int(rng.integers(1, 4))) for _ in range(e)]
    triggered = rng.uniform(size=e + near) < 0.1
    triggered[e:] = False
    # both consumers' probabilities: within 0.9 tol of each other, at random for the first
    # e events; the last `near` have every value at thr + c (|c| < tol / 2), and the other
    # consumer's are shifted across the threshold (half of them up, half down)
    c = rng.uniform(0.1, 0.5, near) * tol * np.where(np.arange(near) % 2, 1.0, -1.0)
    rings[e:] = (thr + c)[:, None]
    new += [np.array([thr + ci]) for ci in c]
    delta_rings = rng.uniform(-0.9, 0.9, rings.shape) * tol
    delta_new = [rng.uniform(-0.9, 0.9, len(p)) * tol for p in new]
    delta_rings[e:] = -np.sign(c)[:, None] * 0.9 * tol
    for i in range(e, e + near):
        delta_new[i] = -np.sign(c[i - e]) * 0.9 * tol * np.ones(1)
    def f32(a):
        return np.clip(a, 0.0, 1.0).astype(np.float32)
    a_rings, b_rings = f32(rings), f32(rings + delta_rings)
    a_new, b_new = [f32(p) for p in new], [f32(p + d) for p, d in zip(new, delta_new)]
    assert np.abs(b_rings.astype(np.float64) - a_rings).max() <= tol
    assert max(np.abs(b.astype(np.float64) - a).max() for a, b in zip(a_new, b_new)) <= tol

    da = decide_many(a_rings, n_before, a_new, triggered, rule)
    db = decide_many(b_rings, n_before, b_new, triggered, rule)
    flips, same_far = {True: 0, False: 0}, 0
    for i in range(e + near):
        sa = _new_scores(a_rings[i], n_before[i], a_new[i], smooth)
        sb = _new_scores(b_rings[i], n_before[i], b_new[i], smooth)
        assert np.abs(sa - sb).max() <= tol            # a mean of values within tol
        eligible = n_before[i] + np.arange(1, len(sa) + 1) >= rule.min_points
        if not (eligible & (np.abs(sa - thr) <= tol)).any() or triggered[i]:
            assert da[i].fire == db[i].fire, i
            if da[i].fire is not None:
                assert abs(da[i].score - db[i].score) <= tol
            same_far += 1
        elif i >= e:
            # within the tolerance of the threshold: this pair decides differently
            assert (da[i].fire is None) != (db[i].fire is None), i
            flips[da[i].fire is None] += 1
    assert same_far >= e - 5 and flips == {True: near // 2, False: near // 2}
