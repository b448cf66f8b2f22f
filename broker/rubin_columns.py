"""The Rubin packets of a poll batch, decoded together and checked column by column.

:func:`read_packets` is what :func:`broker.validate.rubin_alert`, ``check_record`` and
``_history_rows`` do to one packet at a time, done to the packets of one schema id at
once: the bodies are decoded in one block (``schemas.avro_block``, polars' Avro reader,
about 20x faster than fastavro here) and every rule is an array operation. The rules are
theirs, and so are the words of a dead letter: a packet that any vectorised check flags is
checked again, alone, by ``check_record`` itself on the values decoded here, so a reason
and its detail are the same whichever path read the packet (tests/unit/test_rubin_columns.py
compares the two paths on every kind of bad packet).

What is decoded of a packet: the ``diaSource`` (its id, object, time, band, fluxes and
errors, position), the ``diaObject`` (for its diaObjectId), and of each point of
``prvDiaSources`` and ``prvDiaForcedSources`` the id, time, band, fluxes and errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from broker import state as st

HISTORY_SKIPS = ("no_flux", "nonpositive_flux", "not_before_the_alert", "bad_value")

COLUMNS = ["diaSource", "prvDiaSources", "prvDiaForcedSources", "diaObject"]
_BAND_CODE = {b: i for i, b in enumerate(st.BANDS)}


@dataclass
class AlertColumns:
    """The alerts' own points (one row per message kept) and their history points."""
    idx: np.ndarray           # message index in the batch
    object_id: np.ndarray     # int64 (-1: none in the packet)
    source_id: np.ndarray
    time: np.ndarray          # float64 MJD
    flux: np.ndarray          # float64 nJy (scienceFlux, else psfFlux + templateFlux, else psfFlux)
    flux_err: np.ndarray
    produced_us: np.ndarray   # int64 (0 for a Rubin packet: the caller puts the Kafka timestamp)
    band: np.ndarray          # uint8 band code (BAND_UNKNOWN for another band)
    ra: np.ndarray
    dec: np.ndarray
    # history, oldest first within each alert: the alert row (index into the arrays above)
    h_owner: np.ndarray
    h_id: np.ndarray
    h_time: np.ndarray
    h_band: np.ndarray        # uint8 band byte, with the FORCED bit
    h_flux: np.ndarray
    h_err: np.ndarray
    any_history: bool         # whether any alert carried history (else its points have no kind)
    # history points left out: their alert row and reason (index into HISTORY_SKIPS)
    s_owner: np.ndarray
    s_reason: np.ndarray


def concatenate(parts: list) -> Optional["AlertColumns"]:
    """One AlertColumns of several, rows in message order (history owners follow)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    base = np.cumsum([0] + [len(p.idx) for p in parts[:-1]])
    cat = {f: np.concatenate([getattr(p, f) for p in parts]) for f in
           ("idx", "object_id", "source_id", "time", "flux", "flux_err", "produced_us", "band", "ra", "dec",
            "h_id", "h_time", "h_band", "h_flux", "h_err", "s_reason")}
    order = np.argsort(cat["idx"], kind="stable")
    new_row = np.empty(len(order), np.int64)
    new_row[order] = np.arange(len(order))
    for f in ("idx", "object_id", "source_id", "time", "flux", "flux_err", "produced_us", "band", "ra", "dec"):
        cat[f] = cat[f][order]
    h_owner = new_row[np.concatenate([p.h_owner + b for p, b in zip(parts, base)])]
    s_owner = new_row[np.concatenate([p.s_owner + b for p, b in zip(parts, base)])]
    # history stays grouped by alert and oldest first within it (the pool sorts by owner, stably)
    return AlertColumns(**{k: v for k, v in cat.items() if k != "s_reason"}, h_owner=h_owner,
                        any_history=any(p.any_history for p in parts), s_owner=s_owner,
                        s_reason=cat["s_reason"])


_FLOAT_FIELDS = ("midpointMjdTai", "ra", "dec", "scienceFlux", "scienceFluxErr", "psfFlux", "psfFluxErr",
                 "templateFlux", "templateFluxErr")
_INT_FIELDS = ("diaSourceId", "diaForcedSourceId", "diaObjectId")


class _Fields:
    """The fields of a polars struct Series that the checks read, as numpy arrays with
    their null masks, from one polars query (a query per field costs ~0.2 ms each)."""

    def __init__(self, struct):
        import polars as pl

        have = set(struct.struct.fields)
        self.n = len(struct)
        exprs = []
        for name in _FLOAT_FIELDS + _INT_FIELDS:
            if name in have:
                fill = np.nan if name in _FLOAT_FIELDS else 0
                exprs += [pl.col(name).fill_null(fill).alias(name), pl.col(name).is_null().alias(name + ":null")]
        if "band" in have:
            exprs += [pl.col("band").replace_strict(_BAND_CODE, default=st.BAND_UNKNOWN, return_dtype=pl.UInt8)
                      .fill_null(st.BAND_UNKNOWN).alias("band"), pl.col("band").is_null().alias("band:null")]
        frame = struct.struct.unnest().select(exprs) if exprs else None
        self._cols = {} if frame is None else {c: frame.get_column(c).to_numpy() for c in frame.columns}

    def get(self, name: str, dtype=np.float64):
        """(values, null mask); a field the schema lacks is all null."""
        if name not in self._cols:
            fill = st.BAND_UNKNOWN if name == "band" else (np.nan if name in _FLOAT_FIELDS else 0)
            return np.full(self.n, fill, dtype=dtype), np.ones(self.n, dtype=bool)
        return self._cols[name].astype(dtype, copy=False), self._cols[name + ":null"]


def _brightness(f: _Fields, detections: bool):
    """(flux, error, flux null, error null, psfFlux, its null, psfFluxErr, its null) as
    ``validate._brightness``: scienceFlux with scienceFluxErr (psfFluxErr when that is
    null or zero); else psfFlux + templateFlux with the two errors in quadrature
    (templateFluxErr null counts as zero; a null psfFluxErr makes the error null); else
    psfFlux alone."""
    sci, sci_null = f.get("scienceFlux")
    sci_err, sci_err_null = f.get("scienceFluxErr")
    psf, psf_null = f.get("psfFlux")
    psf_err, psf_err_null = f.get("psfFluxErr")
    n = len(sci)
    if detections:
        tmpl, tmpl_null = f.get("templateFlux")
        terr, terr_null = f.get("templateFluxErr")
    else:   # a diaForcedSource has no template flux
        tmpl, tmpl_null = np.full(n, np.nan), np.ones(n, bool)
        terr, terr_null = np.zeros(n), np.ones(n, bool)
    has_sci = ~sci_null
    use_psf_err = sci_err_null | (sci_err == 0.0)   # `scienceFluxErr or psfFluxErr`
    flux = np.where(has_sci, sci, np.where(tmpl_null, psf, psf + tmpl))
    terr = np.where(terr_null, 0.0, terr)
    with np.errstate(all="ignore"):
        err = np.where(has_sci, np.where(use_psf_err, psf_err, sci_err),
                       np.where(tmpl_null, psf_err, np.sqrt(psf_err ** 2 + terr ** 2)))
    flux_null = sci_null & psf_null
    err_null = np.where(has_sci, use_psf_err & psf_err_null, psf_null | psf_err_null)
    return flux, err, flux_null, err_null, psf, psf_null, psf_err, psf_err_null


def read_packets(df, idx: list, keys: list, max_mjd: Optional[float], check_record,
                 rejected: dict) -> AlertColumns:
    """The columns of the packets in ``df`` (polars, :data:`COLUMNS`; message indices
    ``idx``, Kafka keys ``keys``). A packet that fails a check goes to ``rejected``
    (message index -> Rejected, from ``check_record``); the history points left out are
    in ``s_owner``/``s_reason``."""
    ds_col = df.get_column("diaSource")
    ds = _Fields(ds_col)
    n = ds.n
    oid, oid_null = ds.get("diaObjectId", np.int64)
    if oid_null.any():
        ooid = df.get_column("diaObject").struct.field("diaObjectId")
        ooid_null = ooid.is_null().to_numpy()
        oid = np.where(~oid_null, oid, np.where(~ooid_null, ooid.fill_null(0).to_numpy(), -1))
    sid, _ = ds.get("diaSourceId", np.int64)
    t, _ = ds.get("midpointMjdTai")
    ra, _ = ds.get("ra")
    dec, _ = ds.get("dec")
    band, band_null = ds.get("band", np.uint8)
    flux, err, flux_null, err_null, psf, psf_null, psf_err, psf_err_null = _brightness(ds, True)

    # every packet check_record could refuse is flagged (it decides; a false flag costs a call)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(t) & np.isfinite(ra) & np.isfinite(dec) & np.isfinite(flux) & np.isfinite(err) \
            & (psf_null | np.isfinite(psf)) & (psf_err_null | np.isfinite(psf_err))
        flagged = (oid < 0) | (sid < 0) | flux_null | err_null | band_null | ~finite | (err <= 0) \
            | (~psf_err_null & (psf_err <= 0)) | (flux <= 0) | (t < 0.0) | (t > 200_000.0) \
            | (ra < 0.0) | (ra > 360.0) | (dec < -90.0) | (dec > 90.0) | (band == st.BAND_UNKNOWN)
        if max_mjd is not None:
            flagged |= t > max_mjd
    oid_l = oid.tolist()
    for j in range(n):
        if keys[j] is None or keys[j] != str(oid_l[j]).encode():
            flagged[j] = True
    for j in np.flatnonzero(flagged).tolist():
        rec = {"diaObjectId": oid_l[j], "diaSourceId": int(sid[j]),
               "midpointMjdTai": float(t[j]), "ra": float(ra[j]), "dec": float(dec[j]),
               "band": None if band_null[j] else ds_col[j]["band"],
               "scienceFlux": None if flux_null[j] else float(flux[j]),
               "scienceFluxErr": None if err_null[j] else float(err[j]),
               "psfFlux": None if psf_null[j] else float(psf[j]),
               "psfFluxErr": None if psf_err_null[j] else float(psf_err[j])}
        bad = check_record(rec, keys[j], max_mjd)
        if bad is not None:
            rejected[idx[j]] = bad
            flagged[j] = True
        else:
            flagged[j] = False
    good = np.flatnonzero(~flagged)
    idx_a = np.asarray(idx, dtype=np.int64)

    # history of the good packets: forced photometry, then detections over the same visits
    parts = []
    for name, forced in (("prvDiaForcedSources", True), ("prvDiaSources", False)):
        lst = df.get_column(name)
        lens = lst.list.len().fill_null(0).to_numpy().astype(np.int64)
        if not lens.sum():
            continue
        items = _Fields(lst.explode(empty_as_null=False, keep_nulls=False))
        owner = np.repeat(np.arange(n), lens)
        hf, he, hf_null, he_null = _brightness(items, not forced)[:4]
        parts.append((owner, items.get("diaForcedSourceId" if forced else "diaSourceId", np.int64)[0],
                      items.get("midpointMjdTai")[0], *items.get("band", np.uint8),
                      hf, he, hf_null | he_null, np.full(len(owner), forced)))
    empty_i, empty_f = np.empty(0, np.int64), np.empty(0, np.float64)
    if parts:
        cols = [np.concatenate(c) for c in zip(*parts)]
        h_owner, h_id, h_time, h_code, h_band_null, h_flux, h_err, h_nullflux, h_forced = cols
        keep = ~flagged[h_owner]
        h_owner, h_id, h_time, h_code, h_band_null, h_flux, h_err, h_nullflux, h_forced = (
            c[keep] for c in (h_owner, h_id, h_time, h_code, h_band_null, h_flux, h_err, h_nullflux, h_forced))
        # one point per visit (its time): the last one given, detections being given after
        # forced photometry; then oldest first
        seq = np.arange(len(h_owner))
        order = np.lexsort((seq, h_time, h_owner))
        o_, t_ = h_owner[order], h_time[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = (o_[1:] != o_[:-1]) | (t_[1:] != t_[:-1])
        # NaN times never compare equal: each stays its own visit (then "bad_value")
        sel = order[last]
        h_owner, h_id, h_time, h_code, h_band_null, h_flux, h_err, h_nullflux, h_forced = (
            c[sel] for c in (h_owner, h_id, h_time, h_code, h_band_null, h_flux, h_err, h_nullflux, h_forced))
        with np.errstate(invalid="ignore"):
            no_flux = h_nullflux
            bad_value = ~no_flux & (~(np.isfinite(h_flux) & np.isfinite(h_err) & np.isfinite(h_time))
                                    | (h_err <= 0) | (h_id < 0) | h_band_null
                                    | (h_code == st.BAND_UNKNOWN))
            nonpos = ~no_flux & ~bad_value & (h_flux <= 0)
            late = ~no_flux & ~bad_value & ~nonpos & ~(h_time < t[h_owner])
        reason = np.full(len(h_owner), -1, np.int64)
        for why, m in (("no_flux", no_flux), ("bad_value", bad_value), ("nonpositive_flux", nonpos),
                       ("not_before_the_alert", late)):
            reason[m] = HISTORY_SKIPS.index(why)
        ok = reason < 0
        s_owner, s_reason = h_owner[~ok], reason[~ok]
        h_owner, h_id, h_time, h_code, h_flux, h_err, h_forced = (
            c[ok] for c in (h_owner, h_id, h_time, h_code, h_flux, h_err, h_forced))
        h_band = h_code | np.where(h_forced, st.FORCED, 0).astype(np.uint8)
    else:
        h_owner = h_id = s_owner = s_reason = empty_i
        h_time = h_flux = h_err = empty_f
        h_band = np.empty(0, np.uint8)
    # owners: rows of the packets kept
    row_of = np.full(n, -1, dtype=np.int64)
    row_of[good] = np.arange(len(good))
    return AlertColumns(idx_a[good], oid[good], sid[good], t[good], flux[good], err[good],
                        np.zeros(len(good), np.int64), band[good], ra[good], dec[good],
                        row_of[h_owner], h_id, h_time, h_band.astype(np.uint8), h_flux, h_err,
                        bool(parts), row_of[s_owner], s_reason)
