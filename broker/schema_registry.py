"""Schemas by id from a Confluent-compatible Schema Registry (Rubin's).

:func:`registry_resolver` gives the ``resolver`` of :class:`schemas.Codec`: asked once per
schema id the codec does not know, it answers the schema JSON (Avro), or None when the
registry does not know the id (the codec remembers that; the message is dead-lettered as
``unknown_schema_id``), and raises :class:`RegistryUnavailable` when the registry cannot
be asked (not remembered: ``broker.retry`` waits it out and the batch runs again).

The decode of a batch catches every error of one message (``validate.validate_batch``:
a poison pill must not stop the consumer), so an outage must surface before it:
:func:`resolve_ids` asks the codec about every schema id of a batch first, and raises.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable, Optional

from broker.errors import BrokerError, RegistryUnavailable
from schemas import HEADER, MAGIC, Codec

log = logging.getLogger("broker.schema_registry")

AUTH_ENV = "ULENS_SCHEMA_REGISTRY_PASSWORD"
# HTTP statuses of a registry that is away or overloaded (and retried by the client first)
_UNAVAILABLE_STATUS = frozenset((408, 429, 500, 502, 503, 504))


def client_conf(reg) -> dict:
    """``SchemaRegistryClient`` settings from ``kafka.schema_registry`` (``reg``); the
    basic-auth password from env ULENS_SCHEMA_REGISTRY_PASSWORD only."""
    conf = {"url": reg.url, "timeout": reg.timeout_s,
            # the client's own retries stay short: the broker's retry loop waits out outages
            "max.retries": 1, "retries.wait.ms": 200, "retries.max.wait.ms": 1000}
    if reg.basic_auth_user:
        password = os.environ.get(AUTH_ENV)
        if not password:
            raise BrokerError(f"env {AUTH_ENV} is not set but kafka.schema_registry."
                              f"basic_auth_user is {reg.basic_auth_user!r}")
        conf["basic.auth.user.info"] = f"{reg.basic_auth_user}:{password}"
    if reg.ssl_ca_location:
        conf["ssl.ca.location"] = reg.ssl_ca_location
    return conf


def registry_resolver(client) -> Callable[[int], Optional[dict]]:
    """The codec's resolver over ``client`` (a ``SchemaRegistryClient``): schema id ->
    Avro schema JSON, None when the registry does not know the id; RegistryUnavailable
    when it cannot be asked. Schema references (named types registered under their own
    subjects) are fetched and inlined."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    def ask(what: str, fn):
        try:
            return fn()
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return None
            if exc.http_status_code in _UNAVAILABLE_STATUS or exc.http_status_code < 0:
                raise RegistryUnavailable(f"schema registry: {what}: {exc}") from exc
            raise BrokerError(f"schema registry refused {what}: {exc}") from exc
        except (OSError, ConnectionError) as exc:
            raise RegistryUnavailable(f"schema registry: {what}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:      # the HTTP client's transport errors (httpx: connect, timeout)
            if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2"):
                raise RegistryUnavailable(f"schema registry: {what}: {type(exc).__name__}: {exc}") from exc
            raise

    def resolve(schema_id: int) -> Optional[dict]:
        schema = ask(f"schema id {schema_id}", lambda: client.get_schema(schema_id))
        if schema is None:
            log.warning("schema id %d is not known to the schema registry", schema_id)
            return None
        if (schema.schema_type or "AVRO") != "AVRO":
            log.warning("schema id %d is a %s schema, not Avro", schema_id, schema.schema_type)
            return None
        named: dict = {}
        _inline_references(client, schema, named, ask, seen=set())
        found = json.loads(schema.schema_str)
        log.info("schema id %d from the schema registry: %s", schema_id,
                 found.get("name") if isinstance(found, dict) else found)
        if named:
            import fastavro
            return fastavro.parse_schema(found, named_schemas=named)
        return found

    return resolve


def _inline_references(client, schema, named: dict, ask, seen: set) -> None:
    """Parse ``schema``'s references (depth first) into fastavro's ``named`` types."""
    import fastavro

    for ref in schema.references or []:
        key = (ref.subject, ref.version)
        if key in seen:
            continue
        seen.add(key)
        got = ask(f"reference {ref.subject} v{ref.version}",
                  lambda: client.get_version(ref.subject, ref.version))
        if got is None:
            raise BrokerError(f"schema registry: reference {ref.name} ({ref.subject} "
                              f"v{ref.version}) is not there")
        _inline_references(client, got.schema, named, ask, seen)
        fastavro.parse_schema(json.loads(got.schema.schema_str), named_schemas=named)


def codec_for(settings) -> Codec:
    """The broker's codec: our schemas, Rubin's alert schemas when they were fetched
    (``ulens rubin fetch-schemas``: ids 1101, 1000), and, when ``kafka.schema_registry.url``
    is set, the registry asked for any other id. Without either, a Rubin packet is an
    ``unknown_schema_id`` dead letter (said once here, at start-up)."""
    from schemas import rubin

    reg = settings.kafka.schema_registry
    resolver = None
    if reg.url is not None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        resolver = registry_resolver(SchemaRegistryClient(client_conf(reg)))
    codec = Codec(resolver=resolver)
    added = rubin.add_to(codec)
    if not added and resolver is None:
        log.warning("Rubin's alert schemas are not fetched (%s) and no kafka.schema_registry is "
                    "set: Rubin packets will be dead letters (unknown_schema_id); run `%s`",
                    rubin.schema_dir(), rubin.FETCH_COMMAND)
    return codec


def resolve_ids(codec: Codec, values: Iterable[Optional[bytes]]) -> None:
    """Ask ``codec`` about the schema id of every well-framed message in ``values``, so
    that a registry outage raises here (RegistryUnavailable) instead of rejecting the
    messages one by one; malformed frames are left to the decode that follows."""
    if not codec.resolves:
        return                    # nothing to ask: an unknown id is the decode's dead letter
    asked: set[int] = set()
    for v in values:
        if v is None or len(v) < HEADER.size:
            continue
        magic, sid = HEADER.unpack_from(v)
        if magic == MAGIC and sid not in asked:
            asked.add(sid)
            codec.known(sid)
