"""`ulens simulate`: PSPL and binary-lens light curves into a dataset (.npz).

What one event is (the same code path for both classes; only the lens differs):

* cadence: 1,500 epochs evenly spaced over days 0..1000 (``np.linspace(0, 1000, 1500)``),
  each dropped independently with probability ``cadence_mask_prob``; a mask that would
  leave fewer than ``MIN_POINTS`` points is drawn again (matters only for p near 1);
* t0 uniform in 0..1000 d; tE and u0 from the chosen binary parameter set (for both
  classes, unless the ``thesis_priors`` shortcut is asked for); baseline magnitude of
  source + blend uniform in 18..22; source flux fraction fs uniform in 0.5..1;
* binary only: s, q, rho from the set, alpha uniform in [0, 2 pi); magnification by
  VBMicrolensing ``BinaryLightCurve`` (finite uniform source, see ``training.physics``);
  PSPL: the analytic A(u);
* flux relative to baseline F = fs A + (1 - fs); noise-free ``mag_model`` =
  baseline_mag - 2.5 log10 F; ``mag`` = mag_model + N(0, mag_error_std); the stored
  ``mag_err`` is ``mag_error_std``;
* binary only: ``dchi2`` and ``mag_pspl`` from the best PSPL fit to the noise-free curve
  on the event's epochs under its errors (``training.detectability``); PSPL events get
  ``mag_pspl = mag_model`` and ``dchi2 = NaN`` (and s, q, alpha, rho = NaN).

Parameter sets (U = uniform, logU = uniform in the logarithm), see ``PARAMETER_SETS``:

=========  ===============  =================  ================  ==================  ================
set        s                q                  u0                rho                 tE (days)
=========  ===============  =================  ================  ==================  ================
baseline   U 0.1-2.5        U 0.1-1            U 0.01-0.5        U 0.01-0.1          U 10-100
distinct   U 0.8-1.5        U 0.1-0.5          U 0.01-0.15       U 0.01-0.05         U 20-150
planetary  logU 0.5-3       logU 1e-4-1e-2     U 0.001-0.5       logU 1e-4-0.05      logU 10-150
stellar    logU 0.3-5       U 0.3-1            U 0.001-0.8       logU 0.001-0.1      logU 20-200
=========  ===============  =================  ================  ==================  ================

baseline and distinct are the thesis sets, kept uniform as there (and as in the measured
detectability figures); planetary and stellar span one or more decades in s, rho and tE,
where uniform draws would leave the low decade almost empty, hence log-uniform.

Reproducibility: event ``index`` of class ``kind`` (0 = PSPL, 1 = binary) draws
everything (mask, parameters, redraws after a failure, noise) from its own stream
``np.random.default_rng([seed, kind, index])``, so the classes never share a stream and
the output does not depend on the number of workers. Chunks of events have fixed
boundaries and each runs in a fresh process, because VBMicrolensing keeps static state
(the root finder starts from the previous roots) that changes its float64 results in the
last bits with the call history.

Event ids: ``(seed mod 2**16) * 2**28 + kind * 2**27 + index`` (below 2**44, unique in
a file, and across files whose seeds differ modulo 2**16); ``decode_event_id`` inverts
it. They stay below 2**44 so that the stream's ``diaSourceId = diaObjectId * 100000 +
point index`` fits in 63 bits.

Order in the file: the PSPL events 0..n_pspl-1 followed by the binaries 0..n_binary-1,
permuted by ``np.random.default_rng([seed, 2]).permutation(n_pspl + n_binary)``: the
classes are interleaved, deterministically.

A VBMicrolensing failure (exception, NaN or inf) makes the event draw new parameters
from its own stream; failures are counted in ``meta["failures_resampled"]``. A binary
is never written with a failed or a substituted curve.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from training import detectability, physics, pspl
from training import survey as sv
from training.dataset import PARAM_FIELDS, Dataset
from training.photometry import njy_to_mag

HELP = "simulate PSPL and binary-lens light curves into a dataset (.npz)"

N_EPOCHS = 1500
WINDOW_DAYS = 1000.0
EPOCHS = np.linspace(0.0, WINDOW_DAYS, N_EPOCHS)
MIN_POINTS = 10
MAX_FAILURES_PER_EVENT = 100
# Fixed chunk boundaries (part of what makes the output independent of --workers).
BINARY_CHUNK = 32
PSPL_CHUNK = 1024
PSPL, BINARY, ORDER_STREAM = 0, 1, 2
KIND_NAMES = {PSPL: "PSPL", BINARY: "binary"}


class SimulationError(ValueError):
    """Bad simulation settings (the message names the setting)."""


@dataclass(frozen=True)
class Prior:
    lo: float
    hi: float
    log: bool = False

    def draw(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))))
        return float(rng.uniform(self.lo, self.hi))

    def describe(self) -> str:
        return f"{'log-uniform' if self.log else 'uniform'} {self.lo:g}..{self.hi:g}"


def U(lo, hi):  # noqa: N802
    return Prior(lo, hi, False)


def LogU(lo, hi):  # noqa: N802
    return Prior(lo, hi, True)


PARAMETER_SETS: dict[str, dict[str, Prior]] = {
    "baseline": {"s": U(0.1, 2.5), "q": U(0.1, 1.0), "u0": U(0.01, 0.5),
                 "rho": U(0.01, 0.1), "tE": U(10.0, 100.0)},
    "distinct": {"s": U(0.8, 1.5), "q": U(0.1, 0.5), "u0": U(0.01, 0.15),
                 "rho": U(0.01, 0.05), "tE": U(20.0, 150.0)},
    "planetary": {"s": LogU(0.5, 3.0), "q": LogU(1e-4, 1e-2), "u0": U(0.001, 0.5),
                  "rho": LogU(1e-4, 0.05), "tE": LogU(10.0, 150.0)},
    "stellar": {"s": LogU(0.3, 5.0), "q": U(0.3, 1.0), "u0": U(0.001, 0.8),
                "rho": LogU(0.001, 0.1), "tE": LogU(20.0, 200.0)},
}
# Shared by every set and both classes.
T0_PRIOR = U(0.0, WINDOW_DAYS)
ALPHA_PRIOR = U(0.0, 2.0 * math.pi)
BASELINE_MAG_PRIOR = U(18.0, 22.0)
FS_PRIOR = U(0.5, 1.0)
# The thesis' PSPL priors: a shortcut (the classes then differ in u0 and tE, so a
# classifier can learn the simulator instead of the lens). Only with thesis_priors.
THESIS_PSPL_PRIORS = {"u0": U(0.01, 1.0), "tE": U(10.0, 150.0)}
# shared_priors "wide": u0, tE and fs for both classes from ranges that cover the
# effective single-lens parameters of the binaries. A binary that looks like a PSPL
# (wide or close topology) has an effective PSPL fs, tE, u0 outside the set's narrow
# ranges (fitted fs ~0.02 for wide binaries drawn with fs >= 0.5); a model trained on
# the narrow ranges learns "outside them = binary" and fires on 44-73% of real single
# lenses that are blended (fs < 0.5), long (tE > 100 d) or far (u0 > 0.5)
# (docs/BENCHMARKS_HISTORY.md, "Prior leak").
WIDE_SHARED_PRIORS = {"u0": U(0.001, 1.0), "tE": LogU(5.0, 250.0), "fs": LogU(0.01, 1.0)}
SHARED_PRIORS = ("set", "wide")


# Detectability onset (training.detectability.onset): the first visit at which the best
# PSPL fit to the visits so far has a chi^2 of at least this; 160 is the Delta chi^2 of
# Penny et al. 2019 (after Bennett & Rhie 2002) for a detection, the threshold that
# `detectable` uses on the whole curve.
ONSET_DCHI2 = 160.0


@dataclass(frozen=True)
class SimulationConfig:
    survey: str = "thesis"              # training/surveys/<name>.yaml, or a profile file
    parameter_set: str = "baseline"
    seed: int = 0
    cadence_mask_prob: float = 0.2
    mag_error_std: float = 0.05
    thesis_priors: bool = False
    vbm_tol: float = physics.DEFAULT_TOL
    shared_priors: str = "set"          # "set": u0/tE from the set, fs U(0.5, 1); "wide"

    def __post_init__(self):
        self.validate()

    @property
    def profile(self) -> "sv.Profile":
        return sv.load_profile(self.survey)

    def validate(self) -> None:
        try:
            self.profile
        except sv.SurveyError as exc:
            raise SimulationError(str(exc)) from None
        if self.parameter_set not in PARAMETER_SETS:
            raise SimulationError(f"unknown binary parameter set {self.parameter_set!r}; "
                                  f"choose from {', '.join(PARAMETER_SETS)}")
        if self.shared_priors not in SHARED_PRIORS:
            raise SimulationError(f"unknown shared priors {self.shared_priors!r}; choose from "
                                  f"{', '.join(SHARED_PRIORS)}")
        if self.shared_priors == "wide" and self.thesis_priors:
            raise SimulationError("--shared-priors wide and --thesis-priors contradict each other "
                                  "(the thesis shortcut gives PSPL events their own u0/tE priors)")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) \
                or self.seed < 0:
            raise SimulationError(f"seed must be a non-negative integer, got {self.seed!r}")
        p = self.cadence_mask_prob
        if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
            raise SimulationError(f"cadence mask probability must be in [0, 1), got {p!r}")
        e = self.mag_error_std
        if not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0):
            raise SimulationError(f"magnitude error std must be a positive number, got {e!r}")
        if not (isinstance(self.vbm_tol, (int, float)) and math.isfinite(self.vbm_tol)
                and self.vbm_tol > 0):
            raise SimulationError(f"VBMicrolensing tolerance must be > 0 (0 hangs), "
                                  f"got {self.vbm_tol!r}")


# ----------------------------------------------------------------------------- events

def event_rng(seed: int, kind: int, index: int) -> np.random.Generator:
    """The random stream of one event (kind 0 = PSPL, 1 = binary)."""
    return np.random.default_rng([int(seed), int(kind), int(index)])


def event_id(seed: int, kind: int, index: np.ndarray | int) -> np.ndarray:
    return (np.int64(seed % (1 << 16)) << np.int64(28)) + (np.int64(kind) << np.int64(27)) \
        + np.asarray(index, dtype=np.int64)


def decode_event_id(eid: int) -> tuple[int, int, int]:
    """(seed mod 2**16, kind, index) of an event id."""
    eid = int(eid)
    return eid >> 28, (eid >> 27) & 1, eid & ((1 << 27) - 1)


def shared_priors(config: SimulationConfig, kind: int) -> dict[str, Prior]:
    """The u0, tE and fs priors of one class (``config.shared_priors``, ``thesis_priors``)."""
    if config.shared_priors == "wide":
        return WIDE_SHARED_PRIORS
    if config.thesis_priors and kind == PSPL:
        return {**THESIS_PSPL_PRIORS, "fs": FS_PRIOR}
    priors = PARAMETER_SETS[config.parameter_set]
    return {"u0": priors["u0"], "tE": priors["tE"], "fs": FS_PRIOR}


def draw_parameters(rng: np.random.Generator, kind: int, config: SimulationConfig) -> dict:
    """One parameter draw. Both classes draw the shared parameters in the same order from
    the same priors; binaries then draw s, q, alpha, rho."""
    priors = PARAMETER_SETS[config.parameter_set]
    shared = shared_priors(config, kind)
    prof = config.profile
    t0_prior = T0_PRIOR if prof.kind == "grid" else U(*sv.t0_range(prof))
    p = {"t0": t0_prior.draw(rng), "tE": shared["tE"].draw(rng), "u0": shared["u0"].draw(rng),
         "baseline_mag": BASELINE_MAG_PRIOR.draw(rng), "fs": shared["fs"].draw(rng)}
    if prof.kind != "grid":     # colours and extinction, drawn alike for both classes
        p.update(source_gi=U(prof.source_gi_min, prof.source_gi_max).draw(rng),
                 blend_gi=U(prof.blend_gi_min, prof.blend_gi_max).draw(rng),
                 extinction=U(prof.extinction_min, prof.extinction_max).draw(rng))
    # Survey profiles draw a lens for both classes (PSPL events then forget it), so that the
    # visits, templates and noise that follow come from the same place in the stream; the
    # thesis grid keeps its original draws (its data keep their bits).
    if kind == BINARY or prof.kind != "grid":
        lens = dict(s=priors["s"].draw(rng), q=priors["q"].draw(rng),
                    alpha=ALPHA_PRIOR.draw(rng), rho=priors["rho"].draw(rng))
    if kind == BINARY:
        p.update(lens)
    else:
        p.update(s=math.nan, q=math.nan, alpha=math.nan, rho=math.nan)
    return p


def simulate_event(kind: int, index: int, config: SimulationConfig) -> dict:
    """Simulate one event through the config's survey; returns its times, magnitudes,
    parameters (PARAM_FIELDS order), the number of failed binary computations and, for
    every survey but the thesis grid, the per-visit survey data (bands, fluxes, ...)."""
    if config.profile.kind == "grid":
        return _grid_event(kind, index, config)
    return _survey_event(kind, index, config)


def _grid_event(kind: int, index: int, config: SimulationConfig) -> dict:
    """The thesis' survey (unchanged draws: the same seed gives the same bits)."""
    rng = event_rng(config.seed, kind, index)
    while True:
        keep = np.flatnonzero(rng.random(N_EPOCHS) >= config.cadence_mask_prob)
        if keep.size >= MIN_POINTS:
            break
    t = EPOCHS[keep]
    failures = 0
    while True:
        p = draw_parameters(rng, kind, config)
        A = _magnification(kind, t, p, config)
        if A is not None:
            break
        failures += 1
        if failures >= MAX_FAILURES_PER_EVENT:
            raise RuntimeError(f"VBMicrolensing failed {failures} times in a row for binary "
                               f"event {index} (seed {config.seed}); last parameters {p}")
    F = physics.flux(A, p["fs"])
    mag_model = physics.flux_to_mag(F, p["baseline_mag"])
    mag = mag_model + rng.normal(0.0, config.mag_error_std, t.size)
    p["onset"], p["onset_index"] = math.nan, -1
    if kind == BINARY:
        fit = detectability.detectability(t, F, config.mag_error_std,
                                          true_params=(p["t0"], p["u0"], p["tE"]))
        mag_pspl = physics.flux_to_mag(np.maximum(fit.flux(t), 1e-12), p["baseline_mag"])
        p["dchi2"] = fit.chi2
        sigma = physics.mag_err_to_flux_err(F, config.mag_error_std)
        tp = (p["t0"], p["u0"], p["tE"])
        p["onset_index"] = detectability.onset(
            t, fit.chi2_per_point(t, F, sigma),
            lambda n: detectability.fit_pspl(t[:n], F[:n], sigma[:n], true_params=tp,
                                             stop_below=ONSET_DCHI2).chi2, ONSET_DCHI2)
        p["onset"] = float(t[p["onset_index"]]) if p["onset_index"] >= 0 else math.nan
    else:
        mag_pspl = mag_model
        p["dchi2"] = math.nan
    return {"time": t, "mag": mag, "mag_model": mag_model,
            "mag_pspl": mag_pspl, "params": [p[k] for k in PARAM_FIELDS], "failures": failures}


def _magnification(kind: int, t: np.ndarray, p: dict, config: SimulationConfig):
    """A(t), or None when VBMicrolensing fails for these parameters."""
    if kind == PSPL:
        return physics.pspl_magnification(t, p["t0"], p["u0"], p["tE"])
    try:
        A = physics.binary_magnification(t, p["t0"], p["u0"], p["tE"], p["s"], p["q"],
                                         p["alpha"], p["rho"], tol=config.vbm_tol)
    except physics.MagnificationError:
        return None
    return A if A.shape == t.shape and np.all(np.isfinite(A)) and np.all(A > 0) else None


def _survey_event(kind: int, index: int, config: SimulationConfig) -> dict:
    """One event through a survey profile (training.survey). Draw order: parameters (both
    classes alike; binaries then their lens), the visits, the templates and the noise. A
    draw whose window holds fewer than MIN_POINTS visits (Roman, t0 between seasons), or
    whose binary magnification fails, is drawn again from the event's own stream."""
    prof = config.profile
    rng = event_rng(config.seed, kind, index)
    failures = unobserved = 0
    while True:
        p = draw_parameters(rng, kind, config)
        v = sv.visits(prof, rng, p["t0"], p["tE"])
        if len(v.time) < MIN_POINTS:
            unobserved += 1
        else:
            A = _magnification(kind, v.time, p, config)
            if A is not None:
                break
            failures += 1
        if failures + unobserved >= MAX_FAILURES_PER_EVENT:
            raise RuntimeError(f"event {index} of kind {kind} (seed {config.seed}, survey {prof.name}): "
                               f"{failures + unobserved} draws in a row unobserved or failed; last parameters {p}")
    src, blend = sv.band_magnitudes(prof, p["baseline_mag"], p["fs"], p["source_gi"], p["blend_gi"],
                                    p["extinction"])
    obs = sv.observe(prof, rng, v, A, src, blend)
    # the magnitudes from the fluxes as stored (float32) and as the broker converts them
    sci, sci_err = obs.sci_flux.astype(np.float32), obs.sci_flux_err.astype(np.float32)
    pos = sci > 0
    mag, mag_err = np.full(len(sci), np.nan), np.full(len(sci), np.nan)
    mag[pos], mag_err[pos] = njy_to_mag(sci[pos].astype(np.float64), sci_err[pos].astype(np.float64))
    mag_model = njy_to_mag(obs.flux_model)
    p["onset"], p["onset_index"] = math.nan, -1
    if kind == BINARY:
        fit = pspl.fit_pspl_bands(v.time, obs.flux_model, obs.diff_flux_err, v.band,
                                        true_params=(p["t0"], p["u0"], p["tE"]))
        model = fit.flux(v.time, v.band)
        mag_pspl = njy_to_mag(np.maximum(model, 1e-12))
        p["dchi2"] = fit.chi2
        tp = (p["t0"], p["u0"], p["tE"])
        t, F, e, b = v.time, obs.flux_model, obs.diff_flux_err, v.band
        p["onset_index"] = detectability.onset(
            t, np.square((F - model) / e),
            lambda n: pspl.fit_pspl_bands(t[:n], F[:n], e[:n], b[:n], true_params=tp,
                                          stop_below=ONSET_DCHI2).chi2, ONSET_DCHI2)
        p["onset"] = float(t[p["onset_index"]]) if p["onset_index"] >= 0 else math.nan
    else:
        mag_pspl = mag_model
        p["dchi2"] = math.nan
    return {"time": v.time, "mag": mag, "mag_err": mag_err, "mag_model": mag_model, "mag_pspl": mag_pspl,
            "params": [p[k] for k in PARAM_FIELDS], "failures": failures, "unobserved": unobserved,
            "band": np.array([sv.BAND_CODE[prof.band_names[b]] for b in v.band], dtype=np.uint8),
            "sci_flux": sci, "sci_flux_err": sci_err, "diff_flux": obs.diff_flux,
            "diff_flux_err": obs.diff_flux_err, "detected": obs.detected, "m5": v.m5,
            "source_mag": src, "blend_mag": blend}


def _limit_threads():
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(limits=1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return None


def simulate_chunk(kind: int, start: int, stop: int, config: SimulationConfig) -> dict:
    """Events ``start..stop-1`` of one class, packed into arrays (what a worker returns).

    BLAS runs on one thread here whatever the caller, so the results do not depend on
    where the chunk runs.
    """
    limiter = _limit_threads()
    try:
        events = [simulate_event(kind, i, config) for i in range(start, stop)]
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    out = {
        "kind": kind, "start": start,
        "lengths": np.array([e["time"].size for e in events], dtype=np.int64),
        "time": np.concatenate([e["time"] for e in events]),
        **{k: np.concatenate([e[k] for e in events]).astype(np.float32)
           for k in ("mag", "mag_model", "mag_pspl")},
        "params": np.array([e["params"] for e in events], dtype=np.float64).reshape(-1, len(PARAM_FIELDS)),
        "failures": int(sum(e["failures"] for e in events)),
        "unobserved": int(sum(e.get("unobserved", 0) for e in events)),
    }
    if "band" in events[0]:               # a survey profile: its visit data
        for k in SURVEY_POINT_FIELDS:
            out[k] = np.concatenate([e[k] for e in events])
        for k in ("source_mag", "blend_mag"):
            out[k] = np.stack([e[k] for e in events])
    return out


# per-visit survey data (training.survey.observe) and their dtypes in the dataset
SURVEY_POINT_FIELDS = {"mag_err": np.float32, "band": np.uint8, "sci_flux": np.float32,
                       "sci_flux_err": np.float32, "diff_flux": np.float32,
                       "diff_flux_err": np.float32, "detected": bool, "m5": np.float32}


def _run_task(task) -> dict:
    return simulate_chunk(*task)


def _worker_init():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _limit_threads()


def _chunks(kind: int, n: int, size: int) -> list[tuple[int, int, int]]:
    return [(kind, a, min(a + size, n)) for a in range(0, n, size)]


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "VBMicrolensing", "ulens-broker"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _pool_context():
    """Fresh worker processes: forked from a clean fork server (or spawned)."""
    import multiprocessing
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload(["training.simulate"])
        return ctx
    return get_context("spawn")


def simulate(n_pspl: int, n_binary: int, config: SimulationConfig | None = None,
             workers: int | None = None, progress: bool = False,
             command: str | None = None) -> Dataset:
    """Simulate ``n_pspl`` PSPL and ``n_binary`` binary events into a Dataset.

    ``workers``: number of worker processes (None = os.cpu_count()). The result depends
    only on the counts and ``config``, not on ``workers``: chunks have fixed boundaries
    (``BINARY_CHUNK``, ``PSPL_CHUNK`` events) and every chunk runs in a fresh process.
    The fresh process matters: VBMicrolensing keeps static state between calls (root
    finder seeds), which changes its float64 results in the last bits with the call
    history. ``workers=0`` runs the chunks one after the other in this process (for
    debugging and tests): same draws, but float64 values may differ in the last bits.
    ``command`` is recorded in the metadata.
    """
    config = config or SimulationConfig()
    config.validate()
    for name, n in (("number of PSPL events", n_pspl), ("number of binary events", n_binary)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise SimulationError(f"{name} must be a non-negative integer, got {n!r}")
        if n >= 1 << 27:
            raise SimulationError(f"{name} must be below 2**27, got {n}")
    if n_pspl + n_binary == 0:
        raise SimulationError("nothing to simulate: both event counts are 0")
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 0:
        raise SimulationError(f"workers must be a non-negative integer, got {workers!r}")
    tasks = _chunks(BINARY, n_binary, BINARY_CHUNK) + _chunks(PSPL, n_pspl, PSPL_CHUNK)

    results: dict[tuple[int, int], dict] = {}
    from tqdm import tqdm
    with tqdm(total=n_pspl + n_binary, unit="event", disable=not progress, file=sys.stderr,
              dynamic_ncols=True, smoothing=0.05) as bar:
        if workers == 0:
            for task in tasks:
                r = simulate_chunk(*task, config)
                results[(r["kind"], r["start"])] = r
                bar.update(len(r["lengths"]))
        else:
            ctx = _pool_context()
            pool = ctx.Pool(processes=min(workers, len(tasks)), initializer=_worker_init,
                            maxtasksperchild=1)
            try:
                for r in pool.imap_unordered(_run_task, [(*task, config) for task in tasks]):
                    results[(r["kind"], r["start"])] = r
                    bar.update(len(r["lengths"]))
                pool.close()
            finally:
                pool.terminate()
                pool.join()

    parts = [results[(k, a)] for k, a, _ in _chunks(PSPL, n_pspl, PSPL_CHUNK)] + \
            [results[(k, a)] for k, a, _ in _chunks(BINARY, n_binary, BINARY_CHUNK)]
    lengths = np.concatenate([r["lengths"] for r in parts])
    kinds = np.concatenate([np.full(len(r["lengths"]), r["kind"], np.int8) for r in parts])
    index = np.concatenate([np.arange(r["start"], r["start"] + len(r["lengths"])) for r in parts])
    params = np.concatenate([r["params"] for r in parts])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    point = {k: np.concatenate([r[k] for r in parts]) for k in ("time", "mag", "mag_model", "mag_pspl")}
    prof = config.profile
    survey_data = prof.kind != "grid"

    order = np.random.default_rng([int(config.seed), ORDER_STREAM]).permutation(len(lengths))
    lens = lengths[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    take = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order])
    ids = np.where(kinds == PSPL, event_id(config.seed, PSPL, index),
                   event_id(config.seed, BINARY, index))
    failures = int(sum(r["failures"] for r in parts))
    unobserved = int(sum(r["unobserved"] for r in parts))
    shared = shared_priors(config, BINARY)
    priors = {**PARAMETER_SETS[config.parameter_set], "u0": shared["u0"], "tE": shared["tE"]}
    meta = {
        "generator": "training.simulate",
        "parameter_set": config.parameter_set,
        "priors": {
            "binary": {k: v.describe() for k, v in priors.items()} | {
                "alpha": ALPHA_PRIOR.describe() + " rad"},
            "pspl": ({k: v.describe() for k, v in THESIS_PSPL_PRIORS.items()}
                     if config.thesis_priors else "same u0 and tE priors as the binaries"),
            "shared": {"t0": T0_PRIOR.describe() + " d", "baseline_mag": BASELINE_MAG_PRIOR.describe(),
                       "fs": shared["fs"].describe()},
        },
        "thesis_priors": bool(config.thesis_priors),
        "shared_priors": config.shared_priors,
        "seed": int(config.seed),
        "cadence": {"n_epochs": N_EPOCHS, "window_days": WINDOW_DAYS, "spacing": "even",
                    "mask_prob": float(config.cadence_mask_prob), "min_points": MIN_POINTS},
        "cadence_mask_prob": float(config.cadence_mask_prob),
        "mag_error_std": float(config.mag_error_std),
        "n_pspl": int(n_pspl), "n_binary": int(n_binary),
        "failures_resampled": failures,
        "unobserved_redrawn": unobserved,     # survey draws with < MIN_POINTS visits (Roman: t0 between seasons)
        "vbm_tol": float(config.vbm_tol),
        "binary_model": "VBMicrolensing BinaryLightCurve, finite uniform source, static",
        "detectability": "dchi2 = chi2 of the best PSPL fit (t0, u0, tE; source flux >= 0 and "
                         "blend flux solved in closed form) to the noise-free flux under the "
                         "mag errors converted to flux",
        "event_id": "(seed mod 2**16) * 2**28 + kind * 2**27 + index, kind 0 PSPL / 1 binary",
        "order": "PSPL then binaries, permuted by default_rng([seed, 2]).permutation(n)",
        "command": command,
        "versions": _versions(),
    }
    extra = {}
    if survey_data:
        extra = {k: np.concatenate([r[k] for r in parts]).astype(dt)[take]
                 for k, dt in SURVEY_POINT_FIELDS.items()}
        extra.update({k: np.concatenate([r[k] for r in parts])[order] for k in ("source_mag", "blend_mag")})
        meta["cadence"] = {"survey": prof.name, "kind": prof.kind, "min_points": MIN_POINTS}
        meta["priors"]["shared"]["t0"] = U(*sv.t0_range(prof)).describe() + " d"
        meta["priors"]["shared"].update({
            "source (g-i)_0": U(prof.source_gi_min, prof.source_gi_max).describe(),
            "blend (g-i)_0": U(prof.blend_gi_min, prof.blend_gi_max).describe(),
            "extinction A_i": U(prof.extinction_min, prof.extinction_max).describe()})
        meta["detectability"] = ("dchi2 = chi2 of the best PSPL fit (t0, u0, tE shared; per band a "
                                 "source flux >= 0 and a blend flux in closed form) to the noise-free "
                                 "fluxes on the event's visits under their difference-flux errors")
        meta.pop("cadence_mask_prob")
        meta.pop("mag_error_std")
    else:
        extra["mag_err"] = np.full(len(take), config.mag_error_std, dtype=np.float32)
    meta.update(survey=prof.describe(), bands=list(prof.band_names), onset_dchi2=ONSET_DCHI2,
                onset="first visit at which the best PSPL fit to the visits so far has chi2 >= onset_dchi2")
    ds = Dataset(offsets=offsets, time=point["time"][take], mag=point["mag"][take],
                 mag_model=point["mag_model"][take], mag_pspl=point["mag_pspl"][take],
                 event_id=ids[order].astype(np.int64), label=kinds[order].astype(np.int8),
                 params={k: params[order, j] for j, k in enumerate(PARAM_FIELDS)}, meta=meta, **extra)
    ds.validate("simulated dataset")
    return ds


# ------------------------------------------------------------------------------- CLI

def check_output(path: str | Path) -> Path:
    """Fail early (SimulationError) when ``path`` cannot be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SimulationError(f"output {path} is a directory, not a file")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SimulationError(f"output {path} cannot be written: {probe} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".ulens-write-test-"):
            pass
    except OSError as exc:
        raise SimulationError(f"output {path} cannot be written: {exc.strerror or exc}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise SimulationError(f"output {path} exists and is not writable")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to simulate")
    g.add_argument("--survey", default="thesis", metavar="NAME|FILE",
                   help="survey profile: " + ", ".join(sv.profile_names()) + " (training/surveys/"
                        "<name>.yaml: cadence, bands, seasons, depths, errors, 5-sigma alerts) or a "
                        "profile file of your own; thesis = 1,500 even epochs over 1,000 d, one band")
    g.add_argument("--n-pspl", type=int, required=True, metavar="N",
                   help="number of single-lens (PSPL) events, label 0")
    g.add_argument("--n-binary", type=int, required=True, metavar="N",
                   help="number of binary-lens events, label 1 (finite source, VBMicrolensing)")
    g.add_argument("--binary-params", default="baseline", metavar="NAME",
                   help="binary parameter set: " + "; ".join(
                       f"{n} (" + ", ".join(f"{k} {v.describe()}" for k, v in ps.items()) + ")"
                       for n, ps in PARAMETER_SETS.items())
                   + ". PSPL events draw u0 and tE from the same set. Every event: t0 uniform "
                     "over the survey, baseline mag (reference band) uniform 18..22, source "
                     "fraction fs uniform 0.5..1, alpha uniform 0..2pi; for survey profiles also "
                     "source and blend colours and an extinction (the profile's ranges)")
    g.add_argument("--output", "-o", required=True, metavar="FILE",
                   help="dataset file to write (.npz, the training.dataset format): per event "
                        "the observed and noise-free magnitudes, the best-fit PSPL model, the "
                        "true parameters and, for binaries, dchi2 = chi2 of the best PSPL fit to "
                        "the noise-free curve (detectability)")
    g = parser.add_argument_group("observing")
    g.add_argument("--cadence-mask-prob", type=float, default=None, metavar="P",
                   help="thesis survey only: probability that each of the 1,500 evenly spaced "
                        "epochs over 1000 d is dropped, independently (thesis: 0.05, 0.2, 0.3, "
                        "0.4); in [0, 1) (default: 0.2)")
    g.add_argument("--mag-error-std", type=float, default=None, metavar="S",
                   help="thesis survey only: std of the Gaussian magnitude errors, also stored as "
                        "mag_err (thesis: 0.05, 0.10, 0.20) (default: 0.05)")
    g = parser.add_argument_group("reproducibility and speed")
    g.add_argument("--seed", type=int, default=0, metavar="K",
                   help="random seed; the same seed gives the same data whatever --workers")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="W",
                   help="worker processes (each chunk of events runs in a fresh one)")
    g.add_argument("--vbm-tol", type=float, default=physics.DEFAULT_TOL, metavar="TOL",
                   help="VBMicrolensing absolute accuracy goal on the magnification (> 0; "
                        "1e-2 measured at <= 0.002 mag error, 1e-3 at 0.0002 mag and half the "
                        "speed)")
    g.add_argument("--thesis-priors", action="store_true",
                   help="SHORTCUT, for reproducing the thesis only: PSPL events draw u0 uniform "
                        "0.01..1 and tE uniform 10..150 instead of the binary set's priors, so "
                        "the classes differ in u0/tE (a classifier can learn that); recorded in "
                        "the metadata")
    g.add_argument("--shared-priors", choices=SHARED_PRIORS, default="set",
                   help="u0, tE and source fraction fs, drawn alike for both classes: 'set' = "
                        "u0/tE from --binary-params and fs uniform 0.5..1 (the thesis ranges); "
                        "'wide' = u0 uniform 0.001..1, tE log-uniform 5..250 d, fs log-uniform "
                        "0.01..1, ranges that cover the binaries' effective single-lens "
                        "parameters (a model trained on 'set' fires on blended, long or distant "
                        "single lenses outside its ranges)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    g.add_argument("--plot", metavar="DIR", default=None,
                   help="also draw a few PSPL and binary light curves per band (detections and "
                        "forced photometry told apart) into DIR/survey_<name>.png")


def _recorded_command(args: argparse.Namespace) -> str:
    """The command that reproduces the file, with every option that changes it spelled
    out (--workers, --quiet and --output do not change the data and are left out)."""
    parts = ["ulens", "simulate", "--survey", args.survey, "--n-pspl", str(args.n_pspl),
             "--n-binary", str(args.n_binary), "--binary-params", args.binary_params]
    if args.survey == "thesis":
        parts += ["--cadence-mask-prob", repr(float(args.cadence_mask_prob)),
                  "--mag-error-std", repr(float(args.mag_error_std))]
    parts += ["--seed", str(args.seed), "--vbm-tol", repr(float(args.vbm_tol))]
    if args.thesis_priors:
        parts.append("--thesis-priors")
    if args.shared_priors != "set":
        parts += ["--shared-priors", args.shared_priors]
    return " ".join(shlex.quote(p) for p in parts)


def summary(ds: Dataset) -> str:
    """One line: visits and detections per event, bands, and how many binaries the
    survey's own visits can tell from a single lens (dchi2 >= 160) and when (onset)."""
    lens = ds.lengths()
    det = np.add.reduceat(ds.detected.astype(np.int64), ds.offsets[:-1]) if len(ds.time) else lens
    names = [sv.BAND_NAMES[b] for b in range(len(sv.BAND_NAMES))]
    counts = np.bincount(ds.band, minlength=len(names))
    bands = ", ".join(f"{names[b]} {counts[b] / counts.sum():.0%}" for b in np.flatnonzero(counts))
    out = (f"survey {ds.meta.get('survey', {}).get('name', '?')}: visits per event median "
           f"{np.median(lens):.0f} ({lens.min()}-{lens.max()}), 5-sigma detections per event median "
           f"{np.median(det):.0f} ({np.mean(det) / max(np.mean(lens), 1e-9):.0%} of visits); bands {bands}")
    d = ds.params["dchi2"][ds.label == 1]
    if d.size:
        b = ds.label == 1
        on = ds.params["onset_index"][b] >= 0
        rel = (ds.params["onset"][b][on] - ds.params["t0"][b][on]) / ds.params["tE"][b][on]
        out += (f"; binaries with dchi2 >= 160 on the survey's visits: {np.mean(d >= 160):.1%} "
                f"(<25: {np.mean(d < 25):.1%}, median {np.median(d):.0f}); onset median "
                + (f"t0 {np.median(rel):+.2f} tE" if len(rel) else "-"))
    return out


def run(args: argparse.Namespace) -> int:
    prof = SimulationConfig(survey=args.survey).profile
    if prof.kind != "grid":
        for flag, value in (("--cadence-mask-prob", args.cadence_mask_prob),
                            ("--mag-error-std", args.mag_error_std)):
            if value is not None:
                raise SimulationError(f"{flag} applies to the thesis survey only; survey {prof.name} "
                                      "defines its cadence and errors in its profile")
    if args.cadence_mask_prob is None:
        args.cadence_mask_prob = prof.grid_mask_prob if prof.kind == "grid" else 0.2
    if args.mag_error_std is None:
        args.mag_error_std = prof.grid_mag_err if prof.kind == "grid" else 0.05
    config = SimulationConfig(survey=args.survey, parameter_set=args.binary_params, seed=args.seed,
                              cadence_mask_prob=args.cadence_mask_prob,
                              mag_error_std=args.mag_error_std, thesis_priors=args.thesis_priors,
                              vbm_tol=args.vbm_tol, shared_priors=args.shared_priors)
    config.validate()
    for name, n in (("--n-pspl", args.n_pspl), ("--n-binary", args.n_binary)):
        if n < 0:
            raise SimulationError(f"{name} must be >= 0, got {n}")
    if args.n_pspl + args.n_binary == 0:
        raise SimulationError("nothing to simulate: --n-pspl and --n-binary are both 0")
    if args.workers < 1:
        raise SimulationError(f"--workers must be >= 1, got {args.workers}")
    output = check_output(args.output)
    t_start = time.perf_counter()
    ds = simulate(args.n_pspl, args.n_binary, config, workers=args.workers,
                  progress=not args.quiet, command=_recorded_command(args))
    elapsed = time.perf_counter() - t_start
    ds.save(output)
    n = ds.n_events
    print(f"wrote {output}: {n} events ({args.n_pspl} PSPL, {args.n_binary} binary), "
          f"{len(ds.time)} points, {elapsed:.1f} s ({n / elapsed:.1f} events/s with "
          f"{args.workers} worker(s)); VBMicrolensing failures resampled: "
          f"{ds.meta['failures_resampled']}" + (f", unobserved draws redrawn: {ds.meta['unobserved_redrawn']}"
                                                  if ds.meta["unobserved_redrawn"] else ""))
    print(summary(ds))
    if args.plot:
        from training.survey_plot import plot_survey
        print(f"plot: {plot_survey(ds, args.plot)}")
    return 0


__all__ = ["SimulationConfig", "SimulationError", "PARAMETER_SETS", "simulate",
           "simulate_event", "simulate_chunk", "draw_parameters", "event_id", "decode_event_id",
           "check_output", "EPOCHS"]
