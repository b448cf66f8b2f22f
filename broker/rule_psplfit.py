"""The classical decision rule in the broker: a robust PSPL refit per new point.

The fit and the decision are ``training.psplfit.advance`` (pure numpy, the same function
the offline evaluation runs); this module only moves its state between Redis and the
batch. Per poll batch, for the events the batch touched:

1. one pipelined round trip: each event's fit state ``P:pf:<hash>:<id>`` (``<hash>`` names
   the parameters that produced it: other parameters start a state of their own, from the
   event's stored points), its trigger outbox
   ``P:tp:<id>`` and, when the append reply does not already hold the event's whole
   stored light curve (it does when the TD-CNN is not running, and for young events),
   the event's light curve ``P:ev:<id>`` (a rare second round trip fetches the curve of an
   event whose fit lags behind without a new point in this batch: recovery after a crash);
2. ``advance`` over the events with unprocessed points, vectorised across them (each
   point with its band, ``broker.state.band_of``: the fit has a source and a blend flux
   per band);
3. one round trip of a Lua script per chunk (``broker/state/lua/psplfit_save.lua``): the state
   is stored unless the stored one has seen as many points (a concurrent consumer's newer
   state wins; one that saw fewer is replaced), and, when the rule fired, ``SET NX`` of the
   outbox with status ``P`` and the trigger record;
4. after the batch's triggers are delivered, :meth:`PsplFitRule.mark_sent` sets ``S``.

A re-delivered alert finds ``n_done`` already at the event's point count: nothing is
refitted, and a trigger still pending (``P``) is produced again with its deterministic
``triggerId`` (per event, rule and parameter version). The outbox is per event and rule,
whatever the parameters: an event fires this rule once.

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
from broker.trigger_fields import params_from_fit_state
from broker.triggers import Rule, trigger_at
from training import psplfit

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

    def __init__(self, store: st.EventStore, params: psplfit.Params, chunk_events: int = 256,
                 trigger_ttl_s: Optional[int] = None):
        self.store = store
        self.r = store.r
        self.prefix = store.prefix
        self.ttl_s = store.ttl_s
        self.trigger_ttl_s = max(int(trigger_ttl_s or 0), self.ttl_s)
        self.params = params
        self.version = params.version
        self.rule = Rule(self.name, params.threshold, params.min_points, 1)
        self.chunk = int(chunk_events)
        self._sha = {}
        self._load_scripts()

    # keys (the store's layout: hash-tagged on a cluster, broker.state.keys)
    def state_key(self, object_id: int) -> str:
        return self.store.keys.psplfit_state(params_hash(self.params), object_id)

    def trigger_key(self, object_id: int) -> str:
        return self.store.keys.psplfit_trigger(object_id)

    def _load_scripts(self) -> None:
        self._sha = {"save": self.r.script_load(st.lua_script("psplfit_save")),
                     "sent": self.r.script_load(st.lua_script("sent"))}

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
            curves.append((recs["t"].astype(np.float64), recs["mag"], recs["err"], st.band_of(recs["band"])))
            firsts.append(first)
            items.append((res, mine, recs))
        out = list(pending)
        if refresh:
            pipe = self.r.pipeline(transaction=False)
            for o in refresh:
                pipe.expire(self.state_key(o), self.ttl_s)
                pipe.expire(self.trigger_key(o), self.trigger_ttl_s)
            pipe.execute()
        if not states:
            return out
        new, outcomes = psplfit.advance(np.stack(states), curves, firsts, self.params)
        saves = []
        for (res, mine, recs), s_old, s_new, oc, first in zip(items, states, new, outcomes, firsts):
            trig = None
            if oc.fire is not None:
                # the rule's own fit at the deciding point (the state stops there)
                trig = trigger_at(res.object_id, recs[oc.fire - first], points, mine, self.rule,
                                  oc.fire_stat, oc.fire, self.version, curve=(recs, first),
                                  fit_params=params_from_fit_state(s_new))
            saves.append((res.object_id, int(s_old["n_done"]), s_new, trig))
        codes = self._save(saves)
        again = []                  # outboxes still pending (a save run twice, a race)
        have = {t["diaObjectId"] for t in out}
        for (oid, _, _, trig), code in zip(saves, codes):
            if code == st.TRIG_NEW:
                out.append(trig)
            elif code == st.TRIG_PENDING and oid not in have:
                again.append(oid)
        out.extend(st.pending_in(self.r, [self.trigger_key(o) for o in again], again).values())
        return out

    @staticmethod
    def _records(raw: bytes, hsize: int):
        h = st.parse_header(raw)
        recs = np.frombuffer(raw, dtype=st.RECORD, offset=hsize)
        return recs, h.n_total - len(recs)

    def _save(self, saves) -> list[str]:
        calls = []
        size = psplfit.STATE.itemsize
        groups = self.store.keys.slot_groups([o for o, *_ in saves], self.chunk)
        for g in groups:
            part = [saves[i] for i in g]
            keys = [self.state_key(o) for o, *_ in part] + [self.trigger_key(o) for o, *_ in part]
            args = [self.ttl_s, self.trigger_ttl_s]
            for _, old, s_new, trig in part:
                a = np.array([old], dtype="<u4").tobytes() + (b"\1" if trig else b"\0") + \
                    psplfit.pack_state(s_new[None])
                if trig:
                    a += json.dumps(trig, sort_keys=True).encode()
                args.append(a)
            args.append(size)
            calls.append(("save", keys, args))
        out: list[str] = [""] * len(saves)
        for g, reply in zip(groups, self._evalsha(calls) if calls else []):
            for i, x in zip(g, reply):
                out[i] = x.decode() if isinstance(x, bytes) else str(x)
        return out

    def mark_sent(self, object_ids: Sequence[int]) -> int:
        return st.mark_sent(self._evalsha, self.trigger_key, self.store.keys, object_ids)

    def read(self, object_id: int) -> Optional[dict]:
        return read_fit(self.r, self.prefix, self.params, object_id)


def params_hash(params: psplfit.Params) -> str:
    """The hash in ``params.version`` that names the parameters in the state key."""
    return params.version.rsplit('-', 1)[-1]


def state_key(prefix: str, params: psplfit.Params, object_id: int, client=None) -> str:
    """``P:pf:<hash>:<id>``: an event's fit state made with these parameters (the hash of
    ``params.version``); another parameter set starts states of its own. ``client``: the
    layout of that client (hash-tagged on a cluster), else the single-node one."""
    return st.KeyLayout.of(client, prefix).psplfit_state(params_hash(params), object_id)


def trigger_key(prefix: str, object_id: int, client=None) -> str:
    """``P:tp:<id>``: the rule's outbox for an event, whatever the parameters."""
    return st.KeyLayout.of(client, prefix).psplfit_trigger(object_id)


def read_fit(client, prefix: str, params: psplfit.Params, object_id: int) -> Optional[dict]:
    """The stored fit state (for ``params``) and the rule's trigger of one event
    (inspection, tests)."""
    sk, tk = state_key(prefix, params, object_id, client), trigger_key(prefix, object_id, client)
    raw, trg = client.get(sk), client.get(tk)
    if raw is None and trg is None:
        return None
    out: dict = {}
    if raw is not None:
        s = psplfit.unpack_state(raw)
        out["state"] = {k: s[k].tolist() for k in psplfit.STATE.names}   # per-band fields: lists
        out["ttl_s"] = int(client.ttl(sk))
    if trg is not None:
        out["trigger_status"], out["trigger"] = st.outbox_record(trg)
    return out
