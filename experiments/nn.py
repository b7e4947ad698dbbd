"""A small numpy MLP (no biases, ReLU hidden, identity output) for the seed's experiment:
training, the GGN Laplace posterior, and variational students (docs/experiments.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from planner import Structure
from planner.network import unflatten

__all__ = ["Adam", "Prior", "gaussian_loglik", "ggn_precision", "train_teacher", "train_vi"]


def _forward(s: Structure, theta: np.ndarray, X: np.ndarray):
    hs, zs = [X], []
    for lp in unflatten(s, theta):
        z = hs[-1] @ lp.U.T
        zs.append(z)
        hs.append(np.maximum(z, 0.0) if lp.t < s.T else z)
    return hs, zs


def _backward(s: Structure, theta, hs, zs, g_out: np.ndarray) -> np.ndarray:
    """Gradient of Σ_i g_out[i]·out[i] with respect to the flat parameters."""
    layers = unflatten(s, theta)
    grad = np.empty_like(theta)
    g = g_out
    for k in range(len(layers) - 1, -1, -1):
        lp = layers[k]
        grad[s.layer(lp.t).U] = g.T @ hs[k]
        if k:
            g = (g @ lp.U) * (zs[k - 1] > 0)
    return grad


def gaussian_loglik(s: Structure, theta, X, y, noise: float) -> float:
    out = _forward(s, theta, X)[0][-1][:, 0]
    return float(
        -0.5 * np.sum(((y - out) / noise) ** 2) - y.size * np.log(noise * np.sqrt(2 * np.pi))
    )


class Adam:
    def __init__(self, n: int, lr: float) -> None:
        self.lr, self.m, self.v, self.t = lr, np.zeros(n), np.zeros(n), 0

    def step(self, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad**2
        mh, vh = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        return self.lr * mh / (np.sqrt(vh) + 1e-8)


def he_init(s: Structure, rng: np.random.Generator) -> np.ndarray:
    theta = np.empty(s.n_params)
    for t in range(2, s.T + 1):
        ix = s.layer(t).U
        theta[ix] = rng.normal(size=ix.shape) * np.sqrt(2.0 / s.width(t - 1))
    return theta


def train_teacher(s, X, y, rng, steps: int, lr: float = 1e-3, prior_prec: float = 1.0):
    """MAP with an N(0, 1/prior_prec) prior and Gaussian noise: full-batch Adam."""
    theta = he_init(s, rng)
    opt = Adam(theta.size, lr)
    for _ in range(steps):
        hs, zs = _forward(s, theta, X)
        g = _backward(s, theta, hs, zs, (hs[-1] - y[:, None]) / 0.01) + prior_prec * theta
        theta -= opt.step(g / len(y))
    return theta


def ggn_precision(s: Structure, theta, X, noise: float, prior_prec: float) -> np.ndarray:
    """Laplace with the generalised Gauss-Newton Hessian: ``Jᵀ J / noise² + prior_prec I``."""
    hs, zs = _forward(s, theta, X)
    layers = unflatten(s, theta)
    J = np.empty((len(X), s.n_params))
    g = np.ones((len(X), 1))
    for k in range(len(layers) - 1, -1, -1):
        lp = layers[k]
        J[:, s.layer(lp.t).U.ravel()] = np.einsum("ni,nj->nij", g, hs[k]).reshape(len(X), -1)
        if k:
            g = (g @ lp.U) * (zs[k - 1] > 0)
    P = J.T @ J / noise**2
    P[np.diag_indices_from(P)] += prior_prec
    return P


@dataclass(frozen=True)
class Prior:
    """N(mean, covariance) or N(mean, diag(variance)) over a student's parameters."""

    mean: np.ndarray
    variance: np.ndarray | None = None
    covariance: np.ndarray | None = None

    def kl_parts(self):
        """(precision or its diagonal, log det Σ), for KL(q ‖ prior) and its gradient."""
        if self.covariance is not None:
            L = sla.cholesky(self.covariance, lower=True)
            P = sla.cho_solve((L, True), np.eye(len(L)))
            return P, 2.0 * float(np.sum(np.log(np.diag(L))))
        return 1.0 / self.variance, float(np.sum(np.log(self.variance)))


def train_vi(
    s: Structure,
    prior: Prior,
    data,
    rng: np.random.Generator,
    epochs: int,
    batch: int = 8,
    log_every: int = 100,
    noise: float = 0.1,
    lr: float = 1e-3,
    init: np.ndarray | None = None,
):
    """VI with a diagonal Gaussian q, loss ``KL(q ‖ prior) − E_q log-likelihood``
    (reparameterised, one sample a step); returns (steps, test log-likelihood at μ)."""
    X, y, Xt, yt = data
    n, k = len(X), s.n_params
    mu = (he_init(s, rng) if init is None else init.copy()).astype(float)
    rho = np.full(k, np.log(np.expm1(1e-3)))
    P, _ = prior.kl_parts()
    full = P.ndim == 2
    opt = Adam(2 * k, lr)
    steps, curve, step = [], [], 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for a in range(0, n, batch):
            b = order[a : a + batch]
            sig = np.log1p(np.exp(rho))
            eps = rng.normal(size=k)
            w = mu + sig * eps
            hs, zs = _forward(s, w, X[b])
            g_w = _backward(s, w, hs, zs, (hs[-1] - y[b, None]) / noise**2) * (n / len(b))
            diff = mu - prior.mean
            g_mu = g_w + (P @ diff if full else P * diff)
            g_sig = g_w * eps + ((np.diag(P) if full else P) * sig - 1.0 / sig)
            upd = opt.step(np.concatenate([g_mu, g_sig / (1.0 + np.exp(-rho))]) / n)
            mu -= upd[:k]
            rho -= upd[k:]
            step += 1
            if step % log_every == 0:
                steps.append(step)
                curve.append(gaussian_loglik(s, mu, Xt, yt, noise))
    return np.array(steps), np.array(curve)
