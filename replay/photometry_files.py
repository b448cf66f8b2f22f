"""Archival light curves: text tables, one file per event, read into :class:`LightCurves`.

Format
------
* Columns: time, magnitude, magnitude error (further columns are ignored), separated by
  whitespace and/or commas. ``#`` starts a comment (whole line or end of line). Blank
  lines are skipped. One optional header line (the first non-comment line, if none of its
  first three fields is a number).
* Time: the scale is detected per file from the size of the values; all rows of a file
  must fall in the same range:

  ====================  =========================  ==========================
  value x               taken as                   MJD
  ====================  =========================  ==========================
  x >= 2,400,000        JD or HJD                  x - 2,400,000.5
  2,000 <= x < 20,000   HJD' = HJD - 2,450,000     x + 49,999.5
  20,000 <= x < 100,000 MJD                        x
  anything else         an error
  ====================  =========================  ==========================

  HJD is used as if it were JD (no barycentric correction: at most ~8.3 min off), and
  "reduced JD" (JD - 2,400,000) would be read as MJD, 0.5 d off. The file's own MJD is
  replayed as ``midpointMjdTai`` (no shift to the present).
* Rows need not be sorted: they are sorted by time; two rows at the same time are an
  error naming both lines. Non-numeric or non-finite values, errors <= 0 and rows with
  fewer than three columns are errors naming the file and line.
* ``diaObjectId``: ``10**13 + (blake2b-64(base name, UTF-8) mod 10**13)``, stable across
  machines and runs, or ``--object-id-start K`` then K, K+1, ... in the order given.
* Template for the difference flux: ``baseline_mag`` = the 75th percentile of the file's
  magnitudes (the median of its faintest half), so psfFlux ~ 0 at baseline.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from replay.stream import LightCurves, ReplayError, check_object_ids

_SPLIT = re.compile(r"[,\s]+")
HASH_BASE = 10**13


class PhotometryFileError(ReplayError):
    """An archival light-curve file cannot be read; the message names the file and line."""


def time_scale(x: float) -> Optional[str]:
    """The time scale of value ``x`` ('jd', 'hjd_prime' or 'mjd'), None if unrecognised."""
    if x >= 2_400_000:
        return "jd"
    if 20_000 <= x < 100_000:
        return "mjd"
    if 2_000 <= x < 20_000:
        return "hjd_prime"
    return None


_TO_MJD = {"jd": -2_400_000.5, "hjd_prime": 49_999.5, "mjd": 0.0}
SCALE_NAMES = {"jd": "JD/HJD", "hjd_prime": "HJD-2450000", "mjd": "MJD"}


def to_mjd(values, scale: str) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) + _TO_MJD[scale]


def object_id_for(path: str | os.PathLike) -> int:
    """Stable diaObjectId of an archival file: 10**13 + blake2b-64(base name) mod 10**13."""
    digest = hashlib.blake2b(Path(path).name.encode("utf-8"), digest_size=8).digest()
    return HASH_BASE + int.from_bytes(digest, "big") % HASH_BASE


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def read_table(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(mjd, mag, mag_err, detected scale) of one file, sorted by time; errors name file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PhotometryFileError(f"photometry file not found: {path}") from None
    except UnicodeDecodeError:
        raise PhotometryFileError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as exc:
        raise PhotometryFileError(f"{path}: cannot read: {exc.strerror}") from None
    rows: list[tuple[float, float, float]] = []
    lines: list[int] = []
    seen_content = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        toks = [t for t in _SPLIT.split(line) if t]
        where = f"{path}:{lineno}"
        if not seen_content:
            seen_content = True
            if not any(_is_number(t) for t in toks[:3]):
                continue  # the optional header line
        if len(toks) < 3:
            raise PhotometryFileError(f"{where}: expected 3 columns (time, mag, error), "
                                      f"found {len(toks)}: {line!r}")
        vals = []
        for col, (name, tok) in enumerate(zip(("time", "mag", "error"), toks[:3]), start=1):
            try:
                v = float(tok)
            except ValueError:
                raise PhotometryFileError(f"{where}: column {col} ({name}) is not a number: "
                                          f"{tok!r}") from None
            if not math.isfinite(v):
                raise PhotometryFileError(f"{where}: column {col} ({name}) is not finite: {tok!r}")
            vals.append(v)
        if vals[2] <= 0:
            raise PhotometryFileError(f"{where}: magnitude error must be positive, got {toks[2]!r}")
        rows.append((vals[0], vals[1], vals[2]))
        lines.append(lineno)
    if not rows:
        raise PhotometryFileError(f"{path}: no data rows (expected columns time, mag, error)")
    arr = np.array(rows, dtype=np.float64)
    line_no = np.array(lines)
    scale = time_scale(arr[0, 0])
    if scale is None:
        raise PhotometryFileError(
            f"{path}:{line_no[0]}: time {arr[0, 0]!r} is in no known range "
            "(JD/HJD >= 2,400,000; HJD-2450000 in 2,000..20,000; MJD in 20,000..100,000)")
    for t, ln in zip(arr[:, 0].tolist(), line_no.tolist()):
        if time_scale(t) != scale:
            raise PhotometryFileError(f"{path}:{ln}: time {t!r} is not {SCALE_NAMES[scale]} "
                                      f"like the first row (line {line_no[0]})")
    order = np.argsort(arr[:, 0], kind="stable")
    arr, line_no = arr[order], line_no[order]
    dup = np.flatnonzero(np.diff(arr[:, 0]) == 0)
    if dup.size:
        i = int(dup[0])
        raise PhotometryFileError(f"{path}:{line_no[i + 1]}: time {arr[i + 1, 0]!r} repeats "
                                  f"line {line_no[i]}; times of one event must be distinct")
    return to_mjd(arr[:, 0], scale), arr[:, 1], arr[:, 2], scale


def load_files(paths: Sequence[str | os.PathLike], object_id_start: Optional[int] = None
               ) -> LightCurves:
    """Read every file (all of them, before anything is produced) into one LightCurves."""
    if not paths:
        raise PhotometryFileError("no photometry files given")
    mjd, mag, err, base, ids, names = [], [], [], [], [], []
    for i, path in enumerate(paths):
        t, m, e, _ = read_table(path)
        mjd.append(t)
        mag.append(m)
        err.append(e)
        base.append(float(np.percentile(m, 75)))
        ids.append(object_id_for(path) if object_id_start is None else object_id_start + i)
        names.append(str(path))
    first_of: dict[int, str] = {}
    for oid, name in zip(ids, names):
        if oid in first_of:
            raise PhotometryFileError(f"{name}: diaObjectId {oid} is also that of {first_of[oid]} "
                                      "(same file name?); use --object-id-start")
        first_of[oid] = name
    check_object_ids(ids, "photometry files")
    lens = np.array([len(t) for t in mjd], dtype=np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    lc = LightCurves(object_id=np.array(ids, dtype=np.int64), offsets=offsets,
                     mjd=np.concatenate(mjd), mag=np.concatenate(mag), mag_err=np.concatenate(err),
                     baseline_mag=np.array(base, dtype=np.float64), source="photometry files",
                     label=None, params={}, start_mjd=None, names=names)
    lc.validate()
    return lc
