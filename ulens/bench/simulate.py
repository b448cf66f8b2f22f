"""`ulens bench simulate`: events simulated per second per core, per survey profile and
class, against the magnification alone."""
from __future__ import annotations

import time


from ulens.bench.harness import Run, SIM_DEFAULTS, log, make_row


def simulate_rows(n_binary: int, n_pspl: int, seed: int, workers: int = 1,
                  surveys: tuple = ("thesis",)) -> list[dict]:
    """Events simulated per second per core for each survey profile and class, against the
    magnification alone on the same parameters and epochs (the part no simulator avoids).
    Rows ``simulate.<kind>`` are the thesis survey's (named as before the profiles)."""
    from training import physics
    from training.simulate import SimulationConfig, simulate

    rows = []
    for survey in surveys:
        cfg = SimulationConfig(survey=survey, parameter_set=SIM_DEFAULTS["parameter_set"], seed=seed,
                               cadence_mask_prob=SIM_DEFAULTS["cadence_mask_prob"],
                               mag_error_std=SIM_DEFAULTS["mag_error_std"])
        prefix = "simulate" if survey == "thesis" else f"simulate.{survey}"
        for kind, n in (("binary", n_binary), ("pspl", n_pspl)):
            if n <= 0:
                continue
            t0 = time.perf_counter()
            ds = simulate(n if kind == "pspl" else 0, n if kind == "binary" else 0, cfg, workers=workers)
            sim_rate = n / (time.perf_counter() - t0)
            par = ds.params
            # baseline: the magnification alone, same parameters and epochs, this process
            t0 = time.perf_counter()
            for i in range(ds.n_events):
                t = ds.event(i)[0]
                if kind == "binary":
                    physics.binary_magnification(t, par["t0"][i], par["u0"][i], par["tE"][i], par["s"][i],
                                                 par["q"][i], par["alpha"][i], par["rho"][i], tol=cfg.vbm_tol)
                else:
                    physics.pspl_magnification(t, par["t0"][i], par["u0"][i], par["tE"][i])
            base = n / (time.perf_counter() - t0)
            what = "VBMicrolensing BinaryLightCurve" if kind == "binary" else "numpy PSPL A(u)"
            rows.append(make_row(f"{prefix}.{kind}", sim_rate, "events/s/core", base,
                                 note=f"survey {survey}: training.simulate.simulate, {n} events, "
                                      f"workers={workers} (~{ds.lengths().mean():.0f} visits each, process "
                                      f"start included); baseline: {what} alone on the same parameters"))
            if kind == "binary" and survey == "thesis":
                rows.append(_vbm_plus_fit_row(ds, cfg, base))
            log(f"simulate {survey} {kind}: {sim_rate:,.1f}/s vs {what} alone {base:,.1f}/s")
    return rows


def _vbm_plus_fit_row(ds, cfg, base: float) -> dict:
    """VBMicrolensing + the PSPL fit for dchi2 on the thesis events (the two big costs)."""
    from training import detectability, physics

    par = ds.params
    t0 = time.perf_counter()
    for i in range(ds.n_events):
        t = ds.event(i)[0]
        A = physics.binary_magnification(t, par["t0"][i], par["u0"][i], par["tE"][i], par["s"][i],
                                         par["q"][i], par["alpha"][i], par["rho"][i], tol=cfg.vbm_tol)
        detectability.detectability(t, physics.flux(A, par["fs"][i]), cfg.mag_error_std,
                                    true_params=(par["t0"][i], par["u0"][i], par["tE"][i]))
    return make_row("simulate.binary.vbm_plus_dchi2_fit", ds.n_events / (time.perf_counter() - t0),
                    "events/s/core", base, note="VBMicrolensing + the PSPL fit for dchi2 (the two big "
                    "costs of a binary), same events; baseline: VBMicrolensing alone")


def bench_simulate(run: Run, a) -> list[dict]:
    return simulate_rows(a.sim_binary, a.sim_pspl, a.seed + 1000, workers=1, surveys=tuple(a.sim_surveys))
