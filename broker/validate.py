"""Decoding and validation of incoming alerts: pure functions, no I/O.

Two wire formats, told apart by the schema id in the frame: our compact alert
(``schemas/alert``) and Rubin's own packet (``lsst.vN_M.alert``; :func:`rubin_alert`).
Both become the same internal points, each with its band: the alert's own point (the
new detection, ``KIND_LIVE``) and the points of its history (``prvDiaSources``, and
Rubin's ``prvDiaForcedSources``, ``KIND_HISTORY``), which backfill an event new to the
broker and fill the visits between alerts (the state skips history it has). A batch's
Rubin packets are decoded together where they can be (:func:`_block_columns`,
``broker.rubin_columns``): the same checks, reasons and points, ~5x less time a packet.

Every message either gives its points or is a :class:`Rejected` with a short
machine-readable ``reason`` (the dead-letter header and the metrics label) and a
human ``detail``; a bad history point is left out and counted (:data:`HISTORY_SKIPS`),
never a dead letter of an alert whose own point is good. Reasons:

=====================  ==========================================================
``truncated_frame``    shorter than the frame header, or the Avro body ends early
``bad_magic_byte``     first byte is not the Confluent magic byte 0
``unknown_schema_id``  schema id not in ``schemas/registry.json``
``wrong_kind``         a valid message of another kind (a trigger on the alerts topic)
``bad_body``           the Avro body does not decode under its schema (a missing
                       required field ends here too), or trailing bytes
``bad_key``            Kafka key missing or not the decimal diaObjectId (Rubin's own
                       stream has no key: run ``ulens rekey`` in front of the broker)
``bad_id``             diaObjectId or diaSourceId negative, or a Rubin packet with no
                       diaObjectId (in neither its diaSource nor its diaObject)
``missing_value``      a Rubin diaSource without a flux (psfFlux and scienceFlux null),
                       an error or a band
``nonfinite_value``    NaN or infinity in a time, flux, error or coordinate
``nonpositive_error``  scienceFluxErr or psfFluxErr zero or negative
``nonpositive_flux``   scienceFlux zero or negative (no magnitude exists)
``absurd_value``       time, position, band, magnitude or magnitude error out of range
``future_time``        midpointMjdTai later than the wall clock + ``consumer.future_margin_s``
                       (a point from the future would become the event's newest and
                       block every real one as out of order)
``unreadable``         reading or checking the message raised an unexpected error (the
                       detail names it); the message is kept as it could be read
``out_of_order``       (from the state) earlier than the event's newest point, not a duplicate
``duplicate_time``     (from the state) a stored point has this time and another diaSourceId
``changed_resend``     (from the state) this diaSourceId is stored with another time,
                       magnitude, error or band (an exact re-send is a duplicate)
=====================  ==========================================================
"""
from __future__ import annotations

import hashlib
import logging
import math
import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from broker import state as st
from broker.rubin_columns import HISTORY_SKIPS   # the reasons a history point is left out
from schemas import BadBody, BadMagicByte, CodecError, TruncatedFrame, UnknownSchemaId, WrongKind
from training.photometry import njy_to_mag

log = logging.getLogger(__name__)

ALERT_KINDS = ("alert", "rubin")      # the codec kinds the alerts topic carries

# Ranges outside which a value is absurd (not merely unusual) for this broker.
MJD_RANGE = (0.0, 200_000.0)       # MJD; catches JD, Unix seconds, negative times
MAG_RANGE = (0.0, 40.0)            # AB magnitude from scienceFlux
MAX_MAG_ERR = 10.0                 # magnitudes
BANDS = frozenset(st.BANDS)

_CODEC_REASONS = ((TruncatedFrame, "truncated_frame"), (BadMagicByte, "bad_magic_byte"),
                  (UnknownSchemaId, "unknown_schema_id"), (WrongKind, "wrong_kind"),
                  (BadBody, "bad_body"))


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class Points:
    """The valid alerts of a batch reduced to what the broker keeps, column by column."""
    object_id: np.ndarray    # int64 diaObjectId
    source_id: np.ndarray    # int64 diaSourceId
    time: np.ndarray         # float64 midpointMjdTai
    mag: np.ndarray          # float32, from scienceFlux
    mag_err: np.ndarray      # float32, from scienceFluxErr
    produced_us: np.ndarray  # int64 alertProducedUs
    band: np.ndarray         # uint8 band byte (broker.state.band_codes: code | FORCED)
    ra: np.ndarray           # float64 degrees (ICRS), of the alert
    dec: np.ndarray          # float64 degrees (ICRS)
    kind: Optional[np.ndarray] = None   # uint8 KIND_LIVE / KIND_HISTORY (None: all live)

    def __len__(self) -> int:
        return len(self.object_id)

    def select(self, mask: np.ndarray) -> "Points":
        """The points where ``mask`` is true, in order."""
        return Points(*(None if c is None else c[mask] for c in (
            self.object_id, self.source_id, self.time, self.mag, self.mag_err, self.produced_us,
            self.band, self.ra, self.dec, self.kind)))

    @classmethod
    def empty(cls) -> "Points":
        z = np.empty(0, dtype=np.int64)
        f8 = z.astype(np.float64)
        return cls(z, z, f8, z.astype(np.float32), z.astype(np.float32), z, z.astype(np.uint8), f8, f8)


def codec_reason(exc: CodecError) -> str:
    for cls, reason in _CODEC_REASONS:
        if isinstance(exc, cls):
            return reason
    return "bad_body"


def decode(codec, value: Optional[bytes]) -> dict | Rejected:
    """The alert (compact form, :func:`rubin_alert` for a Rubin packet, its history under
    ``prvDiaSources``), or why it cannot be decoded."""
    try:
        sid, record = codec.decode(value)
    except CodecError as exc:
        return Rejected(codec_reason(exc), str(exc))
    kind = codec.kind_of(sid)
    if kind == "alert":
        return record
    if kind == "rubin":
        return rubin_alert(record)
    return Rejected("wrong_kind", f"schema id {sid} is a {kind}, expected {' or '.join(ALERT_KINDS)}")




def _brightness(src: dict) -> tuple[Optional[float], Optional[float]]:
    """(total flux, its error) in nJy of a Rubin diaSource or diaForcedSource: the direct
    image's ``scienceFlux`` when the packet has it; else the difference flux plus the
    template's flux at the source (``templateFlux``, diaSource only); else the difference
    flux alone (a packet without any baseline: the magnitude is that of the flux above
    the template, as for a transient on an empty template)."""
    sci = src.get("scienceFlux")
    if sci is not None:
        return sci, src.get("scienceFluxErr") or src.get("psfFluxErr")
    diff, derr = src.get("psfFlux"), src.get("psfFluxErr")
    if diff is None:
        return None, None
    tmpl = src.get("templateFlux")
    if tmpl is not None:
        terr = src.get("templateFluxErr") or 0.0
        return diff + tmpl, math.sqrt((derr or 0.0) ** 2 + terr ** 2) if derr is not None else None
    return diff, derr


def _rubin_point(src: dict, source_id_field: str, forced: bool = False) -> dict:
    flux, err = _brightness(src)
    return {"diaSourceId": src[source_id_field], "midpointMjdTai": src["midpointMjdTai"],
            "band": src.get("band"), "scienceFlux": flux, "scienceFluxErr": err,
            "psfFlux": src.get("psfFlux"), "psfFluxErr": src.get("psfFluxErr"), "forced": forced}


def rubin_alert(packet: dict) -> dict:
    """A Rubin alert packet (lsst.v10_0 .. v11_1) as the compact alert the checks read.

    * ``diaObjectId`` from the diaSource, else from the diaObject (Rubin's own 11.1 sample
      has it only there); -1 when neither has it (a ``bad_id`` dead letter);
    * brightness: :func:`_brightness` (scienceFlux, else psfFlux + templateFlux, else psfFlux);
    * ``alertProducedUs`` 0: the packet has no production time (the consumer takes the
      Kafka message's timestamp);
    * history: every earlier visit once, from ``prvDiaSources`` (the detections, as the
      alerts of those visits gave them) and ``prvDiaForcedSources`` (forced photometry at
      the object's position: the visits without a detection), oldest first. A visit is
      its ``midpointMjdTai``; a detection wins over forced photometry of the same visit,
      so that a broker backfilled from history holds the points of one that saw every
      alert. Forced sources are keyed by their ``diaForcedSourceId`` and marked
      ``forced`` (stored with the band byte's ``FORCED`` bit); the others are detections.
    """
    ds = packet["diaSource"]
    obj = packet.get("diaObject") or {}
    oid = ds.get("diaObjectId")
    if oid is None:
        oid = obj.get("diaObjectId")
    live = _rubin_point(ds, "diaSourceId")
    live.update({"diaObjectId": -1 if oid is None else oid, "ra": ds["ra"], "dec": ds["dec"],
                 "alertProducedUs": 0})
    visits: dict = {}
    for f in packet.get("prvDiaForcedSources") or ():
        visits[f["midpointMjdTai"]] = _rubin_point(f, "diaForcedSourceId", forced=True)
    for d in packet.get("prvDiaSources") or ():
        visits[d["midpointMjdTai"]] = _rubin_point(d, "diaSourceId")
    live["prvDiaSources"] = [visits[t] for t in sorted(visits)] if visits else None
    return live


def mjd_now(now_s: Optional[float] = None) -> float:
    """MJD (UTC; TAI is 37 s ahead, far below any margin used here) of a Unix time."""
    import time

    return (time.time() if now_s is None else now_s) / 86400.0 + 40587.0


def check_record(record: dict, key: Optional[bytes], max_mjd: Optional[float] = None) -> Optional[Rejected]:
    """Checks that need no magnitude: key, ids, finiteness, signs and ranges; with
    ``max_mjd``, times after it are refused (``future_time``)."""
    oid, sid = record["diaObjectId"], record["diaSourceId"]
    if oid < 0 or sid < 0:
        return Rejected("bad_id", f"diaObjectId {oid}, diaSourceId {sid}: ids must be >= 0"
                        + (" (a Rubin packet with no diaObjectId in its diaSource or diaObject)"
                           if oid == -1 else ""))
    for name in ("scienceFlux", "scienceFluxErr", "band"):
        if record[name] is None:
            return Rejected("missing_value", f"diaSource.{name} is null" + (
                " (and so are psfFlux and templateFlux: no brightness)" if name == "scienceFlux" else ""))
    if key is None or key != str(oid).encode():
        return Rejected("bad_key", f"Kafka key {key!r} is not the diaObjectId {oid}")
    for name in ("midpointMjdTai", "scienceFlux", "scienceFluxErr", "psfFlux", "psfFluxErr",
                 "ra", "dec"):
        if record[name] is not None and not math.isfinite(record[name]):
            return Rejected("nonfinite_value", f"{name} is {record[name]}")
    for name in ("scienceFluxErr", "psfFluxErr"):
        if record[name] is not None and record[name] <= 0:
            return Rejected("nonpositive_error", f"{name} = {record[name]} must be > 0")
    if record["scienceFlux"] <= 0:
        return Rejected("nonpositive_flux", f"scienceFlux = {record['scienceFlux']} nJy has no magnitude")
    t = record["midpointMjdTai"]
    if not MJD_RANGE[0] <= t <= MJD_RANGE[1]:
        return Rejected("absurd_value", f"midpointMjdTai = {t} outside {MJD_RANGE}")
    if max_mjd is not None and t > max_mjd:
        return Rejected("future_time", f"midpointMjdTai = {t} is {t - max_mjd:.4f} d after the "
                        f"latest accepted time {max_mjd:.4f} (now + consumer.future_margin_s)")
    if not (0.0 <= record["ra"] <= 360.0 and -90.0 <= record["dec"] <= 90.0):
        return Rejected("absurd_value", f"ra, dec = {record['ra']}, {record['dec']} out of range")
    if record["band"] not in BANDS:
        return Rejected("absurd_value", f"band {record['band']!r} is not one of ugrizy")
    return None


def magnitudes(flux: np.ndarray, flux_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mag, mag_err) float32 from scienceFlux/scienceFluxErr in nJy (the replay's inverse)."""
    mag, err = njy_to_mag(flux, flux_err)
    return mag.astype(np.float32), err.astype(np.float32)


def magnitudes_ok(mag: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Where :func:`check_magnitudes` finds nothing wrong (as an array, for many points)."""
    return (mag >= MAG_RANGE[0]) & (mag <= MAG_RANGE[1]) & (err > 0) & (err <= MAX_MAG_ERR)


def check_magnitudes(mag: np.ndarray, err: np.ndarray) -> list[Optional[Rejected]]:
    """Range checks on the float32 magnitudes the model will see."""
    bad_mag = ~((mag >= MAG_RANGE[0]) & (mag <= MAG_RANGE[1]))
    bad_err = ~((err > 0) & (err <= MAX_MAG_ERR))
    out: list[Optional[Rejected]] = [None] * len(mag)
    for i in np.flatnonzero(bad_mag | bad_err):
        if bad_mag[i]:
            out[i] = Rejected("absurd_value", f"magnitude {mag[i]} outside {MAG_RANGE}")
        else:
            out[i] = Rejected("absurd_value", f"magnitude error {err[i]} outside (0, {MAX_MAG_ERR}]")
    return out


def _history_rows(hist, before: float) -> tuple[list, dict]:
    """The usable history points (diaSourceId, time, band, flux, flux error, forced), oldest
    first, strictly before the alert's own time; and what was left out, by reason. A point
    without a ``forced`` key (our compact alert's history) is a detection."""
    rows, skipped = [], {}
    for p in hist:
        f, e, t = p["scienceFlux"], p["scienceFluxErr"], p["midpointMjdTai"]
        why = None
        if f is None or e is None:
            why = "no_flux"
        elif not (math.isfinite(f) and math.isfinite(e) and math.isfinite(t)) or e <= 0 \
                or p["diaSourceId"] < 0 or p.get("band") not in BANDS:
            why = "bad_value"
        elif f <= 0:
            why = "nonpositive_flux"
        elif not t < before:
            why = "not_before_the_alert"
        if why is None:
            rows.append((p["diaSourceId"], t, p["band"], f, e, bool(p.get("forced", False))))
        else:
            skipped[why] = skipped.get(why, 0) + 1
    rows.sort(key=lambda r: r[1])
    return rows, skipped


@dataclass
class Batch:
    """A validated poll batch: its points (history first, then the alert's own point, per
    message in message order), each point's message index, the rejected messages and the
    history points left out (by reason)."""
    points: Points
    kept: list
    rejected: dict
    history_skipped: dict

    def __iter__(self):                 # (points, kept, rejected), as before history
        return iter((self.points, self.kept, self.rejected))


# A batch's Rubin packets of one schema id are decoded in one block (broker.rubin_columns)
# from this many on; fewer go message by message (the block's fixed cost, about a
# millisecond, is worth it from a handful of 8 KB packets on).
BLOCK_MIN_MESSAGES = 4


def _rubin_groups(codec, values: list) -> dict:
    """{schema id: [message index]} of the well-framed messages whose schema is a known
    Rubin packet (kind ``rubin``); the frames are looked at, nothing is decoded."""
    from schemas import HEADER, MAGIC

    groups: dict = {}
    for i, v in enumerate(values):
        if v is None or len(v) < HEADER.size:
            continue
        magic, sid = HEADER.unpack_from(v)
        if magic == MAGIC and codec.known(sid) and codec.kind_of(sid) == "rubin":
            groups.setdefault(sid, []).append(i)
    return {sid: m for sid, m in groups.items() if len(m) >= BLOCK_MIN_MESSAGES}


def _block_columns(codec, values: list, keys: list, max_mjd, rejected: dict) -> tuple[list, set]:
    """The Rubin packets that decode in blocks: ([AlertColumns], their message indices).
    A group whose block does not decode (a bad body among them) is left to the
    message-by-message path, which gives each bad message its reason."""
    from broker import rubin_columns as rc
    from schemas import HEADER

    out, done = [], set()
    for sid, members in _rubin_groups(codec, values).items():
        reader = codec.block_reader(sid, rc.COLUMNS)
        df = None if reader is None else reader.read([values[i][HEADER.size:] for i in members])
        if df is None:
            continue
        rej: dict = {}
        try:
            cols = rc.read_packets(df, members, [keys[i] for i in members], max_mjd, check_record, rej)
        except Exception as exc:   # never lose a batch to this path: the other one reads it
            log.warning("Rubin packets of schema id %d read one by one: %s: %s", sid, type(exc).__name__, exc)
            continue
        rejected.update(rej)
        out.append(cols)
        done.update(members)
    return out, done


def _record_columns(recs: list, idx: list):
    """AlertColumns of decoded, checked alert records (compact alerts and Rubin packets
    read one by one), with their history (``_history_rows``)."""
    from broker.rubin_columns import AlertColumns

    n = len(recs)

    def col(name, dtype):
        return np.fromiter((r[name] for r in recs), dtype=dtype, count=n)

    owner, hid, ht, hb, hf, he, hforced = [], [], [], [], [], [], []
    s_owner, s_reason = [], []
    for j, r in enumerate(recs):
        hist = r.get("prvDiaSources")
        if hist:
            rows, why = _history_rows(hist, float(r["midpointMjdTai"]))
            for k, v in why.items():
                s_owner += [j] * v
                s_reason += [HISTORY_SKIPS.index(k)] * v
            for r_ in rows:
                owner.append(j)
                hid.append(r_[0])
                ht.append(r_[1])
                hb.append(r_[2])
                hf.append(r_[3])
                he.append(r_[4])
                hforced.append(r_[5])
    return AlertColumns(np.asarray(idx, np.int64), col("diaObjectId", np.int64), col("diaSourceId", np.int64),
                        col("midpointMjdTai", np.float64), col("scienceFlux", np.float64),
                        col("scienceFluxErr", np.float64), col("alertProducedUs", np.int64),
                        st.band_codes(r["band"] for r in recs), col("ra", np.float64), col("dec", np.float64),
                        np.asarray(owner, np.int64), np.asarray(hid, np.int64), np.asarray(ht, np.float64),
                        st.band_codes(hb, hforced), np.asarray(hf, np.float64), np.asarray(he, np.float64),
                        any(r.get("prvDiaSources") for r in recs), np.asarray(s_owner, np.int64),
                        np.asarray(s_reason, np.int64))


def validate_batch(codec, values: list, keys: list, max_mjd: Optional[float] = None,
                   timestamps_us=None) -> Batch:
    """Decode and check a batch: its points, their message indices, {message index: Rejected}.

    ``max_mjd``: the latest time accepted (``mjd_now() + margin``), None for no bound.
    ``timestamps_us``: each message's Kafka timestamp (µs), the production time of an
    alert that carries none (Rubin's packet): a list, or a function of the message index
    (asked only for such alerts, so a compact stream costs no call). Any error while reading one message rejects
    that message (``unreadable``), never the batch. Rubin packets are read in blocks
    where they can be (:func:`_block_columns`), with the same checks and reasons."""
    from broker.rubin_columns import concatenate

    rejected: dict[int, Rejected] = {}
    skipped: dict[str, int] = {}
    parts, done = _block_columns(codec, values, keys, max_mjd, rejected)
    recs, idx = [], []
    for i, (v, k) in enumerate(zip(values, keys)):
        if i in done:
            continue
        try:
            rec = decode(codec, v)
            if isinstance(rec, Rejected):
                rejected[i] = rec
                continue
            bad = check_record(rec, k, max_mjd)
        except Exception as exc:  # a poison pill must not stop the consumer on every restart
            rejected[i] = Rejected("unreadable", f"{type(exc).__name__}: {exc}")
            continue
        if bad is not None:
            rejected[i] = bad
            continue
        recs.append(rec)
        idx.append(i)
    if recs:
        parts.append(_record_columns(recs, idx))
    a = concatenate(parts)
    if a is None:
        return Batch(Points.empty(), [], rejected, skipped)
    n = len(a.idx)
    with np.errstate(all="ignore"):
        mag, err = magnitudes(a.flux, a.flux_err)
    checks = check_magnitudes(mag, err)
    produced = a.produced_us
    missing = np.flatnonzero(produced <= 0)
    if timestamps_us is not None and len(missing):
        stamp = timestamps_us if callable(timestamps_us) else timestamps_us.__getitem__
        produced[missing] = np.maximum([stamp(int(a.idx[j])) for j in missing], 0)
    good = np.array([c is None for c in checks], dtype=bool)
    for j in np.flatnonzero(~good):
        rejected[int(a.idx[j])] = checks[j]
    # the history left out of the alerts whose own point is good (the others' is not counted)
    for r, k in zip(*np.unique(a.s_reason[good[a.s_owner]], return_counts=True)):
        skipped[HISTORY_SKIPS[r]] = skipped.get(HISTORY_SKIPS[r], 0) + int(k)
    if not a.any_history:
        # no alert carries history (the usual compact stream): the alerts' own points
        ok = np.flatnonzero(good)
        pts = Points(a.object_id[ok], a.source_id[ok], a.time[ok], mag[ok], err[ok], produced[ok],
                     a.band[ok], a.ra[ok], a.dec[ok], None)
        return Batch(pts, a.idx[ok].tolist(), rejected, skipped)
    h_keep = good[a.h_owner]
    h_owner = a.h_owner[h_keep]
    with np.errstate(all="ignore"):
        hmag, herr = magnitudes(a.h_flux[h_keep], a.h_err[h_keep])
    usable = magnitudes_ok(hmag, herr)
    if not usable.all():
        skipped["bad_value"] = skipped.get("bad_value", 0) + int((~usable).sum())
    # one pool of points, the alerts' own (rows 0 .. n-1) then the history (n ..), put in
    # order by alert, its history (in its own order) before its own point
    owner = h_owner[usable]
    own = np.flatnonzero(good)
    al = np.concatenate([owner, own])                               # each point's alert row
    pool_row = np.concatenate([n + np.flatnonzero(usable), own])
    is_live = np.concatenate([np.zeros(len(owner), bool), np.ones(len(own), bool)])
    order = np.lexsort((np.arange(len(al)), is_live, al))
    al, pool_row, is_live = al[order], pool_row[order], is_live[order]

    def pooled(live_col, hist_col):
        return np.concatenate([live_col, np.asarray(hist_col, dtype=live_col.dtype)])[pool_row]

    pts = Points(a.object_id[al], pooled(a.source_id, a.h_id[h_keep]), pooled(a.time, a.h_time[h_keep]),
                 pooled(mag, hmag), pooled(err, herr), produced[al],
                 pooled(a.band, a.h_band[h_keep]), a.ra[al], a.dec[al],
                 np.where(is_live, st.KIND_LIVE, st.KIND_HISTORY).astype(np.uint8))
    return Batch(pts, a.idx[al].tolist(), rejected, skipped)


def append_outcomes(statuses: bytes, rows, points: Points, kept: list[int]
                    ) -> tuple[int, int, list[tuple[int, Rejected]], int]:
    """What the append script's status codes for one event's points mean: (appended,
    duplicates, [(message index, Rejected)], history points the event had already).
    ``rows``: the points' rows in ``points``. Only an alert's own point can make a dead
    letter: a history point that is not appended is history the state has (or a visit it
    holds differently, which the alert that brought it had the chance to say)."""
    if statuses == st.APPENDED * len(rows):
        return len(rows), 0, [], 0
    codes = np.frombuffer(statuses, dtype=np.uint8)
    appended = codes == st.APPENDED[0]
    rows = np.asarray(rows)
    history = np.zeros(len(codes), bool) if points.kind is None else points.kind[rows] == st.KIND_HISTORY
    other = ~appended & ~history
    dup = other & ((codes == st.DUPLICATE[0]) | (codes == st.DUPLICATE_UNVERIFIED[0]))
    dead = []
    for k in np.flatnonzero(other & ~dup).tolist():      # rare: dead letters
        code, i = bytes([codes[k]]), int(rows[k])
        if code == st.OUT_OF_ORDER:
            dead.append((kept[i], Rejected(
                "out_of_order", f"midpointMjdTai {points.time[i]} is earlier than the event's "
                "newest point and matches no stored point")))
        elif code == st.CONFLICT:
            dead.append((kept[i], Rejected(
                "duplicate_time", f"midpointMjdTai {points.time[i]} is the time of a stored point "
                f"with another diaSourceId than {points.source_id[i]}")))
        elif code == st.CHANGED:
            dead.append((kept[i], Rejected(
                "changed_resend", f"diaSourceId {points.source_id[i]} is stored with another time, "
                "magnitude, error or band (re-sent with changed content)")))
        else:
            raise ValueError(f"unknown append status {code!r}")
    return (int(np.count_nonzero(appended)), int(np.count_nonzero(dup)), dead,
            int(np.count_nonzero(~appended & history)))


_HEADERS = operator.methodcaller("headers")


def message_headers(msg) -> tuple[list, Optional[str]]:
    """A Kafka message's headers, or ([], why) when they cannot be read.

    A header name that is not UTF-8 makes confluent-kafka's ``headers()`` return a list
    holding a NULL with a UnicodeDecodeError set. Called from C (``methodcaller``), CPython
    turns that into a SystemError; called as ``msg.headers()`` from Python, a call site
    that the interpreter has specialised (3.11+, after a few calls) skips that check and
    returns the broken list, whose use crashes the process. The list also stays cached in
    the message: call this once per message (the consumer keeps the answer per batch)."""
    try:
        return list(_HEADERS(msg) or []), None
    except Exception as exc:
        return [], f"{type(exc).__name__}: {exc}"


# A dead letter must fit the producer's message.max.bytes (librdkafka's default 1,000,000)
# and the topic's max.message.bytes (Kafka's default 1 MiB), whatever the source topic
# accepted: one that does not fit would fail its delivery, the batch would never commit
# and the consumer would stop at the same message on every restart (a poison pill).
# Bigger keys and values are cut to a prefix; headers say how long the original was and
# give its SHA-256 (the original stays at dlq.source.topic/partition/offset until retention).
DEAD_LETTER_MAX_BYTES = 512 * 1024        # key + value + headers
DEAD_LETTER_MAX_KEY = 1024
DEAD_LETTER_MAX_HEADERS = 64 * 1024       # original headers beyond this are left out (counted)


@dataclass(frozen=True)
class DeadLetter:
    key: Optional[bytes]
    value: Optional[bytes]
    headers: list


def dead_letter(key: Optional[bytes], value: Optional[bytes], original_headers, reason: str,
                detail: str, topic: str, partition: int, offset: int, group: str,
                headers_error: Optional[str] = None) -> DeadLetter:
    """The dead-letter record of a rejected message: the original key, value and headers
    (cut to fit :data:`DEAD_LETTER_MAX_BYTES`) plus where it came from and why;
    ``headers_error`` says why the original headers could not be read (then left out)."""
    ours = [("dlq.reason", reason.encode()), ("dlq.detail", detail[:1000].encode()),
            ("dlq.source.topic", topic.encode()), ("dlq.source.partition", str(partition).encode()),
            ("dlq.source.offset", str(offset).encode()), ("dlq.consumer.group", group.encode())]
    if headers_error is not None:
        ours.append(("dlq.headers.unreadable", headers_error[:500].encode()))
    kept, size = [], 0
    original = list(original_headers or [])
    for name, val in original:
        n = len(name) + len(val or b"")
        if size + n > DEAD_LETTER_MAX_HEADERS:
            break
        kept.append((name, val))
        size += n
    if len(kept) < len(original):
        ours.append(("dlq.headers.dropped", str(len(original) - len(kept)).encode()))
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY:
        ours += [("dlq.key.truncated", str(len(key)).encode()),
                 ("dlq.key.sha256", hashlib.sha256(key).hexdigest().encode())]
        key = key[:DEAD_LETTER_MAX_KEY]
    # the value gets what is left after the key and every header (ours include the two below)
    room = DEAD_LETTER_MAX_BYTES - len(key or b"") - size - 200 - \
        sum(len(n) + len(v) for n, v in ours)
    if value is not None and len(value) > room:
        ours += [("dlq.value.truncated", str(len(value)).encode()),
                 ("dlq.value.sha256", hashlib.sha256(value).hexdigest().encode())]
        value = value[:room]
    return DeadLetter(key, value, kept + ours)
