"""Model artifact: a folder of data, never code.

    weights.pt        the model's state_dict (torch.save; loaded with weights_only=True)
    model_card.json   architecture arguments, format version, channels, decision rule,
                      threshold, training data and command, metrics
    scalers.json      the two-stage feature scalers (:mod:`training.scalers`)

:func:`load_artifact` refuses anything that is not plain tensors (a checkpoint that
carries code objects fails to load), a card of another format version, or a class other
than the TD-CNN; every error names the file.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training import decision, psplfit
from training.features import (CHANNELS, REFERENCE_POINTS, FeatureError, build_features,
                               build_features_batch, feature_set, needs_pspl_d)
from training.model import TDCNN
from training.scalers import ScalerError, TwoStageScaler

FORMAT_VERSION = 1
MODEL_CLASS = "training.model:TDCNN"
WEIGHTS, CARD, SCALERS = "weights.pt", "model_card.json", "scalers.json"
_CLASSES = {MODEL_CLASS: TDCNN}  # the only classes an artifact may name


class ArtifactError(ValueError):
    """A model artifact that is missing, corrupt or of another format (names the file)."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def save_artifact(directory, model: nn.Module, card: dict, scalers: TwoStageScaler) -> Path:
    """Write weights.pt, model_card.json and scalers.json into ``directory``.

    The card is completed with the fields the loader needs (class, kwargs, format
    version, channels, reference points, receptive field, created) unless given.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    net = _unwrap(model)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    card = dict(card)
    card.setdefault("name", d.name)
    card["class"] = MODEL_CLASS
    card["kwargs"] = net.config.kwargs()
    card["format_version"] = FORMAT_VERSION
    card.setdefault("channels", list(CHANNELS))
    card.setdefault("reference_points", REFERENCE_POINTS)
    card["receptive_field"] = net.receptive_field
    card.setdefault("decision", decision.params(card.get("threshold", 0.5)))
    card.setdefault("threshold", float(card["decision"]["threshold"]))
    card["decision"]["threshold"] = float(card["threshold"])
    card.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tmp = d / (WEIGHTS + ".tmp")
    torch.save(state, tmp)
    tmp.replace(d / WEIGHTS)
    (d / CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=_json_default) + "\n")
    (d / SCALERS).write_text(scalers.to_json() + "\n")
    return d


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class Artifact:
    model: nn.Module
    card: dict
    scalers: TwoStageScaler
    threshold: float
    receptive_field: int
    version: str
    device: torch.device

    @property
    def channels(self) -> tuple[str, ...]:
        """The feature channels the model reads (the card's; training.features.FEATURE_SETS)."""
        return tuple(self.card["channels"])

    @property
    def decision(self) -> dict:
        """Decision-rule parameters (rule, smooth_window, min_points, threshold)."""
        return self.card["decision"]

    @property
    def needs_pspl_d(self) -> bool:
        """Whether the model reads the PSPL-fit statistic (feature set v3)."""
        return needs_pspl_d(self.channels)

    @property
    def pspl_params(self):
        """The ``training.psplfit.Params`` whose statistic D the model reads (the card's
        ``pspl_fit``; None for a model that reads none)."""
        if not self.needs_pspl_d:
            return None
        return psplfit.Params(**self.card["pspl_fit"])

    def pspl_d(self, time, mag, mag_err, band=None) -> np.ndarray:
        """D at every point of a whole light curve, with the card's fit parameters."""
        curve = (time, mag, mag_err) if band is None else (time, mag, mag_err, band)
        return psplfit.run_curves([curve], self.pspl_params)[0]

    def inputs(self, time, mag, mag_err, reference=None, prev_time: float | None = None,
               band=None, pspl_d=None) -> np.ndarray:
        """Model input (n, C) float32 for a light curve (or a tail window, see features);
        ``band`` u8 codes per point (None: one band). ``pspl_d``: the PSPL-fit statistic
        per point for a v3 model; computed here for a whole curve when not given (a tail
        window must pass it: its fit began before the window)."""
        if self.needs_pspl_d and pspl_d is None:
            if reference is not None or prev_time is not None:
                raise FeatureError("a tail window of a v3 model needs its pspl_d")
            pspl_d = self.pspl_d(time, mag, mag_err, band)
        return self.scalers.transform(build_features(time, mag, mag_err, reference, prev_time, band,
                                                     channels=self.channels, pspl_d=pspl_d))

    def inputs_batch(self, time, mag, mag_err, reference=None, prev_time=None,
                     lengths=None, band=None, pspl_d=None) -> np.ndarray:
        """Model input (B, W, C) float32 for B curves or tail windows at once: row ``b`` equals
        ``inputs(...)`` of curve ``b`` bit for bit on one machine (see
        ``features.build_features_batch`` for the arguments); rows past ``lengths[b]`` are 0."""
        x = self.scalers.transform(build_features_batch(time, mag, mag_err, reference, prev_time,
                                                        lengths, band, channels=self.channels,
                                                        pspl_d=pspl_d))
        if lengths is not None:
            x[np.arange(x.shape[1])[None, :] >= np.asarray(lengths)[:, None]] = 0.0
        return x

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """P(binary) per point: x (B, T, C) float32 -> (B, T) float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[-1] != self.scalers.n_channels:
            raise ValueError(f"predict expects (B, T, {self.scalers.n_channels}), got {x.shape}")
        out = np.empty(x.shape[:2], dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size])).to(self.device)
                out[s:s + batch_size] = torch.softmax(self.model(xb), dim=-1)[..., 1].cpu().numpy()
        return out

    def predict_last(self, x: np.ndarray, n_last: int = 1, batch_size: int = 4096) -> np.ndarray:
        """P(binary) of the newest ``n_last`` points only: x (B, T, C) -> (B, n_last).

        Uses the model's dependency cone (cheap per alert); equals
        ``predict(x)[:, -n_last:]`` within ``training.model.PROB_TOLERANCE``. Pass the newest
        ``receptive_field + n_last - 1`` points (or all, if fewer) of each event.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[-1] != self.scalers.n_channels:
            raise ValueError(f"predict_last expects (B, T, {self.scalers.n_channels}), got {x.shape}")
        out = np.empty((len(x), n_last), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size])).to(self.device)
                logits = self.model.forward_last(xb, n_last)
                out[s:s + batch_size] = torch.softmax(logits, dim=-1)[..., 1].cpu().numpy()
        return out

    def predict_curves(self, curves: list[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
        """P(binary) per point for ragged model inputs [(n_i, C)] -> [(n_i,)]."""
        from training.model import predict_ragged

        return predict_ragged(self.model, curves, self.device, batch_size)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"model artifact file missing: {path}")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return obj


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_artifact(directory, device: str | torch.device = "cpu") -> Artifact:
    """Load an artifact folder; the model comes back in eval mode on ``device``."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"model artifact folder not found: {d}")
    card_path, weights_path, scalers_path = d / CARD, d / WEIGHTS, d / SCALERS
    card = _read_json(card_path)
    if card.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{card_path}: model card format version {card.get('format_version')!r}, "
                            f"this code reads version {FORMAT_VERSION}")
    cls = _CLASSES.get(card.get("class"))
    if cls is None:
        raise ArtifactError(f"{card_path}: unknown model class {card.get('class')!r} "
                            f"(expected {MODEL_CLASS!r})")
    for key in ("kwargs", "threshold", "decision", "channels", "reference_points"):
        if key not in card:
            raise ArtifactError(f"{card_path}: missing field {key!r}")
    try:
        channels = feature_set(card["channels"])
    except (FeatureError, TypeError) as exc:
        raise ArtifactError(f"{card_path}: built for features this code does not build: {exc}") from None
    if needs_pspl_d(channels):
        if not isinstance(card.get("pspl_fit"), dict):
            raise ArtifactError(f"{card_path}: a v3 model needs its pspl_fit parameters: "
                                "the card has no 'pspl_fit' object")
        try:
            psplfit.Params(**card["pspl_fit"])
        except (TypeError, psplfit.PsplFitError) as exc:
            raise ArtifactError(f"{card_path}: a v3 model needs its pspl_fit parameters: {exc}") from None
    if card["reference_points"] != REFERENCE_POINTS:
        raise ArtifactError(f"{card_path}: built with {card['reference_points']} reference points; "
                            f"this code uses {REFERENCE_POINTS}")
    try:
        model = cls(**card["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{card_path}: bad model arguments: {exc}") from None
    try:
        scalers = TwoStageScaler.from_dict(_read_json(scalers_path))
    except ScalerError as exc:
        raise ArtifactError(f"{scalers_path}: {exc}") from None
    if scalers.n_channels != len(channels):
        raise ArtifactError(f"{scalers_path}: {scalers.n_channels} channels, the card's features "
                            f"have {len(channels)}")
    if not weights_path.is_file():
        raise ArtifactError(f"model artifact file missing: {weights_path}")
    raw = weights_path.read_bytes()
    if not zipfile.is_zipfile(weights_path):
        raise ArtifactError(f"{weights_path}: not a torch checkpoint (expected the zip format "
                            "written by torch.save)")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ArtifactError(f"{weights_path}: refused: the checkpoint holds objects other than "
                            "tensors (loaded with weights_only=True; an artifact is data, not code)"
                            ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{weights_path}: not a readable torch state_dict: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{weights_path}: expected a state_dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights_path}: does not match the card's model arguments: "
                            f"{str(exc).splitlines()[0]}") from None
    dev = resolve_device(device)
    if dev.type == "cuda":
        # full float32 as on the CPU: the card's threshold was chosen on float32 outputs and
        # cuDNN's default TF32 convolutions move probabilities by ~1e-3 (a trigger earlier
        # or later than the CPU broker's)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model.to(dev).eval()
    try:
        threshold = float(card["threshold"])
    except (TypeError, ValueError):
        raise ArtifactError(f"{card_path}: threshold is not a number") from None
    name = str(card.get("name", d.name))
    version = f"{name}-{hashlib.sha256(raw).hexdigest()[:12]}"
    return Artifact(model=model, card=card, scalers=scalers, threshold=threshold,
                    receptive_field=model.receptive_field, version=version, device=dev)
