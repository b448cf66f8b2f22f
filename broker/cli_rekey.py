"""`ulens rekey`: the unkeyed source stream (Rubin's) re-produced keyed by diaObjectId."""
from __future__ import annotations

import argparse
import json
import logging

HELP = ("read an unkeyed alert stream (Rubin's: rekey.topic on rekey.source) and produce every "
        "packet's original bytes to kafka.topics.alerts keyed by its diaObjectId; undecodable "
        "packets and packets without an object id go to the dead-letter topic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", default=None, help="source topic (default: rekey.topic)")
    parser.add_argument("--group", default=None, help="consumer group on the source cluster "
                        "(default: rekey.group; prefixed with the user name when rekey.group_prefix_user)")
    parser.add_argument("--until-idle", type=float, metavar="SECONDS", default=None,
                        help="exit once nothing was read for this long")
    parser.add_argument("--limit", type=int, metavar="N", default=None,
                        help="exit after N source messages")
    parser.add_argument("--batch-size", type=int, metavar="N", default=None,
                        help="messages per poll batch (default: rekey.batch_size)")


def run(args) -> int:
    import config
    from broker.errors import BrokerError
    from broker.rekey import Rekeyer

    settings = config.load(args.config)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise BrokerError("--batch-size must be >= 1")
        settings = settings.replace(rekey={"batch_size": args.batch_size})
    if args.limit is not None and args.limit < 1:
        raise BrokerError("--limit must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rekeyer = Rekeyer(settings, topic=args.topic, group=args.group)
    rekeyer.install_signal_handlers()
    summary = rekeyer.run(until_idle=args.until_idle, max_messages=args.limit)
    print(json.dumps(summary.as_dict()))
    return 0
