#!/usr/bin/env bash
# Produce the shipped model models/tdcnn-baseline/: simulate a baseline training set and a
# fresh test set (another seed), train with a wall-clock cap, evaluate on the fresh test set,
# copy the artifact + evaluation into models/tdcnn-baseline/ with a README of the commands.
#
# Needs only `python3` with torch, numpy, scikit-learn, scipy, tqdm, matplotlib, pyyaml and
# VBMicrolensing importable (set PYTHONPATH yourself; the repository root is added here).
# Runs on a GPU when there is one (bf16 autocast), else on the CPU.
#
# Settings (environment variables, defaults in brackets):
#   N_TRAIN [40000]  training events (half binary)     N_TEST [6000]  fresh test events
#   MAX_MINUTES [5]  cap on the training epochs          EPOCHS [200]   epoch limit
#   BATCH_SIZE [128] LR [0.002]  PATIENCE [10]           WORKERS [nproc]
#   SEED_TRAIN [20251] SEED_TEST [90210] SEED [0]        WORK [results/shipped]  (scratch folder)
#   DEST [models/tdcnn-baseline]                         PYTHON [python3]
#   SHARED_PRIORS [set]  u0/tE/fs ranges of both classes (simulate --shared-priors: set | wide)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
N_TRAIN=${N_TRAIN:-40000}
N_TEST=${N_TEST:-6000}
MAX_MINUTES=${MAX_MINUTES:-5}
EPOCHS=${EPOCHS:-200}
BATCH_SIZE=${BATCH_SIZE:-128}
LR=${LR:-0.002}
PATIENCE=${PATIENCE:-10}
WORKERS=${WORKERS:-$(nproc)}
SEED_TRAIN=${SEED_TRAIN:-20251}
SEED_TEST=${SEED_TEST:-90210}
SEED=${SEED:-0}
WORK=${WORK:-results/shipped}
DEST=${DEST:-models/tdcnn-baseline}
SHARED_PRIORS=${SHARED_PRIORS:-set}
mkdir -p "$WORK"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

SIM_TRAIN=(-m ulens.cli simulate --n-pspl $((N_TRAIN - N_TRAIN / 2)) --n-binary $((N_TRAIN / 2))
           --binary-params baseline --output "$WORK/train.npz" --seed "$SEED_TRAIN" --workers "$WORKERS"
           --shared-priors "$SHARED_PRIORS")
SIM_TEST=(-m ulens.cli simulate --n-pspl $((N_TEST - N_TEST / 2)) --n-binary $((N_TEST / 2))
          --binary-params baseline --output "$WORK/test.npz" --seed "$SEED_TEST" --workers "$WORKERS"
          --shared-priors "$SHARED_PRIORS")
log "simulate training set: $PY ${SIM_TRAIN[*]}"
"$PY" "${SIM_TRAIN[@]}"
log "simulate fresh test set: $PY ${SIM_TEST[*]}"
"$PY" "${SIM_TEST[@]}"

TRAIN=(-m ulens.cli train --data "$WORK/train.npz" --experiment-name "$(basename "$DEST")"
       --output-root "$WORK/runs" --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" --lr "$LR"
       --patience "$PATIENCE" --max-minutes "$MAX_MINUTES" --seed "$SEED" --device auto --no-progress)
log "train: $PY ${TRAIN[*]}"
RUN=$("$PY" "${TRAIN[@]}" | tail -n 1)     # train prints its run folder last
[ -f "$RUN/model_card.json" ] || { echo "train did not report a run folder (got '$RUN')" >&2; exit 1; }

EVAL=(-m ulens.cli evaluate --model "$RUN" --data "$WORK/test.npz" --early-detection
      --device auto)
log "evaluate on the fresh test set: $PY ${EVAL[*]}"
"$PY" "${EVAL[@]}"

log "copy $RUN -> $DEST"
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$RUN"/{weights.pt,model_card.json,scalers.json,config.json,summary.json,training.log} "$DEST"/
cp -r "$RUN/evaluation" "$DEST/evaluation"

cat > "$WORK/commands.txt" <<EOF2
SHARED_PRIORS=$SHARED_PRIORS N_TRAIN=$N_TRAIN N_TEST=$N_TEST MAX_MINUTES=$MAX_MINUTES EPOCHS=$EPOCHS BATCH_SIZE=$BATCH_SIZE LR=$LR PATIENCE=$PATIENCE SEED=$SEED WORKERS=$WORKERS
python3 ${SIM_TRAIN[*]}
python3 ${SIM_TEST[*]}
python3 ${TRAIN[*]}
python3 ${EVAL[*]}
EOF2
"$PY" - "$DEST" "$WORK/commands.txt" <<'PYEOF'
import json, sys
from pathlib import Path
dest, commands = Path(sys.argv[1]), Path(sys.argv[2])
card = json.loads((dest / "model_card.json").read_text())
ev = json.loads((dest / "evaluation" / "evaluation_summary.json").read_text())
d, c = ev["detectable"], ev["classification"]
early = {r["cut"]: r for r in ev.get("early_detection", [])}
f = lambda v: "n/a" if v is None else f"{v:.3f}"
tr = card["training"]
lines = [
    f"# {dest.name}: a shipped TD-CNN",
    "",
    "Causal dilated TimeDistributed 1-D CNN (kernels 9/7/5, filters 128/64/32, dilations "
    f"{'/'.join(map(str, card['kwargs']['dilations']))}, receptive field {card['receptive_field']} points), "
    "trained on simulated baseline binary and PSPL events. Load it with "
    f"`training.artifact.load_artifact('models/{dest.name}')` (weights_only, no pickle). "
    f"Shared priors of both classes (u0, tE, fs): `{card['data'].get('meta', {}).get('shared_priors', 'set')}` "
    "(`ulens simulate --shared-priors`).",
    "",
    "## Figures on a fresh test set of the same priors (never seen in training or model selection)",
    "",
    f"- events: {ev['n_events']} ({ev['n_pspl']} PSPL, {ev['n_binary']} binary; "
    f"{d['n_binary']} binaries with Δχ² ≥ 160)",
    f"- ROC AUC, PSPL vs binaries with Δχ² ≥ 160: **{f(d['roc_auc'])}**",
    f"- recall of those binaries at the card threshold {card['threshold']:.4f}: **{f(d['recall_at_threshold'])}** "
    f"with {f(d['pspl_firing_rate'])} of test PSPL events firing (threshold chosen on validation for ≤ 5%)",
    f"- overall ROC AUC (all binaries, incl. undetectable ones): {f(ev['roc_auc'])}; PR AUC {f(ev['pr_auc'])}; "
    f"share of binaries with Δχ² < 160: {f(ev['binary_dchi2_fractions']['below_160'])}",
    f"- at threshold: accuracy {f(c['accuracy'])}, precision {f(c['precision'])}, recall {f(c['recall'])}, "
    f"F1 {f(c['f1'])}",
    f"- recall (Δχ² ≥ 160) with data up to t0: {f(early.get('t0', {}).get('recall_detectable'))}; "
    f"median first-trigger time of those binaries {f(ev['decision_time']['binary_detectable_tE'].get('median'))} tE "
    "relative to t0 (negative = before the peak)",
    "",
    f"Training: {card['data']['n_events']} events, best epoch {tr['best_epoch']} of {tr['epochs_run']} "
    f"(stopped by {tr['stopped_by']}), device {tr['device']}, {tr['wall_s']} s.",
    "",
    "Files: `weights.pt` (state_dict), `model_card.json`, `scalers.json` (the artifact); `config.json`, "
    "`summary.json`, `training.log` (the training run); `evaluation/` (summary JSON and plots).",
    "",
    "## How it was made",
    "",
    "```",
    "bash scripts/train_shipped_model.sh   # with the settings below",
    "```",
    "",
    "which ran:",
    "",
    "```",
]
lines += commands.read_text().splitlines()
lines += ["```", ""]
(dest / "README.md").write_text("\n".join(lines))
PYEOF
log "done: $DEST"
cat "$DEST/README.md"
