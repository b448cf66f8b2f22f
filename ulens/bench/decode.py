"""`ulens bench decode`: ways to read Rubin packets, on the same packets in one run.

The packets are the replay's ``lsst.v11_1`` packets of whole events of ``--survey``
(default lsst), built in this process (no Kafka). Rows, each in packets/s:

* ``decode.rubin.batch``: what the broker does, ``broker.validate.validate_batch`` in
  batches of ``consumer.batch_size`` (blocks decoded by polars, checked column by column);
  baseline: the same function reading every packet alone (fastavro, ``rubin_alert``);
* ``decode.rubin.fastavro``: fastavro's ``schemaless_reader`` of whole packets, the decode
  alone; baseline: the same with a reader schema of only the fields the broker uses
  (fastavro then resolves and skips the others);
* ``decode.rubin.polars``: polars' ``read_avro`` of the blocks alone; baseline: the same
  without ``prvDiaSources`` (the road not taken: it would skip detections the broker
  backfills from, see docs/BENCHMARKS.md).
"""
from __future__ import annotations

import io
import time

import numpy as np

from ulens.bench.harness import Run, cached_dataset, load_dataset, log, make_row


def _reader_schema(schema: dict) -> dict:
    """A reader schema with only the fields the broker reads."""
    src_keep = {"diaSourceId", "diaObjectId", "midpointMjdTai", "band", "scienceFlux", "scienceFluxErr",
                "psfFlux", "psfFluxErr", "templateFlux", "templateFluxErr", "ra", "dec"}
    frc_keep = {"diaForcedSourceId", "midpointMjdTai", "band", "scienceFlux", "scienceFluxErr",
                "psfFlux", "psfFluxErr"}
    fields = {f["name"]: f["type"] for f in schema["fields"]}

    def record(t):
        if isinstance(t, list):
            return next(record(b) for b in t if b != "null")
        return record(t["items"]) if isinstance(t, dict) and t.get("type") == "array" else t

    def prune(rec, keep, name):
        return {"type": "record", "name": name, "fields": [f for f in rec["fields"] if f["name"] in keep]}

    src = record(fields["diaSource"])
    return {"type": "record", "name": schema["name"], "namespace": schema.get("namespace"), "fields": [
        {"name": "diaSource", "type": prune(src, src_keep, "diaSource")},
        {"name": "prvDiaSources", "type": ["null", {"type": "array", "items": "diaSource"}], "default": None},
        {"name": "prvDiaForcedSources", "type": ["null", {"type": "array", "items": prune(
            record(fields["prvDiaForcedSources"]), frc_keep, "diaForcedSource")}], "default": None},
        {"name": "diaObject", "type": ["null", prune(record(fields["diaObject"]), {"diaObjectId"}, "diaObject")],
         "default": None}]}


def bench_decode(run: Run, a) -> list[dict]:
    import fastavro

    import broker.validate as v
    from broker.rubin_columns import COLUMNS
    from broker.schema_registry import codec_for
    from ulens.bench.consumer import rubin_stream
    from replay.rubin import RubinPackets
    from replay.stream import from_dataset, plan
    from schemas import HEADER, MAGIC, rubin

    survey = a.survey if a.survey != "thesis" else "lsst"
    full = cached_dataset(run.cache, a.events, a.seed, a.workers, survey)
    r = run.settings.replay
    # whole events (every packet of each, so their history is as long as the survey makes it)
    stream, _, _ = rubin_stream(run, full, a.decode_packets, survey)
    sub = load_dataset(stream)
    k = sub.n_events
    p = plan(from_dataset(sub, r.start_mjd), detections_only=True, snr_threshold=r.snr_threshold)
    schema = rubin.load_schema(11, 1)
    sid = rubin.schema_id(11, 1)
    hdr = HEADER.pack(MAGIC, sid)
    keys, values = [], []
    for key, _mjd, body in RubinPackets(p, schema).records():
        keys.append(key)
        values.append(hdr + body)
    n = len(values)
    sizes = np.array([len(x) for x in values])
    what = (f"{n} lsst.v11_1 packets of the replay, {k} whole {survey} events (median "
            f"{int(np.median(sizes))} B, p90 {int(np.percentile(sizes, 90))} B)")
    log(f"decode: {what}")
    codec = codec_for(run.settings)
    bs = run.settings.consumer.batch_size

    def batches(fn, limit=n):
        t0 = time.perf_counter()
        for i in range(0, limit, bs):
            fn(values[i:min(i + bs, limit)], keys[i:min(i + bs, limit)])
        return limit / (time.perf_counter() - t0)

    def validate(vals, ks):
        v.validate_batch(codec, vals, ks, None, lambda i: 1)

    batches(validate, min(n, bs))                       # warm: imports, the block reader
    block = batches(validate)
    one = min(n, max(500, n // 10))                     # the slow path on a share of the packets
    saved = v.BLOCK_MIN_MESSAGES
    v.BLOCK_MIN_MESSAGES = 10 ** 9
    try:
        single = batches(validate, one)
    finally:
        v.BLOCK_MIN_MESSAGES = saved
    parsed = fastavro.parse_schema(schema)
    reader = fastavro.parse_schema(_reader_schema(schema))
    bodies = [x[HEADER.size:] for x in values]

    def avro(rs, limit):
        t0 = time.perf_counter()
        for b in bodies[:limit]:
            fastavro.schemaless_reader(io.BytesIO(b), parsed, rs)
        return limit / (time.perf_counter() - t0)

    fa = avro(None, one)
    fa_reader = avro(reader, one)
    import polars as pl

    blk = codec.block_reader(sid, COLUMNS)

    def polars(cols):
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            pl.read_avro(io.BytesIO(blk.container(bodies[i:i + bs])), columns=cols)
        return n / (time.perf_counter() - t0)

    pol = polars([blk.first_field, *COLUMNS])
    pol_no_prv = polars([blk.first_field, *(c for c in COLUMNS if c != "prvDiaSources")])
    log(f"decode: batch {block:,.0f}/s (one by one {single:,.0f}/s), fastavro {fa:,.0f}/s (reader "
        f"schema {fa_reader:,.0f}/s), polars {pol:,.0f}/s (without prvDiaSources {pol_no_prv:,.0f}/s)")
    return [
        make_row("decode.rubin.batch", block, "packets/s", single,
                 note=f"broker.validate.validate_batch in batches of {bs} (polars blocks, columns); "
                      f"{what}; baseline: the same function reading each packet alone (fastavro + "
                      f"rubin_alert) on the first {one}"),
        make_row("decode.rubin.fastavro", fa, "packets/s", fa_reader,
                 note=f"fastavro.schemaless_reader, whole packets, {one} packets; baseline: the same "
                      "with a reader schema of the 12 diaSource, 7 diaForcedSource and 1 diaObject "
                      "fields the broker reads"),
        make_row("decode.rubin.polars", pol, "packets/s", pol_no_prv,
                 note=f"polars.read_avro of blocks of {bs} packets ({', '.join(COLUMNS)}); baseline: "
                      "the same blocks without prvDiaSources"),
    ]


def add_arguments(g) -> None:
    g.add_argument("--decode-packets", type=int, default=20_000,
                   help="decode: about this many packets, of whole events of --survey (lsst by default)")
