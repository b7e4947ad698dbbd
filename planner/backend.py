"""Where the dense formats' large kernels run: numpy (the default) or torch.

The apply of a ``full`` or ``precision`` plan is a handful of large dense kernels —
a Cholesky factorisation, triangular solves, products — around index bookkeeping
that stays in numpy. This module is the one seam between them: the formats ask
:func:`current` for a :class:`Backend` and hand it numpy arrays; the torch backend
moves them to its device in float64, computes there, and hands numpy arrays back.

* ``use(None)`` (the default): numpy and scipy, no torch needed;
* ``use("cpu")``: torch on the CPU (how the torch path is tested everywhere);
* ``use("cuda")``: torch on the GPU, for workers that have one.

The service selects it with ``PLANNER_DEVICE`` (``app.settings``); the core reads no
environment. Results agree with the numpy path to rounding (1e-9 relative, tested).

Examples
--------
>>> import numpy as np
>>> S = np.array([[4.0, 2.0], [2.0, 3.0]])
>>> current().name
'numpy'
>>> with use("cpu"):
...     L = current().cholesky(S)
>>> np.allclose(L @ L.T, S)
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import scipy.linalg as sla

__all__ = ["Backend", "NumpyBackend", "TorchBackend", "current", "use"]


class Backend:
    """The kernels the dense formats' apply needs, on numpy arrays in and out."""

    name = "abstract"

    def cholesky(self, S: np.ndarray) -> np.ndarray:
        """Lower Cholesky factor of ``S``; ``np.linalg.LinAlgError`` when it has none."""
        raise NotImplementedError

    def solve_lower(self, L: np.ndarray, B: np.ndarray) -> np.ndarray:
        """``L⁻¹ B`` for a lower triangular ``L`` (``B`` a vector or a matrix)."""
        raise NotImplementedError

    def condition(
        self, S_BB: np.ndarray, S_Bk: np.ndarray, S_kk: np.ndarray, d: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One joint conditioning: with ``L = chol(S_BB)``, ``α = L⁻¹ d`` and
        ``W = L⁻¹ S_Bk``, returns ``(L, Wᵀ α, S_kk − Wᵀ W)`` (the last symmetrised):
        the factor, the mean's shift and the kept covariance."""
        raise NotImplementedError

    def gram(self, L: np.ndarray) -> np.ndarray:
        """``L Lᵀ``, symmetrised."""
        raise NotImplementedError

    def cho_solve(self, L: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``(L Lᵀ)⁻¹ y`` for a lower Cholesky factor ``L``."""
        raise NotImplementedError


class NumpyBackend(Backend):
    name = "numpy"

    def cholesky(self, S: np.ndarray) -> np.ndarray:
        return sla.cholesky(S, lower=True, check_finite=False)

    def solve_lower(self, L: np.ndarray, B: np.ndarray) -> np.ndarray:
        return sla.solve_triangular(L, B, lower=True, check_finite=False)

    def condition(self, S_BB, S_Bk, S_kk, d):
        L = self.cholesky(S_BB)
        alpha = self.solve_lower(L, d)
        W = sla.solve_triangular(L, S_Bk, lower=True, check_finite=False, overwrite_b=True)
        out = S_kk - W.T @ W
        out += out.T
        out *= 0.5
        return L, W.T @ alpha, out

    def gram(self, L: np.ndarray) -> np.ndarray:
        out = L @ L.T
        out += out.T
        out *= 0.5
        return out

    def cho_solve(self, L: np.ndarray, y: np.ndarray) -> np.ndarray:
        return sla.cho_solve((L, True), y, check_finite=False)


class TorchBackend(Backend):
    """torch on ``device`` (``"cpu"`` or ``"cuda"``), float64."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.name = f"torch-{self.device.type}"

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.device)

    @staticmethod
    def _np(t) -> np.ndarray:
        return t.detach().to("cpu").numpy()

    def _chol(self, S):
        L, info = self.torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            raise np.linalg.LinAlgError(f"{int(info)}-th leading minor is not positive definite")
        return L

    def cholesky(self, S: np.ndarray) -> np.ndarray:
        return self._np(self._chol(self._t(S)))

    def solve_lower(self, L: np.ndarray, B: np.ndarray) -> np.ndarray:
        b = self._t(B)
        x = self.torch.linalg.solve_triangular(
            self._t(L), b[:, None] if b.ndim == 1 else b, upper=False
        )
        return self._np(x[:, 0] if b.ndim == 1 else x)

    def condition(self, S_BB, S_Bk, S_kk, d):
        torch = self.torch
        L = self._chol(self._t(S_BB))
        alpha = torch.linalg.solve_triangular(L, self._t(d)[:, None], upper=False)[:, 0]
        W = torch.linalg.solve_triangular(L, self._t(S_Bk), upper=False)
        out = self._t(S_kk)
        out -= W.T @ W
        out = 0.5 * (out + out.T)
        return self._np(L), self._np(W.T @ alpha), self._np(out)

    def gram(self, L: np.ndarray) -> np.ndarray:
        t = self._t(L)
        out = t @ t.T
        return self._np(0.5 * (out + out.T))

    def cho_solve(self, L: np.ndarray, y: np.ndarray) -> np.ndarray:
        b = self._t(y)
        x = self.torch.cholesky_solve(b[:, None] if b.ndim == 1 else b, self._t(L), upper=False)
        return self._np(x[:, 0] if b.ndim == 1 else x)


_NUMPY = NumpyBackend()
_current: Backend = _NUMPY


def current() -> Backend:
    """The backend in force."""
    return _current


def select(device: str | None) -> Backend:
    """Make ``device`` (None: numpy; ``"cpu"``, ``"cuda"``: torch there) the backend in
    force for this process (kept when it already is); returns it."""
    global _current
    if device in (None, "", "numpy"):
        _current = _NUMPY
    elif _current.name != f"torch-{device}":
        _current = TorchBackend(device)
    return _current


@contextlib.contextmanager
def use(device: str | None) -> Iterator[Backend]:
    """The backend for ``device`` in force inside the block."""
    global _current
    before = _current
    try:
        yield select(device)
    finally:
        _current = before
