"""Event state in Redis: one packed binary string per live event, updated by Lua.

Layout (see README "Broker: Redis layout"). Keys, with ``P`` = ``redis.key_prefix``:

``P:ev:<diaObjectId>``  STRING, TTL ``redis.event_ttl_s`` (refreshed when a point is appended)
    ``header`` (``40 + 4*M`` bytes, little-endian) followed by one 17-byte record per
    stored point, oldest first::

        header: u8 version(=1) | u8 M | u8 flags (1 reference set, 2 triggered) | u8 0 |
                u32 n_total | u32 n_scored | u32 n_dropped | i64 last diaSourceId |
                f64 reference | f64 last time | f32 x M  (last M probabilities, oldest first)
        record: f64 midpointMjdTai | f32 mag | f32 mag_err | u8 P(binary) * 254 (255 = not scored)

    ``n_total`` counts every point ever appended (dropped ones included), so the stored
    records are the global indices ``n_dropped .. n_total - 1``. Values up to
    ``EXACT_LIMIT`` (4 KB, ~236 points) are rewritten at their exact size on each append
    (100 points = 1,760 bytes of value, about 1.9 KB with Redis' own overhead, ``MEMORY
    USAGE``); longer ones grow by APPEND + SETRANGE (constant cost per point, but Redis
    over-allocates a growing string by up to 2x).
``P:tr:<diaObjectId>``  STRING, same TTL; exists only once the event has triggered:
    one status byte (``P`` pending = decided but not yet confirmed delivered, ``S`` sent)
    followed by the trigger record as JSON (the "outbox" for a re-produce after a crash).

Idempotency (append script): points of one event arrive in time order (one key, one
partition). A point is *appended* when its time is later than the newest stored point's.
Same time as the newest point: a *duplicate* if its diaSourceId equals the stored
``last diaSourceId``, else a *conflict* (two points at one time -> dead letter). Earlier
time: a *duplicate* if a stored point has exactly that time (binary search of the packed
records; stored times are strictly increasing, so a time names one point), a duplicate
too (``unverified``) when it is older than every stored point and older points were
dropped, else *out of order* (dead letter). Duplicates write nothing.

All of a poll batch's events go to Redis in one pipeline of script calls (chunks of
``chunk_events`` events per call, one round trip); so does the score update.
Multi-key script calls need a single Redis (not Redis Cluster).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from broker.errors import BrokerError

VERSION = 1
HEADER_FIXED = struct.Struct("<BBBBIIIqdd")  # 40 bytes, then f32 x M ring
FLAG_REFERENCE = 1
FLAG_TRIGGERED = 2
RECORD = np.dtype([("t", "<f8"), ("mag", "<f4"), ("err", "<f4"), ("p", "u1")])  # 17 bytes
INPUT = np.dtype([("id", "<i8"), ("t", "<f8"), ("mag", "<f4"), ("err", "<f4")])  # 24 bytes
PROB_UNSCORED = 255
EXACT_LIMIT = 4096  # values up to this many bytes are rewritten at their exact size; longer: APPEND
PROB_SCALE = 254.0
PREFIX = struct.Struct("<IIB")  # window start index, points dropped now, trigger status byte

# Status codes of each incoming point, as returned by the append script.
APPENDED, DUPLICATE, OUT_OF_ORDER, CONFLICT, DUPLICATE_UNVERIFIED = b"0", b"1", b"2", b"3", b"4"

# Trigger outcome codes of the score script.
TRIG_NONE, TRIG_NEW, TRIG_DONE, TRIG_PENDING, TRIG_CONFLICT, TRIG_GONE = "N", "T", "D", "P", "C", "G"

_LUA_COMMON = """
local REC = 17
local HFMT = '<BBBBIIIc8dd'
local HSIZE = 40
"""

APPEND_LUA = _LUA_COMMON + r"""
-- KEYS[1..n] event keys, KEYS[n+1..2n] their trigger keys
-- ARGV: K, RF, max_points, ttl, M, counts (u32 per event), points (24 B each: id, t, mag, err),
--       exact_limit (bytes: values up to this size are rewritten at their exact size)
local K = tonumber(ARGV[1])
local RF = tonumber(ARGV[2])
local MAXP = tonumber(ARGV[3])
local TTL = tonumber(ARGV[4])
local M = tonumber(ARGV[5])
local counts = ARGV[6]
local pts = ARGV[7]
local EXACT = tonumber(ARGV[8])
local SLACK = math.max(16, math.floor(MAXP / 8))
local H = HSIZE + 4 * M
local n = #KEYS / 2
local out = {}
local ppos = 1
for i = 1, n do
  local cnt = struct.unpack('<I', counts, (i - 1) * 4 + 1)
  local key = KEYS[i]
  -- small values come whole (one call); long ones by pieces (GETRANGE)
  local v = redis.call('GETRANGE', key, 0, EXACT - 1)
  local whole = #v < EXACT
  local ver, m, flags, rsv, ntot, nsc, ndrop, lastid, ref, lastt, ring
  if #v == 0 then
    ver, m, flags, ntot, nsc, ndrop, lastid, ref, lastt = 1, M, 0, 0, 0, 0, string.rep('\0', 8), 0 / 0, nil
    ring = string.rep('\0', 4 * M)
  else
    ver, m, flags, rsv, ntot, nsc, ndrop, lastid, ref, lastt = struct.unpack(HFMT, v)
    if ver ~= 1 or m ~= M then
      return redis.error_reply('ULENS layout mismatch in ' .. key .. ': version ' .. ver .. ', M ' .. m)
    end
    ring = string.sub(v, HSIZE + 1, H)
  end
  local nst = ntot - ndrop
  local first = ndrop
  if nst == 0 then lastt = nil end
  local function time_at(q)  -- time of stored record q (0-based)
    local pos = H + q * REC
    if whole then return (struct.unpack('<d', v, pos + 1)) end
    return (struct.unpack('<d', redis.call('GETRANGE', key, pos, pos + 7)))
  end
  local oldlast = lastt
  local newrecs = {}
  local st = {}
  for j = 1, cnt do
    local id8 = string.sub(pts, ppos, ppos + 7)
    local tb = string.sub(pts, ppos + 8, ppos + 15)
    local t = struct.unpack('<d', tb)
    if lastt == nil or t > lastt then
      newrecs[#newrecs + 1] = tb .. string.sub(pts, ppos + 16, ppos + 23) .. '\255'
      lastt = t
      lastid = id8
      st[j] = '0'
    elseif t == lastt then
      if id8 == lastid then st[j] = '1' else st[j] = '3' end
    else
      local found = false
      if oldlast == nil or t > oldlast then
        for q = 1, #newrecs do
          if string.sub(newrecs[q], 1, 8) == tb then found = true break end
        end
      elseif nst > 0 then
        local lo, hi = 0, nst - 1
        while lo <= hi do
          local mid = math.floor((lo + hi) / 2)
          local tm = time_at(mid)
          if tm == t then found = true break
          elseif tm < t then lo = mid + 1 else hi = mid - 1 end
        end
        if not found and first > 0 and t < time_at(0) then st[j] = '4' end
      end
      if found then st[j] = '1' elseif st[j] == nil then st[j] = '2' end
    end
    ppos = ppos + 24
  end
  local added = #newrecs
  local dropnow = 0
  local after = nil   -- the new value when it was built here (small values)
  if added > 0 then
    local ntot2 = ntot + added
    if bit.band(flags, 1) == 0 and ntot2 >= K and first == 0 then
      local mags = {}
      for q = 0, K - 1 do
        local mg
        if q < nst then
          local pos = H + q * REC + 8
          if whole then mg = struct.unpack('<f', v, pos + 1)
          else mg = struct.unpack('<f', redis.call('GETRANGE', key, pos, pos + 3)) end
        else mg = struct.unpack('<f', newrecs[q - nst + 1], 9) end
        mags[#mags + 1] = mg
      end
      table.sort(mags)
      if K % 2 == 1 then ref = mags[(K + 1) / 2]
      else ref = (mags[K / 2] + mags[K / 2 + 1]) / 2 end
      flags = flags + 1
    end
    -- keep max_points; long values trim in steps of SLACK points (amortised); never
    -- drop the context of unscored points
    local newlen = H + (nst + added) * REC
    local small = newlen <= EXACT
    local drop = 0
    if nst + added > MAXP + SLACK or (small and nst + added > MAXP) then
      drop = nst + added - MAXP
      local lim = nsc - RF
      if lim < K then lim = 0 end
      if drop > lim - first then drop = lim - first end
      if drop < 0 then drop = 0 end
    end
    local header = struct.pack(HFMT, 1, M, flags, 0, ntot2, nsc, ndrop + drop, lastid, ref, lastt) .. ring
    local tail = table.concat(newrecs)
    if small or drop > 0 or #v == 0 then
      -- rewrite at the exact size (APPEND would over-allocate up to 2x)
      local body
      if whole then body = string.sub(v, H + drop * REC + 1)
      else body = redis.call('GETRANGE', key, H + drop * REC, -1) end
      after = header .. body .. tail
      redis.call('SET', key, after, 'EX', TTL)
    else
      redis.call('APPEND', key, tail)
      redis.call('SETRANGE', key, 0, header)
      redis.call('EXPIRE', key, TTL)
    end
    first = first + drop
    ndrop = ndrop + drop
    dropnow = drop
    ntot = ntot2
    nst = nst + added - drop
  end
  local hdr = struct.pack(HFMT, 1, M, flags, 0, ntot, nsc, ndrop, lastid, ref, lastt or 0 / 0) .. ring
  local trg = '\0'
  if bit.band(flags, 2) == 2 then
    local s = redis.call('GETRANGE', KEYS[n + i], 0, 0)
    if s ~= '' then trg = s end
    if added > 0 then redis.call('EXPIRE', KEYS[n + i], TTL) end
  end
  local win = ''
  local s0 = ntot
  if nsc < ntot then
    s0 = nsc - RF
    if s0 < first then s0 = first end
    if s0 < K then s0 = first end
    local pos = H + (s0 - first) * REC
    if after ~= nil then win = string.sub(after, pos + 1)
    elseif added == 0 and whole then win = string.sub(v, pos + 1)
    else win = redis.call('GETRANGE', key, pos, -1) end
  end
  out[i] = struct.pack('<IIB', s0, dropnow, string.byte(trg)) .. hdr .. table.concat(st) .. win
end
return out
"""

SCORE_LUA = _LUA_COMMON + r"""
-- KEYS[1..n] event keys, KEYS[n+1..2n] trigger keys
-- ARGV[1] ttl, ARGV[2] M, ARGV[2+i]: u32 old n_scored | u32 u | u8 fire | f32 x M ring | u8 x u probs | payload
local TTL = tonumber(ARGV[1])
local M = tonumber(ARGV[2])
local H = HSIZE + 4 * M
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local a = ARGV[2 + i]
  local old, u, fire = struct.unpack('<IIB', a)
  local key = KEYS[i]
  local h = redis.call('GETRANGE', key, 0, H - 1)
  if #h < H then
    out[i] = 'G'
  else
    local ver, m, flags, rsv, ntot, nsc, ndrop, lastid, ref, lastt = struct.unpack(HFMT, h)
    if nsc ~= old or old + u > ntot then
      out[i] = 'C'
    else
      local first = ndrop
      local pb = 10 + 4 * M
      for j = 0, u - 1 do
        local g = old + j
        if g >= first then
          redis.call('SETRANGE', key, H + (g - first) * REC + 16, string.sub(a, pb + j, pb + j))
        end
      end
      local res = 'N'
      if fire == 1 then
        local tk = KEYS[n + i]
        if bit.band(flags, 2) == 0 then
          flags = flags + 2
          local ok = redis.call('SET', tk, 'P' .. string.sub(a, pb + u), 'NX', 'EX', TTL)
          if ok then res = 'T' else
            local s = redis.call('GETRANGE', tk, 0, 0)
            if s == 'P' then res = 'P' else res = 'D' end
          end
        else
          local s = redis.call('GETRANGE', tk, 0, 0)
          if s == 'P' then res = 'P' else res = 'D' end
        end
      end
      redis.call('SETRANGE', key, 0,
        struct.pack(HFMT, ver, m, flags, 0, ntot, old + u, ndrop, lastid, ref, lastt) .. string.sub(a, 10, 9 + 4 * M))
      out[i] = res
    end
  end
end
return out
"""

SENT_LUA = r"""
-- KEYS: trigger keys confirmed delivered: status byte P -> S
local n = 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('SETRANGE', KEYS[i], 0, 'S')
    n = n + 1
  end
end
return n
"""


def header_size(m: int) -> int:
    return HEADER_FIXED.size + 4 * m


@dataclass(frozen=True)
class Header:
    version: int
    m: int
    flags: int
    n_total: int
    n_scored: int
    n_dropped: int
    last_source_id: int
    reference: Optional[float]
    ring_bytes: bytes  # f32 x M, oldest first; valid = min(M, n_scored) newest entries

    @property
    def ring(self) -> np.ndarray:
        """(M,) float32, the last M probabilities (oldest first)."""
        return np.frombuffer(self.ring_bytes, dtype="<f4")

    @property
    def triggered(self) -> bool:
        return bool(self.flags & FLAG_TRIGGERED)

    def ring_valid(self) -> np.ndarray:
        k = min(self.m, self.n_scored)
        return self.ring[self.m - k:] if k else self.ring[:0]


def parse_header(buf: bytes, offset: int = 0) -> Header:
    ver, m, flags, _, ntot, nsc, ndrop, last_id, ref, _last_t = HEADER_FIXED.unpack_from(buf, offset)
    if ver != VERSION:
        raise BrokerError(f"event state version {ver}, this code reads version {VERSION}")
    start = offset + HEADER_FIXED.size
    return Header(ver, m, flags, ntot, nsc, ndrop, last_id,
                  ref if flags & FLAG_REFERENCE and ref == ref else None, bytes(buf[start:start + 4 * m]))


def pack_points(ids, times, mags, errs) -> bytes:
    """The append script's input for points in order: 24 bytes each."""
    a = np.empty(len(ids), dtype=INPUT)
    a["id"], a["t"], a["mag"], a["err"] = ids, times, mags, errs
    return a.tobytes()


def quantize_probs(p: np.ndarray) -> bytes:
    """P(binary) as one byte for the stored record (0..254; 255 means not scored)."""
    q = np.rint(np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0) * PROB_SCALE)
    return q.astype(np.uint8).tobytes()


def dequantize_probs(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.uint8)
    return np.where(q == PROB_UNSCORED, np.nan, q / PROB_SCALE)


@dataclass
class AppendResult:
    """What the append script says about one event of the batch."""
    object_id: int
    header: Header          # after this batch's points
    statuses: bytes         # one status code per incoming point, in order
    start: int              # global index of the first point in ``window``
    dropped_now: int        # oldest points dropped by this call (max_points)
    trigger_status: bytes   # b"\0" none, b"P" pending, b"S" sent
    window: np.ndarray      # RECORD array: points start .. n_total-1 (empty if all scored)


def parse_append_reply(object_id: int, raw: bytes, m: int, count: int) -> AppendResult:
    start, dropped, trg = PREFIX.unpack_from(raw, 0)
    h = parse_header(raw, PREFIX.size)
    pos = PREFIX.size + header_size(m)
    statuses = raw[pos:pos + count]
    window = np.frombuffer(raw, dtype=RECORD, offset=pos + count)
    return AppendResult(object_id, h, statuses, start, dropped, bytes([trg]), window)


@dataclass
class ScoreUpdate:
    """New probabilities of one event (and its trigger, when the rule fired)."""
    object_id: int
    old_n_scored: int
    probs: np.ndarray           # (u,) float32, for points old_n_scored .. old_n_scored+u-1
    ring: np.ndarray            # (M,) float32, last M probabilities after them (oldest first)
    trigger: Optional[dict] = None  # the trigger record (JSON-able) when the rule fired

    def pack(self) -> bytes:
        return pack_updates([self])[0]


def pack_updates(updates: Sequence[ScoreUpdate]) -> list[bytes]:
    """The score script's per-event argument: u32 old n_scored | u32 u | u8 fire |
    f32 x M ring | u8 x u probabilities | trigger JSON (when fired). Vectorised."""
    if not updates:
        return []
    q = quantize_probs(np.concatenate([np.asarray(u.probs, dtype=np.float32) for u in updates]))
    rings = np.stack([np.asarray(u.ring, dtype="<f4") for u in updates]).tobytes()
    rl = len(rings) // len(updates)
    out, pos = [], 0
    pack = PREFIX.pack
    for k, u in enumerate(updates):
        n = len(u.probs)
        arg = pack(u.old_n_scored, n, 1 if u.trigger else 0) + rings[k * rl:(k + 1) * rl] + q[pos:pos + n]
        if u.trigger:
            arg += json.dumps(u.trigger, sort_keys=True).encode()
        out.append(arg)
        pos += n
    return out


@dataclass
class EventView:
    """Everything stored about one event (for ``ulens events show``)."""
    object_id: int
    header: Header
    first_index: int
    points: np.ndarray          # RECORD array
    ttl_s: int
    trigger_status: Optional[str]
    trigger: Optional[dict]

    def to_dict(self) -> dict:
        h = self.header
        probs = dequantize_probs(self.points["p"])
        ring = h.ring_valid()
        return {
            "diaObjectId": self.object_id, "n_total": h.n_total, "n_scored": h.n_scored,
            "n_dropped": h.n_dropped, "n_stored": int(len(self.points)),
            "last_diaSourceId": h.last_source_id, "reference_mag": h.reference,
            "last_probabilities": [float(x) for x in ring],
            "score": float(np.mean(ring.astype(np.float64))) if len(ring) else None,
            "triggered": h.triggered, "trigger_status": self.trigger_status,
            "trigger": self.trigger, "ttl_s": self.ttl_s,
            "points": [{"index": self.first_index + i, "midpointMjdTai": float(p["t"]),
                        "mag": float(p["mag"]), "mag_err": float(p["err"]),
                        "p_binary": None if np.isnan(q) else round(float(q), 4)}
                       for i, (p, q) in enumerate(zip(self.points, probs))],
        }


class EventStore:
    """The broker's Redis state. All methods are batch-wide and cost one round trip."""

    def __init__(self, client, prefix: str, ttl_s: int, max_points: int, *,
                 reference_points: int, receptive_field: int, smooth_window: int,
                 chunk_events: int = 256, exact_limit: int = EXACT_LIMIT):
        if smooth_window < 1 or smooth_window > 255:
            raise BrokerError(f"smooth window {smooth_window} must be in 1..255")
        need = receptive_field + reference_points + 1
        if max_points < need:
            raise BrokerError(f"redis.max_points = {max_points} is too small for this model: keep "
                              f"at least receptive_field + reference_points + 1 = {need} points")
        self.r = client
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self.max_points = int(max_points)
        self.k = int(reference_points)
        self.rf = int(receptive_field)
        self.m = int(smooth_window)
        self.chunk = int(chunk_events)
        self.exact_limit = max(int(exact_limit), header_size(self.m) + RECORD.itemsize)
        self._sha: dict[str, str] = {}
        self._load_scripts()

    # keys
    def event_key(self, object_id: int) -> str:
        return f"{self.prefix}:ev:{int(object_id)}"

    def trigger_key(self, object_id: int) -> str:
        return f"{self.prefix}:tr:{int(object_id)}"

    def _load_scripts(self) -> None:
        for name, src in (("append", APPEND_LUA), ("score", SCORE_LUA), ("sent", SENT_LUA)):
            self._sha[name] = self.r.script_load(src)

    def _run(self, calls: list[tuple[str, list, list]]) -> list:
        """Run script calls in one pipeline (one round trip); reload scripts once if flushed."""
        return run_scripts(self.r, self._sha, calls, self._load_scripts)

    def append(self, object_ids: Sequence[int], counts: Sequence[int], points: bytes) -> list[AppendResult]:
        """Append the batch's points (``pack_points``, grouped by event in ``object_ids``
        order, each event's points in arrival order). One result per event."""
        calls, spans = [], []
        pos = 0
        counts = [int(c) for c in counts]
        for s in range(0, len(object_ids), self.chunk):
            ids = object_ids[s:s + self.chunk]
            cnt = counts[s:s + self.chunk]
            nbytes = sum(cnt) * INPUT.itemsize
            keys = [self.event_key(o) for o in ids] + [self.trigger_key(o) for o in ids]
            args = [self.k, self.rf, self.max_points, self.ttl_s, self.m,
                    np.asarray(cnt, dtype="<u4").tobytes(), points[pos:pos + nbytes], self.exact_limit]
            pos += nbytes
            calls.append(("append", keys, args))
            spans.append((ids, cnt))
        replies = self._run(calls)
        out = []
        for (ids, cnt), reply in zip(spans, replies):
            for o, c, raw in zip(ids, cnt, reply):
                out.append(parse_append_reply(int(o), raw, self.m, c))
        return out

    def save_scores(self, updates: Sequence[ScoreUpdate]) -> list[str]:
        """Store new probabilities and decisions; per event a TRIG_* code."""
        calls = []
        for s in range(0, len(updates), self.chunk):
            part = updates[s:s + self.chunk]
            keys = [self.event_key(u.object_id) for u in part] + \
                   [self.trigger_key(u.object_id) for u in part]
            calls.append(("score", keys, [self.ttl_s, self.m] + pack_updates(part)))
        out: list[str] = []
        for reply in self._run(calls) if calls else []:
            out.extend(x.decode() if isinstance(x, bytes) else str(x) for x in reply)
        return out

    def mark_sent(self, object_ids: Sequence[int]) -> int:
        if not object_ids:
            return 0
        return int(self._run([("sent", [self.trigger_key(o) for o in object_ids], [])])[0])

    def pending_triggers(self, object_ids: Sequence[int]) -> dict[int, dict]:
        """Trigger records still marked pending (decided, delivery not confirmed)."""
        if not object_ids:
            return {}
        vals = self.r.mget([self.trigger_key(o) for o in object_ids])
        return {int(o): json.loads(v[1:]) for o, v in zip(object_ids, vals)
                if v is not None and v[:1] == b"P"}

    def read(self, object_id: int) -> Optional[EventView]:
        return read_event(self.r, self.prefix, object_id)


def read_event(client, prefix: str, object_id: int) -> Optional[EventView]:
    """Everything stored about one event, or None (needs no model, loads no script)."""
    ek, tk = f"{prefix}:ev:{int(object_id)}", f"{prefix}:tr:{int(object_id)}"
    pipe = client.pipeline(transaction=False)
    pipe.get(ek)
    pipe.ttl(ek)
    pipe.get(tk)
    raw, ttl, trg = pipe.execute()
    if raw is None:
        return None
    h = parse_header(raw)
    points = np.frombuffer(raw, dtype=RECORD, offset=header_size(h.m))
    status = trigger = None
    if trg is not None:
        status = {b"P": "pending", b"S": "sent"}.get(trg[:1], "unknown")
        trigger = json.loads(trg[1:])
    return EventView(int(object_id), h, h.n_total - len(points), points, int(ttl), status, trigger)


def scan_events(client, prefix: str, limit: int = 100) -> list[int]:
    """Ids of live events (SCAN; for inspection, not for the hot path)."""
    out = []
    for k in client.scan_iter(match=f"{prefix}:ev:*", count=1000):
        out.append(int(k.decode().rsplit(":", 1)[1]))
        if len(out) >= limit:
            break
    return sorted(out)


def run_scripts(r, sha: dict, calls, reload) -> list:
    """Run Lua script calls ``(name, keys, args)`` in one pipeline (one round trip).

    If Redis lost its script cache (restart, SCRIPT FLUSH), ``reload()`` loads the
    scripts again into ``sha`` and the pipeline is replayed once.
    """
    import redis

    for attempt in (0, 1):
        pipe = r.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.evalsha(sha[name], len(keys), *keys, *args)
        try:
            return pipe.execute()
        except redis.exceptions.NoScriptError:
            if attempt:
                raise
            reload()
    raise AssertionError("unreachable")
