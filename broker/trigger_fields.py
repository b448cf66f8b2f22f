"""What a trigger (schema ``trigger`` v2) tells a follow-up team beyond the decision:
where the event is, the deciding point, the bands seen, the causal PSPL estimate and a
summary line. Pure functions, no I/O.

PSPL estimate (point-source point-lens, Paczynski 1986, ApJ 304, 1; formulas in
``training.pspl``). Causal: only the event's stored points up to the deciding one.

* tdcnn trigger: :func:`fit_estimate`, the multi-band weighted least-squares fit in flux
  (``training.pspl.fit_pspl_bands``: one (t0, u0, tE), a source and a blend flux per
  band), run once when the trigger fires (triggers are rare; its cost is in
  docs/BENCHMARKS_HISTORY.md, "Trigger PSPL estimate").
* pspl-fit trigger: the rule's own robust fit at the deciding point
  (:func:`params_from_fit_state`), evaluated by :func:`estimate_at` like the fit above.

Both then go through :func:`estimate_at`: at the given (t0, u0, tE) each band's source
and blend fluxes are solved in closed form (``training.pspl.fluxes``: F_s >= 0, F_b free,
weights 1/sigma_F^2), which gives the predicted peak magnitude in the deciding band,
-2.5 log10(F_s A(u0) + F_b), and chi^2 per degree of freedom (n - 3 - 2 nBands) over the
points: the trigger's anomaly statistic ``psplChi2Dof``.

A fit that fails (fewer than 4 points, an error, a non-finite result) gives None: the
trigger's estimate fields are then null and its summary says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from broker.state.layout import band_name, band_of
from training import pspl
from training.photometry import K_MAG
from training.pspl import MIN_FIT_POINTS


@dataclass(frozen=True)
class PsplEstimate:
    """The PSPL estimate of an event at trigger time (trigger fields t0 .. psplChi2Dof)."""
    t0: float                         # MJD (TAI)
    u0: float                         # Einstein radii
    tE: float                         # days
    peak_mag: Optional[float]         # in the deciding band; None: the band cannot say
    chi2_dof: Optional[float]         # None: no degree of freedom left

    @property
    def peak_mjd(self) -> float:
        return self.t0                # a PSPL peaks at closest approach


def _curve(recs):
    """(t, flux, flux error, dense band index, reference magnitude) of RECORD points, the
    flux relative to the reference, their median magnitude (any unit does: the model is
    linear in the fluxes)."""
    t = np.asarray(recs["t"], dtype=np.float64)
    m = np.asarray(recs["mag"], dtype=np.float64)
    e = np.asarray(recs["err"], dtype=np.float64)
    _, dense = np.unique(band_of(recs["band"]), return_inverse=True)   # a band's forced points too
    m_ref = float(np.median(m))
    F = np.power(10.0, -0.4 * (m - m_ref))
    return t, F, K_MAG * e * F, dense.ravel(), m_ref


def estimate_at(recs, t0: float, u0: float, tE: float) -> Optional[PsplEstimate]:
    """The estimate of the PSPL (t0, u0, tE) over RECORD points ``recs`` (oldest first,
    the deciding point last): per-band closed-form fluxes, peak magnitude in the deciding
    band, chi^2 per degree of freedom. None when the parameters are not finite."""
    if not (math.isfinite(t0) and math.isfinite(u0) and math.isfinite(tE) and u0 > 0 and tE > 0):
        return None
    if len(recs) == 0:
        return None
    t, F, sF, band, m_ref = _curve(recs)
    ok = np.isfinite(F) & np.isfinite(sF) & (sF > 0)
    if not ok.all():
        t, F, sF, band = t[ok], F[ok], sF[ok], band[ok]
    if len(t) == 0:
        return None
    A = pspl.magnification(t, t0, u0, tE)
    A0 = float(pspl.magnification_u(np.array([u0]))[0])
    w = 1.0 / (sF * sF)
    chi2 = 0.0
    peak = None
    bands = np.unique(band)
    last = band[-1]
    for b in bands:
        k = band == b
        wk, Ak, Fk = w[k], A[k], F[k]
        if k.sum() < 2:         # one point: the flux fits it exactly, says nothing of the peak
            continue
        a, bl, c = pspl.fluxes(np.array(wk.sum()), np.array(wk @ Ak), np.array(wk @ (Ak * Ak)),
                               np.array(wk @ Fk), np.array(wk @ (Ak * Fk)), np.array(wk @ (Fk * Fk)))
        a, bl = float(a), float(bl)
        chi2 += float(np.sum(wk * np.square(Fk - (a * Ak + bl))))
        if b == last:
            f_peak = a * A0 + bl
            if f_peak > 0 and math.isfinite(f_peak):
                peak = m_ref - 2.5 * math.log10(f_peak)
    dof = len(t) - 3 - 2 * len(bands)
    chi2_dof = chi2 / dof if dof > 0 and math.isfinite(chi2) else None
    return PsplEstimate(float(t0), float(u0), float(tE), peak, chi2_dof)


def fit_estimate(recs) -> Optional[PsplEstimate]:
    """Fit a PSPL to RECORD points ``recs`` (the event's stored points up to the deciding
    one, oldest first) with ``training.pspl.fit_pspl_bands``; None when it fails."""
    if len(recs) < MIN_FIT_POINTS:
        return None
    try:
        t, F, sF, band, _ = _curve(recs)
        with np.errstate(all="ignore"):
            fit = pspl.fit_pspl_bands(t, F, sF, band)
            return estimate_at(recs, fit.t0, fit.u0, fit.tE)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError):
        return None


def params_from_fit_state(state) -> Optional[tuple[float, float, float]]:
    """(t0 MJD, u0, tE) of a pspl-fit rule state (``training.psplfit.STATE``), None when it
    holds no fit. The rule works in time relative to its ``t_ref`` and in ln u0, ln tE.
    These are shared by the bands; the state's per-band fluxes (relative to each band's
    own reference) are not reported: :func:`estimate_at` solves every band's fluxes at
    these parameters, so the peak magnitude is in the deciding point's band."""
    from training import psplfit

    if not int(state["flags"]) & psplfit.HAS_FIT:
        return None
    t0 = float(state["t0"]) + float(state["t_ref"])
    return t0, math.exp(float(state["lu0"])), math.exp(float(state["lte"]))


def coordinates(points, mine, source_id: int) -> tuple[Optional[float], Optional[float]]:
    """(ra, dec) of the deciding alert when it is among the batch's rows ``mine`` of the
    event, else of the event's last row in the batch; (None, None) without a row."""
    rows = list(mine)
    if not rows:
        return None, None
    pick = rows[-1]
    for i in rows:
        if int(points.source_id[i]) == source_id:
            pick = i
            break
    ra, dec = float(points.ra[pick]), float(points.dec[pick])
    return (ra if math.isfinite(ra) else None), (dec if math.isfinite(dec) else None)


def n_bands(recs) -> int:
    return int(len(np.unique(band_of(recs["band"])))) if len(recs) else 0


# ------------------------------------------------------------------------- the record
def v2_fields(*, ra, dec, record, recs, estimate: Optional[PsplEstimate]) -> dict:
    """The fields added in v2 (but ``summary``) from the deciding stored ``record`` and
    the event's stored points ``recs`` up to it."""
    e = estimate
    return {"ra": ra, "dec": dec, "band": band_name(record["band"]),
            "mag": _finite(record["mag"]), "magErr": _finite(record["err"]),
            "nBands": n_bands(recs) if recs is not None else None,
            "t0": None if e is None else e.t0, "u0": None if e is None else e.u0,
            "tE": None if e is None else e.tE, "peakMjdTai": None if e is None else e.peak_mjd,
            "peakMag": None if e is None else e.peak_mag,
            "psplChi2Dof": None if e is None else e.chi2_dof}


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def summary_line(rec: dict) -> str:
    """The trigger's one line (``summary``), from its other fields (v1 or v2)."""
    g = rec.get
    where = (f"at RA {g('ra'):.5f} Dec {g('dec'):+.5f}" if g("ra") is not None and g("dec") is not None
             else "at unknown position")
    band = g("band") or "?"
    point = f", {band}={g('mag'):.2f}" if g("mag") is not None else ""
    rule = g("rule")
    stat, fmt = {"tdcnn": ("P", ".3f"), "pspl-fit": ("D", ".1f")}.get(rule, (f"{rule} statistic", ".3f"))
    nb = g("nBands")
    bands = "" if nb is None else f" in {nb} band{'s' if nb != 1 else ''}"
    decision = (f"({stat}={g('probability'):{fmt}} >= {g('threshold'):{fmt}} after {g('nPoints')} "
                f"points{bands})")
    if g("t0") is not None:
        fit = f"PSPL fit t0={g('t0'):.1f} u0={g('u0'):.3f} tE={g('tE'):.1f} d"
        if g("peakMag") is not None:
            fit += f", peak {band}={g('peakMag'):.1f} at MJD {g('peakMjdTai'):.1f}"
        else:
            fit += f", peak at MJD {g('peakMjdTai'):.1f}"
        if g("psplChi2Dof") is not None:
            fit += f", chi2/dof {g('psplChi2Dof'):.2f}"
    elif "t0" in rec:
        fit = "PSPL fit failed"
    else:
        fit = "no PSPL estimate"
    return f"binary candidate {g('diaObjectId')} {where}{point} {decision}; {fit}"


@lru_cache(maxsize=1)
def _v2_defaults() -> dict:
    import schemas

    sid = schemas.default_codec().schema_id("trigger")
    return {f["name"]: f["default"] for f in schemas.load_schema_json(sid)["fields"] if "default" in f}


def as_latest(rec: dict) -> dict:
    """A trigger record for the latest schema: a v1 record (an outbox entry written before
    the upgrade) gets the new fields as their defaults (null) and a summary from what it
    has; a v2 record is returned as it is (a missing summary is made)."""
    out = {**_v2_defaults(), **rec}
    if not out.get("summary"):
        out["summary"] = summary_line(rec)
    return out
