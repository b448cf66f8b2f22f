"""`ulens replay --format rubin` against the real Kafka, read back with a plain consumer and
checked by a plain fastavro reader in a subprocess that does not import this project (it
reads Rubin's .avsc files from the fetched cache itself); the production-time header and
the key of both formats; the ground truth names every event."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from replay.producer import PRODUCED_HEADER
from schemas import default_codec, rubin
from tests.helpers import rubin_schemas
from tests.integration.test_replay import read_jsonl, read_topic, replay
from tests.unit.test_replay_stream import make_dataset
from training import simulate as sim

# A plain reader of Rubin's packets: fastavro and the standard library only. It resolves
# the alert schema's named types from the sibling .avsc files with fastavro's own loader.
VALIDATOR = r'''
import json, struct, sys
import fastavro, fastavro.schema
root, major, minor, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
folder = f"{root}/{major}/{minor}"
schema = fastavro.schema.load_schema(f"{folder}/lsst.v{major}_{minor}.alert.avsc")
def required(name):
    with open(f"{folder}/lsst.v{major}_{minor}.{name}.avsc") as f:
        return [x["name"] for x in json.load(f)["fields"] if not isinstance(x["type"], list)]
req = {n: required(n) for n in ("alert", "diaSource", "diaForcedSource", "diaObject")}
def check(rec, name):
    missing = [f for f in req[name] if rec.get(f) is None]
    assert not missing, (name, missing)
import io
out = []
data = open(path, "rb").read()
pos = 0
while pos < len(data):
    (n,) = struct.unpack_from(">I", data, pos); pos += 4
    msg = data[pos:pos + n]; pos += n
    assert msg[0] == 0, "magic byte"
    sid = struct.unpack(">I", msg[1:5])[0]
    assert sid == major * 100 + minor, sid
    buf = io.BytesIO(msg[5:])
    rec = fastavro.schemaless_reader(buf, schema, None)
    assert buf.tell() == n - 5, "trailing bytes"
    check(rec, "alert"); check(rec["diaSource"], "diaSource"); check(rec["diaObject"], "diaObject")
    for q in rec["prvDiaSources"]:
        check(q, "diaSource")
    for q in rec["prvDiaForcedSources"]:
        check(q, "diaForcedSource")
    out.append({"diaSourceId": rec["diaSourceId"], "diaObjectId": rec["diaSource"]["diaObjectId"],
                "mjd": rec["diaSource"]["midpointMjdTai"], "n_prv": len(rec["prvDiaSources"]),
                "n_forced": len(rec["prvDiaForcedSources"]), "size": n})
own = {"schemas", "replay", "ulens", "broker", "training", "config", "tests"} & set(sys.modules)
assert not own, own
print(json.dumps(out))
'''


def plain_read(tmp_path, msgs, version):
    """The packets decoded by the validator subprocess (python -I, cwd elsewhere)."""
    path = tmp_path / "packets.bin"
    path.write_bytes(b"".join(struct.pack(">I", len(m.value())) + m.value() for m in msgs))
    script = tmp_path / "validate.py"
    script.write_text(VALIDATOR)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(script), str(rubin.schema_dir()), *map(str, version),
                           str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def lsst():
    return sim.simulate(4, 4, sim.SimulationConfig(survey="lsst", seed=11), workers=0)


@pytest.mark.parametrize("version", rubin.SUPPORTED, ids=lambda v: f"{v[0]}.{v[1]}")
def test_rubin_packets_validate_under_rubins_schema(services, topics, tmp_path, capsys, lsst, version):
    rubin_schemas(version)
    t = topics("alerts", partitions=3)["alerts"]
    data = lsst.save(tmp_path / "lsst.npz")
    truth_path = tmp_path / "run" / "truth.jsonl"
    rc, out, err = replay(capsys, "--data", data, "--topic", t, "--format", "rubin",
                          "--rubin-version", "%d.%d" % version, "--truth-out", truth_path)
    assert rc == 0, err
    n = int(lsst.detected.sum())
    assert f"replay: {n} alerts, " in out and f"Rubin lsst.v{version[0]}_{version[1]} packets" in err
    msgs = read_topic(services, t, n)
    got = plain_read(tmp_path, msgs, version)
    assert len(got) == n and len({g["diaSourceId"] for g in got}) == n
    now_us = time.time() * 1e6
    for m, g in zip(msgs, got):
        assert m.key() == str(g["diaObjectId"]).encode()
        headers = dict(m.headers())
        assert abs(int(headers[PRODUCED_HEADER]) - now_us) < 120e6
    per_key: dict = {}
    for g in got:
        per_key.setdefault(g["diaObjectId"], []).append(g["mjd"])
    assert all(v == sorted(v) for v in per_key.values())        # per key: time order
    # the codec (after rubin.add_to) decodes them too, as the broker would
    codec = default_codec()
    rubin.add_to(codec)
    assert {codec.decode_kinds(m.value(), "rubin")[0] for m in msgs} == {"rubin"}
    truth = read_jsonl(truth_path)
    sent = {int(e): int(c) for e, c in zip(lsst.event_id, np.add.reduceat(
        lsst.detected.astype(int), lsst.offsets[:-1])) if c}
    assert {r["diaObjectId"]: r["n_points"] for r in truth} == sent
    run = json.loads((tmp_path / "run" / "replay.json").read_text())
    assert run["options"]["format"] == "rubin" and run["kafka"]["schema_id"] == rubin.schema_id(*version)
    sizes = sorted(g["size"] for g in got)
    print(f"\nRubin {version}: {n} packets, bytes median {sizes[len(sizes) // 2]}, max {sizes[-1]}")


def test_no_key_and_the_header_on_compact_alerts(services, topics, tmp_path, capsys):
    ds = make_dataset(3, 10, seed=21)
    t = topics("alerts")["alerts"]
    rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--topic", t, "--no-key",
                          "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 0, err
    msgs = read_topic(services, t, 30)
    codec = default_codec()
    for m in msgs:
        assert m.key() is None
        rec = codec.decode_kind(m.value(), "alert")
        assert int(dict(m.headers())[PRODUCED_HEADER]) == rec["alertProducedUs"]
    assert [r["diaObjectId"] for r in read_jsonl(tmp_path / "truth.jsonl")] == ds.event_id.tolist()


def test_rubin_without_fetched_schemas_says_the_command(services, topics, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(rubin.ENV, str(tmp_path / "empty"))
    t = topics("alerts")["alerts"]
    ds = make_dataset(2, 10, seed=22, amplitude=3.0)
    rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--topic", t, "--format", "rubin",
                          "--truth-out", tmp_path / "x" / "truth.jsonl")
    assert rc == 3 and "run `ulens rubin fetch-schemas`" in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, match", [
    (["--history", "3"], "--history is for --format ulens"),
    (["--no-detections-only"], "one packet per detection"),
])
def test_rubin_refuses_compact_only_options(services, tmp_path, capsys, argv, match):
    ds = make_dataset(2, 10, seed=23)
    rc, out, err = replay(capsys, "--data", ds.save(tmp_path / "d.npz"), "--format", "rubin", *argv,
                          "--truth-out", tmp_path / "truth.jsonl")
    assert rc == 3 and match in err, err
