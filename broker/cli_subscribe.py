"""`ulens subscribe`: the follow-up observer's view of the trigger topic."""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

HELP = "print triggers as they arrive: event, MJD, probability, points seen, latency"


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


def format_trigger(rec: dict) -> str:
    latency_ms = (rec["triggerProducedUs"] - rec["alertProducedUs"]) / 1000.0
    return (f"{rec['diaObjectId']}  MJD {rec['midpointMjdTai']:.5f}  P(binary) {rec['probability']:.3f}"
            f"  points {rec['nPoints']}  latency {latency_ms:.0f} ms  [{rec['rule']} {rec['modelVersion']}]")


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
                rec = codec.decode_kind(msg.value(), "trigger")
            except CodecError as exc:
                print(f"undecodable message at {msg.topic()}[{msg.partition()}]@{msg.offset()}: {exc}",
                      file=sys.stderr)
                continue
            seen += 1
            if args.json:
                rec = dict(rec, latencyMs=(rec["triggerProducedUs"] - rec["alertProducedUs"]) / 1000.0)
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
