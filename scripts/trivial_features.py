"""Can trivial per-event features tell undetectable binaries from single lenses?

A binary whose light curve a PSPL fits (dchi2 < 25 on the survey's own visits) carries no
lens signal a rule could use; if eight trivial features of the event (how many visits and
detections, how bright the peak, how long above 5 sigma, in how many bands) still separate
those binaries from PSPL events, the simulator draws the two classes differently and a
classifier can learn the simulator instead of the lens. A gradient-boosted classifier,
5-fold cross-validated ROC AUC: 0.5 is no leak.

Usage: python3 scripts/trivial_features.py DATASET.npz [DCHI2_MAX] > leak.json
"""
import json
import sys

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score

from training import dataset

NAMES = ("visits", "detections", "peak psfFlux S/N", "peak scienceFlux / median",
         "days above 5 sigma", "bands detected", "detected share", "span of visits (d)")


def features(ds) -> np.ndarray:
    out = []
    for i in range(ds.n_events):
        a, b = ds.offsets[i], ds.offsets[i + 1]
        t, det, band = ds.time[a:b], ds.detected[a:b], ds.band[a:b]
        snr = ds.diff_flux[a:b] / ds.diff_flux_err[a:b]
        sci = ds.sci_flux[a:b].astype(np.float64)
        above = t[det & (snr > 0)]
        out.append([b - a, det.sum(), snr.max(), sci.max() / max(np.median(sci), 1e-9),
                    above.max() - above.min() if len(above) > 1 else 0.0,
                    len(np.unique(band[det])), det.mean(), t.max() - t.min()])
    return np.asarray(out, dtype=np.float64)


def main(path: str, dchi2_max: float = 25.0) -> dict:
    ds = dataset.load(path)
    d = ds.params["dchi2"]
    sel = (ds.label == 0) | ((ds.label == 1) & (d < dchi2_max))
    X, y = features(ds)[sel], ds.label[sel].astype(int)
    clf = GradientBoostingClassifier(random_state=0)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    auc = cross_val_score(clf, X, y, cv=cv, scoring="roc_auc")
    return {"dataset": str(path), "survey": ds.meta.get("survey", {}).get("name"),
            "shared_priors": ds.meta.get("shared_priors"), "dchi2_max": dchi2_max,
            "n_pspl": int((y == 0).sum()), "n_binary_below": int((y == 1).sum()),
            "features": list(NAMES), "auc_mean": float(auc.mean()), "auc_sd": float(auc.std()),
            "auc_folds": [round(float(a), 3) for a in auc]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(float(x) for x in sys.argv[2:3])), indent=2))
