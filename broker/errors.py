"""Errors the broker raises about its input, settings or services (printed without a traceback)."""
from __future__ import annotations


class BrokerError(ValueError):
    """A broker problem the user can act on; the message names it."""


class DeliveryError(BrokerError):
    """Kafka did not confirm delivery of triggers or dead letters: the batch is not committed."""
