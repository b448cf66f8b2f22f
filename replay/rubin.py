"""Rubin's own alert packets (``lsst.vN_M.alert``) from a replay plan (pure: no I/O, no Kafka).

One packet per selected point of :class:`replay.stream.Plan` (``--format rubin`` selects the
survey's 5-sigma detections, the visits that are DIASources), in the plan's send order, so
both formats share the replay's ordering, pacing and producing; only this builder and the
schema id differ. What a packet holds (Rubin's names and units, :mod:`schemas.rubin`):

* ``diaSource``: the detection. ``diaSourceId`` as the compact alert's (``diaObjectId *
  100_000 + point index``); ``psfFlux``/``psfFluxErr`` the difference flux, ``scienceFlux``/
  ``scienceFluxErr`` the visit image's, ``templateFlux`` = scienceFlux - psfFlux and
  ``templateFluxErr`` = sqrt(psfFluxErr^2 - scienceFluxErr^2) (the template's own noise; 0
  for a noiseless template), nJy; ``snr`` = |psfFlux| / psfFluxErr, ``isNegative``;
  ``midpointMjdTai``, ``band``, ``ra``/``dec`` (:func:`replay.stream.sky_positions`);
  ``visit`` = round(midpointMjdTai * 86400) (seconds: events observed at the same survey
  epoch share it); a deterministic ``detector`` (0..188, LSSTCam's science detectors) and
  ``x``/``y`` per object; ``timeProcessedMjdTai`` = midpoint + 60 s; ``psfNdata`` =
  ``bboxSize``^2 = 225 pixels, ``trailNdata`` = ``dipoleNdata`` = 0 (no trail or dipole
  fit: a point source); ``exposureTime`` 30 s where the schema has it (11.1). Every other
  field is null.
* ``prvDiaSources``: the object's previous detections within the last ``WINDOW_DAYS`` (365)
  days, oldest first ([] for the first one).
* ``prvDiaForcedSources``: forced photometry of every previous visit of the object within
  365 days, detected or not (psfFlux = that visit's difference flux); ``diaForcedSourceId``
  = the visit's point id (for a detected visit, the same number as its diaSourceId).
* ``diaObject``: id, ra, dec, ``validityStartMjdTai`` (this detection's processing time),
  ``nDiaSources`` and ``<band>_psfFluxNdata``: the object's detections so far (all time,
  this one included) in all and per band, first and last detection times; the rest null.
* ``ssSource``, ``mpc_orbits``, cutouts, ``observation_reason``, ``target_name``: null.

Rubin's packets have no production time: the replay sends it in the Kafka message header
``ulens.alertProducedUs`` (both formats).

Serialise once: each diaSource (also sent in the history of later packets), forced source
and the envelope are written by :class:`FlatRecord` (Avro binary of a record of primitive
and nullable-primitive fields, compiled from the schema); a packet is their concatenation.
The tests hold the bytes against fastavro's writer and a plain fastavro reader.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Iterator, Optional

import numpy as np

from replay.stream import Plan, ReplayError, _splitmix64, point_photometry, sky_positions, source_ids

WINDOW_DAYS = 365.0              # LSE-163: a packet carries the previous 12 months
PROCESSING_S = 60.0              # simulated time from mid-exposure to the processed DIASource
EXPOSURE_S = 30.0
BBOX_PIXELS = 15
N_DETECTORS = 189                # LSSTCam science detectors
DETECTOR_PIXELS = (4072, 4000)   # x, y extent of an LSSTCam CCD
RUBIN_BANDS = ("u", "g", "r", "i", "z", "y")


# ---------------------------------------------------------------------------- Avro, serialise once

def zigzag(n: int) -> bytes:
    """Avro ``long``/``int``: zigzag then base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_DOUBLE, _FLOAT = struct.Struct("<d").pack, struct.Struct("<f").pack


def _string(v: str) -> bytes:
    b = v.encode("utf-8")
    return zigzag(len(b)) + b


_PRIMITIVE: dict[str, Callable] = {
    "long": zigzag, "int": zigzag, "double": _DOUBLE, "float": _FLOAT, "string": _string,
    "boolean": lambda v: b"\x01" if v else b"\x00"}


class FlatRecord:
    """Avro binary writer of one record whose fields are primitives or ``["null", T]``,
    for a fixed tuple of field names given values (in that order); every other field of the
    schema must be nullable and is written null. Raises ReplayError at construction when
    the schema requires a field that ``names`` lacks or has a type this writer cannot write.
    """

    def __init__(self, schema: dict, names: tuple[str, ...]):
        self.name, self.names = schema.get("name"), names
        fields = {f["name"]: f["type"] for f in schema["fields"]}
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise ReplayError(f"{self.name} has no field {unknown[0]!r}")
        pos = {n: i for i, n in enumerate(names)}
        # head, then per given field: (value index, writer, null bytes or None when required,
        # branch bytes, the constant null bytes of the absent fields that follow it)
        steps: list[list] = []
        const = bytearray()
        self.head = b""
        for fname, ftype in fields.items():
            null_index, prim = _nullable(ftype)
            if fname not in pos:
                if null_index is None:
                    raise ReplayError(f"{self.name}.{fname} is required ({ftype}) and the replay has "
                                      f"no value for it")
                const += zigzag(null_index)
                continue
            if prim not in _PRIMITIVE:
                raise ReplayError(f"{self.name}.{fname}: type {ftype} is not a primitive or "
                                  f"nullable primitive")
            if steps:
                steps[-1][4] = bytes(const)
            else:
                self.head = bytes(const)
            const = bytearray()
            if null_index is None:
                steps.append([pos[fname], _PRIMITIVE[prim], None, b"", b""])
            else:
                steps.append([pos[fname], _PRIMITIVE[prim], zigzag(null_index), zigzag(1 - null_index), b""])
        if steps:
            steps[-1][4] = bytes(const)
        else:
            self.head = bytes(const)
        self.steps = [tuple(st) for st in steps]

    def encode(self, values) -> bytes:
        """The Avro body of the record with ``values`` (in ``names`` order; None = null)."""
        out = [self.head]
        for i, write, null, branch, tail in self.steps:
            v = values[i]
            if v is None:
                if null is None:
                    raise ReplayError(f"{self.name}.{self.names[i]} is required and got None")
                out.append(null)
            else:
                out.append(branch)
                out.append(write(v))
            out.append(tail)
        return b"".join(out)


def _nullable(t) -> tuple[Optional[int], object]:
    """(index of null in the union or None, the other branch's type) of a field type."""
    if isinstance(t, list):
        if len(t) == 2 and "null" in t:
            k = t.index("null")
            return k, t[1 - k]
        return None, t
    return None, t


def _branch(t, predicate) -> int:
    """The index of the union branch of ``t`` that ``predicate`` accepts."""
    for k, b in enumerate(t if isinstance(t, list) else [t]):
        if predicate(b):
            return k
    raise ReplayError(f"no matching branch in {t}")


def _record_schema(t, name: str) -> dict:
    for b in (t if isinstance(t, list) else [t]):
        if isinstance(b, dict) and b.get("type") == "record" and b["name"].split(".")[-1] == name:
            return b
        if isinstance(b, dict) and b.get("type") == "array":
            return _record_schema(b["items"], name)
    raise ReplayError(f"no record {name} in {t}")


# ---------------------------------------------------------------------------- the packets

SOURCE_FIELDS = ("diaSourceId", "visit", "detector", "diaObjectId", "midpointMjdTai", "exposureTime",
                 "ra", "dec", "x", "y", "isNegative", "snr", "psfFlux", "psfFluxErr", "psfNdata",
                 "trailNdata", "dipoleNdata", "scienceFlux", "scienceFluxErr", "templateFlux",
                 "templateFluxErr", "band", "timeProcessedMjdTai", "bboxSize")
FORCED_FIELDS = ("diaForcedSourceId", "diaObjectId", "ra", "dec", "visit", "detector", "psfFlux",
                 "psfFluxErr", "midpointMjdTai", "scienceFlux", "scienceFluxErr", "band",
                 "timeProcessedMjdTai")
OBJECT_FIELDS = (("diaObjectId", "validityStartMjdTai", "ra", "dec")
                 + tuple(f"{b}_psfFluxNdata" for b in RUBIN_BANDS)
                 + ("firstDiaSourceMjdTai", "lastDiaSourceMjdTai", "nDiaSources"))


class RubinPackets:
    """The packets of ``plan`` under Rubin's alert schema ``schema`` (the inlined JSON of
    :func:`schemas.rubin.load_schema`); :meth:`records` yields (key, mjd, Avro body)."""

    def __init__(self, plan: Plan, schema: dict, window_days: float = WINDOW_DAYS):
        if not (window_days >= 0 and math.isfinite(window_days)):
            raise ReplayError(f"history window must be >= 0 days, got {window_days}")
        self.plan, self.window = plan, float(window_days)
        self.schema_name = f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")
        fields = {f["name"]: f["type"] for f in schema["fields"]}
        src = _record_schema(fields["diaSource"], "diaSource")
        src_names = {f["name"] for f in src["fields"]}
        self.source_fields = tuple(n for n in SOURCE_FIELDS if n in src_names)
        self._source = FlatRecord(src, self.source_fields)
        self._forced = FlatRecord(_record_schema(fields["prvDiaForcedSources"], "diaForcedSource"),
                                  FORCED_FIELDS)
        self._object = FlatRecord(_record_schema(fields["diaObject"], "diaObject"), OBJECT_FIELDS)
        self._envelope = self._compile_envelope(schema["fields"])
        lc = plan.lc
        sci, sci_err, psf, psf_err, band = point_photometry(lc)
        bad = sorted(set(np.unique(band[plan.sel_point]).tolist()) - set(RUBIN_BANDS)) if plan.n_alerts else []
        if bad:
            raise ReplayError(f"{lc.source}: Rubin packets carry bands {' '.join(RUBIN_BANDS)}; the "
                              f"input has {', '.join(map(str, bad))}")
        self._phot = (sci, sci_err, psf, psf_err, band)
        self._lc = lc
        ra, dec = sky_positions(lc.object_id)
        self._ra, self._dec = ra.tolist(), dec.tolist()
        h = _splitmix64(lc.object_id.astype(np.int64).astype(np.uint64) ^ np.uint64(0xD1B54A32D192ED03))
        self._detector = (h % np.uint64(N_DETECTORS)).astype(np.int64).tolist()
        u = ((h >> np.uint64(11)).astype(np.float64) / 2.0**53)
        v = ((_splitmix64(h) >> np.uint64(11)).astype(np.float64) / 2.0**53)
        self._xy = list(zip((u * DETECTOR_PIXELS[0]).tolist(), (v * DETECTOR_PIXELS[1]).tolist()))
        self._windows()

    # the envelope: diaSourceId, then per field a constant (null) or a part
    def _compile_envelope(self, fields: list) -> list:
        parts = []
        for f in fields:
            name, t = f["name"], f["type"]
            if name == "diaSourceId":
                parts.append(("id", None))
            elif name == "diaSource":
                parts.append(("source", None))
            elif name in ("prvDiaSources", "prvDiaForcedSources"):
                k = _branch(t, lambda b: isinstance(b, dict) and b.get("type") == "array")
                parts.append((name, zigzag(k)))
            elif name == "diaObject":
                k = _branch(t, lambda b: b != "null")
                parts.append(("object", zigzag(k)))
            else:
                null_index, _ = _nullable(t)
                if null_index is None:
                    raise ReplayError(f"{self.schema_name}.{name} is required ({t}) and the replay has "
                                      f"no value for it")
                parts.append(("const", zigzag(null_index)))
        # merge runs of constants
        merged: list = []
        for kind, b in parts:
            if kind == "const" and merged and merged[-1][0] == "const":
                merged[-1] = ("const", merged[-1][1] + b)
            else:
                merged.append((kind, b))
        return merged

    def _windows(self) -> None:
        """Per selected position: the first selected position (same event) and the first
        point within the window, and the per-band detection counts so far."""
        p, lc = self.plan, self._lc
        mjd = lc.mjd
        sel_mjd = mjd[p.sel_point]
        s = len(p.sel_point)
        lo_d = np.empty(s, np.int64)
        lo_p = np.empty(s, np.int64)
        counts = p.per_event_counts()
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        for e in np.flatnonzero(counts).tolist():
            a, b = int(first[e]), int(first[e] + counts[e])
            o0, o1 = int(lc.offsets[e]), int(lc.offsets[e + 1])
            edge = sel_mjd[a:b] - self.window
            lo_d[a:b] = a + np.searchsorted(sel_mjd[a:b], edge, side="left")
            lo_p[a:b] = o0 + np.searchsorted(mjd[o0:o1], edge, side="left")
        band = self._phot[4][p.sel_point]
        onehot = np.stack([band == b for b in RUBIN_BANDS], axis=1).astype(np.int64)
        cum = np.cumsum(onehot, axis=0)
        before = np.where(p.sel_start[:, None] > 0, cum[np.maximum(p.sel_start - 1, 0)], 0)
        self._ndata = (cum - before).tolist()
        self._lo_d, self._lo_p = lo_d.tolist(), lo_p.tolist()
        self._first_sel, self._counts = first.tolist(), counts.tolist()

    # per event, built at its first packet and dropped after its last
    def _event(self, e: int) -> tuple:
        p, lc = self.plan, self._lc
        sci, sci_err, psf, psf_err, band = self._phot
        a, n = self._first_sel[e], self._counts[e]
        pts = p.sel_point[a:a + n]
        o0 = int(lc.offsets[e])
        f_lo = self._lo_p[a]                       # forced sources: from the first window's edge
        f_hi = int(pts[-1])                        # to the last detection (excluded)
        oid = int(lc.object_id[e])
        ra, dec, det = self._ra[e], self._dec[e], self._detector[e]
        x, y = self._xy[e]
        proc = PROCESSING_S / 86_400.0

        def rows(idx):
            m = lc.mjd[idx]
            return (source_ids(np.full(len(idx), oid), idx - o0).tolist(), m.tolist(),
                    np.rint(m * 86_400.0).astype(np.int64).tolist(), (m + proc).tolist())

        fidx = np.arange(f_lo, f_hi, dtype=np.int64)
        fid, fm, fv, fp = rows(fidx)
        enc_f = self._forced.encode
        forced = [enc_f((i, oid, ra, dec, v, det, d, de, m, s, se, b, t)) for i, v, d, de, m, s, se, b, t in zip(
            fid, fv, psf[fidx].tolist(), psf_err[fidx].tolist(), fm, sci[fidx].tolist(),
            sci_err[fidx].tolist(), band[fidx].tolist(), fp)]
        sid, sm, sv, sp = rows(pts)
        d_, de_, s_, se_ = (np.asarray(x_, np.float64)[pts] for x_ in (psf, psf_err, sci, sci_err))
        tmpl = (s_ - d_).tolist()
        tmpl_err = np.sqrt(np.maximum(de_ * de_ - se_ * se_, 0.0)).tolist()
        snr = (np.abs(d_) / de_).tolist()
        full = {"exposureTime": EXPOSURE_S, "psfNdata": BBOX_PIXELS ** 2, "trailNdata": 0,
                "dipoleNdata": 0, "bboxSize": BBOX_PIXELS, "detector": det, "diaObjectId": oid,
                "ra": ra, "dec": dec, "x": x, "y": y}
        sources = []
        names = self.source_fields
        for k, (i, m, v, t) in enumerate(zip(sid, sm, sv, sp)):
            dk = float(d_[k])
            row = {**full, "diaSourceId": i, "visit": v, "midpointMjdTai": m, "isNegative": dk < 0,
                   "snr": snr[k], "psfFlux": dk, "psfFluxErr": float(de_[k]), "scienceFlux": float(s_[k]),
                   "scienceFluxErr": float(se_[k]), "templateFlux": tmpl[k], "templateFluxErr": tmpl_err[k],
                   "band": band[pts[k]], "timeProcessedMjdTai": t}
            sources.append((self._source.encode(tuple(row[nm] for nm in names)), i, m, t))
        return sources, forced, f_lo

    def records(self) -> Iterator[tuple[bytes, float, bytes]]:
        """Yield (key, mjd, Avro body of the packet) per alert in the plan's send order."""
        p, lc = self.plan, self._lc
        keys_ev = [str(o).encode("ascii") for o in lc.object_id.tolist()]
        cache: dict[int, tuple] = {}
        left = list(self._counts)
        order, events, mjds = p.order.tolist(), p.event.tolist(), p.mjd.tolist()
        sel_point = p.sel_point.tolist()
        envelope = self._envelope
        enc_obj = self._object.encode
        for g, e, mjd in zip(order, events, mjds):
            got = cache.get(e)
            if got is None:
                got = cache[e] = self._event(e)
            sources, forced, f_lo = got
            a = self._first_sel[e]
            k = g - a
            body, sid, m, tproc = sources[k]
            nd = self._ndata[g]
            obj = enc_obj((int(lc.object_id[e]), tproc, self._ra[e], self._dec[e], *nd,
                           sources[0][2], m, k + 1))
            lo_d = self._lo_d[g] - a
            lo_f = self._lo_p[g] - f_lo
            hi_f = sel_point[g] - f_lo
            out = []
            for kind, b in envelope:
                if kind == "const":
                    out.append(b)
                elif kind == "id":
                    out.append(zigzag(sid))
                elif kind == "source":
                    out.append(body)
                elif kind == "prvDiaSources":
                    out.append(b)
                    _array(out, [s[0] for s in sources[lo_d:k]])
                elif kind == "prvDiaForcedSources":
                    out.append(b)
                    _array(out, forced[lo_f:hi_f])
                else:   # object
                    out.append(b)
                    out.append(obj)
            left[e] -= 1
            if not left[e]:
                del cache[e]
            yield keys_ev[e], mjd, b"".join(out)


def _array(out: list, items: list) -> None:
    """An Avro array of already-encoded items: one block (count, items), then 0."""
    if items:
        out.append(zigzag(len(items)))
        out.extend(items)
    out.append(b"\x00")
