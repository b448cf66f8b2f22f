"""The byte layout of an event's state, and the constants the Lua scripts share with it.

Everything here is written once: the Lua scripts (``broker/state/lua/*.lua``) get these
constants from :func:`lua_prelude`, prepended when a script is loaded.

Event value ``P:ev:<diaObjectId>`` (little-endian)::

    header (HEADER_FIXED, 44 bytes):
        u8 version(=4) | u8 M | u8 flags (2 triggered) | u8 0 | u32 n_total | u32 n_scored |
        u32 n_dropped | i64 last diaSourceId | i64 max diaSourceId | f64 last time |
        u32 model tag
    bands (BANDS_BLOCK, 72 bytes), one slot per band u g r i z y and one for "unknown":
        f64 x 7 reference magnitude of the band (NaN until the band has K points) |
        u16 x 7 points of the band appended so far (saturating) | 2 bytes 0
    ring: f32 x M, the last M probabilities (oldest first)
    records: one RECORD (26 bytes) per stored point, oldest first:
        f64 midpointMjdTai | i64 diaSourceId | f32 mag | f32 mag_err | u8 band | u8 P * 254

The band byte is the band code (bits 0..6: 0..5 ugrizy, ``BAND_UNKNOWN`` = 127 any other
band) and, in bit 7 (``FORCED``), whether the point is forced photometry (a Rubin
``prvDiaForcedSources`` point: a visit measured at the object's position, detected or not)
rather than a detection (a ``diaSource``, live or from ``prvDiaSources``). Our compact
alert has no such flag: its points are detections (its schema's "one observed point";
a replay without ``--detections-only`` sends every visit of a simulated survey, and those
below 5 sigma are stored as detections too). The flag is part of the point: a re-send
with the other kind is changed content. Everything that reads a band byte takes the code
with :func:`band_of` (or :func:`band_slot`, :func:`band_name`) and the kind with
:func:`forced_of`; the Lua scripts mask it the same way (``BAND_MASK``). Version 3 had no
flag (unknown band 255): its values are refused as any other version is.

The append script's input per point is ``INPUT`` (26 bytes): a record's first five fields
(the band byte with its ``FORCED`` bit, copied as it is into the record) and a ``kind``
byte, ``KIND_HISTORY`` for a point taken from a packet's history
(``prvDiaSources``/``prvDiaForcedSources``): such a point at or before the event's newest
stored time is already covered and is skipped (``HISTORY``), never a dead letter.

Per band reference: a band's reference is the median magnitude of its first K points
(``training.features``: the light curves of different bands share one magnification but
not their baseline flux), fixed in the header once the band has K points.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from training.features import N_SLOTS, SLOT_UNKNOWN, band_slots  # noqa: F401 (one mapping, re-exported)

VERSION = 4                                       # 4: the band byte's FORCED bit
HEADER_FIXED = struct.Struct("<BBBBIIIqqdI")      # 44 bytes
BANDS = "ugrizy"
BAND_UNKNOWN = 0x7F                               # N_SLOTS: ugrizy + one for any other code
FORCED = 0x80                                     # band byte, bit 7: forced photometry
BAND_MASK = 0x7F                                  # band byte, bits 0..6: the band code
BANDS_BLOCK = struct.Struct("<" + "d" * N_SLOTS + "H" * N_SLOTS + "xx")   # 72 bytes
COUNT_MAX = 0xFFFF
FLAG_TRIGGERED = 2
RECORD = np.dtype([("t", "<f8"), ("id", "<i8"), ("mag", "<f4"), ("err", "<f4"), ("band", "u1"),
                   ("p", "u1")])
INPUT = np.dtype([("t", "<f8"), ("id", "<i8"), ("mag", "<f4"), ("err", "<f4"), ("band", "u1"),
                  ("kind", "u1")])
KIND_LIVE, KIND_HISTORY = 0, 1
PROB_UNSCORED = 255
PROB_SCALE = 254.0
EXACT_LIMIT = 4096  # values up to this many bytes are rewritten at their exact size; longer: APPEND
# append reply prefix: window start index, points dropped now, trigger status byte, 1 when
# the event was scored by another model (or smoothing window) and is scored again now
PREFIX = struct.Struct("<IIBB")
SCORE_PREFIX = struct.Struct("<IIB")  # score update: old n_scored, u, fire

# Status codes of each incoming point, as returned by the append script.
APPENDED, DUPLICATE, OUT_OF_ORDER, CONFLICT, DUPLICATE_UNVERIFIED, CHANGED, HISTORY = \
    b"0", b"1", b"2", b"3", b"4", b"5", b"6"

# Trigger outcome codes of the score script (and of the PSPL-fit rule's save script).
TRIG_NONE, TRIG_NEW, TRIG_DONE, TRIG_PENDING, TRIG_CONFLICT, TRIG_GONE, TRIG_ALREADY = \
    "N", "T", "D", "P", "C", "G", "A"


def header_size(m: int) -> int:
    return HEADER_FIXED.size + BANDS_BLOCK.size + 4 * m


def band_slot(code: int) -> int:
    """The header slot of a band byte (0..5 ugrizy, anything else the unknown slot)."""
    code = int(code) & BAND_MASK
    return code if code < len(BANDS) else SLOT_UNKNOWN


def band_codes(bands, forced=None) -> np.ndarray:
    """u8 band bytes of band names: the index in ``ugrizy`` (BAND_UNKNOWN otherwise), with
    the ``FORCED`` bit where ``forced`` (bools, one per band; None: all detections) says."""
    lut = {b: i for i, b in enumerate(BANDS)}
    codes = np.fromiter((lut.get(b, BAND_UNKNOWN) for b in bands), dtype=np.uint8)
    if forced is not None:
        codes |= np.where(np.asarray(forced, dtype=bool), FORCED, 0).astype(np.uint8)
    return codes


def band_of(band_bytes) -> np.ndarray:
    """The band codes (u8, FORCED bit cleared) of stored band bytes: what the model's
    features, the PSPL fit and the band counts read."""
    return np.asarray(band_bytes, dtype=np.uint8) & np.uint8(BAND_MASK)


def forced_of(band_bytes) -> np.ndarray:
    """True where a stored band byte marks forced photometry (False: a detection)."""
    return (np.asarray(band_bytes, dtype=np.uint8) & np.uint8(FORCED)) != 0


def band_name(code: int):
    """The band name of a band byte, None for an unknown band."""
    code = int(code) & BAND_MASK
    return BANDS[code] if code < len(BANDS) else None


def slot_name(slot: int) -> str:
    """The band name of a header slot ("unknown" for the last)."""
    return BANDS[slot] if slot < len(BANDS) else "unknown"


def model_tag(model_version: str, smooth_window: int, reference_points: int) -> int:
    """u32 naming what scored an event's stored probabilities: a state scored under another
    tag is scored again (broker/state/lua/append.lua)."""
    return zlib.crc32(f"{model_version}|M={smooth_window}|K={reference_points}".encode())


def lua_prelude() -> str:
    """The constants the Lua scripts share with this module, written from it (one source)."""
    return "\n".join([
        f"local REC = {RECORD.itemsize}", f"local IN_SIZE = {INPUT.itemsize}",
        f"local P_OFF = {RECORD.fields['p'][1]}",
        f"local BAND_OFF = {RECORD.fields['band'][1]}",
        f"local KIND_OFF = {INPUT.fields['kind'][1]}",
        f"local KIND_HISTORY = {KIND_HISTORY}", f"local BAND_MASK = {BAND_MASK}",
        # struct's c8 keeps the int64 ids as bytes (Lua numbers are doubles)
        "local HFMT = '<BBBBIIIc8c8dI'", f"local HFIX = {HEADER_FIXED.size}",
        f"local BFMT = '<{'d' * N_SLOTS}{'H' * N_SLOTS}xx'", f"local BSIZE = {BANDS_BLOCK.size}",
        f"local HSIZE = {HEADER_FIXED.size + BANDS_BLOCK.size}",
        f"local NSLOT = {N_SLOTS}", f"local NBANDS = {len(BANDS)}",
        f"local COUNT_MAX = {COUNT_MAX}",
        f"local VERSION = {VERSION}", f"local FLAG_TRIGGERED = {FLAG_TRIGGERED}",
        *(f"local ST_{name} = '{code.decode()}'" for name, code in (
            ("APPENDED", APPENDED), ("DUPLICATE", DUPLICATE), ("OUT_OF_ORDER", OUT_OF_ORDER),
            ("CONFLICT", CONFLICT), ("UNVERIFIED", DUPLICATE_UNVERIFIED), ("CHANGED", CHANGED),
            ("HISTORY", HISTORY))),
        ""])
