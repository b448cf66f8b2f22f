"""The TD-CNN: the thesis' TimeDistributed 1-D CNN, made causal and dilated.

Three convolution blocks (Conv1D -> BatchNorm -> ReLU -> Dropout) with kernels 9/7/5 and
128/64/32 filters, then a per-timestep head FC(64) -> ReLU -> Dropout -> FC(2). Each
convolution is padded on the left only, by ``(kernel - 1) * dilation`` zeros, so the
output at point ``n`` depends on points ``<= n`` only (causal). With dilations 1/4/16
(FINDINGS: by far the best measured) the receptive field is
``1 + 8*1 + 6*4 + 4*16 = 97`` points.

Input (B, T, C) float32, output logits (B, T, 2); P(binary) = softmax(...)[..., 1].
Because the net is causal, right-padding a batch of ragged curves does not change the
outputs at real points (:func:`predict_ragged` relies on that), and the output at the
last point of a window of the newest ``receptive_field`` points equals the output of a
run over the whole curve (in eval mode).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class TDCNNConfig:
    in_channels: int = 3
    conv_channels: tuple[int, ...] = (128, 64, 32)
    kernel_sizes: tuple[int, ...] = (9, 7, 5)
    dilations: tuple[int, ...] = (1, 4, 16)
    fc_units: int = 64
    n_classes: int = 2
    dropout: float = 0.2

    def kwargs(self) -> dict:
        """JSON-ready constructor arguments (what the model card stores)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left by (kernel - 1) * dilation: output n sees inputs <= n."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, padding=0)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, T)
        return super().forward(nn.functional.pad(x, (self.left_pad, 0)))


class TDCNN(nn.Module):
    """Causal dilated TimeDistributed CNN; ``TDCNN(**card["kwargs"])`` rebuilds it."""

    def __init__(self, in_channels: int = 3, conv_channels=(128, 64, 32), kernel_sizes=(9, 7, 5),
                 dilations=(1, 4, 16), fc_units: int = 64, n_classes: int = 2, dropout: float = 0.2):
        super().__init__()
        conv_channels, kernel_sizes, dilations = tuple(conv_channels), tuple(kernel_sizes), tuple(dilations)
        if not (len(conv_channels) == len(kernel_sizes) == len(dilations)) or not conv_channels:
            raise ValueError("conv_channels, kernel_sizes and dilations must have one equal, "
                             "non-zero length")
        self.config = TDCNNConfig(in_channels, conv_channels, kernel_sizes, dilations, fc_units,
                                  n_classes, float(dropout))
        blocks = []
        c_in = in_channels
        for c_out, k, d in zip(conv_channels, kernel_sizes, dilations):
            blocks.append(nn.Sequential(CausalConv1d(c_in, c_out, k, d), nn.BatchNorm1d(c_out),
                                        nn.ReLU(), nn.Dropout(dropout)))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Linear(c_in, fc_units), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(fc_units, n_classes))

    @classmethod
    def from_config(cls, config: TDCNNConfig) -> "TDCNN":
        return cls(**config.kwargs())

    @property
    def receptive_field(self) -> int:
        """Number of points (newest included) the output at one point depends on."""
        c = self.config
        return 1 + sum((k - 1) * d for k, d in zip(c.kernel_sizes, c.dilations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> logits (B, T, n_classes)."""
        h = x.transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return self.head(h.transpose(1, 2))

    def forward_last(self, x: torch.Tensor, n_last: int = 1) -> torch.Tensor:
        """Logits of the newest ``n_last`` points only: x (B, T, C) -> (B, n_last, n_classes).

        Eval mode only. Computes just the dependency cone of those outputs (with dilations
        1/4/16 and one output: 23 positions of layer 1, 5 of layer 2, 1 of layer 3) instead
        of every position of the window, so the cost per alert stays small; equals
        ``forward(x)[:, -n_last:]`` up to float rounding. Give it at least the newest
        ``receptive_field + n_last - 1`` points for the result to equal a run over the
        whole curve (fewer points = the curve starts there).
        """
        if self.training:
            raise RuntimeError("forward_last is for eval mode (BatchNorm running statistics)")
        t = x.shape[1]
        if not 1 <= n_last <= t:
            raise ValueError(f"n_last must be in 1..{t}, got {n_last}")
        plan = self._cone_plan(t, n_last, x.device)
        h = x[:, plan[0][0]].transpose(1, 2)  # (B, C, |P0|) input at the needed positions
        for block, (_, idx) in zip(self.blocks, plan[1:]):
            conv, bn = block[0], block[1]
            hz = torch.cat([h, h.new_zeros(h.shape[0], h.shape[1], 1)], dim=2)  # last col = pad
            g = hz[:, :, idx]  # (B, C_in, |P|, k)
            y = torch.einsum("bcpk,ock->bop", g, conv.weight) + conv.bias[None, :, None]
            y = nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                         False, 0.0, bn.eps)
            h = torch.relu(y)
        return self.head(h.transpose(1, 2))

    def _cone_plan(self, t: int, n_last: int, device) -> list:
        """[(P0, None), (P1, idx1), ...]: positions per layer and gather indices into the
        previous layer's kept positions (index len(P_prev) = a zero pad column)."""
        key = (t, n_last, str(device))
        cache = self.__dict__.setdefault("_cone_cache", {})
        if key in cache:
            return cache[key]
        c = self.config
        positions = [np.arange(t - n_last, t)]
        for k, d in zip(reversed(c.kernel_sizes), reversed(c.dilations)):
            p = positions[0]
            need = (p[:, None] - d * np.arange(k - 1, -1, -1)[None, :]).ravel()
            positions.insert(0, np.unique(need[need >= 0]))
        plan = [(torch.as_tensor(positions[0], device=device), None)]
        for layer, (k, d) in enumerate(zip(c.kernel_sizes, c.dilations), start=1):
            prev, p = positions[layer - 1], positions[layer]
            q = p[:, None] - d * np.arange(k - 1, -1, -1)[None, :]
            idx = np.where(q >= 0, np.searchsorted(prev, np.maximum(q, 0)), len(prev))
            plan.append((torch.as_tensor(p, device=device), torch.as_tensor(idx, device=device)))
        cache[key] = plan
        return plan


def predict_ragged(model: nn.Module, curves: list[np.ndarray], device: torch.device | str = "cpu",
                   batch_size: int = 64, amp: bool = False) -> list[np.ndarray]:
    """P(binary) per point for ragged inputs ``curves[i]`` (n_i, C) -> list of (n_i,) float32.

    Curves are sorted by length and right-padded within a batch; causality makes the
    padding invisible to the real points. The model should be in eval mode.
    """
    device = torch.device(device)
    out: list[np.ndarray | None] = [None] * len(curves)
    order = np.argsort([len(c) for c in curves], kind="stable")
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            lens = [len(curves[i]) for i in idx]
            t_max = max(max(lens), 1)
            c = curves[idx[0]].shape[1]
            batch = np.zeros((len(idx), t_max, c), dtype=np.float32)
            for row, i in enumerate(idx):
                batch[row, :lens[row]] = curves[i]
            xb = torch.from_numpy(batch).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
            p = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = p[row, :lens[row]].astype(np.float32)
    return out  # type: ignore[return-value]
