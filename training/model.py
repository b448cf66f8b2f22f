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
run over the whole curve (in eval mode); both up to float32 rounding.

:meth:`TDCNN.forward_last` (the broker's path) computes only what the newest outputs need,
as a few GEMMs with BatchNorm folded in. "The same result", for it and ``forward``, in
any batch, on any thread count, CPU or GPU, means P(binary) within :data:`PROB_TOLERANCE`,
not the same bits. So consumers that split the work store what one would within that
tolerance, and decide the same except where the smoothed score lies within it of the
threshold.
"""
from __future__ import annotations

import threading
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


# Two float32 computations of one point's P(binary) (forward or forward_last, any batch,
# thread count, x86-64 CPU with AVX2 or GPU) differ by at most this much. They differ at
# all because their sums (896 terms in the second convolution, 320 in the third) are taken
# in different orders: forward's convolutions and forward_last's GEMMs are other
# algorithms, and MKL, OpenBLAS and cuBLAS split a GEMM's inner sums into blocks chosen by
# the number of rows, the threads and the CPU, so the same event rounds differently in
# another batch or on another machine. float32 keeps 24 bits (u = 6e-8) and a sum of K
# terms is off by about sqrt(K) u times the magnitudes summed: the shipped models' logits
# come out up to 3.1e-5 from a float64 run (|logit| up to 9 on simulated light curves, 40
# on U[0, 1] inputs), and P = sigmoid(l1 - l0) moves by at most a quarter of the error in
# l1 - l0. Measured on a 2-core AMD EPYC (docs/BENCHMARKS_HISTORY.md, "Portability"): one event
# alone vs in batches of 2-1,500 rows, 1 or 2 threads, up to 1.1e-6; forward_last vs
# forward up to 7.5e-6; either vs float64 up to 8.7e-6; and an H100 vs the CPU up to
# 1.5e-5 on N(0, 1) inputs (same file, GPU section). 5e-5 leaves a margin of 3 over the
# worst; 1e-6 would not hold even for the batch alone. The stored byte round(254 P) then
# differs by at most 1.
PROB_TOLERANCE = 5e-5

_WORKSPACE_LOCK = threading.Lock()


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

        Eval mode only (BatchNorm running statistics, no dropout; no autograd graph is
        built). Equals ``forward(x)[:, -n_last:]`` up to float32 rounding: P(binary)
        within :data:`PROB_TOLERANCE`.
        Give it at least the newest ``receptive_field + n_last - 1`` points for the result
        to equal a run over the whole curve (fewer points = the curve starts there).

        How: each output depends on a tree of positions (its *dependency cone*): layer L
        at the output point, layer L-1 at its k_L taps, layer L-2 at the k_L * k_{L-1}
        taps of those, ... With BatchNorm folded into the convolutions (cached, see
        :meth:`_folded`), layer 1 over that tree is one GEMM whose input rows are a
        strided view of ``x`` (a position of the tree is linear in its tap indices), and
        every further layer is one GEMM over a plain reshape of the previous output
        (its rows are already grouped by tap). With kernels 9/7/5 and dilations 1/4/16
        that is 35 x (27 -> 128), 5 x (896 -> 64), 1 x (320 -> 32) and the head per
        output (~0.42 M multiply-adds; the 23 distinct layer-1 positions of the cone are
        computed 35 times: measured, that costs about what gathering them would).
        ``n_last`` outputs are ``n_last`` such trees (adjacent outputs of a dilated net
        share almost nothing above the input); when that would cost more than a plain
        pass over the newest ``receptive_field + n_last - 1`` points, that pass is run
        instead (:meth:`_forward_dense`, the same GEMMs over im2col rows). Tree nodes at
        positions before the window start are zeroed after their layer, exactly the
        zeros that the causal left padding puts at the input of the next layer.

        An event's result depends on the rest of its batch only through float32 rounding
        (the BLAS library blocks a GEMM by its number of rows): P(binary) within
        :data:`PROB_TOLERANCE`, not the same bits. Intermediate buffers are kept between
        calls (a few MB); calls from several threads take turns.
        """
        if self.training:
            raise RuntimeError("forward_last is for eval mode (BatchNorm running statistics)")
        if x.dim() != 3:
            raise ValueError(f"forward_last expects (B, T, C), got shape {tuple(x.shape)}")
        t = x.shape[1]
        if not 1 <= n_last <= t:
            raise ValueError(f"n_last must be in 1..{t}, got {n_last}")
        with torch.no_grad():
            folded = self._folded(x.device)
            x = x.to(folded[0][0].dtype)
            plan = self._tree_plan(t, n_last)
            if plan is None:  # a dense pass over the newest points is cheaper
                out = self._forward_dense(x[:, max(0, t - (self.receptive_field + n_last - 1)):],
                                          n_last, folded)
            else:
                out = self._forward_tree(x, n_last, plan, folded)
            return out

    # -- fast path internals -------------------------------------------------------------

    # layer-1 rows per chunk of the tree path (x 128 channels x 4 B = 4 MB): intermediates
    # stay in cache and live in reused buffers (fresh large tensors cost page faults: a
    # 36 MB layer-1 output took ~4x the time of its GEMM on the 2-core VM)
    TREE_ROWS_PER_CHUNK = 8192
    TREE_COST_FACTOR = 1.0  # tree multiply-adds x this vs the dense pass's: fewer wins

    def _drop_fast_caches(self) -> None:
        for k in ("_fold_cache", "_fold_tensors", "_ws"):
            self.__dict__.pop(k, None)

    def train(self, mode: bool = True):
        self._drop_fast_caches()
        return super().train(mode)

    def _apply(self, *args, **kwargs):  # .to(), .double(), .cuda(), ...
        self._drop_fast_caches()
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_fast_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def _folded(self, device) -> list:
        """[(W (k*C_in, C_out), b (C_out,)) per conv with BatchNorm folded in, then the head's
        (W^T, b) pairs], cached; recomputed whenever a
        parameter or buffer changed (in-place updates bump tensor versions;
        ``train()``, ``to()`` and ``load_state_dict`` also drop the cache)."""
        tensors = self.__dict__.get("_fold_tensors")
        if tensors is None:
            tensors = self.__dict__["_fold_tensors"] = list(self.parameters()) + list(self.buffers())
        key = (str(device),) + tuple((p.data_ptr(), p._version) for p in tensors)
        cached = self.__dict__.get("_fold_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        out = []
        with torch.inference_mode(False), torch.no_grad():
            for block in self.blocks:
                conv, bn = block[0], block[1]
                w = conv.weight.detach().to(device=device, dtype=torch.float64)
                b = conv.bias.detach().to(device=device, dtype=torch.float64)
                s = (bn.weight.detach().to(device, torch.float64)
                     / torch.sqrt(bn.running_var.detach().to(device, torch.float64) + bn.eps))
                wf = w * s[:, None, None]                                   # (C_out, C_in, k)
                bf = (b - bn.running_mean.detach().to(device, torch.float64)) * s \
                    + bn.bias.detach().to(device, torch.float64)
                dtype = conv.weight.dtype
                # rows ordered (tap, channel) to match a patch of k positions x C_in channels
                out.append((wf.permute(2, 1, 0).reshape(-1, wf.shape[0]).to(dtype).contiguous(),
                            bf.to(dtype).contiguous()))
            for layer in (self.head[0], self.head[3]):
                out.append((layer.weight.detach().to(device).t().contiguous(),
                            layer.bias.detach().to(device).contiguous()))
        self.__dict__["_fold_cache"] = (key, out)
        return out

    def _tree_plan(self, t: int, n_last: int):
        """None when a dense pass is cheaper, else a dict: ``skip`` (leading taps of each
        conv dropped because they lie before the window start on every branch), ``sizes``
        and ``steps`` of the strided input view (outputs, taps of conv L .. 2, taps of
        conv 1; steps in points), ``t_pad``/``base`` (padded length and the view's first
        point), ``masks`` (per conv, 0/1 per node: 0 where its position is before the
        start; None where none is), ``rows`` (output rows per event of each conv).
        Cached per (T, n_last)."""
        key = (t, n_last)
        cache = self.__dict__.setdefault("_tree_cache", {})
        if key in cache:
            return cache[key]
        c = self.config
        ks, ds, chans = c.kernel_sizes, c.dilations, (c.in_channels,) + c.conv_channels
        n_conv = len(ks)
        # taps before the start even on the newest branch (all of whose nodes sit at t-1)
        # read only padding: drop them (their contribution is exactly 0)
        skip = [max(0, k - 1 - (t - 1) // d) for k, d in zip(ks, ds)]
        kept = [k - s for k, s in zip(ks, skip)]
        rows = [n_last * int(np.prod(kept[l + 1:])) for l in range(n_conv)]  # per event
        tree = sum(r * kk * ci * co for r, kk, ci, co in zip(rows, kept, chans[:-1], chans[1:]))
        rf = self.receptive_field
        dense_first = [max(0, t - n_last - sum((k - 1) * d for k, d in zip(ks[l + 1:], ds[l + 1:])))
                       for l in range(n_conv)]
        dense = sum((t - f) * k * ci * co
                    for f, k, ci, co in zip(dense_first, ks, chans[:-1], chans[1:]))
        # measured on the shipped model (1 thread, T 20-120, n_last 2-24): per multiply-add
        # both paths cost about the same, so the smaller count wins (the rule picked the
        # faster path in every case but one near-tie)
        if self.TREE_COST_FACTOR * tree > dense:
            cache[key] = None
            return None
        # node positions (original coordinates) per conv's output: dims (n, kept_L, ...)
        masks = []
        pos = np.arange(t - n_last, t)
        for l in range(n_conv - 1, 0, -1):  # conv l's taps index the nodes of conv l-1
            taps = ds[l] * (np.arange(skip[l], ks[l]) - (ks[l] - 1))
            pos = pos[..., None] + taps
            m = (pos >= 0).reshape(-1)
            masks.insert(0, None if m.all() else torch.from_numpy(m.astype(np.float32))[:, None])
        masks.append(None)  # the last conv's nodes are the outputs (all >= 0)
        sizes = (n_last,) + tuple(kept[l] for l in range(n_conv - 1, 0, -1)) + (kept[0],)
        steps = (1,) + tuple(ds[l] for l in range(n_conv - 1, 0, -1)) + (ds[0],)
        base = t - n_last - sum(d * (k - 1 - s) for k, d, s in zip(ks, ds, skip))
        t_pad = t + max(0, -base)
        plan = dict(skip=skip, sizes=sizes, steps=steps, t_pad=t_pad, base=base + t_pad - t,
                    masks=masks, rows=rows)
        cache[key] = plan
        return plan

    def _forward_tree(self, x: torch.Tensor, n_last: int, plan, folded) -> torch.Tensor:
        t_pad, base, sizes, steps = plan["t_pad"], plan["base"], plan["sizes"], plan["steps"]
        masks, rows = plan["masks"], plan["rows"]
        b, t, ch = x.shape
        if t_pad > t:
            x = nn.functional.pad(x, (0, 0, t_pad - t, 0))
        x = x.contiguous()
        n_conv = len(self.blocks)
        chans = (ch,) + self.config.conv_channels
        # the kept taps' rows of each folded weight (rows are ordered tap, channel)
        weights = [(w[s * ci:], bias) for (w, bias), s, ci in zip(folded, plan["skip"], chans)]
        (w1, b1), (w2, b2) = folded[n_conv], folded[n_conv + 1]
        out = x.new_empty((b, n_last, w2.shape[1]))
        step = max(1, self.TREE_ROWS_PER_CHUNK // rows[0])  # events per chunk
        # sizes of the reused buffers for a full chunk: gathered rows, each conv, the head
        need = [step * rows[0] * weights[0][0].shape[0]]
        need += [step * r * w.shape[1] for r, (w, _) in zip(rows, weights)]
        need += [step * rows[-1] * w1.shape[1]]
        with _WORKSPACE_LOCK:  # the buffers are shared: one tree pass at a time
            ws = self._workspace(x.device, x.dtype, need)
            for s0 in range(0, b, step):
                nb = min(step, b - s0)
                view = x.as_strided((nb,) + sizes + (ch,),
                                    (t_pad * ch,) + tuple(s * ch for s in steps) + (1,),
                                    x.storage_offset() + (s0 * t_pad + base) * ch)
                h = ws[0][:view.numel()].view(view.shape)
                h.copy_(view)  # one row per layer-1 node: its kept positions x C
                h = h.view(nb * rows[0], -1)
                for l, (w, bias) in enumerate(weights):
                    h = h.view(-1, w.shape[0])  # one row per node: its kept taps x C_in
                    y = ws[l + 1][:h.shape[0] * w.shape[1]].view(h.shape[0], w.shape[1])
                    h = torch.addmm(bias, h, w, out=y).relu_()
                    if masks[l] is not None:
                        m = masks[l]
                        if m.device != h.device or m.dtype != h.dtype:
                            m = masks[l] = m.to(h.device, h.dtype)
                        h.view(nb, m.shape[0], -1).mul_(m)
                y = ws[n_conv + 1][:h.shape[0] * w1.shape[1]].view(h.shape[0], w1.shape[1])
                h = torch.addmm(b1, h, w1, out=y).relu_()
                torch.addmm(b2, h, w2, out=out[s0:s0 + nb].view(-1, w2.shape[1]))
        return out

    def _workspace(self, device, dtype, need: list[int]) -> list[torch.Tensor]:
        """Flat buffers reused across calls (fresh large tensors cost page faults)."""
        key = (str(device), dtype)
        store = self.__dict__.setdefault("_ws", {})
        bufs = store.get(key)
        if bufs is None or len(bufs) != len(need) or any(len(b) < n for b, n in zip(bufs, need)):
            old = bufs or []
            with torch.inference_mode(False):  # written in place in and out of inference mode
                bufs = [torch.empty(max(n, len(old[i]) if i < len(old) else 0), device=device,
                                    dtype=dtype) for i, n in enumerate(need)]
            store[key] = bufs
        return bufs

    def _forward_dense(self, x: torch.Tensor, n_last: int, folded) -> torch.Tensor:
        """Logits of the newest ``n_last`` points by a plain pass: every layer one GEMM over
        its im2col rows (the same weights and inner dimensions as the tree path; other row
        counts, so the rounding may differ within :data:`PROB_TOLERANCE`), each layer
        only at the positions the newest outputs need. x (B, T, C) -> (B, n_last, classes)."""
        b, t, ch = x.shape
        c = self.config
        n_conv = len(self.blocks)
        reach = [sum((k - 1) * d for k, d in zip(c.kernel_sizes[l + 1:], c.dilations[l + 1:]))
                 for l in range(n_conv)]
        first = [max(0, t - n_last - r) for r in reach]  # first position each layer computes
        (w1, b1), (w2, b2) = folded[n_conv], folded[n_conv + 1]
        out = x.new_empty((b, n_last, w2.shape[1]))
        step = max(1, self.TREE_ROWS_PER_CHUNK // (t - first[0]))  # events per chunk
        for s0 in range(0, b, step):
            h, lo = x[s0:s0 + step], 0  # h covers positions lo .. t-1
            nb = h.shape[0]
            for l, (k, d) in enumerate(zip(c.kernel_sizes, c.dilations)):
                w, bias = folded[l]
                start = first[l] - (k - 1) * d      # first input position this layer reads
                if start < lo:
                    h = nn.functional.pad(h, (0, 0, lo - start, 0))
                else:
                    h = h[:, start - lo:]
                h = h.contiguous()
                cin, rows = h.shape[2], t - first[l]
                patches = h.as_strided((nb, rows, k, cin), (h.shape[1] * cin, cin, d * cin, 1),
                                       h.storage_offset())
                h = torch.addmm(bias, patches.reshape(nb * rows, k * cin), w).relu_()
                h, lo = h.view(nb, rows, -1), first[l]
            h = torch.addmm(b1, h.reshape(nb * n_last, -1), w1).relu_()
            torch.addmm(b2, h, w2, out=out[s0:s0 + nb].view(-1, w2.shape[1]))
        return out

    def _cone_plan(self, t: int, n_last: int, device) -> list:
        """[(P0, None), (P1, idx1), ...]: the distinct positions per layer that the newest
        ``n_last`` outputs depend on, and gather indices into the previous layer's kept
        positions (index len(P_prev) = a zero pad column). Documentation/tests only."""
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
