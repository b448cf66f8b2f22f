"""`ulens consume`: run one broker consumer-group member."""
from __future__ import annotations

import argparse
import json
import logging

HELP = ("consume alerts: idempotent light curves in Redis, the TD-CNN (or the classical PSPL-fit "
        "anomaly detector, or both) on every new point, triggers and dead letters to Kafka")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model artifact folder (default: model.path)")
    parser.add_argument("--group", default=None, help="consumer group id (default: consumer.group)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where the model runs (default: consumer.device)")
    parser.add_argument("--topic", default=None, help="alert topic (default: kafka.topics.alerts)")
    parser.add_argument("--until-idle", type=float, metavar="SECONDS", default=None,
                        help="exit once nothing was read for this long and the assigned "
                             "partitions are caught up (no lag); with lag left or unknown "
                             "(Kafka restarting) it waits up to 60 s more")
    parser.add_argument("--max-alerts", type=int, metavar="N", default=None,
                        help="exit after N alerts")
    parser.add_argument("--metrics-port", type=int, metavar="PORT", default=None,
                        help="serve Prometheus metrics here (default: consumer.metrics_port)")
    parser.add_argument("--batch-size", type=int, metavar="N", default=None,
                        help="messages per poll batch (default: consumer.batch_size)")
    parser.add_argument("--rule", choices=("tdcnn", "pspl-fit", "both"), default=None,
                        help="decision rule: the TD-CNN, the classical PSPL-fit anomaly detector, "
                             "or both (one trigger per event and rule) (default: consumer.rule)")


def run(args) -> int:
    import config
    from broker.consumer import Broker, load_model
    from broker.errors import BrokerError

    settings = config.load(args.config)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise BrokerError("--batch-size must be >= 1")
        settings = settings.replace(consumer={"batch_size": args.batch_size})
    if args.rule is not None:
        settings = settings.replace(consumer={"rule": args.rule})
    if args.max_alerts is not None and args.max_alerts < 1:
        raise BrokerError("--max-alerts must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    artifact = load_model(settings, args.model, args.device)
    log = logging.getLogger("broker")
    if "tdcnn" in settings.consumer.rules:
        log.info("model %s on %s (receptive field %d, threshold %.4f)", artifact.version,
                 artifact.device, artifact.receptive_field,
                 settings.consumer.threshold if settings.consumer.threshold is not None
                 else artifact.threshold)
    if "pspl-fit" in settings.consumer.rules:
        from broker.rule_psplfit import params_from_settings
        p = params_from_settings(settings)
        log.info("rule pspl-fit %s (threshold %.1f, windows %s)", p.version, p.threshold, p.windows)
    port = args.metrics_port if args.metrics_port is not None else settings.consumer.metrics_port
    broker = Broker(settings, artifact, topic=args.topic, group=args.group, metrics_port=port)
    broker.install_signal_handlers()
    summary = broker.run(until_idle=args.until_idle, max_alerts=args.max_alerts)
    print(json.dumps(summary.as_dict()))
    return 0
