#!/usr/bin/env bash
# Produce models/tdcnn-lsst, the default model: the exact commands that made it (its
# README.md lists them with the figures). Simulate two LSST-like training sets (the binary
# set's u0/tE/fs priors, and wide priors for both classes: blended, long and distant single
# lenses), join them and spoil half their events as real photometry is (ulens augment:
# understated errors, outliers), train the v2-feature TD-CNN (64/32/16 filters) with a
# wall-clock cap, then evaluate on fresh test sets of other seeds: LSST-like with each
# prior, and the thesis and Roman profiles, the TD-CNN beside the PSPL-fit rule.
#
# About 20 min of simulation and 45 min of training on a 2-core CPU (it made
# models/tdcnn-lsst on 2026-12-02, 2-core AMD EPYC, no GPU); a GPU is used when
# there is one (--device auto). WORK [results/lsst] is the scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
WORK=${WORK:-results/lsst}
DEST=${DEST:-models/tdcnn-lsst}
MAX_MINUTES=${MAX_MINUTES:-45}
mkdir -p "$WORK"
u() { echo "+ ulens $*" >&2; "$PY" -m ulens.cli "$@"; }
SIM=(simulate --survey lsst --binary-params baseline --workers 2 --quiet)

u "${SIM[@]}" --n-pspl 8000 --n-binary 8000 --shared-priors set --seed 1601 -o "$WORK/train_set.npz"
u "${SIM[@]}" --n-pspl 8000 --n-binary 6000 --shared-priors wide --seed 1602 -o "$WORK/train_wide.npz"
u augment --data "$WORK/train_set.npz" "$WORK/train_wide.npz" -o "$WORK/train_lsst_aug.npz" --seed 1603
RUN=$(u train --data "$WORK/train_lsst_aug.npz" --experiment-name tdcnn-lsst --output-root "$WORK/runs" \
        --epochs 60 --batch-size 64 --lr 0.002 --patience 8 --max-minutes "$MAX_MINUTES" --seed 0 \
        --num-threads 2 --no-progress --features v2 --conv-channels 64,32,16 | tail -n 1)

# fresh test sets: seeds no training used
u "${SIM[@]}" --n-pspl 3000 --n-binary 3000 --shared-priors set --seed 1690 -o "$WORK/test_lsst_set.npz"
u "${SIM[@]}" --n-pspl 3000 --n-binary 3000 --shared-priors wide --seed 1691 -o "$WORK/test_lsst_wide.npz"
u simulate --survey thesis --binary-params baseline --workers 2 --quiet --shared-priors set \
  --n-pspl 500 --n-binary 500 --seed 1692 -o "$WORK/test_thesis.npz"
u simulate --survey roman --binary-params baseline --workers 2 --quiet --shared-priors set \
  --n-pspl 200 --n-binary 200 --seed 1693 -o "$WORK/test_roman.npz"

# the card's threshold: 1% of the validation PSPL events (train chose it for 5%)
"$PY" scripts/rethreshold.py "$RUN" --max-false-rate 0.01
u evaluate --model "$RUN" --data "$WORK/test_lsst_set.npz" --early-detection
# Roman: the TD-CNN alone (the PSPL-fit rule over 4.4 million points takes ~10 CPU minutes)
u evaluate --model "$RUN" --data "$WORK/test_roman.npz" --output "$WORK/roman" > "$WORK/roman.txt"
for t in lsst_set lsst_wide thesis; do
  u evaluate --rule both --model "$RUN" --data "$WORK/test_$t.npz" --false-rate 0.01 \
    --output "$WORK/compare_$t" > "$WORK/compare_$t.txt"
done
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$RUN"/{weights.pt,model_card.json,scalers.json,config.json,summary.json,training.log} "$DEST"/
cp -r "$RUN/evaluation" "$DEST/evaluation"
mkdir -p "$DEST/comparison"
for t in lsst_set lsst_wide thesis; do
  cp "$WORK/compare_$t/comparison.json" "$DEST/comparison/$t.json"
  cp "$WORK/compare_$t.txt" "$DEST/comparison/$t.txt"
done
echo "done: $DEST (write its README.md from comparison/*.txt)" >&2
