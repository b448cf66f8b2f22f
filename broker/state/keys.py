"""Every Redis key the broker writes, in one place (``P`` = ``redis.key_prefix``).

``P:ev:<diaObjectId>``           the event's light curve and scores (``layout``), TTL
                                 ``redis.event_ttl_s``, refreshed when a point is appended
``P:tr:<diaObjectId>``           the TD-CNN rule's outbox: status byte (``P`` pending, ``S``
                                 sent) + the trigger as JSON; outlives the event
``P:pf:<params hash>:<id>``      the PSPL-fit rule's fit state for one parameter set
``P:tp:<diaObjectId>``           the PSPL-fit rule's outbox (as ``P:tr``)
"""
from __future__ import annotations


def event_key(prefix: str, object_id: int) -> str:
    return f"{prefix}:ev:{int(object_id)}"


def trigger_key(prefix: str, object_id: int) -> str:
    return f"{prefix}:tr:{int(object_id)}"


def event_pattern(prefix: str) -> str:
    """SCAN pattern of every event key."""
    return f"{prefix}:ev:*"


def psplfit_state_key(prefix: str, params_hash: str, object_id: int) -> str:
    return f"{prefix}:pf:{params_hash}:{int(object_id)}"


def psplfit_trigger_key(prefix: str, object_id: int) -> str:
    return f"{prefix}:tp:{int(object_id)}"
