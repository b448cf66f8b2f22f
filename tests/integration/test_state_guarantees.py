"""The Redis state's guarantees, script by script, against the real Redis (issue 13).

* the append and score scripts follow their plain-Python reference
  (broker/state/reference.py) on seeded random streams of new points in several bands,
  packet history (old and new), exact and changed re-sends, conflicts, late points and
  trimming: statuses, stored points, per-band counts and references, window start, scores;
* a re-sent diaSourceId with other content (time, flux) is "changed", an exact re-send a
  duplicate;
* every script may run twice (a pipeline replayed after a connection error, a batch
  retried): the second run changes nothing and still reports a pending trigger; two members
  racing on one event leave no point unscored;
* state that belongs to a model: an event met by another model or smoothing window is
  scored again (points, reference and triggered flag kept), never a layout error;
* expiry: a trigger record outlives its event, so an event forgotten and seen again never
  triggers twice.
"""
from __future__ import annotations

import numpy as np
import pytest

from broker import state as st
from broker.state import reference as ref
from tests.unit.test_broker_inference import light_curve

K, RF, M = 10, 97, 5


def store_for(client, prefix, max_points=2000, tag=1, m=M, ttl=600, trigger_ttl=6000):
    return st.EventStore(client, prefix, ttl, max_points, reference_points=K, receptive_field=RF,
                         smooth_window=m, model_tag=tag, trigger_ttl_s=trigger_ttl)


def points(ids, t, mag, err, band=3):
    return st.pack_points(ids, t, np.asarray(mag, np.float32), np.asarray(err, np.float32),
                          np.full(len(ids), band, np.uint8))


def score_all(store, res, p=0.1, trigger=None):
    h = res.header
    u = h.n_total - h.n_scored
    return store.save_scores([st.ScoreUpdate(res.object_id, h.n_scored, np.full(u, p, np.float32),
                                             np.full(store.m, p, np.float32), trigger)])


# --- the append script against its reference ------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_append_script_follows_the_python_reference(redis_client, key_prefix, seed):
    rng = np.random.default_rng(seed)
    max_points = 150                            # values grow past 4 KB: APPEND and trimming
    store = store_for(redis_client, key_prefix, max_points=max_points)
    oid = 4242
    model = ref.RefEvent()
    t_next, sid_next = 60000.0, 10_000
    sent = []                                   # every point sent so far: (t, id, mag, err, band)
    seen = set()                                # status codes met
    for _ in range(80):
        batch = []
        for _ in range(int(rng.integers(1, 12))):
            kind = rng.choice(["new", "new", "new", "exact", "flux", "time", "conflict", "late",
                               "history", "kind"],
                              p=[0.28, 0.2, 0.14, 0.09, 0.06, 0.05, 0.05, 0.05, 0.05, 0.03])
            if kind == "new" or not sent:
                t_next += float(rng.uniform(0.01, 2.0))
                sid_next += int(rng.integers(1, 5))
                # mostly r and i, now and then u or an unknown band (a band that stays young);
                # a third forced photometry (the band byte's FORCED bit: same band, same slot)
                band = int(rng.choice([0, 2, 3, st.BAND_UNKNOWN], p=[0.05, 0.5, 0.4, 0.05])) | \
                    (st.FORCED if rng.random() < 0.3 else 0)
                p = (t_next, sid_next, np.float32(rng.uniform(17, 21)), np.float32(rng.uniform(0.01, 0.1)),
                     band, st.KIND_LIVE)
                sent.append(p)
            elif kind == "history":
                # a packet's history: an old visit (skipped) or one after the newest (filled in)
                if rng.random() < 0.5:
                    old = sent[int(rng.integers(0, len(sent)))]
                    p = old[:5] + (st.KIND_HISTORY,)
                else:
                    t_next += float(rng.uniform(0.01, 1.0))
                    sid_next += int(rng.integers(1, 5))
                    p = (t_next, sid_next, np.float32(rng.uniform(17, 21)), np.float32(0.05),
                         2 | (st.FORCED if rng.random() < 0.5 else 0), st.KIND_HISTORY)
                    sent.append(p[:5] + (st.KIND_LIVE,))
            else:
                old = sent[int(rng.integers(0, len(sent)))]
                if kind == "exact":
                    p = old
                elif kind == "kind":             # the same point re-sent as the other kind
                    p = (old[0], old[1], old[2], old[3], old[4] ^ st.FORCED, st.KIND_LIVE)
                elif kind == "flux":
                    p = (old[0], old[1], np.float32(old[2] + 0.01), old[3], old[4], st.KIND_LIVE)
                elif kind == "time":
                    p = (old[0] + 1e-3, old[1], old[2], old[3], old[4], st.KIND_LIVE)
                elif kind == "conflict":
                    p = (old[0], old[1] + 7, old[2], old[3], old[4], st.KIND_LIVE)
                else:                            # late: a new id at an earlier, unused time
                    p = (old[0] - 1e-4, sid_next + 1000 + len(sent), old[2], old[3], old[4], st.KIND_LIVE)
            batch.append(p)
        cols = list(zip(*batch))
        (res,) = store.append([oid], [len(batch)], st.pack_points(
            cols[1], cols[0], np.array(cols[2], np.float32), np.array(cols[3], np.float32),
            np.array(cols[4], np.uint8), np.array(cols[5], np.uint8)))
        want = ref.append(model, batch, k=K, rf=RF, max_points=max_points, exact_limit=store.exact_limit, m=M)
        assert res.statuses == want, (res.statuses, want)
        seen.update(want)
        assert res.start == ref.window_start(model, k=K, rf=RF)
        if rng.random() < 0.8:                  # usually scored (trimming waits for scores)
            u = model.n_total - model.n_scored
            q = [int(x) for x in rng.integers(0, 254, u)]
            fire = bool(rng.random() < 0.05)
            old_scored = model.n_scored
            expect = ref.score(model, old_scored, q, fire)
            up = st.ScoreUpdate(oid, old_scored, np.array(q, np.float32) / st.PROB_SCALE,
                                np.full(M, 0.1, np.float32), {"triggerId": "x"} if fire else None)
            assert store.save_scores([up]) == [expect]
            if expect == st.TRIG_NEW:
                store.mark_sent([oid])
        view = store.read(oid)
        assert ref.stored(view) == model.records      # the band bytes with their FORCED bits
        assert (view.header.n_total, view.header.n_dropped, view.header.n_scored) == \
            (model.n_total, model.n_dropped, model.n_scored)
        assert [None if r != r else float(r) for r in view.header.references] == model.references
        assert list(view.header.band_counts) == model.band_counts
        assert view.header.max_source_id == model.max_id
        assert view.header.triggered == model.triggered
        stored_p = {view.first_index + i: int(p) for i, p in enumerate(view.points["p"])
                    if p != st.PROB_UNSCORED}
        assert stored_p == {g: q for g, q in model.probs.items() if g >= model.n_dropped}
    assert {r[4] & st.FORCED for r in model.records} == {0, st.FORCED}    # both kinds stored
    assert model.n_dropped > 0                  # the test did reach trimming, and every rule
    assert seen == set(b"".join([st.APPENDED, st.DUPLICATE, st.OUT_OF_ORDER, st.CONFLICT,
                                 st.DUPLICATE_UNVERIFIED, st.CHANGED, st.HISTORY]))


# --- item 8: same diaSourceId, other content ----------------------------------------------
def test_a_resent_source_id_with_other_content_is_changed_an_exact_resend_a_duplicate(redis_client, key_prefix):
    store = store_for(redis_client, key_prefix)
    t = 60000.0 + np.arange(20, dtype=np.float64)
    mag, err = np.full(20, 19.0), np.full(20, 0.05)
    ids = 100 + np.arange(20)
    store.append([1], [20], points(ids, t, mag, err))
    before = redis_client.get(store.event_key(1))
    (res,) = store.append([1], [5], points(
        [ids[3], ids[4], ids[5], ids[6], ids[19]],
        [t[3], t[4] + 0.5, t[5], t[6], t[19] + 1.0],          # same / new time / same / same / later
        [19.0, 19.0, 19.3, 19.0, 19.0], [0.05, 0.05, 0.05, 0.07, 0.05]))
    # exact re-send; id at another time; other flux; other error; newest id re-sent as "later"
    assert res.statuses == st.DUPLICATE + st.CHANGED * 4
    assert redis_client.get(store.event_key(1)) == before    # nothing written
    (res,) = store.append([1], [1], points([ids[7]], [t[7]], [19.0], [0.05], band=4))
    assert res.statuses == st.CHANGED                          # other band
    # another id at a stored time is a conflict; a new id later is appended
    (res,) = store.append([1], [2], points([999, 120], [t[2], t[19] + 2.0], [19, 19], [0.05, 0.05]))
    assert res.statuses == st.CONFLICT + st.APPENDED


def test_ids_above_two_to_the_53_are_told_apart(redis_client, key_prefix):
    """Rubin's diaSourceIds are ~1e17: the script compares them as bytes, not as doubles."""
    store = store_for(redis_client, key_prefix)
    base = 170_000_000_000_000_000
    (res,) = store.append([2], [2], points([base, base + 1], [60000.0, 60001.0], [19, 19], [0.05, 0.05]))
    assert res.statuses == st.APPENDED * 2
    (res,) = store.append([2], [2], points([base + 2, base + 1], [60002.0, 60003.0], [19, 19], [0.05, 0.05]))
    assert res.statuses == st.APPENDED + st.CHANGED
    assert [int(x) for x in store.read(2).points["id"]] == [base, base + 1, base + 2]


# --- item 3: scripts run twice, members racing ---------------------------------------------
def test_the_same_score_save_run_twice_still_reports_the_pending_trigger(redis_client, key_prefix):
    store = store_for(redis_client, key_prefix)
    (res,) = store.append([3], [12], points(np.arange(12), 60000.0 + np.arange(12.0), np.full(12, 19.0),
                                            np.full(12, 0.05)))
    trig = {"triggerId": "t3", "diaObjectId": 3}
    up = [st.ScoreUpdate(3, 0, np.full(12, 0.9, np.float32), np.full(M, 0.9, np.float32), trig)]
    assert store.save_scores(up) == [st.TRIG_NEW]
    # the reply was lost and the pipeline ran again (or the batch was retried): still pending
    assert store.save_scores(up) == [st.TRIG_PENDING]
    assert store.pending_triggers([3]) == {3: trig}
    store.mark_sent([3])
    assert store.save_scores(up) == [st.TRIG_ALREADY]            # sent: nothing to do
    view = store.read(3)
    assert view.header.n_scored == 12 and view.trigger_status == "sent"


def test_two_members_interleaved_leave_no_point_unscored_and_produce_the_trigger(redis_client, key_prefix):
    """A rebalance: member A appended points 0..9, member B re-read them and got 10..11 too;
    A stores its scores first. B's update (from 0) overlaps: its points 10, 11 are stored."""
    a, b = store_for(redis_client, key_prefix), store_for(redis_client, key_prefix)
    t = 60000.0 + np.arange(12.0)
    (ra,) = a.append([4], [10], points(np.arange(10), t[:10], np.full(10, 19.0), np.full(10, 0.05)))
    (rb,) = b.append([4], [12], points(np.arange(12), t, np.full(12, 19.0), np.full(12, 0.05)))
    assert rb.statuses == st.DUPLICATE * 10 + st.APPENDED * 2 and rb.header.n_scored == 0
    assert a.save_scores([st.ScoreUpdate(4, 0, np.full(10, 0.2, np.float32), np.full(M, 0.2, np.float32))]) \
        == [st.TRIG_NONE]
    trig = {"triggerId": "t4", "diaObjectId": 4}
    probs = np.r_[np.full(10, 0.2), 0.95, 0.96].astype(np.float32)
    assert b.save_scores([st.ScoreUpdate(4, 0, probs, probs[-M:], trig)]) == [st.TRIG_NEW]
    view = a.read(4)
    assert view.header.n_scored == 12 and view.header.triggered
    assert np.all(view.points["p"] != st.PROB_UNSCORED)
    assert list(view.points["p"][-2:]) == list(np.frombuffer(st.quantize_probs(probs[-2:]), np.uint8))
    assert a.pending_triggers([4]) == {4: trig}
    # A's second thought (its save retried) changes nothing
    assert a.save_scores([st.ScoreUpdate(4, 0, np.full(10, 0.2, np.float32), np.full(M, 0.2, np.float32))]) \
        == [st.TRIG_PENDING]


# --- item 9: state that belongs to a model ------------------------------------------------
@pytest.mark.parametrize("change", ["model", "smooth_window"])
def test_another_model_or_window_scores_the_event_again(redis_client, key_prefix, change):
    old = store_for(redis_client, key_prefix, tag=111)
    n = 30
    t, mag, err = light_curve(np.random.default_rng(5), n, t0=60000.0)
    (res,) = old.append([5], [n], points(np.arange(n), t, mag, err))
    trig = {"triggerId": "t5", "diaObjectId": 5}
    old.save_scores([st.ScoreUpdate(5, 0, np.full(n, 0.9, np.float32), np.full(M, 0.9, np.float32), trig)])
    old.mark_sent([5])
    ref_mag = old.read(5).header.references
    new = store_for(redis_client, key_prefix, tag=222) if change == "model" else \
        store_for(redis_client, key_prefix, tag=111, m=3)
    (res,) = new.append([5], [1], points([n], [t[-1] + 1.0], [19.0], [0.05]))
    assert res.statuses == st.APPENDED and res.rescored
    h = res.header
    assert (h.n_total, h.n_scored, h.n_dropped, h.m, h.model_tag) == (n + 1, 0, 0, new.m, new.tag)
    assert h.triggered and res.trigger_status == b"S"            # never a second trigger
    assert np.array_equal(h.references, ref_mag, equal_nan=True)
    assert res.start == 0 and len(res.window) == n + 1 and np.all(res.window["p"] == st.PROB_UNSCORED)
    assert np.array_equal(res.window["t"][:n], t)
    # the new model's scores are stored; the old store's update is refused (conflict)
    assert new.save_scores([st.ScoreUpdate(5, 0, np.full(n + 1, 0.3, np.float32), np.full(new.m, 0.3, np.float32),
                                           {"triggerId": "again"})]) == [st.TRIG_DONE]
    assert old.save_scores([st.ScoreUpdate(5, n, np.full(1, 0.9, np.float32), np.full(M, 0.9, np.float32))]) \
        == [st.TRIG_CONFLICT]
    view = new.read(5)
    assert view.header.n_scored == n + 1 and view.trigger["triggerId"] == "t5"
    (res,) = new.append([5], [1], points([n + 1], [t[-1] + 2.0], [19.0], [0.05]))
    assert not res.rescored and res.header.n_scored == n + 1


def test_a_trimmed_event_met_by_another_model_is_scored_from_its_second_stored_point(redis_client, key_prefix):
    """The first stored point of a trimmed event only gives the next one its time step."""
    old = store_for(redis_client, key_prefix, max_points=120, tag=1)
    n = 300
    t, mag, err = light_curve(np.random.default_rng(6), n, t0=60000.0)
    for s0 in range(0, n, 50):
        (res,) = old.append([6], [50], points(np.arange(s0, s0 + 50), t[s0:s0 + 50], mag[s0:s0 + 50], err[s0:s0 + 50]))
        score_all(old, res)
    first = old.read(6).header.n_dropped
    assert first > 0
    new = store_for(redis_client, key_prefix, max_points=120, tag=2)
    (res,) = new.append([6], [1], points([n], [t[-1] + 1.0], [19.0], [0.05]))
    assert res.rescored and res.header.n_scored == first + 1 and res.start == first


# --- item 10: expiry --------------------------------------------------------------------
def test_an_expired_event_seen_again_never_triggers_twice(redis_client, key_prefix):
    store = store_for(redis_client, key_prefix, ttl=600, trigger_ttl=6000)
    (res,) = store.append([7], [12], points(np.arange(12), 60000.0 + np.arange(12.0), np.full(12, 19.0),
                                            np.full(12, 0.05)))
    trig = {"triggerId": "t7", "diaObjectId": 7}
    store.save_scores([st.ScoreUpdate(7, 0, np.full(12, 0.9, np.float32), np.full(M, 0.9, np.float32), trig)])
    store.mark_sent([7])
    assert 600 - 5 <= redis_client.ttl(store.event_key(7)) <= 600
    assert redis_client.ttl(store.trigger_key(7)) > 600          # the record outlives the event
    redis_client.delete(store.event_key(7))                     # the event expires (a season gap)
    (res,) = store.append([7], [12], points(np.arange(100, 112), 60300.0 + np.arange(12.0), np.full(12, 17.0),
                                            np.full(12, 0.05)))
    assert res.statuses == st.APPENDED * 12 and res.header.triggered and res.trigger_status == b"S"
    assert store.save_scores([st.ScoreUpdate(7, 0, np.full(12, 0.99, np.float32), np.full(M, 0.99, np.float32),
                                             {"triggerId": "t7", "diaObjectId": 7, "nPoints": 3})]) \
        == [st.TRIG_DONE]
    assert store.read(7).trigger == trig


def test_the_default_ttl_outlasts_a_bulge_season_gap():
    """Rubin sees a bulge/plane field roughly March to October: a gap of about five months
    (~150 d) between seasons. The event TTL (renewed at each point) must outlast it, and a
    trigger record must outlast its event."""
    import config as cfg

    r = cfg.load().redis
    assert r.event_ttl_s >= 250 * 86400
    assert r.trigger_ttl_s > r.event_ttl_s


@pytest.mark.parametrize("version", [1, 3])    # 3: the layout before the band byte's FORCED bit
def test_a_state_of_the_old_layout_is_refused_with_a_clear_error(redis_client, key_prefix, version):
    from broker.errors import BrokerError

    store = store_for(redis_client, key_prefix)
    redis_client.set(store.event_key(8), bytes([version, 5]) + bytes(58))
    with pytest.raises(BrokerError, match=f"version {version} .*redis.key_prefix"):
        store.append([8], [1], points([1], [60000.0], [19.0], [0.05]))
    with pytest.raises(BrokerError, match=f"version {version}, this code reads version {st.VERSION}"):
        store.read(8)
