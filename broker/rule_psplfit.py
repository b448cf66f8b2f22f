"""The classical decision rule in the broker: a robust PSPL refit per new point.

The fit and the decision are ``training.psplfit.advance`` (pure numpy, the same function
the offline evaluation runs); this module only moves its state between Redis and the
batch. Per poll batch, for the events the batch touched:

1. one pipelined round trip: each event's fit state ``P:pf:<id>``, its trigger outbox
   ``P:tp:<id>`` and, when the append reply does not already hold the event's whole
   stored light curve (it does when the TD-CNN is not running, and for young events),
   the event's light curve ``P:ev:<id>`` (a rare second round trip fetches the curve of an
   event whose fit lags behind without a new point in this batch: recovery after a crash);
2. ``advance`` over the events with unprocessed points, vectorised across them;
3. one round trip of a Lua script per chunk: compare-and-set of the state on its
   ``n_done`` (a concurrent consumer's newer state wins), and, when the rule fired,
   ``SET NX`` of the outbox with status ``P`` and the trigger record;
4. after the batch's triggers are delivered, :meth:`PsplFitRule.mark_sent` sets ``S``.

A re-delivered alert finds ``n_done`` already at the event's point count: nothing is
refitted, and a trigger still pending (``P``) is produced again with its deterministic
``triggerId`` (per event, rule and parameter version).

:class:`RuleCost` times each rule's share of a batch (Prometheus counter
``ulens_rule_seconds_total{rule=...}`` and the consumer's summary), so ``ulens report``
can put a processing cost per alert beside each rule's completeness.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np

from broker import state as st
from broker.triggers import Rule, trigger_at
from training import psplfit

SAVE_LUA = r"""
-- KEYS[1..n] state keys, KEYS[n+1..2n] trigger (outbox) keys
-- ARGV[1] ttl, ARGV[1+i]: u32 old n_done | u8 fire | state bytes (S) | trigger JSON (when fire)
local TTL = tonumber(ARGV[1])
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local a = ARGV[1 + i]
  local old, fire = struct.unpack('<IB', a)
  local S = tonumber(ARGV[2 + n])
  local body = string.sub(a, 6, 5 + S)
  local cur = redis.call('GETRANGE', KEYS[i], 4, 7)
  local cur_done = 0
  if #cur == 4 then cur_done = struct.unpack('<I', cur) end
  if cur_done ~= old then
    out[i] = 'C'
  else
    redis.call('SET', KEYS[i], body, 'EX', TTL)
    local tk = KEYS[n + i]
    local res = 'N'
    if fire == 1 then
      local ok = redis.call('SET', tk, 'P' .. string.sub(a, 6 + S), 'NX', 'EX', TTL)
      if ok then res = 'T' else
        local s = redis.call('GETRANGE', tk, 0, 0)
        if s == 'P' then res = 'P' else res = 'D' end
      end
    elseif redis.call('EXPIRE', tk, TTL) == 1 then
      local s = redis.call('GETRANGE', tk, 0, 0)
      if s == 'P' then res = 'P' end
    end
    out[i] = res
  end
end
return out
"""


def params_from_settings(settings) -> psplfit.Params:
    """The rule's parameters from ``consumer.pspl_fit`` (the same for broker and evaluate)."""
    return psplfit.Params(**asdict(settings.consumer.pspl_fit))


class RuleCost:
    """Seconds spent in each rule (and the points it was given), for cost per alert."""

    def __init__(self, registry=None):
        self.seconds: dict[str, float] = {}
        self.counter = None
        if registry is not None:
            from prometheus_client import Counter

            self.counter = Counter("ulens_rule_seconds", "Wall time spent in each decision rule "
                                   "(model or fit, decision, its Redis round trips)", ["rule"],
                                   registry=registry)

    @contextmanager
    def timing(self, rule: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[rule] = self.seconds.get(rule, 0.0) + dt
            if self.counter is not None:
                self.counter.labels(rule).inc(dt)


class PsplFitRule:
    """The pspl-fit rule's Redis state and its per-batch step."""

    name = psplfit.RULE

    def __init__(self, store: st.EventStore, params: psplfit.Params, chunk_events: int = 256):
        self.store = store
        self.r = store.r
        self.prefix = store.prefix
        self.ttl_s = store.ttl_s
        self.params = params
        self.version = params.version
        self.rule = Rule(self.name, params.threshold, params.min_points, 1)
        self.chunk = int(chunk_events)
        self._sha = {}
        self._load_scripts()

    # keys
    def state_key(self, object_id: int) -> str:
        return f"{self.prefix}:pf:{int(object_id)}"

    def trigger_key(self, object_id: int) -> str:
        return f"{self.prefix}:tp:{int(object_id)}"

    def _load_scripts(self) -> None:
        self._sha = {"save": self.r.script_load(SAVE_LUA), "sent": self.r.script_load(st.SENT_LUA)}

    def _evalsha(self, calls):
        return st.run_scripts(self.r, self._sha, calls, self._load_scripts)

    # --- the batch step ------------------------------------------------------------
    def process(self, touched: Sequence[tuple], points) -> list[dict]:
        """``touched``: (AppendResult, indices of the batch's points of that event) for
        every event of the batch. Returns the triggers to produce now (new and pending)."""
        if not touched:
            return []
        m = self.store.m
        hsize = st.header_size(m)
        pipe = self.r.pipeline(transaction=False)
        need_curve = []
        for res, _ in touched:
            pipe.get(self.state_key(res.object_id))
            pipe.get(self.trigger_key(res.object_id))
            h = res.header
            whole = res.start == h.n_dropped and len(res.window) == h.n_total - h.n_dropped
            fetch = not whole and h.n_total > h.n_dropped
            need_curve.append(fetch)
            if fetch:
                pipe.get(self.store.event_key(res.object_id))
        replies = pipe.execute()
        pos = 0
        states, curves, firsts, items, pending = [], [], [], [], []
        refresh = []
        for (res, mine), fetch in zip(touched, need_curve):
            raw_state, raw_trig = replies[pos], replies[pos + 1]
            pos += 2
            raw_ev = None
            if fetch:
                raw_ev = replies[pos]
                pos += 1
            if raw_trig is not None and raw_trig[:1] == b"P":
                pending.append(json.loads(raw_trig[1:]))
            s = psplfit.unpack_state(raw_state)
            h = res.header
            if s["flags"] & psplfit.TRIGGERED:
                refresh.append(res.object_id)   # keep the outcome as long as the event lives
                continue
            if s["n_done"] >= h.n_total:
                continue
            if fetch:
                if raw_ev is None:
                    continue            # expired between the two calls
                recs, first = self._records(raw_ev, hsize)
            else:
                recs, first = res.window, res.start
            states.append(s)
            curves.append((recs["t"].astype(np.float64), recs["mag"], recs["err"]))
            firsts.append(first)
            items.append((res, mine, raw_state))
        out = list(pending)
        if refresh:
            pipe = self.r.pipeline(transaction=False)
            for o in refresh:
                pipe.expire(self.state_key(o), self.ttl_s)
                pipe.expire(self.trigger_key(o), self.ttl_s)
            pipe.execute()
        if not states:
            return out
        new, outcomes = psplfit.advance(np.stack(states), curves, firsts, self.params)
        saves = []
        for (res, mine, _), s_old, s_new, oc, cv, first in zip(items, states, new, outcomes, curves, firsts):
            trig = None
            if oc.fire is not None:
                trig = trigger_at(res.object_id, res.header, points, mine, self.rule, oc.fire_stat,
                                  oc.fire, float(cv[0][oc.fire - first]), self.version)
            saves.append((res.object_id, int(s_old["n_done"]), s_new, trig))
        codes = self._save(saves)
        for (oid, _, _, trig), code in zip(saves, codes):
            if code == st.TRIG_NEW:
                out.append(trig)
            elif code == st.TRIG_PENDING and trig is not None:
                got = self.r.get(self.trigger_key(oid))
                if got is not None and got[:1] == b"P":
                    out.append(json.loads(got[1:]))
        return out

    @staticmethod
    def _records(raw: bytes, hsize: int):
        h = st.parse_header(raw)
        recs = np.frombuffer(raw, dtype=st.RECORD, offset=hsize)
        return recs, h.n_total - len(recs)

    def _save(self, saves) -> list[str]:
        calls = []
        size = psplfit.STATE.itemsize
        for c0 in range(0, len(saves), self.chunk):
            part = saves[c0:c0 + self.chunk]
            keys = [self.state_key(o) for o, *_ in part] + [self.trigger_key(o) for o, *_ in part]
            args = [self.ttl_s]
            for _, old, s_new, trig in part:
                a = np.array([old], dtype="<u4").tobytes() + (b"\1" if trig else b"\0") + \
                    psplfit.pack_state(s_new[None])
                if trig:
                    a += json.dumps(trig, sort_keys=True).encode()
                args.append(a)
            args.append(size)
            calls.append(("save", keys, args))
        out: list[str] = []
        for reply in self._evalsha(calls):
            out.extend(x.decode() if isinstance(x, bytes) else str(x) for x in reply)
        return out

    def mark_sent(self, object_ids: Sequence[int]) -> int:
        if not object_ids:
            return 0
        return int(self._evalsha([("sent", [self.trigger_key(o) for o in object_ids], [])])[0])

    def read(self, object_id: int) -> Optional[dict]:
        """The stored fit state and trigger of one event (inspection, tests)."""
        raw, trg = self.r.get(self.state_key(object_id)), self.r.get(self.trigger_key(object_id))
        if raw is None and trg is None:
            return None
        out: dict = {}
        if raw is not None:
            s = psplfit.unpack_state(raw)
            out["state"] = {k: (s[k].item()) for k in psplfit.STATE.names}
            out["ttl_s"] = int(self.r.ttl(self.state_key(object_id)))
        if trg is not None:
            out["trigger_status"] = {b"P": "pending", b"S": "sent"}.get(trg[:1], "unknown")
            out["trigger"] = json.loads(trg[1:])
        return out
