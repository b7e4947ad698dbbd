"""The ``precision`` format: mean and precision ``Λ = Σ⁻¹`` (docs/theory.md §7), the Laplace
approximation's native form.

With ``B`` conditioned, ``a`` kept and ``M`` marginalised, let ``r = M ∪ a``,
ordered M first.  One Cholesky ``Λ_rr = L Lᵀ`` gives everything:

* the conditional mean ``μ_r = m_r − Λ_rr⁻¹ Λ_rB (v − m_B)``;
* the marginal precision of ``a``: the Schur complement of ``Λ_rr`` on ``M``,
  which is ``L_aa L_aaᵀ`` (the trailing block of the same factor);
* the cost ``½ (dᵀ Λ_BB d − yᵀ Λ_rr⁻¹ y)``, ``y = Λ_rB d``.

So a plan with a large ``B`` and a small ``a ∪ M`` costs ``O(|a ∪ M|³)``,
however large ``B`` is.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.linalg as sla

from .._threads import all_threads
from ..backend import current, for_size
from ..errors import InvalidPosterior
from ..linalg import inverse_diagonal, symmetrise
from ._dense import DensePosterior, HeldCovariance, _runs, gather
from ._validate import difference_cost

#: A request for Σ over this share of the trailing parameters it spans computes (and
#: keeps) Σ over all of them at once: solving for that many columns costs as much.
_TRAILING_SHARE = 0.25

#: Rows of the factor a trailing Schur complement reads at once (at most this many bytes).
_BLOCK_BYTES = 1 << 26

__all__ = ["PrecisionPosterior"]


def _first(B: np.ndarray, P: np.ndarray) -> int:
    """The first index of B ∪ P (P not empty)."""
    return int(min(P.min(), B.min(initial=P.min())))


class PrecisionPosterior(DensePosterior):
    """``N(mean, precision⁻¹)``."""

    format = "precision"
    array_names = ("precision",)

    @classmethod
    def derived_names(cls, structure) -> tuple[str, ...]:
        """The lower Cholesky factor of Λ: every search of a precision solves with it."""
        return ("cholesky",)

    def derived_arrays(self) -> dict[str, np.ndarray]:
        chol = self.__dict__.get("_chol")
        return {} if chol is None else {"cholesky": chol}

    @property
    def precision(self) -> np.ndarray:
        return self.matrix

    def _rest(self, B: np.ndarray, keep: np.ndarray | None = None):
        """(M, keep) with M every coordinate in neither B nor keep."""
        mask = np.ones(self.n, dtype=bool)
        mask[B] = False
        if keep is not None:
            mask[keep] = False
        M = np.flatnonzero(mask)
        return M, (np.zeros(0, np.int64) if keep is None else keep)

    def _factor(self, r: np.ndarray) -> np.ndarray:
        try:
            return current().cholesky(gather(self.precision, r, r))
        except np.linalg.LinAlgError:  # pragma: no cover - a principal block of a PD matrix
            raise InvalidPosterior("is not positive definite", field="precision") from None

    def condition(self, B, values, keep, structure) -> PrecisionPosterior:
        B = np.asarray(B, dtype=np.int64)
        keep = np.asarray(keep, dtype=np.int64)
        M, _ = self._rest(B, keep)
        r = np.concatenate([M, keep])
        L = self._factor(r)
        mu = self.mean[r].copy()
        if B.size:
            y = gather(self.precision, r, B, copy=False) @ (values - self.mean[B])
            mu -= current().cho_solve(L, y)
        La = L[M.size :, M.size :]
        prec = current().gram(La)
        return PrecisionPosterior(structure, mu[M.size :], prec, La.copy())

    def constraint_cost(self, B, values) -> float:
        B = np.asarray(B, dtype=np.int64)
        if B.size == 0:
            return 0.0
        r, _ = self._rest(B)
        # natively: a factor of Λ over the complement, one product with Λ_rB and one solve
        native = r.size**3 / 3 + r.size * B.size + r.size**2
        if native > self._covariance_route_work(B):
            # B small against its complement: Σ_BB (by solves, or read from the kept
            # trailing Σ) costs less than a factor of Λ over the complement
            return self._covariance_cost(B, values)
        d = values - self.mean[B]
        whole = float(d @ (gather(self.precision, B, B, copy=False) @ d))
        part = 0.0
        if r.size:
            L = self._factor(r)
            z = sla.solve_triangular(
                L, gather(self.precision, r, B, copy=False) @ d, lower=True, check_finite=False
            )
            part = float(z @ z)
        return difference_cost(whole, part, B.size, "the plan")

    # -- the precision side of the search's blocks (docs/theory.md §6) ---------------------
    def _covariance_route_work(self, idx: np.ndarray) -> float:
        """Flops of forming Σ over ``idx`` by solves with the trailing factor, then inverting."""
        t = self.n - int(idx.min()) if idx.size else 0
        return t * t * idx.size / 2 + idx.size**2 * t + idx.size**3

    def _schur(self, M: np.ndarray, P: np.ndarray):
        """(factor of Λ_MM, X = L_MM⁻¹ Λ_MP, Q = Λ_PP − XᵀX): the precision of P with M
        marginalised out (and everything else conditioned on)."""
        Lam = self.precision
        LM = self._factor(M) if M.size else np.zeros((0, 0))
        X = (
            sla.solve_triangular(LM, gather(Lam, M, P), lower=True, check_finite=False)
            if M.size
            else np.zeros((0, P.size))
        )
        Q = gather(Lam, P, P) - X.T @ X
        return LM, X, Q

    def inverse_block(self, idx) -> np.ndarray:
        """Σ_BB⁻¹ is the Schur complement of Λ on B's complement: cheap when that is small."""
        idx = np.asarray(idx, dtype=np.int64)
        M, _ = self._rest(idx)
        native = M.size**3 / 3 + M.size**2 * idx.size + M.size * idx.size**2
        if native > self._covariance_route_work(idx):
            return super().inverse_block(idx)
        _, _, Q = self._schur(M, idx)
        return symmetrise(Q)

    def conditional_precision(self, B, values, P):
        B = np.asarray(B, dtype=np.int64)
        P = np.asarray(P, dtype=np.int64)
        M, _ = self._rest(B, P)
        native = M.size**3 / 3 + M.size**2 * P.size
        trailing = self._trailing_schur_work(B, P, M)
        if min(native, trailing) > self._covariance_route_work(np.concatenate([B, P])):
            return None
        if trailing < native:
            return self._trailing_schur(B, values, P, M)
        return self._native_schur(B, values, P, M)

    def _native_schur(self, B, values, P, M):
        """``(diag Q, Q c)`` from a factor of ``Λ_MM``: ``O(|M|³ + |M|² |P|)``."""
        Lam, m = self.precision, self.mean
        LM = self._factor(M) if M.size else np.zeros((0, 0))
        X = (
            sla.solve_triangular(LM, gather(Lam, M, P), lower=True, check_finite=False)
            if M.size
            else np.zeros((0, P.size))
        )
        q = np.diag(Lam)[P] - np.einsum("ij,ij->j", X, X)  # diag of Q = Λ_PP − XᵀX
        Qc = gather(Lam, P, P, copy=False) @ m[P] - X.T @ (X @ m[P])  # Q m_P
        if B.size:  # the shift of the mean by conditioning: Q Δ_P = −y_P + Λ_PM Λ_MM⁻¹ y_M
            d = values - m[B]
            Qc -= gather(Lam, P, B, copy=False) @ d
            if M.size:
                y_M = gather(Lam, M, B, copy=False) @ d
                Qc += X.T @ sla.solve_triangular(LM, y_M, lower=True, check_finite=False)
        return q, Qc

    # -- the same from the cached factor of Λ, when P and B lie in the trailing layers ----
    def _trailing_schur_work(self, B: np.ndarray, P: np.ndarray, M: np.ndarray) -> float:
        """Flops of :meth:`_trailing_schur` (infinite without the cached factor): with
        t0 the first index of B ∪ P, every index before t0 is marginalised, and the
        trailing block of the factor of Λ is already the factor of what is left."""
        if "_chol" not in self.__dict__ or P.size == 0:
            return np.inf
        t0 = _first(B, P)
        t, R = self.n - t0, int(np.count_nonzero(t0 <= M))
        return P.size * t * (2 + R) + R * R * t + B.size * t

    def _trailing_schur(self, B, values, P, M):
        """``(diag Q, Q c)`` from the trailing block ``L_t`` of the cached factor of Λ.

        ``Λ' = L_t L_tᵀ`` is the precision of the trailing indices with the leading
        ones marginalised; conditioning on B takes its sub-block, and marginalising
        the trailing rest R is a Schur complement: ``S = Λ'_{PB∪P} − Λ'_{P,R}
        Λ'_RR⁻¹ Λ'_{R,B∪P}``.  Rows of ``L_t`` are read in place, a run of P at a
        time, so the work is ``O(|P| |R| t)`` however many leading indices were
        marginalised."""
        m = self.mean
        t0 = _first(B, P)
        Lt = self._chol[t0:, t0:]
        R = M[t0 <= M] - t0
        p, b = P - t0, B - t0
        Lr = Lt[R]
        K = sla.cholesky(Lr @ Lr.T, lower=True, check_finite=False) if R.size else None
        step = max(1, _BLOCK_BYTES // (8 * max(1, Lt.shape[0])))  # rows per block
        blocks = [  # (position in P, rows of L_t) for runs of P, at most ``step`` rows each
            (i, slice(p[i], p[i] + min(e, i + step) - i))
            for s0, e in zip(*_runs(p), strict=True)
            for i in range(s0, e, step)
        ]
        # L_t is lower triangular: rows up to r have no entry right of column r
        v = np.zeros(Lt.shape[0])  # L_tᵀ z, z = (m_P on P, −d on B): Λ' z = L_t v
        for i, rows in blocks:
            v[: rows.stop] += Lt[rows, : rows.stop].T @ m[P[i : i + rows.stop - rows.start]]
        if B.size:
            v -= Lt[b].T @ (values - m[B])
        rv = sla.cho_solve((K, True), Lr @ v, check_finite=False) if R.size else None
        q = np.empty(P.size)
        Qc = np.empty(P.size)
        for i, rows in blocks:
            c = rows.stop
            Lp, j = Lt[rows, :c], slice(i, i + c - rows.start)
            q[j] = np.einsum("ij,ij->i", Lp, Lp)
            Qc[j] = Lp @ v[:c]
            if R.size:
                Y = Lr[:, :c] @ Lp.T  # Λ'_RP over this block
                Qc[j] -= Y.T @ rv
                Y = sla.solve_triangular(K, Y, lower=True, check_finite=False, overwrite_b=True)
                q[j] -= np.einsum("ij,ij->j", Y, Y)
        return q, Qc

    @classmethod
    def align_bytes_of(cls, structure, shapes, conditioned: int, kept: int) -> int:
        rest = structure.n_params - conditioned
        return 8 * (3 * rest**2 + rest * conditioned)

    # -- small blocks: Σ[r, c] = X_rᵀ X_c with X = L⁻¹ E, never Σ whole ----------------------
    def _cols(self, idx: np.ndarray) -> np.ndarray:
        """``L⁻¹ E_idx`` over rows ``min(idx)..n`` (above them it is zero): a solve with the
        trailing block of the cached factor only, ``O((n − min idx)² |idx|)``."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return np.zeros((0, 0))
        t0 = int(idx.min())
        E = np.zeros((self.n - t0, idx.size))
        E[idx - t0, np.arange(idx.size)] = 1.0
        return for_size(E.size).solve_lower(self._chol[t0:, t0:], E)

    def cov_block(self, idx) -> np.ndarray:
        X = self._cols(np.asarray(idx, dtype=np.int64))
        return X.T @ X

    def cov_cross(self, rows, cols) -> np.ndarray:
        return self._cov(rows, cols)

    def covariance_over(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        cached = self._trailing_for(int(idx[0]), idx.size) if idx.size else None
        if cached is not None:  # read in place
            return HeldCovariance(cached[1], first=cached[0])
        return super().covariance_over(idx)

    def _trailing_for(self, t0: int, count: int):
        """The kept trailing Σ when it covers index ``t0`` on, computed now when ``count``
        entries from ``t0`` on are a large share of the trailing ones; else None."""
        cached = self.__dict__.get("_trailing")
        if cached is not None and cached[0] <= t0:
            return cached
        if count >= (self.n - t0) * _TRAILING_SHARE:
            return self._trailing_covariance(t0)
        return None

    def _cov(self, rows, cols) -> np.ndarray:
        """Σ[rows][:, cols]: from the kept trailing Σ when it covers them, else by solves
        with the factor."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        u, inv = np.unique(np.concatenate([rows, cols]), return_inverse=True)
        if u.size == 0:
            return np.zeros((rows.size, cols.size))
        cached = self._trailing_for(int(u[0]), u.size)
        if cached is not None:
            s0, S = cached
            return gather(S, rows - s0, cols - s0)
        X = self._cols(u)
        return X[:, inv[: rows.size]].T @ X[:, inv[rows.size :]]

    def _trailing_covariance(self, t0: int):
        """Σ over the trailing parameters ``t0..n`` (every parameter from layer t0's
        on), from the cached factor in one LAPACK call: the trailing block of the factor
        is the Cholesky factor of their marginal precision, so ``potri`` of it is their
        covariance.  Kept for the searches that ask for large blocks again and again.
        A network's greedy first asks for it inside its one-thread loop: ``potri`` then
        takes the threads in force outside that loop."""
        L = self._chol[t0:, t0:]
        # O(n³): the caller's threads, also inside a one-thread loop; on a device backend
        # when large (planner.backend)
        with all_threads():
            try:
                S = for_size(L.size).cholesky_inverse(L)
            except np.linalg.LinAlgError:  # pragma: no cover - a principal block of a PD factor
                raise InvalidPosterior("is not positive definite", field="precision") from None
        self.__dict__["_trailing"] = (t0, S)
        return t0, S

    def prepare(self, first: int, count: int) -> None:
        """The search will ask for Σ over ``count`` parameters from index ``first`` on:
        when that is a large share of them, compute Σ over all of them now, once."""
        if count == 0 or first >= self.n:
            return
        cached = self.__dict__.get("_trailing")
        if (cached is None or cached[0] > first) and count >= (self.n - first) * _TRAILING_SHARE:
            self._trailing_covariance(first)

    def one_shot_work(self, conditioned: int, kept: int) -> float:
        rest = self.n - conditioned
        return rest**3 / 3 + kept**3 + rest * conditioned

    def _group_blocks(self, groups: np.ndarray):
        """Σ blocks (n, g, g) and means (n, g) of each row of ``groups``, in one solve."""
        # one cov_cross: the kept trailing Σ when there is one, else solves
        return self.cov_blocks(groups, groups), self.mean[groups]

    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        S, m = self._group_blocks(groups)
        return 0.5 * np.einsum("nk,nk->n", m, np.linalg.solve(S, m[..., None])[..., 0])

    @cached_property
    def _variance(self) -> np.ndarray:
        return inverse_diagonal(self._chol)  # diag(Λ⁻¹), with Λ = L Lᵀ

    def variance(self) -> np.ndarray:
        return self._variance

    def precision_diagonal(self) -> np.ndarray:
        return np.diag(self.precision).copy()

    def dense_covariance(self) -> np.ndarray:
        """Σ = Λ⁻¹ from the Cholesky factor of Λ (LAPACK ``potri``, one call)."""
        try:
            return np.ascontiguousarray(for_size(self._chol.size).cholesky_inverse(self._chol))
        except np.linalg.LinAlgError:  # pragma: no cover - a Cholesky factor inverts
            raise InvalidPosterior("is not positive definite", field="precision") from None
