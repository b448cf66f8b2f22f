"""`ulens replay`: stream a dataset (or archival light curves) into Kafka as Avro alerts.

Everything is read and checked before the producer exists, so bad input produces
nothing. Outputs of a run (folder ``runs/replay_<UTC timestamp>/`` under the current
directory unless ``--truth-out`` names the truth file elsewhere):

* ``truth.jsonl``: one JSON object per event sent, the fields of the ``truth`` schema
  (``schemas/truth/1/0``): diaObjectId, label, t0, t0_mjd, tE, u0, s, q, alpha, rho, fs,
  baseline_mag, dchi2, n_points, first_mjd, last_mjd, source, run_id; NaN -> null.
* ``replay.json``: the run's parameters, counts, timing and survey MJD range.

Formats (``--format``): ``ulens`` (default), our compact alert (``schemas/alert/``), one
per observed point (or per detection with ``--detections-only``); ``rubin``, Rubin's own
packet ``lsst.vN_M.alert`` (``--rubin-version``, schemas fetched by ``ulens rubin
fetch-schemas``), one per 5-sigma detection with 365 days of history
(:mod:`replay.rubin`). Both go through the same plan, pacing and producer; every message
carries its production time in the header ``ulens.alertProducedUs`` (µs); key =
diaObjectId unless ``--no-key``.

Exit status: 0 all alerts delivered; 1 some alert not delivered (the count is printed);
2 bad input (clean error); 130 interrupted (Ctrl-C / SIGTERM, after flushing).
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import sys
from pathlib import Path
from typing import Optional

HELP = ("Stream a dataset (.npz) or archival light curves as Avro alerts into Kafka, all events "
        "interleaved in survey-time order: compact alerts (one per observed point) or Rubin's own "
        "packets (one per 5-sigma detection), key = diaObjectId.")


class ReplayUsageError(ValueError):
    """A command-line value is invalid."""


def positive_or_max(text: str):
    """argparse type: a positive finite number, or the word ``max``."""
    if text == "max":
        return "max"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'max', got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number or 'max', got {text!r}")
    return v


def _positive(cast):
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return v
    return parse


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _rubin_version(text: str) -> tuple[int, int]:
    from schemas import rubin
    try:
        return rubin.parse_version(text)
    except rubin.RubinSchemaError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE", help="dataset .npz (training.dataset format)")
    src.add_argument("--photometry", metavar="FILE", nargs="+",
                     help="archival light curves: text tables (time, mag, error), one file per event; "
                          "time as JD/HJD, HJD-2450000 or MJD (detected), replayed at the file's own MJD")
    p.add_argument("--format", choices=("ulens", "rubin"), default="ulens",
                   help="ulens: our compact alert (schemas/alert); rubin: Rubin's packet lsst.vN_M.alert, "
                        "one per 5-sigma detection with 365 days of detections and forced photometry "
                        "(needs `ulens rubin fetch-schemas`) (default: ulens)")
    p.add_argument("--rubin-version", default="11.1", metavar="M.m", type=_rubin_version,
                   help="--format rubin: Rubin's schema version, 11.1 or 10.0 (default: 11.1)")
    p.add_argument("--no-key", action="store_true",
                   help="produce messages without a key, as Rubin's stream does (default: key = diaObjectId)")
    p.add_argument("--speed", type=positive_or_max, default=None,
                   help="survey seconds per wall second (86400 = one survey day per second) or 'max' "
                        "[config replay.speed]")
    p.add_argument("--rate", type=_positive(float), default=None,
                   help="cap in alerts per second [config replay.rate]")
    p.add_argument("--limit-events", type=_positive(int), default=None, metavar="N",
                   help="replay only the first N events of the input (file order)")
    p.add_argument("--topic", default=None, help="alerts topic [config kafka.topics.alerts]; created "
                   "with kafka.partitions.alerts partitions if missing")
    p.add_argument("--start-mjd", type=float, default=None, metavar="M",
                   help="MJD of the dataset's day 0 [config replay.start_mjd] (not used for --photometry)")
    p.add_argument("--history", type=_non_negative_int, default=None, metavar="N",
                   help="previous points carried in prvDiaSources [config replay.history_points]")
    p.add_argument("--detections-only", action=argparse.BooleanOptionalAction, default=None,
                   help="send only points with |psfFlux|/psfFluxErr >= --snr-threshold "
                        "[config replay.detections_only]")
    p.add_argument("--snr-threshold", type=float, default=None, metavar="S",
                   help="detection threshold [config replay.snr_threshold]")
    p.add_argument("--truth-out", metavar="PATH", default=None,
                   help="ground-truth JSONL file (default runs/replay_<UTC>/truth.jsonl); "
                        "replay.json is written beside it")
    p.add_argument("--publish-truth", action=argparse.BooleanOptionalAction, default=None,
                   help="also publish the ground truth on the compacted truth topic "
                        "[config replay.publish_truth, kafka.topics.truth]")
    p.add_argument("--object-id-start", type=_non_negative_int, default=None, metavar="K",
                   help="--photometry: diaObjectIds K, K+1, ... in file order instead of a hash of "
                        "each file name")
    p.add_argument("-X", dest="producer_config", type=_kv, action="append", default=[],
                   metavar="KEY=VALUE", help="extra librdkafka producer setting (repeatable), "
                   "e.g. -X compression.type=none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _options(args, settings) -> dict:
    r = settings.replay
    pick = lambda flag, conf: conf if flag is None else flag  # noqa: E731
    speed = pick(args.speed, r.speed)
    snr = pick(args.snr_threshold, r.snr_threshold)
    if not (math.isfinite(snr) and snr >= 0):
        raise ReplayUsageError(f"--snr-threshold must be >= 0, got {snr}")
    start = pick(args.start_mjd, r.start_mjd)
    if not math.isfinite(start):
        raise ReplayUsageError(f"--start-mjd must be finite, got {start}")
    rubin = args.format == "rubin"
    if rubin and args.history is not None:
        raise ReplayUsageError("--history is for --format ulens: a Rubin packet carries the previous "
                               "365 days of detections and forced photometry")
    if rubin and args.detections_only is False:
        raise ReplayUsageError("--format rubin sends one packet per detection: --no-detections-only "
                               "does not apply")
    return {"format": args.format,
            "rubin_version": "%d.%d" % args.rubin_version if rubin else None,
            "keyed": not args.no_key,"speed": None if speed == "max" else float(speed), "speed_arg": speed,
            "rate": pick(args.rate, r.rate), "start_mjd": float(start),
            "history": 0 if rubin else pick(args.history, r.history_points),
            "detections_only": True if rubin else pick(args.detections_only, r.detections_only),
            "snr_threshold": float(snr), "publish_truth": pick(args.publish_truth, r.publish_truth),
            "topic": args.topic or settings.kafka.topics.alerts,
            "limit_events": args.limit_events}


def _run_dir(truth_out: Optional[str], stamp: str) -> tuple[Path, Path, str]:
    """(folder, truth file, run id); the folder is created now (fails early if it cannot be)."""
    try:
        if truth_out:
            truth = Path(truth_out)
            truth.parent.mkdir(parents=True, exist_ok=True)
            return truth.parent, truth, f"replay_{stamp}"
        base = Path("runs")
        for i in range(1000):
            name = f"replay_{stamp}" + (f"_{i}" if i else "")
            try:
                (base / name).mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                continue
            return base / name, base / name / "truth.jsonl", name
    except OSError as exc:
        raise ReplayUsageError(f"cannot create the run folder: {exc}") from None
    raise ReplayUsageError("cannot find a free run folder name under runs/")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, allow_nan=False) + "\n")
    tmp.replace(path)


def _rubin(codec, p, version: tuple[int, int]):
    """(schema id, encode, records) of Rubin's packets for plan ``p``; the first packet is
    decoded under the schema before any I/O."""
    import itertools

    from replay.rubin import RubinPackets
    from schemas import HEADER, MAGIC, rubin

    schema = rubin.load_schema(*version)        # not fetched: says the command to run
    sid = rubin.schema_id(*version)
    codec.add_schema(sid, schema)
    encode = HEADER.pack(MAGIC, sid).__add__
    records = RubinPackets(p, schema).records()
    first = next(records, None)
    if first is None:
        return sid, encode, iter(())
    codec.decode_kinds(encode(first[2]), "rubin")
    return sid, encode, itertools.chain([first], records)


def run(args) -> int:
    import config as cfg
    from replay import producer as kp
    from replay.stream import from_dataset, plan, truth_records
    from schemas import default_codec
    from training.dataset import load

    settings = cfg.load(args.config)
    o = _options(args, settings)

    # 1. read and check everything; nothing touches Kafka before this is done
    if args.data:
        lc = from_dataset(load(args.data), o["start_mjd"], source=str(args.data))
    else:
        from replay.photometry_files import load_files
        lc = load_files(args.photometry, args.object_id_start)
    lc = lc.head(o["limit_events"])
    p = plan(lc, history=o["history"], detections_only=o["detections_only"],
             snr_threshold=o["snr_threshold"])
    codec = default_codec()
    if o["format"] == "rubin":
        alert_sid, encode, records = _rubin(codec, p, args.rubin_version)
        produced_field = None
    else:
        alert_sid = codec.schema_id("alert")
        encode = functools.partial(codec.encode, schema_id=alert_sid)
        records, produced_field = None, "alertProducedUs"
        if p.n_alerts:   # one record through the real schema before any I/O
            codec.encode(next(p.records())[2], schema_id=alert_sid)
    if o["publish_truth"]:
        codec.schema_id("truth")
    overrides = dict(args.producer_config)
    started = dt.datetime.now(dt.timezone.utc)
    folder, truth_path, run_id = _run_dir(args.truth_out, started.strftime("%Y%m%dT%H%M%SZ"))

    # 2. Kafka: topics, producer, the paced loop
    client = settings.kafka.client_config()
    try:
        partitions, created = kp.ensure_topic(client, o["topic"], settings.kafka.partitions.alerts)
    except kp.KafkaUnavailable:
        if args.truth_out is None:
            folder.rmdir()   # nothing was written there
        raise
    what = f", Rubin lsst.v{o['rubin_version'].replace('.', '_')} packets" if o["format"] == "rubin" else ""
    print(f"replay: {p.n_alerts} alerts of {lc.n_events} events from {lc.source} -> topic "
          f"{o['topic']} ({partitions} partitions{', created' if created else ''}{what})", file=sys.stderr)
    delivery = kp.Delivery()
    producer = kp.make_producer(client, delivery, overrides)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=p.n_alerts, unit="alert", unit_scale=True, file=sys.stderr,
                        mininterval=0.5, smoothing=0.1)
    enc = codec.encode
    stop = kp.StopFlag()
    with stop.installed():
        try:
            out = kp.stream_plan(p, producer, o["topic"], encode, delivery, speed=o["speed"],
                                 rate=o["rate"], stop=stop, progress=progress, records=records,
                                 produced_field=produced_field, keyed=o["keyed"])
        finally:
            if progress is not None:
                progress.close()

        # 3. ground truth: file always, topic on request (events with >= 1 alert sent)
        truth = truth_records(p, out.per_event, run_id)
        _write_jsonl(truth_path, truth)
        truth_failed = 0
        if o["publish_truth"] and truth:
            tt = settings.kafka.topics.truth
            before = delivery.failed
            tsid = codec.schema_id("truth")
            try:
                kp.ensure_topic(client, tt, settings.kafka.partitions.truth,
                                {"cleanup.policy": "compact"})
                left = kp.produce_all(producer, tt, ((str(r["diaObjectId"]).encode("ascii"),
                                                      enc(r, schema_id=tsid)) for r in truth))
                truth_failed = delivery.failed - before + left
            except kp.KafkaUnavailable as exc:   # the alerts are out: report, do not crash
                print(f"replay: error: truth not published: {exc}", file=sys.stderr)
                truth_failed = len(truth)

    n = out.produced
    mjd_range = [float(p.mjd[0]), float(p.mjd[n - 1])] if n else None
    undelivered = out.undelivered
    events_started = int((out.per_event > 0).sum())
    report = {
        "run_id": run_id, "started_utc": started.isoformat(timespec="seconds"),
        "command": ("ulens replay " + " ".join(sys.argv[2:])) if sys.argv[1:2] == ["replay"] else None,
        "input": {"data": args.data, "photometry": args.photometry,
                  "events": lc.n_events, "points": lc.n_points},
        "options": {**{k: v for k, v in o.items() if k not in ("speed", "speed_arg")},
                    "speed": o["speed_arg"], "producer_overrides": overrides},
        "kafka": {"bootstrap_servers": cfg.mask_url(client.get("bootstrap.servers")), "topic": o["topic"],
                  "schema_id": alert_sid,
                  "partitions": partitions, "topic_created": created,
                  "truth_topic": settings.kafka.topics.truth if o["publish_truth"] else None},
        "counts": {"alerts_planned": p.n_alerts, "alerts_produced": n,
                   "alerts_delivered": out.delivered, "alerts_undelivered": undelivered,
                   "events_started": events_started,
                   "events_without_alerts": int((p.per_event_counts() == 0).sum()),
                   "truth_records": len(truth), "truth_undelivered": truth_failed},
        "seconds": round(out.seconds, 3), "alerts_per_s": round(out.rate, 1),
        "survey_mjd_range": mjd_range, "interrupted": out.interrupted, "signal": out.signal,
        "first_delivery_error": delivery.first_error, "produce_error": out.error,
        "truth_file": str(truth_path)}
    _write_json(folder / "replay.json", report)

    span = f"MJD {mjd_range[0]:.3f}..{mjd_range[1]:.3f}" if mjd_range else "no alerts"
    summary = (f"replay: {n} alerts, {events_started} events, {out.seconds:.2f} s, "
               f"{out.rate:,.0f} alerts/s, survey {span}")
    if out.interrupted:
        last = f"{mjd_range[1]:.3f}" if mjd_range else "-"
        print(f"replay: interrupted ({out.signal}) after {n} of {p.n_alerts} alerts, "
              f"{events_started} events started, survey date MJD {last}", file=sys.stderr)
    print(summary)
    print(f"truth: {truth_path} ({len(truth)} events); run: {folder / 'replay.json'}")
    if out.error:
        print(f"replay: error: Kafka refused alert {n + 1} of {p.n_alerts}: {out.error}",
              file=sys.stderr)
    if undelivered or truth_failed or out.error:
        print(f"replay: error: {undelivered} alert(s) and {truth_failed} truth record(s) not "
              f"delivered (first error: {delivery.first_error})", file=sys.stderr)
        # ulens/cli.py's table: 4 Kafka away (timed out, unreachable, still unflushed), 3 Kafka
        # refused what was sent (too large, not authorised, a fatal producer error)
        away = delivery.first_error_transient or (out.unflushed and not delivery.failed and not out.error)
        return 130 if out.interrupted else 4 if away else 3
    return 130 if out.interrupted else 0
