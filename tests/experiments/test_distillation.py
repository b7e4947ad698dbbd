"""The seed's distillation objectives against direct numerical optimisation."""

import numpy as np
import pytest
from scipy.optimize import minimize

from experiments.distillation import (
    hinton_loss,
    log_softmax,
    probabilistic_classification_loss,
    regression_closed_form,
    regression_objective,
)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9])
def test_the_regression_theorem_equals_direct_minimisation(lam):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = X @ rng.normal(size=4) + 0.1 * rng.normal(size=60)
    s = y + 0.5 * rng.normal(size=60)
    priv = rng.random(60) < 0.5
    closed = regression_closed_form(X, y, s, priv, lam, sigma=2.0, sigma_s=0.7)
    direct = minimize(
        regression_objective, np.zeros(4), args=(X, y, s, priv, lam, 2.0, 0.7), tol=1e-12
    ).x
    np.testing.assert_allclose(closed, direct, rtol=1e-5, atol=1e-7)
    # and it is a minimum: any nudge costs more
    base = regression_objective(closed, X, y, s, priv, lam, 2.0, 0.7)
    for d in np.eye(4):
        assert regression_objective(closed + 1e-3 * d, X, y, s, priv, lam, 2.0, 0.7) > base


def test_without_privileged_objects_it_is_least_squares():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    w = regression_closed_form(X, y, y, np.zeros(30, bool), 0.5, 1.0, 1.0)
    np.testing.assert_allclose(w, np.linalg.lstsq(X, y, rcond=None)[0], rtol=1e-10)


def test_hinton_loss_is_cross_entropy_plus_softened_cross_entropy():
    rng = np.random.default_rng(2)
    zs, zt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    y = np.eye(3)[rng.integers(0, 3, 5)]
    T = 2.5
    pt = np.exp(zt / T) / np.exp(zt / T).sum(1, keepdims=True)
    expect = -np.sum(y * np.log(np.exp(zs) / np.exp(zs).sum(1, keepdims=True)))
    expect -= np.sum(pt * np.log(np.exp(zs / T) / np.exp(zs / T).sum(1, keepdims=True)))
    assert hinton_loss(zs, zt, y, T) == pytest.approx(expect, rel=1e-12)


def test_probabilistic_loss_reduces_to_cross_entropy_when_lambda_is_zero():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 3))
    y = np.eye(3)[rng.integers(0, 3, 6)]
    s = np.exp(log_softmax(rng.normal(size=(6, 3))))
    priv = np.array([1, 0, 1, 0, 1, 1], bool)
    assert probabilistic_classification_loss(z, y, s, priv, 0.0, 3.0) == pytest.approx(
        -np.sum(y * log_softmax(z)), rel=1e-12
    )
    # λ moves weight from the labels to the teacher's answers and its density term
    lam = 0.4
    lgT = log_softmax(z, 3.0)
    expect = -(
        np.sum(np.where(priv, 1 - lam, 1.0)[:, None] * y * log_softmax(z))
        + lam * np.sum(s[priv] * lgT[priv])
        + lam * np.sum(lgT[priv] + np.log(np.log(1 / np.exp(lgT[priv]))))
    )
    assert probabilistic_classification_loss(z, y, s, priv, lam, 3.0) == pytest.approx(expect)
