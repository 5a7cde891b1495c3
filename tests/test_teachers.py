"""Probing, query augmentation, planted teachers and the digits teacher
(expand_and_cluster.teachers)."""

from __future__ import annotations

import numpy as np
import pytest

from expand_and_cluster.errors import InputError
from expand_and_cluster.network import Network
from expand_and_cluster.teachers import (
    biased_noise_augmentation,
    planted_teacher,
    probe,
    train_digits_teacher,
)
from tests.testing import networks_equal


@pytest.fixture
def net() -> Network:
    return planted_teacher(4, [5, 3], 2, "tanh", seed=1)


# ------------------------------------------------------------------------------------------------
# probing and augmentation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_probe_shapes_determinism_and_variance(net, distribution):
    x, y = probe(net, 50, distribution, seed=3)
    assert x.shape == (50, 4) and y.shape == (50, 2) and x.dtype == y.dtype == np.float64
    np.testing.assert_array_equal(y, net.forward(x))
    x2, _ = probe(net, 50, distribution, seed=3)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, probe(net, 50, distribution, seed=4)[0])
    big, _ = probe(net, 100_000, distribution, seed=0)
    np.testing.assert_allclose(big.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(big.var(axis=0), 1.0, atol=0.03)
    if distribution == "uniform":
        assert np.abs(big).max() <= np.sqrt(3.0)


def test_probe_given_inputs_and_errors(net):
    inputs = np.arange(12.0).reshape(3, 4)
    x, y = probe(net, 0, inputs=inputs)
    np.testing.assert_array_equal(x, inputs)
    assert y.shape == (3, 2)
    with pytest.raises(InputError, match=r"inputs: expected shape \[P, 4\]"):
        probe(net, 0, inputs=np.ones((3, 5)))
    with pytest.raises(InputError, match="unknown 'cauchy'"):
        probe(net, 10, "cauchy")
    with pytest.raises(InputError, match="number of queries"):
        probe(net, 0)


def test_biased_noise_augmentation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 3))
    aug = biased_noise_augmentation(x, np.random.default_rng(1), scale=0.5)
    assert aug.shape == (300, 3)
    np.testing.assert_array_equal(aug[:100], x)
    up, down = aug[100:200] - x, aug[200:] - x
    assert up.min() >= 0.0 and up.max() <= 0.5 and up.mean() == pytest.approx(0.25, abs=0.03)
    assert down.max() <= 0.0 and down.min() >= -0.5
    assert down.mean() == pytest.approx(-0.25, abs=0.03)
    again = biased_noise_augmentation(x, np.random.default_rng(1), scale=0.5)
    np.testing.assert_array_equal(aug, again)


# ------------------------------------------------------------------------------------------------
# demo and test teachers
# ------------------------------------------------------------------------------------------------


def _min_angle_degrees(v: np.ndarray, sign_symmetric: bool) -> float:
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = u @ u.T
    cos = np.abs(cos) if sign_symmetric else cos
    np.fill_diagonal(cos, -1.0)
    return float(np.degrees(np.arccos(np.clip(cos.max(), -1.0, 1.0))))


def test_planted_teacher_is_deterministic():
    a = planted_teacher(6, [8, 5], 2, "sigmoid", seed=7, min_angle_degrees=20)
    b = planted_teacher(6, [8, 5], 2, "sigmoid", seed=7, min_angle_degrees=20)
    c = planted_teacher(6, [8, 5], 2, "sigmoid", seed=8, min_angle_degrees=20)
    assert networks_equal(a, b) and not networks_equal(a, c)
    assert a.hidden_sizes == [8, 5] and (a.d_in, a.d_out) == (6, 2)


@pytest.mark.parametrize(("activation", "angle"), [("tanh", 45.0), ("g", 60.0)])
def test_planted_teacher_angles_and_output_weights(activation, angle):
    net = planted_teacher(3, [12, 6], 3, activation, seed=0, min_angle_degrees=angle)
    sign_symmetric = activation != "g"
    for layer in range(2):
        assert _min_angle_degrees(net.incoming(layer), sign_symmetric) >= angle
    assert np.abs(net.weights[-1]).min() >= 0.3 / np.sqrt(6)


def test_planted_teacher_impossible_angle():
    with pytest.raises(InputError, match="cannot place 10 neurons"):
        planted_teacher(1, [10], 1, "tanh", seed=0, min_angle_degrees=80)
    with pytest.raises(InputError, match="min_angle_degrees"):
        planted_teacher(1, [10], 1, "tanh", seed=0, min_angle_degrees=95)


def test_train_digits_teacher():
    net, x, info = train_digits_teacher(width=10, seed=0, epochs=40)
    assert net.hidden_sizes == [10] and (net.d_in, net.d_out) == (64, 10)
    assert net.activation == "tanh" and all(w.dtype == np.float64 for w in net.weights)
    assert x.shape == (1797, 64) and x.min() >= 0.0 and x.max() <= 1.0
    assert info["test_accuracy"] > 0.8 and info["n_test"] + info["n_train"] == 1797
    again, _, info2 = train_digits_teacher(width=10, seed=0, epochs=40)
    assert networks_equal(net, again) and info == info2
