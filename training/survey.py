"""Survey profiles: when a field is observed, in which band, how deep, and what a visit
measures. Profiles are data (``training/surveys/<name>.yaml``), validated as strictly as
the configuration (``config.build``: an unknown key or a value out of range is an error
that names it and the file). ``training.simulate`` draws every event through one.

Three kinds of schedule:

* ``grid`` (profile ``thesis``): 1,500 epochs evenly spaced over 1,000 days, each dropped
  with a probability, one band, a constant magnitude error: the thesis' survey, simulated
  by ``training.simulate`` exactly as before (the same seed gives the same bits).
* ``nightly`` (profile ``lsst``): Rubin over a Galactic-bulge field. A yearly observing
  season; inside it a field is scheduled every few nights, a scheduled night is lost to
  weather or downtime with a probability, and an observed night gives a pair of visits
  about half an hour apart in two filters (or one visit). Each visit's 5-sigma depth is
  the band's median plus a per-visit scatter. Errors follow the LSST overview paper.
* ``continuous`` (profile ``roman``): Roman's Galactic Bulge Time Domain Survey: seasons of
  ~72 days with a visit every few minutes in the wide filter and a colour visit every
  few hours. Errors from photon counts (source and background) in a photometry aperture.

What a visit measures (``observe``), for every kind but ``grid``: the magnification A(t) is
achromatic; the source and blend fluxes differ per band (their colours differ), so the
source fraction differs between bands, as in crowded fields. ``scienceFlux`` is the total
flux on the visit image, ``psfFlux`` the difference-image flux: the visit's flux minus a
template built from baseline visits, whose own noise enters every difference of that band
(one draw per event and band) and its error. A visit is an alert (a DIASource) when
``|psfFlux| / psfFluxErr >= detection_snr`` (5); every visit has forced photometry
(Rubin's ``prvDiaForcedSources``). Fluxes are in nJy (AB: m = 31.4 - 2.5 log10 F).

Sources (cited where each number is used, in the profile files and below):

* Ivezic et al. 2019, ApJ 873, 111 (arXiv:0805.2366), "LSST: from science drivers to
  reference design", Sec. 3.2.1 and Table 2: the random error
  ``sigma_rand^2 = (0.04 - gamma) x + gamma x^2``, ``x = 10^(0.4 (m - m5))``, gamma per
  band; the systematic floor 0.005 mag; median single-visit depths.
* Bianco, Jones & Ivezic 2022, PSTN-054, simulated median depths in baseline_v2.0.
* PSTN-056 (Rubin's Survey Cadence Optimization Committee, phase 3): no rolling cadence in
  the bulge and plane, visits in pairs ~33 min apart in two filters, the allowed filter
  pairs (``PAIRS``), a filter mix bluer than the main survey (rubin_scheduler's v4
  footprint weights); PSTN-051 (Jones et al. 2021): 29.8% weather downtime, ~10%
  engineering time.
* Penny et al. 2019, ApJS 241, 3 (arXiv:1808.02490): the Roman bulge survey (15-minute
  cadence in W149/F146, 46.8 s exposures, six 72-day seasons, a colour visit every 12 h),
  its zero point and background; crowded-field precision matched to the GULLS
  simulations' medians (0.008 mag at 20.5, 0.036 at 22.5, 0.19 at 24.5).
* Colours: the main-sequence stellar locus in SDSS colours (Covey et al. 2007, AJ 134,
  2398), extinction ratios A_band / E(B-V) for R_V = 3.1 (Schlafly & Finkbeiner 2011,
  ApJ 737, 103, Table 6), source colours of bulge dwarfs and turn-off stars
  ((V-I)_0 0.6-0.9, Bensby et al. 2013) and of the red clump ((V-I)_0 = 1.06), converted
  with Jordi et al. 2006 (A&A 460, 339): V - I = 0.675 (g - i) + 0.364.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

import config as cfg
from training.photometry import AB_ZEROPOINT_NJY, mag_to_njy

# Band codes, shared by the dataset and the broker's state: ugrizy keep codes 0..5.
BAND_NAMES = ("u", "g", "r", "i", "z", "y", "F062", "F087", "F106", "F129", "F146", "F158",
              "F184", "F213")
BAND_CODE = {b: i for i, b in enumerate(BAND_NAMES)}
KINDS = ("grid", "nightly", "continuous")
MAG_PER_FRACTION = 2.5 / math.log(10.0)   # 1.0857: magnitude error of a fractional flux error

# The filter pairs Rubin's scheduler takes in one night (PSTN-056; u+g/r, g+u/r, ...).
PAIRS = {"u": ("g", "r"), "g": ("u", "r"), "r": ("u", "g", "i"), "i": ("r", "z"),
         "z": ("i", "y"), "y": ("z", "y")}

# Main-sequence stellar locus, colours relative to i as a function of (g - i), read off
# Covey et al. 2007 (their Table 3 and Fig. 5; SDSS ugriz, good to ~0.1 mag), y from
# z - y of the same stars in Pan-STARRS (~0.3 (i - z)). Roman's bands are taken as the
# nearest of these: F087 as z, F146 (0.93-2.0 um) as y (no colours beyond 1 um here; a
# documented simplification: it sets how the source fraction in F146 differs from i).
LOCUS_GI = np.array([0.2, 0.6, 1.0, 1.4, 1.8, 2.2, 2.8])
LOCUS = {   # m_band - m_i
    "u": LOCUS_GI + np.array([0.90, 1.20, 1.60, 2.20, 2.50, 2.60, 2.60]),
    "g": LOCUS_GI,
    "r": np.array([0.03, 0.14, 0.27, 0.40, 0.58, 0.85, 1.35]),
    "i": np.zeros(7),
    "z": -np.array([0.00, 0.04, 0.12, 0.20, 0.30, 0.45, 0.70]),
    "y": -np.array([0.00, 0.05, 0.16, 0.26, 0.39, 0.59, 0.91]),
}
LOCUS["F087"] = LOCUS["z"]
LOCUS["F146"] = LOCUS["y"]
# A_band / A_i (Schlafly & Finkbeiner 2011, Table 6, R_V = 3.1: SDSS ugriz, PS1 y; F087 as
# z; F146 ~ 1.4 um, A_H/A_I ~ 0.35 for the bulge's steep near-infrared law, Nishiyama et
# al. 2009: approximate)
EXTINCTION_RATIO = {"u": 2.496, "g": 1.945, "r": 1.346, "i": 1.0, "z": 0.744, "y": 0.633,
                    "F087": 0.744, "F146": 0.35}


class SurveyError(ValueError):
    """A survey profile that does not exist or does not make sense (the message names it)."""


def rng_field(default, lo=None, hi=None, choices=None):
    return field(default=default, metadata=cfg.rng(lo, hi, choices))


@dataclass(frozen=True)
class Band:
    """One band of a profile."""
    weight: float = rng_field(1.0, 0.0, 1.0)          # share of (first) visits in this band
    m5: float = rng_field(24.0, 10.0, 35.0)           # nightly: median single-visit 5-sigma depth
    m5_scatter: float = rng_field(0.0, 0.0, 3.0)      # nightly: per-visit sd of the depth (mag)
    gamma: float = rng_field(0.039, 0.0, 0.04)        # nightly: Ivezic 2019 Table 2
    zeropoint: float = rng_field(0.0, 0.0, 40.0)      # continuous: AB mag of 1 e-/s
    exposure_s: float = rng_field(0.0, 0.0, 3600.0)   # continuous
    background_e2: float = rng_field(0.0, 0.0, 1e9)   # continuous: background variance in the aperture


@dataclass(frozen=True)
class Profile:
    """A survey; what each field means is in training/surveys/lsst.yaml."""
    name: str = "unnamed"
    kind: str = rng_field("grid", choices=KINDS)
    description: str = ""
    duration_days: float = rng_field(1000.0, 1.0, 20_000.0)
    reference_band: str = "i"
    bands: dict[str, Band] = field(default_factory=dict)
    sys_floor_mag: float = rng_field(0.005, 0.0, 0.1)
    crowding_mag: float = rng_field(0.0, 0.0, 5.0)      # nightly: every depth shallower by this
    detection_snr: float = rng_field(5.0, 0.0, 100.0)
    template_visits: int = rng_field(12, 1, 10_000)
    # grid (thesis)
    grid_epochs: int = rng_field(1500, 10, 1_000_000)
    grid_mask_prob: float = rng_field(0.2, 0.0, 0.99)
    grid_mag_err: float = rng_field(0.05, 1e-4, 5.0)
    # nightly (Rubin)
    season_start_day: float = rng_field(0.0, 0.0, 366.0)   # day of the year the season opens
    season_days: float = rng_field(365.0, 1.0, 366.0)
    revisit_min_nights: int = rng_field(1, 1, 365)
    revisit_max_nights: int = rng_field(1, 1, 365)
    night_loss: float = rng_field(0.0, 0.0, 0.99)          # scheduled nights lost (weather, downtime)
    pair_prob: float = rng_field(1.0, 0.0, 1.0)            # observed nights with a second visit
    pair_gap_min: float = rng_field(33.0, 0.0, 600.0)
    night_span_h: float = rng_field(2.0, 0.0, 12.0)        # first visit within +- this of the night's middle
    # continuous (Roman)
    season_starts: str = ""                  # days of day 0 each season opens, comma-separated
    cadence_min: float = rng_field(15.0, 0.1, 10_000.0)
    colour_band: str = ""
    colour_every_h: float = rng_field(12.0, 0.1, 1000.0)
    event_window_te: float = rng_field(6.0, 0.1, 1000.0)   # visits kept within +- this many tE of t0
    event_window_min_days: float = rng_field(30.0, 0.0, 10_000.0)
    event_window_max_days: float = rng_field(200.0, 0.0, 10_000.0)
    # event colours and extinction (every kind but grid)
    source_gi_min: float = rng_field(0.4, -1.0, 5.0)       # intrinsic (g - i) of the source
    source_gi_max: float = rng_field(1.2, -1.0, 5.0)
    blend_gi_min: float = rng_field(0.3, -1.0, 5.0)
    blend_gi_max: float = rng_field(2.8, -1.0, 5.0)
    extinction_min: float = rng_field(0.5, 0.0, 20.0)      # A in the reference band's i-equivalent
    extinction_max: float = rng_field(2.5, 0.0, 20.0)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if self.kind == "grid":
            return
        if not self.bands:
            raise SurveyError(f"survey {self.name}: no bands")
        bad = [b for b in self.bands if b not in BAND_CODE]
        if bad:
            raise SurveyError(f"survey {self.name}: unknown band {bad[0]!r} (known: {', '.join(BAND_NAMES)})")
        if self.reference_band not in self.bands:
            raise SurveyError(f"survey {self.name}: reference_band {self.reference_band!r} is not one of its bands")
        if sum(b.weight for b in self.bands.values()) <= 0:
            raise SurveyError(f"survey {self.name}: the band weights sum to 0")
        for b in self.bands:
            if b not in LOCUS or b not in EXTINCTION_RATIO:
                raise SurveyError(f"survey {self.name}: band {b} has no colour model (training.survey.LOCUS)")
        if self.kind == "nightly":
            if self.revisit_min_nights > self.revisit_max_nights:
                raise SurveyError(f"survey {self.name}: revisit_min_nights > revisit_max_nights")
            missing = [b for b in self.bands if b not in PAIRS]
            if missing:
                raise SurveyError(f"survey {self.name}: band {missing[0]} has no filter pair (PAIRS)")
        if self.kind == "continuous":
            starts = self.starts()
            if not starts:
                raise SurveyError(f"survey {self.name}: season_starts is empty")
            if self.colour_band and self.colour_band not in self.bands:
                raise SurveyError(f"survey {self.name}: colour_band {self.colour_band!r} is not one of its bands")
            for name, b in self.bands.items():
                if not (b.zeropoint > 0 and b.exposure_s > 0):
                    raise SurveyError(f"survey {self.name}: band {name} needs zeropoint and exposure_s")
        for lo, hi in (("source_gi_min", "source_gi_max"), ("blend_gi_min", "blend_gi_max"),
                       ("extinction_min", "extinction_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise SurveyError(f"survey {self.name}: {lo} > {hi}")

    def starts(self) -> list[float]:
        try:
            return [float(x) for x in self.season_starts.split(",") if x.strip()]
        except ValueError:
            raise SurveyError(f"survey {self.name}: season_starts must be numbers separated by commas, "
                              f"got {self.season_starts!r}") from None

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(self.bands) if self.kind != "grid" else ("i",)

    def describe(self) -> dict:
        """JSON-ready, for the dataset's metadata."""
        from dataclasses import asdict
        return asdict(self)


PROFILE_DIR = "surveys"


def profile_names() -> list[str]:
    d = resources.files("training").joinpath(PROFILE_DIR)
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


@lru_cache(maxsize=None)
def load_profile(name_or_path: str) -> Profile:
    """A profile by name (``training/surveys/<name>.yaml``) or from a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        path = p
    else:
        path = Path(str(resources.files("training").joinpath(PROFILE_DIR, f"{name_or_path}.yaml")))
        if not path.exists():
            raise SurveyError(f"unknown survey {name_or_path!r}; choose from {', '.join(profile_names())} "
                              "or give a profile file (.yaml)")
    data = cfg.read_yaml(path)
    try:
        prof = cfg.build(Profile, data, str(path))
    except SurveyError as exc:
        raise SurveyError(f"{path}: {exc}") from None
    return prof


# --------------------------------------------------------------------------- photometry
def sigma_rand(mag, m5, gamma) -> np.ndarray:
    """Ivezic et al. 2019 eq. (5): the random photometric error (~ N/S) of a point source of
    magnitude ``mag`` in a visit of 5-sigma depth ``m5``: sqrt((0.04 - gamma) x + gamma x^2),
    x = 10^(0.4 (mag - m5)); 0.2 at mag = m5 (a 5-sigma detection)."""
    x = np.power(10.0, 0.4 * (np.asarray(mag, dtype=np.float64) - np.asarray(m5, dtype=np.float64)))
    return np.sqrt((0.04 - gamma) * x + gamma * x * x)


def lsst_flux_error(flux, m5, gamma, sys_floor_mag) -> np.ndarray:
    """1-sigma flux error (nJy) of a visit of depth ``m5`` on a source of true flux ``flux``
    (nJy): Ivezic's random error as a fractional error, ``sigma_F^2 = gamma F5^2 +
    (0.04 - gamma) F5 F`` with F5 the flux at m5, plus the systematic floor (a fraction
    ``sys_floor_mag / 1.0857`` of the flux) in quadrature."""
    f = np.asarray(flux, dtype=np.float64)
    f5 = mag_to_njy(m5)
    var = gamma * f5 * f5 + (0.04 - gamma) * f5 * np.maximum(f, 0.0)
    return np.sqrt(var + np.square(sys_floor_mag / MAG_PER_FRACTION * f))


def ccd_flux_error(flux, band: Band, sys_floor_mag) -> np.ndarray:
    """1-sigma flux error (nJy) from photon counts: the source's electrons in one exposure
    (zero point ``band.zeropoint`` = AB mag of 1 e-/s) and the background variance in the
    aperture (Penny et al. 2019), plus the systematic floor in quadrature."""
    f = np.asarray(flux, dtype=np.float64)
    e_per_njy = band.exposure_s * 10.0 ** (0.4 * (band.zeropoint - AB_ZEROPOINT_NJY))
    electrons = np.maximum(f, 0.0) * e_per_njy
    sigma = np.sqrt(electrons + band.background_e2) / e_per_njy
    return np.sqrt(sigma * sigma + np.square(sys_floor_mag / MAG_PER_FRACTION * f))


def flux_error(prof: Profile, band: str, flux, m5) -> np.ndarray:
    b = prof.bands[band]
    if prof.kind == "continuous":
        return ccd_flux_error(flux, b, prof.sys_floor_mag)
    return lsst_flux_error(flux, m5, b.gamma, prof.sys_floor_mag)


def colour_offsets(gi0: float, extinction: float, bands) -> np.ndarray:
    """m_band - m_i of a star of intrinsic (g - i) ``gi0`` behind ``extinction`` mag (A_i)."""
    return np.array([float(np.interp(gi0, LOCUS_GI, LOCUS[b])) + extinction * (EXTINCTION_RATIO[b] - 1.0)
                     for b in bands])


def band_magnitudes(prof: Profile, baseline_mag: float, fs: float, source_gi: float, blend_gi: float,
                    extinction: float) -> tuple[np.ndarray, np.ndarray]:
    """(source, blend) magnitudes per band (``prof.band_names`` order) of an event whose
    reference-band baseline (source + blend) is ``baseline_mag`` with source fraction
    ``fs`` there. fs = 1 has no blend: its magnitudes are +inf (zero flux)."""
    bands = prof.band_names
    ref = bands.index(prof.reference_band)
    f_total = mag_to_njy(baseline_mag)
    src_off = colour_offsets(source_gi, extinction, bands)
    bl_off = colour_offsets(blend_gi, extinction, bands)
    src_ref = AB_ZEROPOINT_NJY - 2.5 * math.log10(fs * f_total)
    src = src_ref + src_off - src_off[ref]
    if fs >= 1.0:
        return src, np.full(len(bands), np.inf)
    bl_ref = AB_ZEROPOINT_NJY - 2.5 * math.log10((1.0 - fs) * f_total)
    return src, bl_ref + bl_off - bl_off[ref]


# --------------------------------------------------------------------------- schedules
@dataclass
class Visits:
    time: np.ndarray        # float64 days since day 0, increasing
    band: np.ndarray        # int index into prof.band_names
    m5: np.ndarray          # float32 5-sigma depth of the visit (NaN: continuous kind)


def _nightly(prof: Profile, rng: np.random.Generator) -> Visits:
    """Rubin: per year, scheduled nights every revisit_min..max nights through the season
    (a random phase), each lost with ``night_loss``; an observed night has a visit at the
    night's middle +- ``night_span_h`` in a band drawn by weight, and with ``pair_prob`` a
    second one ``pair_gap_min`` later in a partner band (``PAIRS``, by weight). Vectorised
    per season (one draw of each kind per night)."""
    names = prof.band_names
    w = np.array([prof.bands[b].weight for b in names], dtype=np.float64)
    cdf = np.cumsum(w / w.sum())
    # per first band: its partners' indices and their cumulative weights
    partners = []
    for b in names:
        idx = np.array([names.index(x) for x in PAIRS[b] if x in prof.bands], dtype=np.int64)
        pw = w[idx] if len(idx) else np.zeros(0)
        partners.append((idx, np.cumsum(pw / pw.sum()) if len(idx) and pw.sum() > 0 else
                         np.linspace(1.0 / max(len(idx), 1), 1.0, len(idx))))
    times, bands = [], []
    years = int(math.ceil(prof.duration_days / 365.25))
    lo_gap, hi_gap = prof.revisit_min_nights, prof.revisit_max_nights
    for y in range(years):
        start = y * 365.25 + prof.season_start_day
        n_max = int(prof.season_days // lo_gap) + 2
        nights = start + float(rng.integers(0, hi_gap)) + np.concatenate(
            [[0.0], np.cumsum(rng.integers(lo_gap, hi_gap + 1, n_max - 1))])
        nights = nights[nights < start + prof.season_days]
        n = len(nights)
        seen = rng.random(n) >= prof.night_loss
        t1 = np.floor(nights) + 0.5 + rng.uniform(-prof.night_span_h, prof.night_span_h, n) / 24.0
        b1 = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(names) - 1)
        pair = rng.random(n) < prof.pair_prob
        u2 = rng.random(n)
        b2 = np.full(n, -1, dtype=np.int64)
        for j in range(len(names)):
            idx, pc = partners[j]
            m = (b1 == j) & pair
            if len(idx) and m.any():
                b2[m] = idx[np.minimum(np.searchsorted(pc, u2[m], side="right"), len(idx) - 1)]
        keep1 = seen
        keep2 = seen & (b2 >= 0)
        times += [t1[keep1], t1[keep2] + prof.pair_gap_min / 1440.0]
        bands += [b1[keep1], b2[keep2]]
    t = np.concatenate(times) if times else np.zeros(0)
    b = np.concatenate(bands).astype(np.int64) if bands else np.zeros(0, np.int64)
    keep = (t >= 0.0) & (t < prof.duration_days)
    t, b = t[keep], b[keep]
    order = np.argsort(t, kind="stable")
    t, b = t[order], b[order]
    base = np.array([prof.bands[n].m5 for n in names])[b] - prof.crowding_mag
    scat = np.array([prof.bands[n].m5_scatter for n in names])[b]
    m5 = base + scat * rng.standard_normal(len(t))
    return Visits(t, b, m5.astype(np.float32))


def _continuous(prof: Profile, t0: float, tE: float) -> Visits:
    """Roman: a visit every ``cadence_min`` in the reference band through each season, a
    ``colour_band`` visit every ``colour_every_h`` hours instead of the main one; only the
    visits within the event's window (+- ``event_window_te`` tE, clipped) are kept, so the
    cost of an event does not grow with the survey's length (a season is ~7,000 visits)."""
    names = prof.band_names
    half = min(max(prof.event_window_te * tE, prof.event_window_min_days), prof.event_window_max_days)
    lo, hi = t0 - half, t0 + half
    step = prof.cadence_min / 1440.0
    ts, bs = [], []
    main = names.index(prof.reference_band)
    colour = names.index(prof.colour_band) if prof.colour_band else None
    every = int(round(prof.colour_every_h * 60.0 / prof.cadence_min)) if colour is not None else 0
    for s in prof.starts():
        e = s + prof.season_days
        a, b = max(s, lo), min(e, hi)
        if a >= b:
            continue
        k = np.arange(math.ceil((a - s) / step), math.floor((b - s) / step) + 1)
        k = k[(s + k * step < e) & (s + k * step <= prof.duration_days)]
        ts.append(s + k * step)
        band = np.full(len(k), main, dtype=np.int64)
        if every:
            band[(k % every) == every // 2] = colour
        bs.append(band)
    t = np.concatenate(ts) if ts else np.zeros(0)
    b = np.concatenate(bs) if bs else np.zeros(0, np.int64)
    return Visits(t, b, np.full(len(t), np.nan, dtype=np.float32))


def visits(prof: Profile, rng: np.random.Generator, t0: float, tE: float) -> Visits:
    """The visits of one event's field (a fresh draw of the schedule per event)."""
    if prof.kind == "nightly":
        return _nightly(prof, rng)
    if prof.kind == "continuous":
        return _continuous(prof, t0, tE)
    raise SurveyError(f"survey {prof.name}: kind {prof.kind} has no visit schedule here "
                      "(grid is training.simulate's thesis path)")


def t0_range(prof: Profile) -> tuple[float, float]:
    """Where t0 is drawn (uniformly): anywhere in the survey (nightly: events fall anywhere
    relative to the seasons); for Roman, within the seasons extended by 30 days each side
    (Roman sees events only there; the years between its seasons would be empty draws)."""
    if prof.kind == "continuous":
        s = prof.starts()
        return min(s) - 30.0, max(s) + prof.season_days + 30.0
    return 0.0, prof.duration_days


def season_intervals(prof: Profile) -> list[tuple[float, float]]:
    """(start, end) of each observing season over the survey (for plots)."""
    if prof.kind == "continuous":
        return [(s, s + prof.season_days) for s in prof.starts()]
    if prof.kind == "nightly":
        years = int(math.ceil(prof.duration_days / 365.25))
        return [(y * 365.25 + prof.season_start_day,
                 min(y * 365.25 + prof.season_start_day + prof.season_days, prof.duration_days))
                for y in range(years) if y * 365.25 + prof.season_start_day < prof.duration_days]
    return [(0.0, prof.duration_days)]


# --------------------------------------------------------------------------- one event's data
@dataclass
class Observed:
    sci_flux: np.ndarray       # nJy, the visit image's total flux (noise included)
    sci_flux_err: np.ndarray
    diff_flux: np.ndarray      # nJy, visit minus template (noise of both included)
    diff_flux_err: np.ndarray
    detected: np.ndarray       # bool: |diff| / err >= detection_snr (an alert)
    flux_model: np.ndarray     # nJy, noise-free total flux
    template: np.ndarray       # nJy per band (prof.band_names order), with its noise


def observe(prof: Profile, rng: np.random.Generator, v: Visits, magnification: np.ndarray,
            source_mag: np.ndarray, blend_mag: np.ndarray) -> Observed:
    """What each visit measures for an event of magnification ``magnification`` (at
    ``v.time``) with per-band source and blend magnitudes. Draw order (for reproducibility):
    the templates (one per band), then one normal deviate per visit."""
    names = prof.band_names
    fs_b, fb_b = mag_to_njy(source_mag), mag_to_njy(blend_mag)          # +inf mag -> 0 flux
    base = fs_b + fb_b
    model = fs_b[v.band] * magnification + fb_b[v.band]
    err = np.empty(len(v.time))
    for j, b in enumerate(names):
        sel = v.band == j
        if sel.any():
            err[sel] = flux_error(prof, b, model[sel], v.m5[sel])
    # template: a coadd of template_visits baseline visits at the band's median depth
    m5_med = np.array([prof.bands[b].m5 - prof.crowding_mag for b in names])
    tmpl_err = np.array([float(flux_error(prof, b, base[j], m5_med[j])) for j, b in enumerate(names)]) \
        / math.sqrt(prof.template_visits)
    template = base + tmpl_err * rng.standard_normal(len(names))
    sci = model + err * rng.standard_normal(len(v.time))
    diff = sci - template[v.band]
    diff_err = np.sqrt(err * err + tmpl_err[v.band] ** 2)
    detected = np.abs(diff) >= prof.detection_snr * diff_err
    return Observed(sci, err, diff, diff_err, detected, model, template)
