"""Set a trained run's card threshold for another PSPL firing rate, chosen on its own
validation split (never on a test set), as `ulens train --max-false-rate` would have.

    python scripts/rethreshold.py RUN_DIR --max-false-rate 0.01

RUN_DIR is a `ulens train` run folder (it has split.json and the card's data path). The
validation events are scored with the artifact as the broker scores them (whole curves,
the card's decision rule); the card's threshold, decision.threshold and threshold_rule
are rewritten, and the previous threshold is kept under threshold_history.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from training import dataset, decision
    from training.artifact import load_artifact
    from training.evaluate import event_probs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a `ulens train` run folder")
    p.add_argument("--max-false-rate", type=float, required=True, metavar="R",
                   help="share of validation PSPL events allowed to fire")
    args = p.parse_args(argv)
    if not 0 < args.max_false_rate < 1:
        p.error(f"--max-false-rate must be in (0, 1), got {args.max_false_rate}")
    card_path = args.run / "model_card.json"
    card = json.loads(card_path.read_text())
    split = json.loads((args.run / "split.json").read_text())
    art = load_artifact(args.run)
    ds = dataset.load(card["data"]["path"]).magnitudes_only()
    pos = {int(e): i for i, e in enumerate(ds.event_id)}
    val = np.array([pos[int(e)] for e in split["val"]])
    dec = art.decision
    scores = np.array([decision.event_score(pr, dec["min_points"], dec["smooth_window"])
                       for pr in event_probs(art, ds, val)])
    pspl = scores[ds.label[val] == 0]
    thr = decision.threshold_for_false_rate(pspl, args.max_false_rate)
    card.setdefault("threshold_history", []).append(
        {"threshold": card["threshold"], "rule": card.get("threshold_rule")})
    card["threshold"] = thr
    card["decision"]["threshold"] = thr
    card["threshold_rule"] = (f"lowest threshold at which <= {args.max_false_rate} of validation PSPL "
                              f"events fire (scripts/rethreshold.py)")
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    print(f"{card_path}: threshold {thr:.6f} ({(pspl >= thr).mean():.4f} of {len(pspl)} validation PSPL fire)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
