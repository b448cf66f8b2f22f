"""Many Avro bodies of one writer schema decoded in one call, column by column.

Why: fastavro decodes a record into a Python dict, field by field. A Rubin alert packet
with a season of history holds thousands of fields (a 102-field ``diaSource``, 18
``prvDiaSources`` of 102 fields and 66 ``prvDiaForcedSources`` in the median packet of
the ``lsst`` profile), and the broker reads about ten of them per point: fastavro took
3.3 ms a packet here, 300 packets/s for one core (docs/BENCHMARKS.md, "Rubin packets:
the decode path"). Polars (MIT) has an Avro reader written in Rust that decodes an Avro
object container file straight into Arrow columns; a poll batch of bodies under one
writer schema is one such file with one data block (the Avro specification, "Object
Container Files": header, then blocks of ``count``, ``size``, the records back to back,
the sync marker). That is about 95 µs a packet, and the columns are what the broker's
vectorised checks want.

What is kept of the codec's own checks (``schemas.Codec.decode``), so that no message is
read differently from how fastavro reads it alone:

* **Boundaries.** One block gives no per-record lengths, so a body with trailing bytes,
  or one cut short, would shift every record after it. Each record's first field is a
  long (Rubin's ``diaSourceId``); it is read from the start of each body here and compared
  with what the block decoded for that record, and a sentinel record of the same schema
  closes the block: a shifted record, or trailing bytes on the last body, breaks one of
  those comparisons (an error by the decoder is the same outcome).
* **Anything else.** Whenever the block cannot be read or a comparison fails, :meth:`read`
  returns None and the caller decodes that batch message by message with fastavro,
  which gives each bad message its own dead-letter reason.

Polars' reader does not follow references to named types (Rubin's ``prvDiaSources`` is an
array of ``lsst.v11_1.diaSource``, defined once for ``diaSource``): :func:`inline_references`
writes each reference out as a renamed copy of its definition, which changes no byte of
the encoding (names are not encoded). A schema whose first field is not a long, or that
the reader refuses (a union of two non-null branches, say), is never read here
(:func:`block_reader` returns None).
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

import fastavro

SYNC = b"ulens.avro.block"           # 16 bytes: the container's sync marker, ours to choose
assert len(SYNC) == 16
SENTINEL_ID = -0x5EED_0000_0001      # the sentinel record's first field: no real id is negative


def zigzag(n: int) -> bytes:
    """An Avro long: zig-zag, then base-128 varint, low group first."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_long(buf: bytes, pos: int = 0) -> tuple[int, int]:
    """(value, position after it) of the Avro long at ``pos``; ValueError if it runs off
    the end or is longer than ten bytes."""
    shift = result = 0
    for i in range(pos, min(pos + 10, len(buf))):
        b = buf[i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), i + 1
        shift += 7
    raise ValueError("Avro long runs off the end of the buffer")


def _bytes(b: bytes) -> bytes:
    return zigzag(len(b)) + b


def _copy(schema):
    """A deep copy of a JSON schema (a JSON round trip: ten times copy.deepcopy's speed)."""
    return json.loads(json.dumps(schema))


def inline_references(schema: dict) -> dict:
    """A copy of ``schema`` in which every reference to a named type (a record, enum or
    fixed defined earlier) is replaced by a copy of its definition under a new name."""
    named: dict[str, dict] = {}
    count = [0]

    def full_name(name: str, ns: str) -> str:
        return name if "." in name or not ns else f"{ns}.{name}"

    def walk(t, ns: str):
        if isinstance(t, list):
            return [walk(b, ns) for b in t]
        if isinstance(t, str):
            ref = named.get(full_name(t, ns))
            if ref is None:
                return t        # a primitive type
            count[0] += 1
            out = _copy(ref)
            out["name"] = f"{ref['name'].rsplit('.', 1)[-1]}_copy{count[0]}"
            return out
        if not isinstance(t, dict):
            return t
        kind = t.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            inner = t.get("namespace", t["name"].rsplit(".", 1)[0] if "." in t["name"] else ns)
            out = dict(t)
            if kind in ("record", "error"):
                out["fields"] = [dict(f, type=walk(f["type"], inner)) for f in t["fields"]]
            named[full_name(t["name"], inner if "." not in t["name"] else "")] = out
            return out
        if kind == "array":
            return dict(t, items=walk(t["items"], ns))
        if kind == "map":
            return dict(t, values=walk(t["values"], ns))
        return t

    return walk(_copy(schema), schema.get("namespace", ""))


def zero_record(schema):
    """The least valid value of ``schema`` (fastavro-parsed or JSON): zero numbers, empty
    strings, bytes and arrays, the first branch of a union, every field of a record."""
    if isinstance(schema, list):
        return zero_record(schema[0])
    if isinstance(schema, str):
        return {"null": None, "boolean": False, "int": 0, "long": 0, "float": 0.0,
                "double": 0.0, "bytes": b"", "string": ""}[schema]
    kind = schema["type"]
    if kind in ("record", "error"):
        return {f["name"]: zero_record(f["type"]) for f in schema["fields"]}
    if kind == "array":
        return []
    if kind == "map":
        return {}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "fixed":
        return b"\0" * schema["size"]
    return zero_record(kind)       # {"type": "long", "logicalType": ...}


class BlockReader:
    """Decode bodies of one writer schema (JSON, references inlined or not) with polars.

    ``columns``: the top-level fields to return (all when None)."""

    def __init__(self, schema: dict, columns: Optional[list[str]] = None):
        import polars  # noqa: F401  (import error here, not at the first batch)

        first = schema["fields"][0]
        if first["type"] not in ("long", "int"):
            raise ValueError(f"first field {first['name']!r} is {first['type']!r}, not a long")
        self.first_field = first["name"]
        self.columns = list(columns) if columns is not None else None
        inlined = inline_references(schema)
        self._header = (b"Obj\x01" + zigzag(2) + _bytes(b"avro.schema") + _bytes(json.dumps(inlined).encode())
                        + _bytes(b"avro.codec") + _bytes(b"null") + b"\x00" + SYNC)
        parsed = fastavro.parse_schema(_copy(schema))
        sentinel = zero_record(parsed)
        sentinel[self.first_field] = SENTINEL_ID
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, sentinel)
        self._sentinel = buf.getvalue()

    def container(self, bodies: list) -> bytes:
        """The object container file of ``bodies`` (then the sentinel) in one block."""
        data = b"".join(bodies) + self._sentinel
        return b"".join((self._header, zigzag(len(bodies) + 1), zigzag(len(data)), data, SYNC))

    def _read_one(self, bodies: list):
        """The DataFrame of one block of ``bodies``, or None (see :meth:`read`)."""
        import polars as pl

        try:
            ids = [read_long(b)[0] for b in bodies]
            cols = None if self.columns is None else [self.first_field, *self.columns]
            df = pl.read_avro(io.BytesIO(self.container(bodies)), columns=cols)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:   # ComputeError, or a Rust panic (a BaseException): the caller falls back
            return None
        if df.height != len(bodies) + 1:
            return None
        got = df.get_column(self.first_field)
        if got[-1] != SENTINEL_ID or got.head(len(bodies)).to_list() != ids:
            return None
        return df.head(len(bodies))

    def read(self, bodies: list):
        """A polars DataFrame of the records of ``bodies`` (one row each, in order), or
        None when a block does not decode or its records are not where the bodies are.

        A large batch is cut into up to :data:`THREADS` blocks read at once: polars
        releases the GIL while it decodes (1,000 + 1,000 packets on two threads: 73 against
        115 µs a packet on one, 2-core AMD EPYC)."""
        import polars as pl

        if not bodies:
            return None
        parts = max(1, min(THREADS, len(bodies) // MIN_PART))
        if parts == 1:
            return self._read_one(bodies)
        size = -(-len(bodies) // parts)
        dfs = list(_pool().map(self._read_one, [bodies[i:i + size] for i in range(0, len(bodies), size)]))
        if any(df is None for df in dfs):
            return None
        return pl.concat(dfs, rechunk=False)


THREADS = max(1, min(4, os.cpu_count() or 1))   # blocks decoded at once (polars frees the GIL)
MIN_PART = 256                                   # packets a block at least, when cut
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="avro-block")
    return _POOL


def block_reader(schema: dict, columns: Optional[list[str]] = None) -> Optional[BlockReader]:
    """A :class:`BlockReader` for ``schema``, or None when this schema is not read in blocks
    (its first field is not a long, polars is missing, or polars cannot read the schema's
    zero record)."""
    try:
        reader = BlockReader(schema, columns)
    except Exception:
        return None
    try:
        import polars as pl

        df = pl.read_avro(io.BytesIO(reader.container([])), columns=None if columns is None else
                          [reader.first_field, *columns])
        if df.height != 1:
            return None
    except Exception:
        return None
    return reader
