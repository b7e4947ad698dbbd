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


def _layers(
    params: list[torch.Tensor], first: int = 2
) -> list[tuple[int, slice, tuple[int, int], slice | None]]:
    """Per layer: (its number, weight slice, weight shape as the kron format reads it, bias
    slice) in the flat layout. A ``Linear`` weight is ``(out, in)``, a ``Conv2d`` weight
    ``(out, in·kh·kw)`` (laplace-torch's K-FAC factors); layers are numbered from
    ``first``: 2 for an MLP (positions), 1 for a network (docs/theory.md §13)."""
    layers, at, i = [], 0, 0
    while i < len(params):
        W = params[i]
        if W.ndim not in (2, 4):
            raise ValueError(
                f"parameter {i} of shape {tuple(W.shape)} is not a Linear or Conv2d weight"
            )
        w = slice(at, at + W.numel())
        at, i = w.stop, i + 1
        b = None
        if i < len(params) and params[i].ndim == 1:
            b = slice(at, at + params[i].numel())
            at, i = b.stop, i + 1
        layers.append((len(layers) + first, w, (W.shape[0], W[0].numel()), b))
    return layers


def _first_layer(prior: Mapping[str, Any]) -> int:
    """Where a kron prior's layer numbers start: 1 for a network, 2 for an MLP."""
    return 1 if "row1" in prior else 2
