"""Versioned Avro schemas and the wire codec (Confluent framing).

Frame: magic byte 0, 4-byte big-endian schema id, Avro binary body (schemaless).
Schema ids and the ``latest`` id of each kind of our own schemas live in ``registry.json``
only. Other schemas (Rubin's ``lsst.vN_M`` alert packets) join a codec at run time:
:meth:`Codec.add_schema` for schemas read from disk, and a ``resolver`` (id -> schema
JSON, e.g. a Confluent-compatible Schema Registry) asked once per unknown id; a schema id
is immutable, so what it answers is kept for the codec's life.
"""
from __future__ import annotations

import io
import json
import struct
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Optional

import fastavro

MAGIC = 0
HEADER = struct.Struct(">bI")


class CodecError(ValueError):
    """A message cannot be encoded or decoded; subclasses say why."""


class BadMagicByte(CodecError):
    pass


class UnknownSchemaId(CodecError):
    pass


class TruncatedFrame(CodecError):
    pass


class BadBody(CodecError):
    """The frame is well formed but its Avro body does not decode under its schema."""


class WrongKind(CodecError):
    """A valid message of another kind than expected (a trigger on the alerts topic...)."""


def _files():
    return resources.files(__name__)


def registry() -> dict:
    return json.loads(_files().joinpath("registry.json").read_text())


def load_schema_json(schema_id: int) -> dict:
    path = registry()["schemas"].get(str(schema_id))
    if path is None:
        raise UnknownSchemaId(f"unknown schema id {schema_id}")
    return json.loads(_files().joinpath(path).read_text())


def samples(schema_id: int) -> list[dict]:
    """The sample records shipped for a schema id."""
    folder = _files().joinpath("samples", str(schema_id))
    return [json.loads(p.read_text()) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".json")]


def kind_of_schema(schema: dict) -> str:
    """The kind of a schema by its full name: ``lsst.vN_M.alert`` (Rubin's packet) is
    ``rubin``; ``ulens.<kind>.vN_M.<kind>`` is ``<kind>``."""
    name = schema.get("name", "") if isinstance(schema, dict) else ""
    ns = schema.get("namespace", "") if isinstance(schema, dict) else ""
    full = name if "." in name else f"{ns}.{name}"
    parts = full.split(".")
    if parts[0] == "lsst" and parts[-1] == "alert":
        return "rubin"
    if parts[0] == "ulens" and len(parts) >= 2:
        return parts[1]
    raise CodecError(f"schema {full!r} is neither a Rubin alert packet (lsst.vN_M.alert) nor one "
                     f"of ours (ulens.<kind>.vN_M.<kind>)")


class Codec:
    """Encode and decode framed Avro messages for every schema in the registry, those added
    with :meth:`add_schema`, and those the ``resolver`` finds for an unknown id."""

    def __init__(self, resolver: Optional[Callable[[int], Optional[dict]]] = None) -> None:
        self._resolver = resolver
        self._unresolvable: set[int] = set()
        reg = registry()
        self.latest: dict[str, int] = {k: int(v) for k, v in reg["latest"].items()}
        self._parsed: dict[int, Any] = {}
        self._json: dict[int, dict] = {}     # the schema JSON as given (block readers need it)
        self._blocks: dict[tuple, Any] = {}  # (schema id, columns) -> BlockReader or None, made once
        self._kind: dict[int, str] = {}
        for sid, path in reg["schemas"].items():
            self._json[int(sid)] = load_schema_json(int(sid))
            self._parsed[int(sid)] = fastavro.parse_schema(self._json[int(sid)])
            self._kind[int(sid)] = path.split("/", 1)[0]
        self._headers = {sid: HEADER.pack(MAGIC, sid) for sid in self._parsed}

    def add_schema(self, schema_id: int, schema, kind: Optional[str] = None) -> None:
        """Make ``schema_id`` known: ``schema`` is the schema JSON (dict) or already parsed
        by fastavro; ``kind`` defaults to :func:`kind_of_schema`. An id already known with
        another schema is an error (ids are immutable)."""
        sid = int(schema_id)
        parsed = schema if isinstance(schema, dict) and "__fastavro_parsed" in schema \
            else fastavro.parse_schema(schema)
        if sid in self._parsed and self._parsed[sid] != parsed:
            raise CodecError(f"schema id {sid} is already known with another schema")
        self._parsed[sid] = parsed
        if isinstance(schema, dict) and "__fastavro_parsed" not in schema:
            self._json[sid] = schema
        self._kind[sid] = kind or kind_of_schema(parsed)
        self._headers[sid] = HEADER.pack(MAGIC, sid)

    @property
    def resolves(self) -> bool:
        """Whether unknown ids are asked of a resolver (a registry)."""
        return self._resolver is not None

    def known(self, schema_id: int) -> bool:
        """Whether ``schema_id`` decodes here (asks the resolver once for an unknown id)."""
        return self._schema(schema_id) is not None

    def _schema(self, sid: int):
        schema = self._parsed.get(sid)
        if schema is None and self._resolver is not None and sid not in self._unresolvable:
            found = self._resolver(sid)   # may raise (registry unreachable): not cached then
            if found is None:
                self._unresolvable.add(sid)
            else:
                self.add_schema(sid, found)
                schema = self._parsed[sid]
        return schema

    def schema_id(self, kind: str) -> int:
        try:
            return self.latest[kind]
        except KeyError:
            raise CodecError(f"no schema of kind {kind!r}; known: {sorted(self.latest)}") from None

    def kind_of(self, schema_id: int) -> str:
        return self._kind[schema_id]

    def ids_of(self, kind: str) -> list[int]:
        """The known schema ids of ``kind`` (``rubin``: Rubin's packets), ascending."""
        return sorted(sid for sid, k in self._kind.items() if k == kind)

    def block_reader(self, schema_id: int, columns: Optional[list] = None):
        """A :class:`schemas.avro_block.BlockReader` of the known schema ``schema_id`` that
        returns ``columns``, made once; None when that schema is not read in blocks (or was
        added already parsed, without its JSON)."""
        key = (schema_id, None if columns is None else tuple(columns))
        if key not in self._blocks:
            from schemas.avro_block import block_reader

            js = self._json.get(schema_id)
            self._blocks[key] = None if js is None else block_reader(js, columns)
        return self._blocks[key]

    def encode(self, record: dict, kind: str = "alert", schema_id: int | None = None) -> bytes:
        sid = self.schema_id(kind) if schema_id is None else schema_id
        if self._schema(sid) is None:
            raise UnknownSchemaId(f"unknown schema id {sid}")
        buf = io.BytesIO()
        buf.write(self._headers[sid])
        try:
            fastavro.schemaless_writer(buf, self._parsed[sid], record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CodecError(f"record does not match schema id {sid} ({self._kind[sid]}): "
                             f"{type(exc).__name__}: {exc}") from None
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[int, dict]:
        """Return (schema id, record); raise a specific CodecError for a bad frame."""
        if data is None or len(data) < HEADER.size:
            raise TruncatedFrame(f"frame of {0 if data is None else len(data)} bytes is shorter "
                                 f"than the {HEADER.size}-byte header")
        magic, sid = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BadMagicByte(f"magic byte is {magic & 0xFF}, expected {MAGIC}")
        schema = self._schema(sid)
        if schema is None:
            raise UnknownSchemaId(f"unknown schema id {sid}")
        buf = io.BytesIO(data)
        buf.seek(HEADER.size)
        try:
            record = fastavro.schemaless_reader(buf, schema, None)
        except (EOFError, struct.error) as exc:
            raise TruncatedFrame(f"Avro body truncated for schema id {sid}: {exc or 'end of data'}") from None
        except Exception as exc:  # fastavro raises assorted errors on garbage bodies
            raise BadBody(f"Avro body does not decode under schema id {sid}: "
                          f"{type(exc).__name__}: {exc}") from None
        if buf.tell() != len(data):
            raise BadBody(f"{len(data) - buf.tell()} trailing bytes after the Avro body "
                          f"(schema id {sid})")
        return sid, record

    def decode_kind(self, data: bytes, kind) -> dict:
        """The record of a message of ``kind`` (a name, or a tuple of accepted names)."""
        return self.decode_kinds(data, kind)[1]

    def decode_kinds(self, data: bytes, kinds) -> tuple[str, dict]:
        """(kind, record) of a message whose kind is ``kinds`` (a name or a tuple of names)."""
        accepted = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        sid, record = self.decode(data)
        if self._kind[sid] not in accepted:
            raise WrongKind(f"schema id {sid} is a {self._kind[sid]}, expected "
                            f"{' or '.join(accepted)}")
        return self._kind[sid], record


@lru_cache(maxsize=1)
def default_codec() -> Codec:
    return Codec()
