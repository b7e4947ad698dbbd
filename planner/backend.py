"""Where the dense formats' large kernels run: numpy (the default) or torch.

The apply of a ``full`` or ``precision`` plan is a handful of large dense kernels —
a Cholesky factorisation, triangular solves, products — around index bookkeeping
that stays in numpy. This module is the one seam between them: the formats ask
:func:`current` for a :class:`Backend` and hand it numpy arrays; the torch backend
moves them to its device in float64, computes there, and hands numpy arrays back.

The search goes through the same seam for its large kernels: the dense greedy's
(``planner.posterior.scoring``) stage starts (``L⁻¹ Σ_{B,G}`` and the conditional
covariance it downdates, :meth:`Backend.downdate`), a merged layer's block
(:meth:`Backend.cholesky`, :meth:`Backend.inverse_diagonal`) and its products with
the rows a stage adds step by step, which a device backend keeps on the device
(:meth:`Backend.rows`) so that a step sends it only its own new rows and fetches only
the products; a precision's covariance blocks, and the exchange moves' ``Σ_BB⁻¹`` and
``H = Σ_BB⁻¹ Σ_{B,E}`` (:meth:`Backend.solve_lower`, :meth:`Backend.cholesky_inverse`,
:meth:`Backend.matmul`). Kernels on fewer
than :data:`DEVICE_ENTRIES` entries stay in numpy whatever the backend
(:func:`for_size`): a device round trip costs more than they do. A device out of
memory raises :class:`DeviceMemoryError`, a ``MemoryError``.

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
import functools
from collections.abc import Iterator

import numpy as np
import scipy.linalg as sla
from scipy.linalg import lapack

from ._threads import product
from .linalg import gram_downdate, inverse_diagonal

__all__ = [
    "DEVICE_ENTRIES",
    "Backend",
    "DeviceMemoryError",
    "HostRows",
    "NumpyBackend",
    "Rows",
    "TorchBackend",
    "current",
    "for_size",
    "use",
]

#: Entries (of the array a kernel makes or holds) from which the search's kernels run on
#: a device backend; smaller ones stay in numpy (:func:`for_size`).
DEVICE_ENTRIES = 1 << 20


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

    def downdate(self, L: np.ndarray, C: np.ndarray, S: np.ndarray):
        """``(X, S − XᵀX)`` with ``X = L⁻¹ C`` (``L`` lower triangular): a conditional
        covariance from the factor of what is conditioned on (the dense greedy's stage
        start, a merge's block).  ``S`` may be overwritten."""
        raise NotImplementedError

    def inverse_diagonal(self, L: np.ndarray) -> np.ndarray:
        """The diagonal of ``(L Lᵀ)⁻¹`` for a lower Cholesky factor ``L``."""
        raise NotImplementedError

    def cholesky_inverse(self, L: np.ndarray) -> np.ndarray:
        """``(L Lᵀ)⁻¹``, whole and symmetric, for a lower Cholesky factor ``L`` (a
        precision's covariance, or ``Σ_BB⁻¹`` for exchange moves)."""
        raise NotImplementedError

    def matmul(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """``A @ B``."""
        raise NotImplementedError

    def rows(self, X0: np.ndarray, room: int) -> Rows:
        """A matrix that grows by rows, starting as ``X0`` (``n0 × w``), with room for
        ``room`` rows past it at first, held where this backend computes its products."""
        return HostRows(X0, room)


class Rows:
    """A matrix ``R = [X0; W]`` that grows by rows (:meth:`Backend.rows`): a stage of the
    dense greedy holds there ``X0 = L⁻¹ Σ_{B,G}`` and a row block of ``W`` per commit,
    over the stage's live columns, and reads its products with them through it.  The
    host always holds its copy (:attr:`host`) for the small reads; a device backend
    holds a second copy on its device, where the products run.  Every product comes back
    as a numpy array."""

    m: int  # rows held, X0's included

    @property
    def host(self) -> HostRows:
        """The rows on the host."""
        raise NotImplementedError

    def append(self, Y: np.ndarray) -> None:
        """Add the rows ``Y`` (``k × w``)."""
        raise NotImplementedError

    def gram(self, cols: np.ndarray, start: int) -> np.ndarray:
        """``R[:, cols]ᵀ R`` for the rows ``R`` from ``start`` on."""
        raise NotImplementedError

    def left(self, X: np.ndarray) -> np.ndarray:
        """``X R`` for all the rows ``R`` (``X``: ``k × m``)."""
        raise NotImplementedError

    def compact(self, keep: np.ndarray) -> None:
        """Keep only the columns ``keep``."""
        raise NotImplementedError


class HostRows(Rows):
    """:class:`Rows` in numpy: ``X0`` as given, and ``W`` in one flat buffer reserved for
    ``room`` rows (zeroed on allocation: its pages are touched as they are used), doubled
    when full and compacted in place.  A product large enough to gain runs on every core
    inside the greedy's single-threaded loop (:func:`planner._threads.product`)."""

    #: entries of W up to which a compaction copies in one vectorised step (not in place)
    SMALL = 1 << 20

    def __init__(self, X0: np.ndarray, room: int) -> None:
        self.X0 = X0
        self.w = X0.shape[1]
        self._buf = np.zeros(room * self.w)
        self.k = 0  # rows of W in use

    @property
    def host(self) -> HostRows:
        return self

    @property
    def m(self) -> int:
        return self.X0.shape[0] + self.k

    @property
    def W(self) -> np.ndarray:
        """The rows past ``X0`` (a view of the buffer)."""
        return self._buf[: self.k * self.w].reshape(self.k, self.w)

    @property
    def nbytes(self) -> int:
        """Bytes the buffer holds (used or not)."""
        return self._buf.nbytes

    def append(self, Y: np.ndarray) -> None:
        k, w = Y.shape[0], self.w
        if (self.k + k) * w > self._buf.size:
            grown = np.zeros(max((self.k + k) * w, 2 * self._buf.size))
            grown[: self.k * w] = self._buf[: self.k * w]
            self._buf = grown
        self._buf[self.k * w : (self.k + k) * w] = Y.ravel()
        self.k += k

    def gram(self, cols: np.ndarray, start: int) -> np.ndarray:
        n0, W = self.X0.shape[0], self.W
        if start < n0:  # X0's rows too
            X0 = self.X0[start:]
            return product(np.ascontiguousarray(X0[:, cols].T), X0) + product(
                np.ascontiguousarray(W[:, cols].T), W
            )
        W = W[start - n0 :]
        return product(np.ascontiguousarray(W[:, cols].T), W)

    def left(self, X: np.ndarray) -> np.ndarray:
        n0 = self.X0.shape[0]
        out = product(X[:, :n0], self.X0) if n0 else np.zeros((X.shape[0], self.w))
        if self.k:
            out += product(X[:, n0:], self.W)
        return out

    def compact(self, keep: np.ndarray) -> None:
        w, nk, buf = self.w, keep.size, self._buf
        if self.k * w <= self.SMALL:  # one vectorised copy
            buf[: self.k * nk] = self.W.take(keep, axis=1).ravel()
        else:  # in place: row i moves to [i nk, (i+1) nk), never past unread rows
            for i in range(self.k):
                buf[i * nk : (i + 1) * nk] = buf[i * w : (i + 1) * w].take(keep)
        self.X0 = self.X0.take(keep, axis=1)
        self.w = nk


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

    def downdate(self, L, C, S):
        X = sla.solve_triangular(L, C, lower=True, check_finite=False)
        return X, gram_downdate(S, X)

    def inverse_diagonal(self, L: np.ndarray) -> np.ndarray:
        return inverse_diagonal(L)

    def matmul(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        return A @ B

    def cholesky_inverse(self, L: np.ndarray) -> np.ndarray:
        S, info = lapack.dpotri(L, lower=1)  # one LAPACK call, into the lower triangle
        if info != 0:
            raise np.linalg.LinAlgError(f"the factor is singular at pivot {info}")
        n, band = S.shape[0], 512
        for i in range(0, n, band):  # mirror the lower triangle, band by band, in place
            S[i : i + band, i + band :] = S[i + band :, i : i + band].T
            blk = S[i : i + band, i : i + band]
            blk[np.triu_indices(blk.shape[0], 1)] = blk.T[np.triu_indices(blk.shape[0], 1)]
        return S


class DeviceMemoryError(MemoryError):
    """A device backend ran out of memory (a ``MemoryError``, as the host's allocations
    raise: the service answers both with a 413 problem)."""


def _device_memory(fn):
    """torch's out-of-memory error on a device becomes :class:`DeviceMemoryError`."""

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        bk = getattr(self, "bk", self)
        try:
            return fn(self, *args, **kwargs)
        except bk.torch.OutOfMemoryError as exc:
            raise DeviceMemoryError(f"the {bk.device} device ran out of memory: {exc}") from None

    return call


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

    @_device_memory
    def cholesky(self, S: np.ndarray) -> np.ndarray:
        return self._np(self._chol(self._t(S)))

    @_device_memory
    def solve_lower(self, L: np.ndarray, B: np.ndarray) -> np.ndarray:
        b = self._t(B)
        x = self.torch.linalg.solve_triangular(
            self._t(L), b[:, None] if b.ndim == 1 else b, upper=False
        )
        return self._np(x[:, 0] if b.ndim == 1 else x)

    @_device_memory
    def condition(self, S_BB, S_Bk, S_kk, d):
        torch = self.torch
        L = self._chol(self._t(S_BB))
        alpha = torch.linalg.solve_triangular(L, self._t(d)[:, None], upper=False)[:, 0]
        W = torch.linalg.solve_triangular(L, self._t(S_Bk), upper=False)
        out = self._t(S_kk)
        out -= W.T @ W
        out = 0.5 * (out + out.T)
        return self._np(L), self._np(W.T @ alpha), self._np(out)

    @_device_memory
    def gram(self, L: np.ndarray) -> np.ndarray:
        t = self._t(L)
        out = t @ t.T
        return self._np(0.5 * (out + out.T))

    @_device_memory
    def cho_solve(self, L: np.ndarray, y: np.ndarray) -> np.ndarray:
        b = self._t(y)
        x = self.torch.cholesky_solve(b[:, None] if b.ndim == 1 else b, self._t(L), upper=False)
        return self._np(x[:, 0] if b.ndim == 1 else x)

    @_device_memory
    def downdate(self, L, C, S):
        X = self.torch.linalg.solve_triangular(self._t(L), self._t(C), upper=False)
        out = self._t(S)
        out -= X.T @ X
        return self._np(X), self._np(out)

    @_device_memory
    def inverse_diagonal(self, L: np.ndarray) -> np.ndarray:
        t = self._t(L)
        eye = self.torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
        Li = self.torch.linalg.solve_triangular(t, eye, upper=False)
        return self._np((Li * Li).sum(dim=0))

    @_device_memory
    def cholesky_inverse(self, L: np.ndarray) -> np.ndarray:
        return self._np(self.torch.cholesky_inverse(self._t(L), upper=False))

    @_device_memory
    def matmul(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        return self._np(self._t(A) @ self._t(B))

    @_device_memory
    def rows(self, X0: np.ndarray, room: int) -> _TorchRows:
        return _TorchRows(self, HostRows(X0, room))


class _TorchRows(Rows):
    """:class:`Rows` mirrored: the host's (:class:`HostRows`), and a copy in one flat
    float64 tensor on the backend's device, where the products run, with room for ``X0``
    and ``ROOM`` more rows at first, doubled when full (device memory is taken when asked
    for, unlike the host's zeroed pages)."""

    ROOM = 1024

    def __init__(self, backend: TorchBackend, host: HostRows) -> None:
        torch = backend.torch
        X0 = host.X0
        n0, w = X0.shape
        self._host, self.bk, self.w, self.m = host, backend, w, n0
        room = max(1, (n0 + min(w, self.ROOM)) * w)
        self.buf = torch.empty(room, dtype=torch.float64, device=backend.device)
        if n0:
            self.buf[: n0 * w] = backend._t(X0).reshape(-1)

    @property
    def host(self) -> HostRows:
        return self._host

    def _R(self, start: int = 0):
        return self.buf[start * self.w : self.m * self.w].view(self.m - start, self.w)

    def _index(self, a: np.ndarray):
        return self.bk.torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.bk.device)

    @_device_memory
    def append(self, Y: np.ndarray) -> None:
        k = Y.shape[0]
        end = (self.m + k) * self.w
        if end > self.buf.numel():
            grown = self.bk.torch.empty(
                max(end, 2 * self.buf.numel()), dtype=self.buf.dtype, device=self.buf.device
            )
            grown[: self.m * self.w] = self.buf[: self.m * self.w]
            self.buf = grown
        self.buf[self.m * self.w : end] = self.bk._t(Y).reshape(-1)
        self.m += k
        self._host.append(Y)

    @_device_memory
    def gram(self, cols: np.ndarray, start: int) -> np.ndarray:
        R = self._R(start)
        return self.bk._np(R.index_select(1, self._index(cols)).T @ R)

    @_device_memory
    def left(self, X: np.ndarray) -> np.ndarray:
        return self.bk._np(self.bk._t(X) @ self._R())

    @_device_memory
    def compact(self, keep: np.ndarray) -> None:
        R = self._R().index_select(1, self._index(keep))  # a new tensor: no overlap
        self.w = int(keep.size)
        self.buf[: R.numel()] = R.reshape(-1)
        self._host.compact(keep)


_NUMPY = NumpyBackend()
_current: Backend = _NUMPY


def current() -> Backend:
    """The backend in force."""
    return _current


def for_size(entries: float) -> Backend:
    """The backend in force for a kernel on ``entries`` entries: numpy below
    :data:`DEVICE_ENTRIES` (a device round trip would cost more than the kernel)."""
    return _current if entries >= DEVICE_ENTRIES else _NUMPY


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
