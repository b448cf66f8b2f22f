"""`ulens subscribe`: the follow-up observer's view of the trigger topic."""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

HELP = ("print triggers as they arrive: event, coordinates, band and magnitude, probability, points "
        "and bands seen, the PSPL estimate, latency and the summary line (schema v1 or v2)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", default=None, help="trigger topic (default: kafka.topics.triggers)")
    parser.add_argument("--from-beginning", action="store_true",
                        help="start at the oldest retained trigger (default: only new ones)")
    parser.add_argument("--json", action="store_true", help="one JSON object per trigger")
    parser.add_argument("--until-idle", type=float, metavar="SECONDS", default=None,
                        help="exit after this long with nothing new")
    parser.add_argument("--max", type=int, metavar="N", default=None, help="exit after N triggers")
    parser.add_argument("--group", default=None,
                        help="consumer group (default: a fresh one; nothing is committed)")


def decode_trigger(codec, value: bytes) -> tuple[int, dict]:
    """(schema id, record) of a trigger message; CodecError when it is not a trigger (the
    dashboard's feed reads the topic through this too)."""
    from schemas import CodecError

    sid, rec = codec.decode(value)
    if codec.kind_of(sid) != "trigger":
        raise CodecError(f"schema id {sid} is a {codec.kind_of(sid)}, not a trigger")
    return sid, rec


def latency_ms(rec: dict) -> float:
    """Alert produced -> trigger produced, in ms; meaningless when ``alertProducedUs`` <= 0
    (the alert's production time is unknown: the trigger was decided late)."""
    return (rec["triggerProducedUs"] - rec["alertProducedUs"]) / 1000.0


def format_trigger(rec: dict) -> str:
    """Two lines per trigger: the facts, then its summary. A v1 trigger (no coordinates,
    no estimate, no summary) gets "-" for what it lacks."""
    g = rec.get
    latency = f"{latency_ms(rec):.0f} ms" if rec["alertProducedUs"] > 0 else "- (decided late)"
    where = (f"RA {g('ra'):.5f} Dec {g('dec'):+.5f}" if g("ra") is not None and g("dec") is not None
             else "RA - Dec -")
    point = (f"{g('band') or '?'} {g('mag'):.2f}+-{g('magErr'):.2f}" if g("mag") is not None
             and g("magErr") is not None else "band -")
    stat = "P(binary)" if rec["rule"] == "tdcnn" else "statistic"
    bands = f" in {g('nBands')} band(s)" if g("nBands") is not None else ""
    if g("t0") is not None:
        fit = f"PSPL t0 {g('t0'):.2f} u0 {g('u0'):.3f} tE {g('tE'):.1f} d"
        if g("peakMag") is not None:
            fit += f" peak {g('peakMag'):.2f} at MJD {g('peakMjdTai'):.2f}"
        if g("psplChi2Dof") is not None:
            fit += f" chi2/dof {g('psplChi2Dof'):.2f}"
    else:
        fit = "PSPL -"
    line = (f"{rec['diaObjectId']}  {where}  MJD {rec['midpointMjdTai']:.5f}  {point}  "
            f"{stat} {rec['probability']:.3f}  points {rec['nPoints']}{bands}  {fit}  "
            f"latency {latency}  [{rec['rule']} {rec['modelVersion']}]")
    summary = g("summary")
    return line + (f"\n    {summary}" if summary else "")


def run(args) -> int:
    from confluent_kafka import Consumer, KafkaException

    import config
    from schemas import CodecError, default_codec

    settings = config.load(args.config)
    topic = args.topic or settings.kafka.topics.triggers
    codec = default_codec()
    consumer = Consumer({**settings.kafka.client_config(),
                         "group.id": args.group or f"ulens-subscribe-{uuid.uuid4().hex[:12]}",
                         "enable.auto.commit": False,
                         "auto.offset.reset": "earliest" if args.from_beginning else "latest"})
    assigned = []
    consumer.subscribe([topic], on_assign=lambda c, parts: assigned.append(parts))
    seen = 0
    idle_from = None
    try:
        while args.max is None or seen < args.max:
            msg = consumer.poll(0.5)
            now = time.monotonic()
            if msg is None:
                if args.until_idle is not None and assigned:
                    idle_from = idle_from or now
                    if now - idle_from >= args.until_idle:
                        break
                continue
            idle_from = None
            if msg.error():
                raise KafkaException(msg.error())
            try:
                sid, rec = decode_trigger(codec, msg.value())
            except CodecError as exc:
                print(f"undecodable message at {msg.topic()}[{msg.partition()}]@{msg.offset()}: {exc}",
                      file=sys.stderr)
                continue
            seen += 1
            if args.json:   # the whole record as decoded (v1 or v2), plus the latency
                rec = dict(rec, schemaId=sid, latencyMs=latency_ms(rec))
                print(json.dumps(rec), flush=True)
            else:
                print(format_trigger(rec), flush=True)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `ulens subscribe | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        consumer.close()
    return 0
