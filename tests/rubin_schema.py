"""Rubin's lsst.v11_1 alert schema and sample packet for tests.

TEMPORARY: read from the unpacked lsst-alert-packet wheel in /tmp/lap (its .avsc files
and sample data only; the package itself is GPLv3 and never imported). Switch this to
``schemas.rubin`` (the fetched, cached schema files) once that module lands.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

RUBIN_DIR = Path("/tmp/lap/whl/lsst/alert/packet/schema/11/1")
NAMED = ("diaSource", "diaForcedSource", "diaObject", "ssSource", "ssObject", "mpc_orbits")


def _need():
    if not (RUBIN_DIR / "lsst.v11_1.alert.avsc").exists():
        pytest.skip(f"Rubin's 11.1 schema files are not at {RUBIN_DIR} (switch to schemas.rubin)")


def rubin_schema() -> dict:
    """The alert schema with its named types inlined (as a registry serves it)."""
    import fastavro
    from fastavro.schema import expand_schema

    _need()
    named: dict = {}
    for n in NAMED:
        fastavro.parse_schema(json.loads((RUBIN_DIR / f"lsst.v11_1.{n}.avsc").read_text()),
                              named_schemas=named)
    parsed = fastavro.parse_schema(json.loads((RUBIN_DIR / "lsst.v11_1.alert.avsc").read_text()),
                                   named_schemas=named)
    return json.loads(json.dumps(expand_schema(parsed)))


def rubin_part(name: str) -> dict:
    _need()
    return json.loads((RUBIN_DIR / f"lsst.v11_1.{name}.avsc").read_text())


def rubin_sample() -> dict:
    """Rubin's own 11.1 sample packet (diaSource.diaObjectId is null, diaObject set)."""
    _need()
    return json.loads((RUBIN_DIR / "sample_data" / "alert.json").read_text())


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
