"""A survey at a glance: a few PSPL and binary light curves of a dataset, per band.

Difference flux (Rubin's psfFlux) against time, one colour per band: filled markers are
the 5-sigma detections (the alerts), open markers the forced photometry of the other
visits (``prvDiaForcedSources``); the noise-free model as a line, the best PSPL of a
binary dashed, the seasons shaded, and the event's t0 and detectability onset marked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training import survey as sv
from training.photometry import mag_to_njy

BAND_COLOURS = {"u": "#56b4e9", "g": "#009e73", "r": "#d55e00", "i": "#cc79a7", "z": "#7f7f7f",
                "y": "#000000", "F146": "#e69f00", "F087": "#0072b2"}


def _events(ds, n_each: int) -> list[int]:
    """The first ``n_each`` PSPL events and binaries that have detections, the binaries
    detectable (dchi2 >= 160) first."""
    det = np.add.reduceat(ds.detected.astype(np.int64), ds.offsets[:-1])
    pspl = [i for i in np.flatnonzero(ds.label == 0) if det[i] > 0][:n_each]
    b = np.flatnonzero(ds.label == 1)
    b = sorted(b, key=lambda i: not ds.params["dchi2"][i] >= 160)
    return pspl + [i for i in b if det[i] > 0][:n_each]


def plot_survey(ds, out_dir, n_each: int = 3) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = ds.meta.get("survey", {}).get("name", "survey")
    events = _events(ds, n_each)
    if not events:
        raise ValueError("no event of this dataset has a 5-sigma detection to plot")
    prof = sv.load_profile(name) if name in sv.profile_names() else None
    fig, axes = plt.subplots(len(events), 1, figsize=(11, 2.4 * len(events)), squeeze=False)
    for ax, i in zip(axes[:, 0], events):
        a, b = ds.offsets[i], ds.offsets[i + 1]
        t = ds.time[a:b]
        t0, tE = ds.params["t0"][i], ds.params["tE"][i]
        half = max(3 * tE, 40.0)
        lo, hi = max(t.min(), t0 - half), min(t.max(), t0 + half)
        if prof is not None:
            for s0, s1 in sv.season_intervals(prof):
                if s1 > lo and s0 < hi:
                    ax.axvspan(max(s0, lo), min(s1, hi), color="0.93", zorder=0)
        for code in np.unique(ds.band[a:b]):
            m = (ds.band[a:b] == code) & (t >= lo) & (t <= hi)
            if not m.any():
                continue
            band = sv.BAND_NAMES[code]
            c = BAND_COLOURS.get(band, "C0")
            f, e, d = ds.diff_flux[a:b][m], ds.diff_flux_err[a:b][m], ds.detected[a:b][m]
            tm = t[m]
            ax.errorbar(tm[d], f[d], e[d], fmt="o", ms=3.5, color=c, elinewidth=0.6, label=f"{band} detection")
            ax.errorbar(tm[~d], f[~d], e[~d], fmt="o", ms=3.5, mfc="none", color=c, alpha=0.6,
                        elinewidth=0.4, label=f"{band} forced")
            tmpl = ds.sci_flux[a:b][m] - ds.diff_flux[a:b][m]      # the band's template
            model = mag_to_njy(ds.mag_model[a:b][m]) - tmpl
            ax.plot(tm, model, "-", color=c, lw=0.8)
            if ds.label[i] == 1:
                ax.plot(tm, mag_to_njy(ds.mag_pspl[a:b][m]) - tmpl, "--", color=c, lw=0.7)
        ax.axvline(t0, color="k", lw=0.5, ls=":")
        on = ds.params["onset"][i]
        if np.isfinite(on):
            ax.axvline(on, color="r", lw=0.8, ls="--")
        kind = "binary" if ds.label[i] == 1 else "PSPL"
        extra = (f", s {ds.params['s'][i]:.2f}, q {ds.params['q'][i]:.2g}, dchi2 {ds.params['dchi2'][i]:.0f}"
                 + (f", onset t0{on - t0:+.1f} d (red)" if np.isfinite(on) else "")) if kind == "binary" else ""
        ax.set_title(f"{kind} {ds.event_id[i]}: t0 {t0:.1f} d (dotted), tE {tE:.1f} d, u0 {ds.params['u0'][i]:.3f}, "
                     f"baseline {ds.params['baseline_mag'][i]:.1f}, fs {ds.params['fs'][i]:.2f}{extra}",
                     fontsize=8, loc="left")
        ax.set_xlim(lo, hi)
        ax.set_ylabel("psfFlux (nJy)", fontsize=8)
        ax.tick_params(labelsize=7)
        h, l = ax.get_legend_handles_labels()
        ax.legend(h, l, fontsize=6, ncol=6, loc="upper right", frameon=False)
    axes[-1, 0].set_xlabel("days since the survey's day 0 (shaded: observing seasons)")
    fig.suptitle(f"survey {name}: difference flux per band; filled = 5-sigma detection (alert), "
                 "open = forced photometry; line = true model, dashed = best PSPL", fontsize=9)
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"survey_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
