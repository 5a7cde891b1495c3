"""End to end on planted teachers with known answers (small versions of the acceptance runs)."""

import numpy as np
import pytest

from expand_and_cluster import metrics
from expand_and_cluster.config import RecoverConfig, TrainConfig
from expand_and_cluster.errors import NoClusterError
from expand_and_cluster.pipeline.recover import recover
from expand_and_cluster.teachers import planted_teacher, probe

# Budgets measured on 2 cores: g, tanh, relu converge in ~60 epochs + 300 L-BFGS iterations;
# sigmoid and softplus teachers sit closer to linear and need longer (200 + 1500).
BUDGET = {
    "g": (60, 300),
    "tanh": (60, 300),
    "relu": (60, 300),
    "sigmoid": (200, 1500),
    "softplus": (200, 1500),
}


def _config(activation, width=8, n_students=8):
    epochs, polish = BUDGET[activation]
    train = TrainConfig(
        n_students=n_students,
        max_epochs=epochs,
        batch_size=256,
        polish_iterations=polish,
        progress=False,
        patience=10,
        cooldown=5,
    )
    return RecoverConfig(activation=activation, width=width, train=train, finetune_iterations=500)


@pytest.mark.parametrize("activation", list(BUDGET))
def test_planted_teacher_recovered(activation):
    teacher = planted_teacher(4, [3], 1, activation, seed=2, min_angle_degrees=30)
    X, Y = probe(teacher, 3000, "gaussian", seed=0)
    res = recover(X, Y, _config(activation))
    assert res.network.hidden_sizes == teacher.hidden_sizes
    al = metrics.alignment(teacher.incoming(0), res.network.incoming(0), activation, None)
    assert al["max"] < 1e-3
    assert res.relative_mse["held_out"] <= 1e-4
    assert res.network.linear_weight is not None or activation not in ("softplus", "relu")


def test_recover_is_reproducible():
    teacher = planted_teacher(3, [2], 1, "tanh", seed=5, min_angle_degrees=30)
    X, Y = probe(teacher, 1000, "uniform", seed=1)
    a = recover(X, Y, _config("tanh", width=5, n_students=4))
    b = recover(X, Y, _config("tanh", width=5, n_students=4))
    np.testing.assert_array_equal(a.training.relative_mse, b.training.relative_mse)
    np.testing.assert_array_equal(a.network.weights[0], b.network.weights[0])


def test_gamma_times_n_below_two_raises():
    X = np.random.default_rng(0).standard_normal((50, 2))
    with pytest.raises(ValueError, match="gamma \\* N"):
        recover(X, X[:, :1], _config("tanh", n_students=3))


def test_no_cluster_raises_clear_error():
    # Pure noise targets: students share no neuron.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 3))
    Y = rng.standard_normal((400, 1))
    cfg = RecoverConfig(
        activation="tanh",
        width=6,
        train=TrainConfig(n_students=6, max_epochs=5, progress=False),
        finetune_iterations=0,
    )
    cfg = RecoverConfig(
        activation="tanh",
        width=6,
        train=cfg.train,
        finetune_iterations=0,
        cluster=type(cfg.cluster)(gamma=1.0, beta_degrees=1.0),
    )
    with pytest.raises(NoClusterError, match="no cluster survived.*median angle above beta"):
        recover(X, Y, cfg)


@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_finetune_with_linear_term_and_several_outputs(activation):
    """The least-squares linear term [d_out, d_in] comes out of lstsq transposed (non-contiguous
    for d_out > 1); fine-tuning must accept it. From the teacher's own (sign-flipped) hidden layer
    the reconstruction is exact up to the linear term, which least squares recovers."""
    from expand_and_cluster.pipeline.fit import finetune, reconstruct_one_hidden_layer

    teacher = planted_teacher(3, [2], 2, activation, seed=1, min_angle_degrees=30)
    X, Y = probe(teacher, 500, "gaussian", seed=0)
    incoming = teacher.incoming(0) * np.array([[1.0], [-1.0]])  # flip the second neuron
    net = reconstruct_one_hidden_layer(incoming, X, Y, activation)
    assert net.linear_weight.shape == (2, 3)
    res = finetune(net, X, Y, max_iterations=50)
    assert res.mse_after <= res.mse_before < 1e-20
