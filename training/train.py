"""`ulens train`: train the TD-CNN on a simulated dataset; one folder per run.

Recipe (see /work/shared/FINDINGS.md for why):

* **Split** 70/15/15 by event, per class, seeded; ``split.json`` keeps the event ids so
  evaluation scores held-out events only.
* **Inputs**: ``Artifact.inputs`` = scalers(build_features(whole curve)): features need the
  event's reference, so they are built on the whole curve, then cropped. Scalers
  (standard then min-max) are fitted on the training split's points only.
* **Per-point targets** (``windowed_chi2``): a binary's point ``j`` is 1 where the χ² of
  the noise-free binary-minus-best-PSPL difference, ``((mag_model - mag_pspl)/mag_err)^2``,
  summed over the newest ``receptive_field`` points up to ``j``, is at least
  ``--target-chi2`` (default 50): the binary signal is then inside what the network sees.
  All other points, and every PSPL point, are 0. (Copying the label onto every point
  teaches the net to call baseline noise binary.) ``mag_pspl`` is used for targets only.
* **Crops**: each epoch takes one crop per training event: ``--crop-length`` loss points
  (256) that contain the event's peak (t0; truth used to choose crops at training time
  only; FINDINGS: random crops fail to learn), with a fraction ``--random-crop-fraction``
  of crops placed anywhere, plus up to ``receptive_field - 1`` points of left context that
  are fed to the net but excluded from the loss, so every loss point sees the same past
  as in the stream (except at a curve's true start, where the stream also has none).
* **Loss**: cross-entropy per point over the loss points. AdamW, gradient clipping.
* **Early stopping** on validation ROC AUC of the event score (the decision rule's
  running maximum of the 5-point causal mean of P(binary), over whole validation
  curves) on PSPL vs detectable binaries (Δχ² >= 160; all binaries where none is); the
  best epoch's weights are kept.
* **Threshold**: the lowest at which at most ``--max-false-rate`` (5%) of validation PSPL
  events ever fire under the decision rule; stored in the model card.
* bf16 autocast and DataParallel on GPUs, CPU otherwise; fixed seeds; ``--max-minutes``
  caps the wall-clock time of the epochs.

Output: ``{output_root}/{name}_{timestamp}/`` with weights.pt, model_card.json,
scalers.json (the artifact), config.json, split.json, training.log, summary.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HELP = "train the TD-CNN on a simulated dataset (one results folder per run)"

DEFAULT_TARGET_CHI2 = 50.0
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


class TrainError(ValueError):
    """Bad training input or arguments (the message names the problem)."""


@dataclass
class TrainConfig:
    data: str
    experiment_name: str = "tdcnn"
    output_root: str = "results"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 6
    seed: int = 0
    device: str = "auto"
    max_minutes: float | None = None
    crop_length: int = 256
    random_crop_fraction: float = 0.2
    target_chi2: float = DEFAULT_TARGET_CHI2
    max_false_rate: float = 0.05
    dilations: tuple[int, ...] = (1, 4, 16)
    dropout: float = 0.2
    conv_channels: tuple[int, ...] = (128, 64, 32)
    fc_units: int = 64
    num_threads: int | None = None
    features: str = "v2"
    progress: bool = True
    command: str | None = None


# ----------------------------------------------------------------------------- helpers

def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_events(labels: np.ndarray, seed: int, fractions=SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
    """Stratified split of event indices into train/val/test (sorted index arrays)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def dataset_features(ds, channels="v1", pspl_d=None) -> np.ndarray:
    """build_features (feature set ``channels``) for every event, flat (P, C) float32 aligned
    with the dataset's points; ``pspl_d``: each event's PSPL-fit statistic (v3)."""
    from training.features import build_features, feature_set

    channels = feature_set(channels)
    out = np.empty((len(ds.time), len(channels)), dtype=np.float32)
    for i in range(ds.n_events):
        a, b = ds.offsets[i], ds.offsets[i + 1]
        out[a:b] = build_features(ds.time[a:b], ds.mag[a:b], ds.mag_err[a:b], band=ds.band[a:b],
                                  channels=channels, pspl_d=None if pspl_d is None else pspl_d[i])
    return out


def pspl_d_cache(output_root, data_sha: str, params) -> Path:
    """Where a training's per-point PSPL-fit statistics of one data file are kept (shared by
    every run under ``output_root``: the fit costs about 0.2 ms per point, training reruns
    on one file are many)."""
    return Path(output_root) / "pspl_d" / f"{data_sha[:12]}-{params.version.rsplit('-', 1)[-1]}.npz"


def point_targets(ds, window: int, chi2_threshold: float) -> np.ndarray:
    """Flat int64 per-point targets (the ``windowed_chi2`` rule of the module docstring)."""
    z2 = ((ds.mag_model.astype(np.float64) - ds.mag_pspl.astype(np.float64))
          / ds.mag_err.astype(np.float64)) ** 2
    cs = np.concatenate([[0.0], np.cumsum(z2)])
    j = np.arange(len(z2))
    starts = np.repeat(ds.offsets[:-1], ds.lengths())
    win = cs[j + 1] - cs[np.maximum(starts, j - window + 1)]
    is_binary = np.repeat(ds.label.astype(bool), ds.lengths())
    return (is_binary & (win >= chi2_threshold)).astype(np.int64)


def targets_card(window: int, chi2_threshold: float) -> dict:
    return {"rule": "windowed_chi2", "window_points": int(window), "chi2_threshold": float(chi2_threshold),
            "doc": "binary point j is 1 where the sum over the newest window_points points up to j of "
                   "((mag_model - mag_pspl)/mag_err)^2 >= chi2_threshold; else 0; PSPL points all 0"}


def peak_indices(ds) -> np.ndarray:
    """Index (within each event) of the point nearest t0."""
    out = np.empty(ds.n_events, dtype=np.int64)
    for i in range(ds.n_events):
        t = ds.time[ds.offsets[i]:ds.offsets[i + 1]]
        out[i] = int(np.clip(np.searchsorted(t, ds.params["t0"][i]), 0, max(len(t) - 1, 0)))
    return out


class CropSampler:
    """Fixed-size training crops with left context excluded from the loss."""

    def __init__(self, x, y, offsets, peaks, events, crop_length, context, random_fraction, rng):
        self.x, self.y, self.offsets, self.peaks = x, y, offsets, peaks
        self.events, self.L, self.ctx, self.p_rand, self.rng = events, crop_length, context, random_fraction, rng
        self.width = crop_length + context

    def crop(self, i: int):
        a0, n = self.offsets[i], self.offsets[i + 1] - self.offsets[i]
        w = self.width
        xb = np.zeros((w, self.x.shape[1]), np.float32)
        yb = np.zeros(w, np.int64)
        mb = np.zeros(w, np.float32)
        if n <= w:  # whole curve, right-padded (causal: padding is invisible to real points)
            xb[:n], yb[:n], mb[:n] = self.x[a0:a0 + n], self.y[a0:a0 + n], 1.0
            return xb, yb, mb
        if self.rng.random() < self.p_rand:
            s = int(self.rng.integers(0, n - self.L + 1))
        else:
            pk = int(self.peaks[i])
            s = int(self.rng.integers(max(0, pk - self.L + 1), min(pk, n - self.L) + 1))
        a = int(np.clip(s - self.ctx, 0, n - w))
        xb[:] = self.x[a0 + a:a0 + a + w]
        yb[:] = self.y[a0 + a:a0 + a + w]
        mb[:] = 1.0 if a == 0 else 0.0
        mb[self.ctx:] = 1.0  # points with their full receptive field inside the crop
        return xb, yb, mb

    def batches(self, batch_size: int):
        order = self.rng.permutation(self.events)
        for s in range(0, len(order), batch_size):
            items = [self.crop(int(i)) for i in order[s:s + batch_size]]
            yield tuple(np.stack(z) for z in zip(*items))


def curves_of(x: np.ndarray, offsets: np.ndarray, events) -> list[np.ndarray]:
    return [x[offsets[i]:offsets[i + 1]] for i in events]


def score_events(model, x, offsets, events, device, amp, dec: dict) -> np.ndarray:
    """Event scores (decision rule over whole curves) for ``events``."""
    from training import decision
    from training.model import predict_ragged

    probs = predict_ragged(model, curves_of(x, offsets, events), device, batch_size=128, amp=amp)
    return np.array([decision.event_score(p, dec["min_points"], dec["smooth_window"]) for p in probs])


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"ulens.train.{path.parent.name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)
    return log


# ----------------------------------------------------------------------------- training

def train(cfg: TrainConfig) -> Path:
    """Run one training; returns the run folder (which is also a loadable artifact)."""
    import torch
    from torch import nn
    from tqdm import tqdm

    from training import dataset as dataset_mod
    from training import decision, metrics
    from training.artifact import resolve_device, save_artifact
    from training.features import FeatureError, feature_set, needs_pspl_d
    from training.model import TDCNN
    from training.scalers import TwoStageScaler

    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.crop_length < 8:
        raise TrainError("epochs and batch size must be >= 1, lr > 0, crop length >= 8")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise TrainError("--max-minutes must be positive")
    if not cfg.experiment_name or "/" in cfg.experiment_name:
        raise TrainError(f"bad experiment name {cfg.experiment_name!r}")
    try:
        channels = feature_set(cfg.features)
    except FeatureError as exc:
        raise TrainError(f"--features: {exc}") from None
    data_path = Path(cfg.data)
    # the TD-CNN reads magnitudes: a visit that measured no flux (a faint band) has none
    ds = dataset_mod.load(data_path).magnitudes_only()  # DatasetError (a ValueError) names the problem
    if len(np.unique(ds.label)) < 2 or min(np.bincount(ds.label, minlength=2)) < 4:
        raise TrainError(f"{data_path}: needs at least 4 events of each class to split and train")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but no CUDA device is available")
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_root) / f"{cfg.experiment_name}_{stamp}"
    k = 1
    while run_dir.exists():
        k += 1
        run_dir = Path(cfg.output_root) / f"{cfg.experiment_name}_{stamp}-{k}"
    run_dir.mkdir(parents=True)
    log = _logger(run_dir / "training.log")
    def say(message: str) -> None:  # training.log and stderr (above the tqdm bar when there is one)
        log.info(message)
        (tqdm.write if cfg.progress else print)(message, file=sys.stderr)
    cfg_dict = asdict(cfg)
    (run_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    say(f"run folder {run_dir}; device {device}{' (bf16 autocast)' if amp else ''}; "
        f"{ds.n_events} events from {data_path}")

    # -- split, features, scalers, targets
    split = split_events(ds.label, cfg.seed)
    (run_dir / "split.json").write_text(json.dumps(
        {"seed": cfg.seed, "fractions": list(SPLIT_FRACTIONS), "data": str(data_path),
         **{k: ds.event_id[v].tolist() for k, v in split.items()}}) + "\n")
    t0 = time.time()
    pspl_params, pspl_d = None, None
    if needs_pspl_d(channels):
        from training.evaluate_rules import params_from_config, pspl_fit_stats

        # the broker's own pspl-fit parameters: a broker running the rule beside this model
        # computes D once for both
        pspl_params = params_from_config()
        sha = file_sha256(data_path)
        pspl_d, _ = pspl_fit_stats(ds, np.arange(ds.n_events), pspl_params,
                                   pspl_d_cache(cfg.output_root, sha, pspl_params), sha,
                                   workers=max(1, cfg.num_threads or (os.cpu_count() or 1)),
                                   progress=cfg.progress)
        say(f"pspl-fit statistic D of {ds.n_events} events in {time.time() - t0:.1f}s "
            f"({pspl_params.version})")
    feats = dataset_features(ds, channels, pspl_d)
    del pspl_d
    train_rows = np.concatenate([np.arange(ds.offsets[i], ds.offsets[i + 1]) for i in split["train"]])
    scalers = TwoStageScaler.fit([feats[train_rows[s:s + 2_000_000]]
                                  for s in range(0, len(train_rows), 2_000_000)], channels=channels)
    x = scalers.transform(feats)
    del feats
    model = TDCNN(in_channels=len(channels), conv_channels=cfg.conv_channels, dilations=cfg.dilations,
                  fc_units=cfg.fc_units, dropout=cfg.dropout)
    rf = model.receptive_field
    y = point_targets(ds, rf, cfg.target_chi2)
    peaks = peak_indices(ds)
    say(f"features + scalers + targets in {time.time() - t0:.1f}s; split train/val/test = "
        f"{len(split['train'])}/{len(split['val'])}/{len(split['test'])}; receptive field {rf}; "
        f"positive points {y[train_rows].mean():.3f} of train points")
    dec = decision.params(0.5)
    val_labels, val_dchi2 = ds.label[split["val"]], ds.params["dchi2"][split["val"]]

    # -- model, optimiser
    net = model.to(device)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        net = nn.DataParallel(model)
        say(f"DataParallel over {torch.cuda.device_count()} GPUs")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    sampler = CropSampler(x, y, ds.offsets, peaks, split["train"], cfg.crop_length, rf - 1,
                          cfg.random_crop_fraction, np.random.default_rng(cfg.seed + 1))

    best = {"auc": -1.0, "epoch": 0, "state": None}
    history = []
    deadline = time.time() + 60 * cfg.max_minutes if cfg.max_minutes else None
    stopped = "epochs"
    bad_epochs = 0
    n_batches = -(-len(split["train"]) // cfg.batch_size)
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        tot, cnt = 0.0, 0
        bar = tqdm(sampler.batches(cfg.batch_size), total=n_batches, desc=f"epoch {epoch}",
                   disable=not cfg.progress, leave=False, file=sys.stderr)
        for xb, yb, mb in bar:
            xb, yb, mb = (torch.from_numpy(a).to(device, non_blocking=True) for a in (xb, yb, mb))
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(xb)
            loss = (loss_fn(logits.float().reshape(-1, 2), yb.reshape(-1)) * mb.reshape(-1)).sum() \
                / mb.sum().clamp_min(1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            tot += float(loss.detach()) * len(xb)
            cnt += len(xb)
            bar.set_postfix(loss=f"{tot / cnt:.4f}")
            if deadline and time.time() > deadline:
                stopped = "max_minutes"
                break
        bar.close()
        net.eval()
        scores = score_events(model, x, ds.offsets, split["val"], device, amp, dec)
        m = metrics.event_metrics(val_labels, scores, val_dchi2,
                                  decision.threshold_for_false_rate(scores[val_labels == 0], cfg.max_false_rate))
        # select on what the model is for: PSPL vs the binaries a rule can tell apart (on
        # a survey where most binaries look like single lenses, lsst 59%, the overall AUC
        # mostly measures the undetectable ones); the overall AUC where there are none
        auc = next((v for v in (m["roc_auc_detectable"], m["roc_auc"]) if v is not None), 0.0)
        row = {"epoch": epoch, "train_loss": tot / max(cnt, 1), "val_auc": m["roc_auc"],
               "val_auc_detectable": m["roc_auc_detectable"], "val_recall_detectable": m["recall_detectable"],
               "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 1)}
        history.append(row)
        improved = auc > best["auc"]
        say(f"epoch {epoch}: loss {row['train_loss']:.4f}  val AUC {_f(m['roc_auc'])}  "
            f"AUC(dchi2>=160) {_f(m['roc_auc_detectable'])}  recall(dchi2>=160 @5% PSPL) "
            f"{_f(m['recall_detectable'])}{'  *' if improved else ''}")
        if improved:
            best = {"auc": auc, "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        sched.step(auc)
        if stopped == "max_minutes":
            break
        if bad_epochs >= cfg.patience:
            stopped = "early_stopping"
            break

    # -- best weights, threshold on validation, artifact
    model.load_state_dict(best["state"])
    model.eval()
    if device.type == "cuda":  # score as the CPU broker does: float32, no TF32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    scores = score_events(model, x, ds.offsets, split["val"], device, False, dec)
    threshold = decision.threshold_for_false_rate(scores[val_labels == 0], cfg.max_false_rate)
    val = metrics.event_metrics(val_labels, scores, val_dchi2, threshold)
    say(f"best epoch {best['epoch']} (stopped by {stopped}); threshold {threshold:.4f} "
        f"(<= {cfg.max_false_rate:.0%} of validation PSPL fire): val AUC {_f(val['roc_auc'])}, "
        f"AUC(dchi2>=160) {_f(val['roc_auc_detectable'])}, recall(dchi2>=160) {_f(val['recall_detectable'])}")
    card = {
        "name": cfg.experiment_name,
        "threshold": threshold,
        "decision": decision.params(threshold),
        "threshold_rule": f"lowest threshold at which <= {cfg.max_false_rate} of validation PSPL events fire",
        "channels": list(channels),
        "targets": targets_card(rf, cfg.target_chi2),
        "crops": {"crop_length": cfg.crop_length, "context": rf - 1,
                  "random_crop_fraction": cfg.random_crop_fraction, "rule": "contain_peak"},
        "data": {"path": str(data_path), "sha256": file_sha256(data_path), "n_events": ds.n_events,
                 "meta": ds.meta, "split": "split.json"},
        "command": cfg.command or " ".join(sys.argv),
        "training": {"best_epoch": best["epoch"], "epochs_run": len(history), "stopped_by": stopped,
                     "seed": cfg.seed, "device": str(device), "bf16": amp, "lr": cfg.lr,
                     "batch_size": cfg.batch_size, "wall_s": round(time.time() - t0, 1)},
        "metrics": {"validation": val},
    }
    if pspl_params is not None:
        card["pspl_fit"] = asdict(pspl_params)
        card["pspl_fit_version"] = pspl_params.version
    save_artifact(run_dir, model, card, scalers)
    summary = {"run_dir": str(run_dir), "best_epoch": best["epoch"], "stopped_by": stopped,
               "threshold": threshold, "validation": val, "history": history}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"saved {run_dir}")
    return run_dir


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# ----------------------------------------------------------------------------- command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="FILE", help="dataset .npz from `ulens simulate`")
    p.add_argument("--experiment-name", required=True, metavar="NAME", help="run folder prefix")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="most training epochs")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="light curves per batch")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="learning rate")
    p.add_argument("--patience", type=int, default=TrainConfig.patience,
                   help="epochs without a better validation AUC before stopping")
    p.add_argument("--output-root", default=TrainConfig.output_root, metavar="DIR",
                   help="folder under which the run folder NAME_<timestamp> is made")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="random seed (split, crops, weights)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (auto: cuda when available)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap on the epochs")
    p.add_argument("--crop-length", type=int, default=TrainConfig.crop_length,
                   help="loss points per training crop (plus receptive_field - 1 of context)")
    p.add_argument("--random-crop-fraction", type=float, default=TrainConfig.random_crop_fraction,
                   help="share of crops placed anywhere instead of around the peak")
    p.add_argument("--target-chi2", type=float, default=TrainConfig.target_chi2,
                   help="windowed chi2 of the binary signal from which a point's target is 1")
    p.add_argument("--max-false-rate", type=float, default=TrainConfig.max_false_rate,
                   help="share of validation PSPL events allowed to fire at the chosen threshold")
    p.add_argument("--dilations", default="1,4,16", help="dilations of the three convolutions")
    p.add_argument("--conv-channels", default=",".join(map(str, TrainConfig.conv_channels)),
                   help="filters of the three convolutions (the thesis: 128,64,32; 64,32,16 trains "
                        "3.5x faster on a CPU)")
    p.add_argument("--dropout", type=float, default=TrainConfig.dropout, help="dropout rate")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                   help="weight decay of the optimiser")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--features", choices=("v1", "v2", "v3"), default=TrainConfig.features,
                   help="input channels (training/features.py): v1 = dmag, mag_err, log_dt (the "
                        "thesis models); v2 = dmag, the brightening's significance, ln mag_err, "
                        "log_dt and the band one-hot, for surveys of many cadences, bands and depths; "
                        "v3 = v2 and the causal PSPL-fit statistic D of the classical rule at each "
                        "point (consumer.pspl_fit's parameters; computed once per data file and kept "
                        "under OUTPUT_ROOT/pspl_d/)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _three_ints(value, option: str) -> tuple[int, ...]:
    """``--dilations``/``--conv-channels``: three positive integers, comma-separated."""
    try:
        v = tuple(int(x) for x in str(value).split(","))
    except ValueError:
        raise TrainError(f"{option} must be comma-separated integers, got {value!r}") from None
    if len(v) != 3 or min(v) < 1:
        raise TrainError(f"{option} needs three positive integers, got {value!r}")
    return v


def run(args) -> int:
    dil = _three_ints(args.dilations, "--dilations")
    conv = _three_ints(args.conv_channels, "--conv-channels")
    cfg = TrainConfig(data=args.data, experiment_name=args.experiment_name, output_root=args.output_root,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      patience=args.patience, seed=args.seed, device=args.device, max_minutes=args.max_minutes,
                      crop_length=args.crop_length, random_crop_fraction=args.random_crop_fraction,
                      target_chi2=args.target_chi2, max_false_rate=args.max_false_rate, dilations=dil,
                      conv_channels=conv,
                      dropout=args.dropout, num_threads=args.num_threads, features=args.features,
                      progress=not args.no_progress,
                      command="ulens train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None)
    run_dir = train(cfg)
    print(run_dir)
    return 0
