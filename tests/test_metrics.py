"""Alignment, overhead, relative MSE and bits of precision (expand_and_cluster.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from expand_and_cluster.metrics import alignment, bits_of_precision, overhead, relative_mse
from expand_and_cluster.network import Network
from expand_and_cluster.teachers import planted_teacher


def _copy_with(net: Network, perm, flip=None, scale=None, activation=None) -> Network:
    """The same function written with permuted, sign-flipped (odd rule) or rescaled neurons."""
    w0, b0, w1 = net.weights[0][perm], net.biases[0][perm], net.weights[1][:, perm]
    if flip is not None:
        s = np.where(flip, -1.0, 1.0)
        w0, b0, w1 = w0 * s[:, None], b0 * s, w1 * s[None, :]
    if scale is not None:
        w0, b0, w1 = w0 * scale[:, None], b0 * scale, w1 / scale[None, :]
    return Network([w0, w1], [b0, net.biases[1].copy()], activation or net.activation)


def test_alignment_of_a_permuted_sign_flipped_copy_is_zero():
    net = planted_teacher(5, [7], 2, "tanh", seed=0)
    rng = np.random.default_rng(0)
    perm = rng.permutation(7)
    copy = _copy_with(net, perm, flip=rng.random(7) < 0.5)
    out = alignment(net.incoming(0), copy.incoming(0), "tanh")
    assert max(out["per_teacher_neuron"]) < 1e-15
    assert out["matched"] == [int(np.flatnonzero(perm == j)[0]) for j in range(7)]
    assert out["count_below_1e-6"] == out["count_below_1e-3"] == 7
    assert out["median"] < 1e-15 and out["max"] < 1e-15


def test_alignment_without_sign_symmetry_sees_flips():
    v = np.array([[1.0, -2.0, 0.5]])
    assert alignment(v, -v, "g")["per_teacher_neuron"] == [2.0]  # 1 - cos(180 deg)
    assert alignment(v, -v, "tanh")["per_teacher_neuron"] == [0.0]


def test_alignment_of_a_rescaled_relu_copy_is_zero():
    v = np.random.default_rng(1).standard_normal((5, 4))
    scaled = v * np.array([0.1, 2.0, 3.0, 7.0, 0.5])[:, None]
    assert alignment(v, scaled, "relu")["max"] < 1e-15


def test_alignment_of_a_perturbed_copy_matches_hand_computation():
    rng = np.random.default_rng(2)
    t = rng.standard_normal((4, 6))
    r = t + 1e-3 * rng.standard_normal((4, 6))
    out = alignment(t, r[::-1], "tanh")
    expected = [
        1 - abs(t[j] @ r[j]) / np.linalg.norm(t[j]) / np.linalg.norm(r[j]) for j in range(4)
    ]
    np.testing.assert_allclose(out["per_teacher_neuron"], expected, rtol=1e-7)
    assert out["matched"] == [3, 2, 1, 0]
    assert out["median"] == pytest.approx(np.median(expected), rel=1e-7)
    assert out["count_below_1e-3"] == int(np.sum(np.array(expected) < 1e-3))


def test_alignment_tiny_distances_keep_relative_precision():
    t = np.array([[1.0, 0.0, 0.0]])
    r = np.array([[1.0, 1e-9, 0.0]])
    # 1 - cos(1e-9) = 5e-19: far below what 1 - u.v can resolve in float64.
    assert alignment(t, r, "tanh")["per_teacher_neuron"][0] == pytest.approx(5e-19, rel=1e-6)


def test_alignment_mask_ignores_masked_inputs():
    rng = np.random.default_rng(3)
    t = rng.standard_normal((3, 5))
    r = t.copy()
    r[:, 1] = rng.standard_normal(3) * 10  # input 1 is constant over the queries: unidentifiable
    mask = np.array([True, False, True, True])
    assert alignment(t, r, "tanh", input_mask=mask)["max"] < 1e-15
    assert alignment(t, r, "tanh")["max"] > 1e-3
    r[:, 4] += 1.0  # the bias column is never masked
    assert alignment(t, r, "tanh", input_mask=mask)["max"] > 1e-3
    with pytest.raises(ValueError, match="input_mask"):
        alignment(t, r, "tanh", input_mask=np.ones(5, dtype=bool))


def test_alignment_with_nothing_recovered():
    t = np.ones((3, 4))
    out = alignment(t, np.zeros((0, 4)), "tanh")
    assert out["per_teacher_neuron"] == [1.0, 1.0, 1.0] and out["matched"] == [None] * 3
    assert out["count_below_1e-3"] == 0 and out["max"] == 1.0
    assert alignment(t, [], "tanh")["median"] == 1.0
    with pytest.raises(ValueError, match="vector lengths differ"):
        alignment(t, np.ones((2, 5)), "tanh")


def test_overhead():
    assert overhead([10, 22], [10, 20]) == [0.0, pytest.approx(0.1)]
    assert overhead([3], [4]) == [-0.25]
    with pytest.raises(ValueError, match="layers"):
        overhead([1, 2], [1])


def test_relative_mse_known_values():
    y = np.array([[0.0, 0.0], [2.0, 4.0]])  # variances 1 and 4: mean 2.5
    assert relative_mse(y, y) == 0.0
    assert relative_mse(np.ones_like(y) * [1.0, 2.0], y) == pytest.approx((1 + 4) / 2 / 2.5)
    assert relative_mse([1.0, 1.0], [0.0, 2.0]) == pytest.approx(1.0)
    # constant targets: plain MSE
    assert relative_mse([[1.0], [3.0]], [[2.0], [2.0]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal shapes"):
        relative_mse(np.ones((3, 2)), np.ones((3, 1)))


def _perturb(net: Network, delta_max: float, seed: int) -> Network:
    """Add noise below ``delta_max / 4`` to every parameter, and exactly ``delta_max`` to one."""
    rng = np.random.default_rng(seed)
    w = [a + rng.uniform(-delta_max / 4, delta_max / 4, a.shape) for a in net.weights]
    b = [a + rng.uniform(-delta_max / 4, delta_max / 4, a.shape) for a in net.biases]
    w[0] = w[0].copy()
    w[0][1, 2] = net.weights[0][1, 2] + delta_max
    return Network(w, b, net.activation)


def test_bits_of_precision_of_a_known_perturbation():
    net = planted_teacher(4, [6], 2, "tanh", seed=0)
    rng = np.random.default_rng(5)
    recovered = _copy_with(_perturb(net, 2.0**-20, seed=1), rng.permutation(6), rng.random(6) < 0.5)
    assert bits_of_precision(net, recovered) == pytest.approx(20.0, abs=1e-6)
    assert bits_of_precision(net, _copy_with(net, np.arange(6))) == float("inf")


def test_bits_of_precision_counts_output_weights_and_bias():
    net = planted_teacher(3, [5], 1, "tanh", seed=0)
    copy = _copy_with(net, np.arange(5))
    copy.weights[1][0, 3] += 2.0**-12
    assert bits_of_precision(net, copy) == pytest.approx(12.0, abs=1e-6)
    copy = _copy_with(net, np.arange(5))
    copy.biases[1][0] += 2.0**-30
    assert bits_of_precision(net, copy) == pytest.approx(30.0, abs=1e-6)


def test_bits_of_precision_relu_rescaling_and_mask():
    net = planted_teacher(3, [5], 2, "relu", seed=0)
    rng = np.random.default_rng(0)
    copy = _copy_with(net, rng.permutation(5), scale=rng.uniform(0.2, 5.0, 5))
    assert bits_of_precision(net, copy) > 45
    copy.weights[0][:, 0] += 1.0  # input 0 masked out: ignored
    assert bits_of_precision(net, copy, input_mask=np.array([False, True, True])) > 45


def test_bits_of_precision_sigmoid_flip_with_bias_shift():
    net = planted_teacher(3, [4], 1, "sigmoid", seed=0)
    flip = np.array([True, False, True, False])
    copy = _copy_with(net, np.arange(4), flip=flip)
    # s(-z) = 1 - s(z): the flipped neurons' outgoing weights move into the output bias
    copy.biases[1] = net.biases[1] + net.weights[1][:, flip].sum(axis=1)
    x = np.random.default_rng(0).standard_normal((10, 3))
    np.testing.assert_allclose(copy.forward(x), net.forward(x), atol=1e-14)
    assert bits_of_precision(net, copy) > 45


def test_bits_of_precision_not_comparable():
    net = planted_teacher(3, [4], 1, "tanh", seed=0)
    assert bits_of_precision(net, planted_teacher(3, [5], 1, "tanh", seed=0)) is None
    assert bits_of_precision(net, planted_teacher(3, [4], 1, "relu", seed=0)) is None
    deep = planted_teacher(3, [4, 4], 1, "tanh", seed=0)
    assert bits_of_precision(deep, deep) is None
