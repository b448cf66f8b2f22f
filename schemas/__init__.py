"""Versioned Avro schemas and the wire codec (Confluent framing).

Frame: magic byte 0, 4-byte big-endian schema id, Avro binary body (schemaless).
Schema ids and the ``latest`` id of each kind live in ``registry.json`` only.
"""
from __future__ import annotations

import io
import json
import struct
from functools import lru_cache
from importlib import resources
from typing import Any

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


class Codec:
    """Encode and decode framed Avro messages for every schema in the registry."""

    def __init__(self) -> None:
        reg = registry()
        self.latest: dict[str, int] = {k: int(v) for k, v in reg["latest"].items()}
        self._parsed: dict[int, Any] = {}
        self._kind: dict[int, str] = {}
        for sid, path in reg["schemas"].items():
            self._parsed[int(sid)] = fastavro.parse_schema(load_schema_json(int(sid)))
            self._kind[int(sid)] = path.split("/", 1)[0]
        self._headers = {sid: HEADER.pack(MAGIC, sid) for sid in self._parsed}

    def schema_id(self, kind: str) -> int:
        try:
            return self.latest[kind]
        except KeyError:
            raise CodecError(f"no schema of kind {kind!r}; known: {sorted(self.latest)}") from None

    def kind_of(self, schema_id: int) -> str:
        return self._kind[schema_id]

    def encode(self, record: dict, kind: str = "alert", schema_id: int | None = None) -> bytes:
        sid = self.schema_id(kind) if schema_id is None else schema_id
        if sid not in self._parsed:
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
        schema = self._parsed.get(sid)
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

    def decode_kind(self, data: bytes, kind: str) -> dict:
        sid, record = self.decode(data)
        if self._kind[sid] != kind:
            raise WrongKind(f"schema id {sid} is a {self._kind[sid]}, expected a {kind}")
        return record


@lru_cache(maxsize=1)
def default_codec() -> Codec:
    return Codec()
