"""Pure parts of the Redis layout: header, records, replies, score updates (no services)."""
import json
import math
import struct

import numpy as np
import pytest

from broker import state as st
from broker.errors import BrokerError


def _header(m=5, flags=0, ntot=12, nsc=10, ndrop=0, last=1234567890123, refs=None, counts=None,
            ring=None, tag=77):
    ring = np.arange(m, dtype="<f4") / 10 if ring is None else ring
    refs = [19.5, float("nan"), 18.25] + [float("nan")] * (st.N_SLOTS - 3) if refs is None else refs
    counts = [12, 0, 3] + [0] * (st.N_SLOTS - 3) if counts is None else counts
    return st.HEADER_FIXED.pack(st.VERSION, m, flags, 0, ntot, nsc, ndrop, last, last + 5, 61002.5, tag) + \
        st.BANDS_BLOCK.pack(*refs, *counts) + ring.astype("<f4").tobytes()


def test_sizes():
    assert st.HEADER_FIXED.size == 44 and st.BANDS_BLOCK.size == 72
    assert st.RECORD.itemsize == 26 and st.INPUT.itemsize == 26
    # the script appends an input as a record with "not scored": the same first 25 bytes, p last
    assert st.RECORD.names[:-1] == st.INPUT.names[:-1] and st.RECORD.names[-1] == "p"
    assert all(st.RECORD.fields[n][1] == st.INPUT.fields[n][1] for n in st.INPUT.names[:-1])
    assert st.RECORD.fields["p"][1] == st.INPUT.fields["kind"][1] == 25
    assert st.header_size(5) + 100 * st.RECORD.itemsize == 2736


def test_lua_prelude_is_written_from_the_python_constants():
    lua = st.lua_script("append")
    assert f"local REC = {st.RECORD.itemsize}" in lua
    assert f"local HSIZE = {st.HEADER_FIXED.size + st.BANDS_BLOCK.size}" in lua
    assert f"local VERSION = {st.VERSION}" in lua and "local ST_CHANGED = '5'" in lua
    assert "local ST_HISTORY = '6'" in lua and f"local NSLOT = {st.N_SLOTS}" in lua
    # struct's formats in Lua have the sizes of the Python header's
    assert st.HEADER_FIXED.format.replace("q", "c8").lstrip("<") == "BBBBIIIc8c8dI"
    assert f"local BFMT = '{st.BANDS_BLOCK.format}'" in lua


def test_model_tag_changes_with_model_window_and_reference():
    a = st.model_tag("m1", 5, 10)
    assert a == st.model_tag("m1", 5, 10) and 0 <= a < 2 ** 32
    assert len({a, st.model_tag("m2", 5, 10), st.model_tag("m1", 7, 10), st.model_tag("m1", 5, 12)}) == 4


def test_parse_header():
    h = st.parse_header(_header())
    assert (h.m, h.n_total, h.n_scored, h.last_source_id) == (5, 12, 10, 1234567890123)
    assert h.references[0] == 19.5 and h.references[2] == 18.25 and np.isnan(h.references[1])
    assert list(h.band_counts) == [12, 0, 3, 0, 0, 0, 0]
    assert (h.max_source_id, h.model_tag, h.last_time) == (1234567890128, 77, 61002.5)
    assert list(h.ring_valid()) == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    h = st.parse_header(_header(flags=st.FLAG_TRIGGERED, refs=[float("nan")] * st.N_SLOTS, nsc=2))
    assert np.isnan(h.references).all() and h.triggered and list(h.ring_valid()) == pytest.approx([0.3, 0.4])
    with pytest.raises(BrokerError, match="version 1"):
        st.parse_header(b"\x01" + _header()[1:])


def test_parse_append_reply():
    recs = np.zeros(3, dtype=st.RECORD)
    recs["t"] = [61000.5, 61001.5, 61002.5]
    recs["mag"] = [20, 19.5, 19]
    recs["p"] = [200, 255, 255]
    raw = st.PREFIX.pack(9, 2, ord("P"), 1) + _header() + b"0124" + recs.tobytes()
    r = st.parse_append_reply(77, raw, 5, 4)
    assert (r.object_id, r.start, r.dropped_now, r.trigger_status, r.statuses) == (77, 9, 2, b"P", b"0124")
    assert r.rescored
    assert np.array_equal(r.window, recs)


def test_pack_points_layout():
    b = st.pack_points([5], [61000.25], [np.float32(20.5)], [np.float32(0.05)], st.band_codes("i"))
    assert len(b) == 26
    t, i, m, e, band, kind = struct.unpack("<dqffBB", b)
    assert (i, t, m, band, kind) == (5, 61000.25, 20.5, 3, st.KIND_LIVE) and e == pytest.approx(0.05)
    assert st.pack_points([5], [1.0], [1.0], [1.0])[-2] == st.BAND_UNKNOWN
    assert st.pack_points([5], [1.0], [1.0], [1.0], kinds=[st.KIND_HISTORY])[-1] == st.KIND_HISTORY
    assert list(st.band_codes(["u", "y", "x"])) == [0, 5, st.BAND_UNKNOWN]


def test_the_band_byte_keeps_the_band_and_whether_the_point_is_forced():
    # every band code (0..5, unknown) fits below the FORCED bit: one byte holds both
    assert st.BAND_UNKNOWN & st.FORCED == 0 and st.BAND_UNKNOWN == st.BAND_MASK >= len(st.BANDS)
    b = st.band_codes(["r", "r", "x", "y"], forced=[False, True, True, False])
    assert list(b) == [2, 2 | st.FORCED, st.BAND_UNKNOWN | st.FORCED, 5]
    assert list(st.band_of(b)) == [2, 2, st.BAND_UNKNOWN, 5]
    assert list(st.forced_of(b)) == [False, True, True, False]
    assert [st.band_name(x) for x in b] == ["r", "r", None, "y"]
    assert [st.band_slot(x) for x in b] == [2, 2, st.SLOT_UNKNOWN, 5]
    assert f"local BAND_MASK = {st.BAND_MASK}" in st.lua_script("append")
    recs = np.zeros(2, dtype=st.RECORD)
    recs["band"] = b[:2]
    recs["p"] = st.PROB_UNSCORED
    view = st.EventView(9, st.parse_header(_header(ntot=2, nsc=0)), 0, recs, 60, None, None)
    pts = view.to_dict()["points"]
    assert [(p["band"], p["forced"]) for p in pts] == [("r", False), ("r", True)]


def test_quantized_probabilities():
    q = np.frombuffer(st.quantize_probs(np.array([0.0, 0.5, 1.0, 1.2])), np.uint8)
    assert list(q) == [0, 127, 254, 254]
    back = st.dequantize_probs(np.array([0, 127, 254, 255], np.uint8))
    assert back[:3] == pytest.approx([0, 0.5, 1.0], abs=1 / 254) and math.isnan(back[3])


def test_score_update_pack():
    trig = {"triggerId": "x", "diaObjectId": 1}
    u = st.ScoreUpdate(1, 10, np.array([0.5, 0.75], np.float32), np.arange(5, dtype=np.float32), trig)
    b = u.pack()
    old, n, fire = st.SCORE_PREFIX.unpack_from(b)
    assert (old, n, fire) == (10, 2, 1)
    assert np.array_equal(np.frombuffer(b, "<f4", 5, 9), np.arange(5))
    assert b[29:31] == bytes([127, 190]) and json.loads(b[31:]) == trig


def test_store_refuses_too_few_points():
    with pytest.raises(BrokerError, match="max_points"):
        st.EventStore(None, "p", 10, 50, reference_points=10, receptive_field=97, smooth_window=5)
