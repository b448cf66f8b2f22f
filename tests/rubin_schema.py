"""Rubin's lsst.v11_1 alert schema, its parts and sample packet for tests, from the schema
files ``schemas.rubin`` fetched (``tests.helpers.rubin_schemas``: skip outside CI when they
are not fetched, fail in CI)."""
from __future__ import annotations

import copy
import json

from schemas import rubin
from tests.helpers import rubin_schemas

VERSION = (11, 1)


def _dir():
    return rubin_schemas(VERSION) / "11" / "1"


def rubin_schema() -> dict:
    """The alert schema with its named types inlined (as a registry serves it)."""
    rubin_schemas(VERSION)
    return rubin.load_schema(*VERSION)


def rubin_part(name: str) -> dict:
    return json.loads((_dir() / f"lsst.v11_1.{name}.avsc").read_text())


def rubin_sample() -> dict:
    """Rubin's own 11.1 sample packet (diaSource.diaObjectId is null, diaObject set)."""
    return json.loads((_dir() / "sample_data" / "alert.json").read_text())


def rubin_packet(object_id, source_id: int, mjd: float, *, in_source: bool = False) -> dict:
    """A Rubin packet for one visit of ``object_id`` (None: no object at all)."""
    rec = copy.deepcopy(rubin_sample())
    rec["diaSourceId"] = source_id
    rec["diaSource"]["diaSourceId"] = source_id
    rec["diaSource"]["midpointMjdTai"] = mjd
    rec["diaSource"]["diaObjectId"] = object_id if in_source else None
    if object_id is None:
        rec["diaObject"] = None
    else:
        rec["diaObject"]["diaObjectId"] = object_id
    return rec
