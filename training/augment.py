"""`ulens augment`: join simulated datasets and spoil a share of their light curves the
way real photometry is spoiled, for training only.

Simulated photometry is ideal: Gaussian, with the reported error exactly the scatter,
and no outlier. Real survey photometry is neither. OGLE's and KMTNet's reported errors
are routinely rescaled by 1.1-2 before a fit (Skowron et al. 2016, AcA 66, 1: "error
bars are underestimated... by a factor of up to 2"; Yee et al. 2012, ApJ 755, 102: the
error-renormalisation recipe microlensing fits use), and difference imaging leaves
outliers (cosmic rays, bad columns, satellite trails; Rubin's own DIA false positives,
Bellm et al. 2019 DMTN-102). A model that has only seen the ideal case reads an
understated error as a detection and an outlier as a caustic crossing: the shipped
models triggered on the baselines of real single lenses (FINDINGS, "Real photometry").

For a share ``--fraction`` of the events (chosen at random, both classes alike), each
event draws one factor ``k`` from ``--scatter`` and its noise ``mag - mag_model`` is
multiplied by ``k`` while ``mag_err`` stays as reported (errors understated when k > 1,
overstated when k < 1); and each of its points becomes an outlier with probability
``--outlier-rate``: ``mag`` moves by ``±(3-10) mag_err`` (brighter or fainter alike).
Only points with ``mag_err <= MAX_ERR`` (0.5 mag) are touched. The fluxes are moved
with the magnitudes (``sci_flux``, and ``diff_flux`` by the same flux), so the file
stays consistent. ``mag_model``, ``mag_pspl`` and the parameters are
the truth and do not change: the per-point training targets stay those of the clean
light curve. The output's ``meta["augment"]`` records the settings and the seed.

Never augment a test set: the figures of ``ulens evaluate`` are on clean simulations
and on real photometry.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HELP = "join datasets and add understated/overstated errors and outliers to a share of events (training only)"


MAX_ERR = 0.5      # mag


class AugmentError(ValueError):
    """Bad augmentation arguments (the message names the option)."""


@dataclass(frozen=True)
class Settings:
    fraction: float = 0.5
    scatter_min: float = 0.8
    scatter_max: float = 1.6
    outlier_rate: float = 0.005
    outlier_min_sigma: float = 3.0
    outlier_max_sigma: float = 10.0
    seed: int = 0

    def check(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise AugmentError(f"--fraction must be in [0, 1], got {self.fraction}")
        if not 0.0 < self.scatter_min <= self.scatter_max:
            raise AugmentError(f"--scatter must be two factors 0 < MIN <= MAX, got "
                               f"{self.scatter_min},{self.scatter_max}")
        if not 0.0 <= self.outlier_rate < 1.0:
            raise AugmentError(f"--outlier-rate must be in [0, 1), got {self.outlier_rate}")


def augment(ds, settings: Settings):
    """A copy of ``ds`` with a share of its events spoiled (module docstring)."""
    from training.photometry import mag_to_njy

    settings.check()
    rng = np.random.default_rng(settings.seed)
    n, lens = ds.n_events, ds.lengths()
    chosen = rng.random(n) < settings.fraction
    k_event = np.where(chosen, rng.uniform(settings.scatter_min, settings.scatter_max, n), 1.0)
    k = np.repeat(k_event, lens)
    # points measured to better than MAX_ERR only: a faint band's forced point of 2 mag
    # error carries no signal, and 10 "sigma" of it would be a flux out of float32's range
    on = np.repeat(chosen, lens) & np.isfinite(ds.mag) & (ds.mag_err <= MAX_ERR)
    mag = ds.mag.astype(np.float64)
    err = ds.mag_err.astype(np.float64)
    new = mag.copy()
    new[on] = ds.mag_model[on] + k[on] * (mag[on] - ds.mag_model[on])
    out = on & (rng.random(len(mag)) < settings.outlier_rate)
    sign = np.where(rng.random(int(out.sum())) < 0.5, -1.0, 1.0)
    new[out] += sign * rng.uniform(settings.outlier_min_sigma, settings.outlier_max_sigma,
                                   int(out.sum())) * err[out]
    res = ds.subset(np.arange(n))          # a copy of every array
    res.mag = new.astype(np.float32)
    sci_new = np.asarray(mag_to_njy(res.mag.astype(np.float64)), dtype=np.float64)
    moved = on & np.isfinite(sci_new)
    delta = np.where(moved, sci_new - res.sci_flux, 0.0)
    res.sci_flux = np.where(moved, sci_new, res.sci_flux).astype(np.float32)
    res.diff_flux = (res.diff_flux + delta).astype(np.float32)
    res.meta = dict(ds.meta, augment={
        **settings.__dict__, "events_augmented": int(chosen.sum()), "outliers": int(out.sum()),
        "doc": "training.augment: noise scaled by k per event, outliers of +-(3-10) mag_err"})
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="datasets from `ulens simulate` (one survey, unique event ids), joined in this order")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="dataset file to write (.npz)")
    p.add_argument("--fraction", type=float, default=Settings.fraction, metavar="F",
                   help="share of events spoiled, chosen at random in both classes")
    p.add_argument("--scatter", default=f"{Settings.scatter_min},{Settings.scatter_max}", metavar="MIN,MAX",
                   help="range of the per-event factor on the noise, the reported mag_err unchanged "
                        "(> 1: errors understated, as OGLE/KMTNet errors before renormalisation)")
    p.add_argument("--outlier-rate", type=float, default=Settings.outlier_rate, metavar="P",
                   help="probability that a point of a spoiled event is an outlier of +-(3-10) mag_err")
    p.add_argument("--seed", type=int, default=Settings.seed, help="random seed")


def run(args) -> int:
    from training import dataset as dataset_mod

    try:
        lo, hi = (float(v) for v in str(args.scatter).split(","))
    except ValueError:
        raise AugmentError(f"--scatter must be MIN,MAX, got {args.scatter!r}") from None
    settings = Settings(fraction=args.fraction, scatter_min=lo, scatter_max=hi,
                        outlier_rate=args.outlier_rate, seed=args.seed)
    settings.check()
    parts = [dataset_mod.load(Path(f)) for f in args.data]
    joined = parts[0] if len(parts) == 1 else dataset_mod.concatenate(
        parts, meta=dict(parts[0].meta, joined=[str(f) for f in args.data]))
    res = augment(joined, settings)
    res.save(args.output)
    a = res.meta["augment"]
    print(f"wrote {args.output}: {res.n_events} events, {a['events_augmented']} spoiled, "
          f"{a['outliers']} outliers")
    return 0
