"""The thesis' two-stage feature normalisation, saved as JSON (never pickle).

Per channel: standardise (``z = (x - mean) / scale``), then min-max to [0, 1]
(``(z - min) / (max - min)``, range 0 taken as 1). Fitted on the training split only
(with scikit-learn's StandardScaler and MinMaxScaler, chunk by chunk with
``partial_fit`` so large splits fit in memory); applied in numpy by :meth:`transform`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import numpy as np

SCALERS_FORMAT_VERSION = 1


class ScalerError(ValueError):
    """A scalers JSON that is malformed or does not match the features."""


@dataclass
class TwoStageScaler:
    means: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    maxs: np.ndarray
    channels: tuple[str, ...] = ()

    @classmethod
    def fit(cls, chunks: Iterable[np.ndarray] | np.ndarray, channels: tuple[str, ...] = ()) -> "TwoStageScaler":
        """Fit on rows of (n, C) features: one array or an iterable of arrays (two passes)."""
        from sklearn.preprocessing import MinMaxScaler, StandardScaler

        chunks = [chunks] if isinstance(chunks, np.ndarray) else list(chunks)
        chunks = [np.asarray(c, dtype=np.float64) for c in chunks if len(c)]
        if not chunks:
            raise ScalerError("cannot fit scalers on zero rows")
        std = StandardScaler()
        for c in chunks:
            std.partial_fit(c)
        mm = MinMaxScaler()
        for c in chunks:
            mm.partial_fit(std.transform(c))
        return cls(means=std.mean_.copy(), scales=std.scale_.copy(), mins=mm.data_min_.copy(),
                   maxs=mm.data_max_.copy(), channels=tuple(channels))

    @property
    def n_channels(self) -> int:
        return len(self.means)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(..., C) -> float32 (..., C)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.n_channels:
            raise ScalerError(f"features have {x.shape[-1]} channels, scalers {self.n_channels}")
        rng = self.maxs - self.mins
        rng = np.where(rng == 0, 1.0, rng)
        return (((x - self.means) / self.scales - self.mins) / rng).astype(np.float32)

    def to_dict(self) -> dict:
        return {"format_version": SCALERS_FORMAT_VERSION, "kind": "standard_then_minmax",
                "channels": list(self.channels), "means": self.means.tolist(),
                "scales": self.scales.tolist(), "mins": self.mins.tolist(), "maxs": self.maxs.tolist()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "TwoStageScaler":
        if not isinstance(d, dict):
            raise ScalerError("scalers JSON must be an object")
        if d.get("format_version") != SCALERS_FORMAT_VERSION:
            raise ScalerError(f"scalers format version {d.get('format_version')!r}, this code reads "
                              f"version {SCALERS_FORMAT_VERSION}")
        try:
            arrs = {k: np.asarray(d[k], dtype=np.float64) for k in ("means", "scales", "mins", "maxs")}
        except KeyError as exc:
            raise ScalerError(f"scalers JSON lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ScalerError(f"scalers JSON has a non-numeric array: {exc}") from None
        shapes = {a.shape for a in arrs.values()}
        if len(shapes) != 1 or arrs["means"].ndim != 1:
            raise ScalerError("scalers arrays must be 1-D and of one length")
        if not all(np.all(np.isfinite(a)) for a in arrs.values()) or np.any(arrs["scales"] <= 0):
            raise ScalerError("scalers values must be finite, scales positive")
        return cls(**arrs, channels=tuple(d.get("channels", ())))

    @classmethod
    def from_json(cls, text: str) -> "TwoStageScaler":
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise ScalerError(f"scalers are not valid JSON: {exc}") from None
        return cls.from_dict(d)
