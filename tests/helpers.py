"""Shared test helpers. Test alerts are built only here, through the real schema."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from schemas import default_codec, samples
from ulens.services import free_ports  # noqa: F401  (the tests' private services use it from here)


def mock_alert(**overrides) -> dict:
    """A valid alert record (schema 'latest'), with fields overridden."""
    codec = default_codec()
    record = dict(samples(codec.schema_id("alert"))[0])
    record["alertProducedUs"] = int(time.time() * 1e6)
    record.update(overrides)
    codec.encode(record, "alert")  # fail early if an override breaks the schema
    return record


def unique(name: str) -> str:
    """A name no other test (or earlier run) uses: topics, groups, key prefixes."""
    return f"test-{name}-{uuid.uuid4().hex[:10]}"




def assert_states_match(dump_a: dict, dump_b: dict, tol: float) -> None:
    """Two dumps of the broker's Redis state hold the same events, points and triggers,
    with probabilities within ``tol`` (``training.model.PROB_TOLERANCE``: two float32 runs
    of the model on different batches may round differently).

    ``dump_*``: {key: value} with the keys' prefix removed (``b"ev:<id>"``, ``b"tr:<id>"``).
    ``ev:``: every ``broker.state.Header`` field equal but the ring of probabilities
    (float32, within ``tol``); the records equal field by field (``RECORD.names``) but
    ``p``, round(254 P), which may differ by 1 (unscored, 255, on both sides or neither).
    ``tr:``: the status byte equal, the trigger JSON equal but ``probability`` (within
    ``tol``). Any other key: equal bytes. Written over the Header fields and RECORD names,
    not byte offsets, so it follows changes of the layout.
    """
    import dataclasses
    import json

    import numpy as np

    from broker import state as st

    assert dump_a.keys() == dump_b.keys(), sorted(dump_a.keys() ^ dump_b.keys())
    for key, a in dump_a.items():
        b = dump_b[key]
        kind = key.split(b":", 1)[0]
        if kind == b"ev":
            ha, hb = st.parse_header(a), st.parse_header(b)
            for f in dataclasses.fields(st.Header):
                if f.name != "ring_bytes":
                    va, vb = getattr(ha, f.name), getattr(hb, f.name)
                    if isinstance(va, np.ndarray):   # per-band references (NaN: none yet), counts
                        assert np.array_equal(va, vb, equal_nan=True), (key, f.name, va, vb)
                    else:
                        assert va == vb, (key, f.name)
            assert np.abs(ha.ring.astype(np.float64) - hb.ring).max(initial=0.0) <= tol, \
                (key, "ring", ha.ring, hb.ring)
            ra = np.frombuffer(a, dtype=st.RECORD, offset=st.header_size(ha.m))
            rb = np.frombuffer(b, dtype=st.RECORD, offset=st.header_size(hb.m))
            assert len(ra) == len(rb), (key, len(ra), len(rb))
            for name in st.RECORD.names:
                if name != "p":
                    assert ra[name].tobytes() == rb[name].tobytes(), (key, name)
            pa, pb = ra["p"].astype(int), rb["p"].astype(int)
            assert np.array_equal(pa == st.PROB_UNSCORED, pb == st.PROB_UNSCORED), (key, "unscored")
            assert np.abs(pa - pb).max(initial=0) <= 1, (key, "p", pa, pb)
        elif kind == b"tr":
            assert a[:1] == b[:1], (key, "status", a[:1], b[:1])
            ta, tb = json.loads(a[1:]), json.loads(b[1:])
            pa, pb = ta.pop("probability"), tb.pop("probability")
            assert ta == tb, (key, ta, tb)
            assert abs(pa - pb) <= tol, (key, "probability", pa, pb)
        else:
            assert a == b, key


def rubin_schemas(*versions):
    """The folder of Rubin's fetched schemas (``schemas.rubin.schema_dir()``) holding
    ``versions`` (default: every supported one). Not fetched: skip, with the command to run,
    except in CI (env CI set), where set-up fetches them, so there it fails."""
    import os

    import pytest

    from schemas import rubin

    want = list(versions or rubin.SUPPORTED)
    missing = [v for v in want if v not in rubin.available()]
    if missing:
        why = (f"Rubin's alert schemas {', '.join(f'{a}.{b}' for a, b in missing)} are not in "
               f"{rubin.schema_dir()}: run `{rubin.FETCH_COMMAND}`")
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(why + " (CI fetches them in scripts/setup.sh)")
        pytest.skip(why)
    return rubin.schema_dir()


def signal_and_wait(pid: int, sig, what: str, timeout_s: float = 30.0) -> None:
    """Send ``sig`` to ``pid`` and wait until the process is gone (or a zombie)."""
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} (pid {pid}) did not stop")
