"""The cluster key layout's slot groups on the shared (single) Redis: an EventStore whose
keys carry hash tags (``KeyLayout(prefix, buckets)``) splits each batch into one script
call per slot, gathers each call's points out of the batch and puts the replies back in
batch order; it must store and answer exactly what the single-node layout does. (The
same code on a real Redis Cluster, with nodes killed: tests/cluster.)"""
from __future__ import annotations

import numpy as np

from broker import state as st

K, RF, M = 10, 20, 5


def _store(client, layout):
    return st.EventStore(client, layout.prefix, 3600, 200, reference_points=K, receptive_field=RF,
                         smooth_window=M, chunk_events=7, keys=layout)


def test_slot_grouped_calls_store_and_answer_what_one_call_does(redis_client, key_prefix):
    rng = np.random.default_rng(5)
    plain = _store(redis_client, st.KeyLayout(f"{key_prefix}:a"))
    tagged = _store(redis_client, st.KeyLayout(f"{key_prefix}:b", 4))     # 4 buckets: groups interleave
    oids = [int(x) for x in rng.choice(10**6, 40, replace=False)]
    t = {o: 60000.0 for o in oids}
    for batch in range(6):
        ids = [o for o in oids if rng.random() < 0.7]
        counts = [int(rng.integers(1, 4)) for _ in ids]
        sid, tt, mag, err = [], [], [], []
        for o, c in zip(ids, counts):
            for j in range(c):
                t[o] += 1.0
                sid.append(o * 1000 + int(t[o]) % 1000)
                tt.append(t[o])
                mag.append(18 + rng.normal(0, 0.1))
                err.append(0.05)
        pts = st.pack_points(sid, tt, mag, err)
        a, b = plain.append(ids, counts, pts), tagged.append(ids, counts, pts)
        assert [r.object_id for r in b] == ids
        for ra, rb in zip(a, b):
            assert (ra.statuses, ra.start, ra.trigger_status) == (rb.statuses, rb.start, rb.trigger_status)
            assert ra.window.tobytes() == rb.window.tobytes()
            assert (ra.header.n_total, ra.header.n_scored, ra.header.ring_bytes) == \
                (rb.header.n_total, rb.header.n_scored, rb.header.ring_bytes)
        again = tagged.append(ids, counts, pts)             # the same batch twice: all duplicates
        assert [r.object_id for r in again] == ids
        assert all(set(r.statuses) == {st.DUPLICATE[0]} for r in again)
        ups = [st.ScoreUpdate(r.object_id, r.header.n_scored,
                              np.full(r.header.n_total - r.header.n_scored, 0.9, np.float32),
                              np.full(M, 0.9, np.float32),
                              trigger={"diaObjectId": r.object_id} if r.object_id % 3 == 0 else None)
               for r in a]
        assert plain.save_scores(ups) == tagged.save_scores(ups)
        fired = [u.object_id for u in ups if u.trigger]
        assert set(plain.pending_triggers(fired)) == set(tagged.pending_triggers(fired))
        assert plain.mark_sent(fired) == tagged.mark_sent(fired)
    for o in oids:
        va, vb = plain.read(o), _read_tagged(redis_client, tagged.keys, o)
        assert (va is None) == (vb is None)
        if va is not None:
            assert va.points.tobytes() == vb.points.tobytes() and va.trigger_status == vb.trigger_status
    assert sorted(st.object_id_of(k) for k in redis_client.scan_iter(match=tagged.keys.pattern())) == \
        sorted(st.object_id_of(k) for k in redis_client.scan_iter(match=plain.keys.pattern()))


def _read_tagged(client, layout, oid):
    """read_event over the tagged keys (read_event picks the layout from the client: a
    single Redis client reads the plain one)."""
    raw = client.get(layout.event(oid))
    if raw is None:
        return None
    h = st.parse_header(raw)
    trg = client.get(layout.trigger(oid))
    status = None if trg is None else {b"P": "pending", b"S": "sent"}[trg[:1]]
    return st.EventView(oid, h, h.n_total - (len(raw) - st.header_size(h.m)) // st.RECORD.itemsize,
                        np.frombuffer(raw, dtype=st.RECORD, offset=st.header_size(h.m)), 0, status, None)
