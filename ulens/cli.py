"""`ulens SUBCOMMAND ...`: dispatch to the module that owns the subcommand.

Each command module exposes ``HELP`` (its description), ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen module is imported, so `ulens --help` and
light commands stay fast (torch is imported only by the commands that need it).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Exceptions raised by these packages about the user's input print without a traceback.
OWN_PACKAGES = {"ulens", "config", "schemas", "training", "replay", "broker"}

# name -> (module path, one-line help). Order is the order shown in `ulens --help`.
# The help is repeated here so that `ulens --help` imports no command module.
COMMANDS: dict[str, tuple[str, str]] = {
    "services": ("ulens.services", "start, stop and inspect the local Kafka and Redis"),
    "simulate": ("training.simulate", "simulate PSPL and binary-lens light curves into a dataset (.npz)"),
    "train": ("training.train", "train the TD-CNN on a simulated dataset"),
    "evaluate": ("training.evaluate", "evaluate a trained model on held-out events"),
    "experiments": ("training.experiments", "cadence / noise / topology series: simulate, train, evaluate"),
    "replay": ("replay.cli", "stream a dataset or archival light curves as Avro alerts into Kafka, in survey time order"),
    "consume": ("broker.cli_consume", "run the broker: alerts -> Redis light curves -> TD-CNN -> triggers"),
    "subscribe": ("broker.cli_subscribe", "print triggers as they arrive (the follow-up observer's view)"),
    "events": ("broker.cli_events", "inspect an event's stored points, probabilities and trigger state"),
    "report": ("broker.report", "score the trigger topic against a replay's ground truth: purity, decision time, latency"),
    "demo": ("ulens.demo", "the whole pipeline in minutes: services, simulate, replay + consume, report"),
    "bench": ("ulens.bench", "throughput and latency benchmarks, each against a baseline measured in the same run"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = []
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<12} {help_}")
    return argparse.ArgumentParser(
        prog="ulens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ulens-broker: real-time triggers for binary microlensing events.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `ulens COMMAND --help` for a command's options.",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ulens: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"ulens {name}", description=module.HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file merged over config/default.yaml (or env ULENS_CONFIG)")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        # Errors the parts raise about the user's input (bad config, dataset, frame,
        # port in use...) carry a message that names the problem: print it, no traceback.
        if type(exc).__module__.split(".")[0] in OWN_PACKAGES:
            print(f"ulens {name}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
