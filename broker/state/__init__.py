"""The broker's event state in Redis, as a package:

``layout``     the byte layout of an event value and the constants Python and Lua share
``keys``       every key format, single Redis and Redis Cluster (hash tags, slot groups)
``lua/``       the scripts (append, score, sent, psplfit_save), loaded with importlib.resources
``store``      the store: batch-wide calls, one round trip each; reading an event back
``reference``  a plain-Python reference of the append and score rules, held against the Lua
               on a real Redis by tests/integration/test_state_guarantees.py

``from broker import state as st`` gives the names below.
"""
from broker.state.keys import (CLUSTER_BUCKETS, KeyLayout, event_key, event_pattern,  # noqa: F401
                               is_cluster, object_id_of, psplfit_state_key, psplfit_trigger_key,
                               trigger_key)
from broker.state.layout import *  # noqa: F401,F403
from broker.state.layout import lua_prelude, model_tag  # noqa: F401
from broker.state.store import (AppendResult, EventStore, EventView, Header, ScoreUpdate,  # noqa: F401
                                dequantize_probs, lua_script, mark_sent, pack_points, pack_updates,
                                outbox_record, parse_append_reply, parse_header, pending_in, quantize_probs,
                                read_event, run_scripts, scan_events, wait_for_replicas)
