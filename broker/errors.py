"""Errors the broker raises about its input, settings or services (printed without a traceback)."""
from __future__ import annotations


class BrokerError(ValueError):
    """A broker problem the user can act on; the message names it."""
    exit_code = 3       # bad input or configuration (ulens/cli.py's table)


class DeliveryError(BrokerError):
    """Kafka did not confirm delivery of triggers or dead letters: the batch is not committed.

    ``transient``: every failure was one a retry can get past (the broker was away)."""
    exit_code = 4       # Kafka did not take the messages: services unavailable

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class RegistryUnavailable(BrokerError):
    """The schema registry could not be asked (unreachable, timing out, answering 5xx):
    waited out like a Kafka or Redis outage (``broker.retry``), never a dead letter."""
    exit_code = 4       # services unavailable
