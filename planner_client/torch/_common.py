"""What the torch adapters share: float64 conversions and the flat layout's layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised by the client-only install check
    raise ImportError(
        "planner_client.torch needs PyTorch; install the torch extra: "
        "pip install './client[torch]' (torch and laplace-torch)"
    ) from exc

#: The posterior formats a prior can come in (docs/theory.md §7).
FORMATS = ("full", "diag", "lowrank", "kron", "precision")

Prior = Mapping[str, Any]


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float64).numpy())


def _sym(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(0.5 * (a + a.T))


def _params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def _layers(params: list[torch.Tensor]) -> list[tuple[int, slice, tuple[int, int], slice | None]]:
    """Per layer t: (t, weight slice, weight shape, bias slice) in the flat layout."""
    layers, at, i = [], 0, 0
    while i < len(params):
        W = params[i]
        if W.ndim != 2:
            raise ValueError(f"parameter {i} of shape {tuple(W.shape)} is not a Linear weight")
        w = slice(at, at + W.numel())
        at, i = w.stop, i + 1
        b = None
        if i < len(params) and params[i].ndim == 1:
            b = slice(at, at + params[i].numel())
            at, i = b.stop, i + 1
        layers.append((len(layers) + 2, w, tuple(W.shape), b))
    return layers
