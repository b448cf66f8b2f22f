"""`ulens SUBCOMMAND ...`: dispatch to the module that owns the subcommand.

Each command module exposes ``HELP`` (its description), ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen module is imported, so `ulens --help` and
light commands stay fast (torch is imported only by the commands that need it).
Every command takes ``--config FILE`` (after any action too) and exits with a status of
the one table ``EXIT_CODES`` (README, "Exit status").
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap

# Exceptions raised by these packages print without a traceback (see exit_code_for).
OWN_PACKAGES = {"ulens", "config", "schemas", "training", "replay", "broker", "followup"}

# name -> (module path, one-line help). Order is the order shown in `ulens --help`.
# The help is repeated here so that `ulens --help` imports no command module.
COMMANDS: dict[str, tuple[str, str]] = {
    "services": ("ulens.services", "start, stop and inspect the local Kafka and Redis"),
    "simulate": ("training.simulate", "simulate PSPL and binary-lens light curves into a dataset (.npz)"),
    "augment": ("training.augment", "join datasets and spoil a share of them as real photometry is (errors, outliers), for training"),
    "train": ("training.train", "train the TD-CNN on a simulated dataset"),
    "evaluate": ("training.evaluate", "evaluate a trained model on held-out events"),
    "experiments": ("training.experiments", "cadence / noise / topology series: simulate, train, evaluate"),
    "rubin": ("ulens.rubin", "fetch Rubin's alert schemas and sample packets (lsst-alert-packet's data files)"),
    "replay": ("replay.cli", "stream a dataset or archival light curves as Avro alerts into Kafka, in survey time order"),
    "rekey": ("broker.cli_rekey", "re-produce an unkeyed alert stream (Rubin's) keyed by diaObjectId, bytes unchanged"),
    "consume": ("broker.cli_consume", "run the broker: alerts -> Redis light curves -> TD-CNN -> triggers"),
    "subscribe": ("broker.cli_subscribe", "print triggers as they arrive (the follow-up observer's view)"),
    "events": ("followup.cli_events", "inspect an event's stored points, probabilities and trigger state; plot it"),
    "dashboard": ("followup.dashboard", "local web page: triggers as they arrive, each event's light curve from Redis"),
    "report": ("broker.report", "score the trigger topic against a replay's ground truth: purity, decision time, latency"),
    "demo": ("ulens.demo", "the whole pipeline in minutes: services, simulate, replay + consume, report"),
    "bench": ("ulens.bench", "throughput and latency benchmarks, each against a baseline measured in the same run"),
}


# The `ulens` command's exit status, for every subcommand. An exception of the project
# says which code it means with an ``exit_code`` attribute (config.ConfigError 3,
# ulens.services.ServiceError 4, ...); see exit_code_for.
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error: a bug, the traceback is printed",
    EXIT_USAGE: "usage error: unknown command, bad or missing option",
    EXIT_BAD_INPUT: "bad input or configuration: the message names the file, field or value",
    EXIT_UNAVAILABLE: "services unavailable: Kafka or Redis could not be reached or started, "
                      "or the consumer gave up after consumer.retry_for_s of retries",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def _exit_codes_text() -> str:
    return "exit status:\n" + "\n".join(
        textwrap.fill(what, 88, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
        for code, what in EXIT_CODES.items())


def _top_parser() -> argparse.ArgumentParser:
    lines = []
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<12} {help_}")
    return argparse.ArgumentParser(
        prog="ulens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ulens-broker: real-time triggers for binary microlensing events.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `ulens COMMAND --help` for a command's "
               "options; every command takes\n--config FILE, also after its action.\n\n" + _exit_codes_text(),
    )


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default once: "(default: X)" is added only when the help does not
    already say what the default is and there is one worth saying (not None, not a flag's
    False, not a suppressed value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        d = action.default
        if (re.search(r"\bdefault", help_, re.I) or d is None or d is argparse.SUPPRESS
                or (d is False and action.nargs == 0)
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return help_
        return help_ + " (default: %(default)s)"


CONFIG_HELP = "YAML file merged over config/default.yaml (or env ULENS_CONFIG)"


def _nested_parsers(parser: argparse.ArgumentParser):
    """The parsers of ``parser``'s sub-actions (``ulens events show``...), recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _nested_parsers(sub)


def build_parser(name: str, module) -> argparse.ArgumentParser:
    """The parser of `ulens NAME`: the module's arguments plus --config, which is also
    accepted after each nested action (`ulens events show 1 --config F`)."""
    parser = argparse.ArgumentParser(prog=f"ulens {name}", description=module.HELP,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None, help=CONFIG_HELP)
    module.add_arguments(parser)
    for sub in _nested_parsers(parser):
        sub.formatter_class = HelpFormatter
        # SUPPRESS: a nested parser that was not given --config must not reset the value
        # given before the action (argparse copies a subparser's defaults over the parent's)
        sub.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    return parser


def exit_code_for(exc: BaseException) -> int | None:
    """The exit status an exception a command raised stands for; None: unexpected (a bug).

    The project's exceptions: their ``exit_code``, else a ValueError or OSError is about
    the user's input (3). A Kafka or Redis client error that means the service is away
    (``broker.retry.transient_cause``): 4; Redis refusing the login: 3."""
    package = type(exc).__module__.split(".")[0]
    if package in OWN_PACKAGES:
        code = getattr(exc, "exit_code", None)
        if isinstance(code, int):
            return code
        return EXIT_BAD_INPUT if isinstance(exc, (ValueError, OSError)) else None
    # a client error of a library that is not imported cannot have been raised
    redis, kafka = sys.modules.get("redis"), sys.modules.get("confluent_kafka")
    if redis is not None and isinstance(exc, (redis.AuthenticationError, redis.exceptions.NoPermissionError)):
        return EXIT_BAD_INPUT
    if (redis is not None and isinstance(exc, redis.RedisError)) or \
            (kafka is not None and isinstance(exc, kafka.KafkaException)):
        from broker.retry import transient_cause
        return EXIT_UNAVAILABLE if transient_cause(exc) is not None else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ulens: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[name][0])
    args = build_parser(name, module).parse_args(rest)     # a usage error exits 2 (argparse)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None:
            raise        # a bug: Python prints the traceback and exits 1 (EXIT_UNEXPECTED)
        from config import mask_url

        # the message names the problem (a bad config key, a dataset, a port in use, the
        # service that is away): no traceback; credentials in addresses are masked
        what = "" if type(exc).__module__.split(".")[0] in OWN_PACKAGES else f"{type(exc).__name__}: "
        print(f"ulens {name}: error: {mask_url(what + str(exc))}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
