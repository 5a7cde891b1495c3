"""Width repair (prune and grow) on planted teachers whose answer is known."""

import numpy as np
import pytest

from expand_and_cluster import metrics
from expand_and_cluster.config import RepairConfig
from expand_and_cluster.network import Network
from expand_and_cluster.pipeline.fit import (
    finetune,
    layer_features,
    reconstruct_one_hidden_layer,
)
from expand_and_cluster.pipeline.repair import grow_neurons, prune_neurons, repair_width
from expand_and_cluster.pipeline.residual import residual_neurons
from expand_and_cluster.teachers import planted_teacher, probe


def _teacher(activation, width=4, d_in=4, d_out=2, seed=3):
    t = planted_teacher(d_in, [width], d_out, activation, seed=seed, min_angle_degrees=30)
    x, y = probe(t, 2000, "gaussian", seed=1)
    return t, x, y


def _with_duplicate(t: Network, j: int) -> Network:
    """The teacher with neuron j split into two identical neurons sharing its outgoing weights."""
    w0 = np.concatenate([t.weights[0], t.weights[0][j : j + 1]], axis=0)
    b0 = np.concatenate([t.biases[0], t.biases[0][j : j + 1]])
    w1 = np.concatenate([t.weights[1], 0.3 * t.weights[1][:, j : j + 1]], axis=1)
    w1[:, j] *= 0.7
    return Network([w0, w1], [b0, t.biases[1].copy()], t.activation)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "g", "relu", "softplus"])
def test_prune_removes_a_duplicated_neuron(activation):
    t, x, y = _teacher(activation)
    net = _with_duplicate(t, 1)
    assert metrics.relative_mse(net.forward(x), y) < 1e-20
    out, removed, _ = prune_neurons(net, x, y, tolerance=1e-12)
    assert out.hidden_sizes == [4]
    assert len(removed) == 1
    assert metrics.relative_mse(out.forward(x), y) < 1e-12
    al = metrics.alignment(t.incoming(0), out.incoming(0), activation)
    assert al["max"] < 1e-12


def test_prune_removes_a_dead_neuron_and_keeps_a_minimal_network():
    t, x, y = _teacher("tanh")
    rng = np.random.default_rng(0)
    w0 = np.concatenate([t.weights[0], rng.normal(size=(1, 4))], axis=0)
    b0 = np.append(t.biases[0], 0.3)
    w1 = np.concatenate([t.weights[1], np.zeros((2, 1))], axis=1)
    net = Network([w0, w1], [b0, t.biases[1]], "tanh")
    out, removed, _ = prune_neurons(net, x, y, tolerance=1e-12)
    assert out.hidden_sizes == [4] and len(removed) == 1
    np.testing.assert_allclose(removed[0], np.append(w0[-1], 0.3))
    # The teacher itself is minimal: nothing goes.
    same, removed, _ = prune_neurons(t, x, y, tolerance=1e-12)
    assert same.hidden_sizes == [4] and removed == []


def test_prune_on_noisy_outputs_only_when_allowed_and_then_only_the_duplicate():
    t, x, y = _teacher("tanh")
    net = _with_duplicate(t, 0)
    y_noisy = y + 1e-3 * np.random.default_rng(0).normal(size=y.shape)
    net = reconstruct_one_hidden_layer(net.incoming(0), x, y_noisy, "tanh")
    # Not nearly exact (relative MSE ~1e-6 > below = 1e-8): left alone.
    same, removed, trials = prune_neurons(net, x, y_noisy, tolerance=1e-12, factor=10.0)
    assert same is net and removed == [] and trials == 0
    # Allowed on any network, the factor criterion removes the duplicate only.
    out, removed, _ = prune_neurons(net, x, y_noisy, tolerance=1e-12, factor=10.0, below=1.0)
    assert out.hidden_sizes == [4] and len(removed) == 1
    assert metrics.alignment(t.incoming(0), out.incoming(0), "tanh")["max"] < 1e-12
    # Pruning disabled: nothing is tried.
    same, removed, trials = prune_neurons(net, x, y_noisy, tolerance=0.0)
    assert same is net and removed == [] and trials == 0


@pytest.mark.parametrize("activation", ["tanh", "g", "relu"])
def test_grow_adds_the_missing_teacher_neuron_and_ignores_junk(activation):
    t, x, y = _teacher(activation, width=4)
    inc = t.incoming(0)
    missing = 2
    net = reconstruct_one_hidden_layer(np.delete(inc, missing, axis=0), x, y, activation)
    before = metrics.relative_mse(net.forward(x), y)
    assert before > 1e-6
    rng = np.random.default_rng(5)
    near = inc[missing] * (1 + 1e-3 * rng.normal(size=inc.shape[1]))
    junk = [{"incoming": rng.normal(size=inc.shape[1]), "size": 9, "median_angle_degrees": 1.0}]
    right = {"incoming": near, "size": 5, "median_angle_degrees": 2.0}
    cfg = RepairConfig(grow_candidates=4)
    out, added, trials = grow_neurons(net, junk + [right], x, y, cfg)
    assert out.hidden_sizes == [4]
    assert len(added) == 1 and added[0]["cluster_size"] == 5
    assert added[0]["relative_mse_after"] * cfg.grow_factor <= before
    al = metrics.alignment(inc, out.incoming(0), activation)
    assert al["max"] < 1e-6
    assert trials >= 2


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus"])
def test_residual_neurons_point_at_the_missing_teacher_neuron(activation):
    # The teacher without one neuron, output layer refitted: the residual is that neuron's
    # contribution (up to the projection), so the best residual neuron is it.
    t, x, y = _teacher(activation, width=4)
    inc = t.incoming(0)
    net = reconstruct_one_hidden_layer(np.delete(inc, 1, axis=0), x, y, activation)
    found = residual_neurons(net, x, y, n_starts=64, keep=3)
    assert 1 <= len(found) <= 3
    assert [c["explained"] for c in found] == sorted((c["explained"] for c in found), reverse=True)
    assert found[0]["explained"] > 0.99
    al = metrics.alignment(inc[1:2], found[0]["incoming"][None, :], activation)
    assert al["max"] < 1e-3
    # An exact network leaves no residual.
    assert residual_neurons(t, x, y) == []


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus"])
def test_grow_without_candidates_finds_the_missing_neuron_from_the_residual(activation):
    # No student found the neuron (no candidates), and the fine-tune has spread its function
    # over the others: the residual neuron, fine-tuned, is the teacher's.
    t, x, y = _teacher(activation, width=4)
    inc = t.incoming(0)
    net = reconstruct_one_hidden_layer(inc[:3], x, y, activation)
    net = finetune(net, x, y, max_iterations=300).network
    before = metrics.relative_mse(net.forward(x), y)
    assert before > 1e-6
    out, added, _ = grow_neurons(net, [], x, y, RepairConfig())
    assert out.hidden_sizes == [4]
    assert len(added) == 1 and added[0]["source"] == "residual"
    assert added[0]["cluster_size"] == 0 and added[0]["median_angle_degrees"] is None
    assert metrics.relative_mse(out.forward(x), y) < 1e-20
    assert metrics.alignment(inc, out.incoming(0), activation)["max"] < 1e-10
    # Without residual neurons there is nothing to try.
    same, added, trials = grow_neurons(net, [], x, y, RepairConfig(residual_candidates=0))
    assert same is net and added == [] and trials == 0
    # Nor with the residual pass's limit at 0 (the clusters' pass keeps its own limit).
    same, added, trials = grow_neurons(net, [], x, y, RepairConfig(residual_max_added=0))
    assert same is net and added == [] and trials == 0


def test_grow_looks_ahead_when_two_neurons_are_missing():
    # Two missing neurons of equal strength: the first addition gains less than grow_factor (the
    # other one's error remains), the second makes the network exact; both are kept.
    t = planted_teacher(3, [4], 1, "tanh", seed=3, min_angle_degrees=30)
    w1 = t.weights[1].copy()
    w1[0, 2], w1[0, 3] = 0.5, -0.5
    t = Network([t.weights[0], w1], t.biases, "tanh")
    x, y = probe(t, 2000, "gaussian", seed=1)
    inc = t.incoming(0)
    net = reconstruct_one_hidden_layer(inc[:2], x, y, "tanh")
    cands = [{"incoming": inc[j] * 1.001, "size": 3, "median_angle_degrees": 1.0} for j in (2, 3)]
    cfg = RepairConfig()
    out, added, _ = grow_neurons(net, cands, x, y, cfg)
    assert out.hidden_sizes == [4] and len(added) == 2
    first = added[0]["relative_mse_before"] / added[0]["relative_mse_after"]
    assert first < cfg.grow_factor  # kept only thanks to the look-ahead
    assert metrics.relative_mse(out.forward(x), y) < 1e-20
    assert metrics.alignment(inc, out.incoming(0), "tanh")["max"] < 1e-10


def test_grow_finishes_the_cluster_pass_before_growing_residual_neurons():
    # A weak softplus neuron on few uniform queries (as full-0024): the cluster candidate's
    # L-BFGS trial stalls near 1e-7; without the Levenberg-Marquardt finish between the passes,
    # pass 2 added a residual neuron and the network ended exact but one neuron too wide.
    # Here the finish alone makes it exact.
    t = planted_teacher(3, [2], 3, "softplus", seed=4, min_angle_degrees=20)
    t.weights[1][:, -1] *= 0.2
    x, y = probe(t, 400, "uniform", seed=1)
    inc = t.incoming(0)
    rng = np.random.default_rng(0)
    start = inc[:1] * (1 + 0.02 * rng.normal(size=inc.shape[1]))
    net = reconstruct_one_hidden_layer(start, x, y, "softplus")
    near = inc[1] * (1 + 0.05 * rng.normal(size=inc.shape[1]))
    cand = {"incoming": near, "size": 3, "median_angle_degrees": 5.0}
    out, added, trials = grow_neurons(net, [cand], x, y, RepairConfig())
    assert out.hidden_sizes == [2]
    assert [a["source"] for a in added] == ["cluster"]
    assert trials == 2  # the candidate's trial, then the finish
    assert added[0]["relative_mse_after"] == metrics.relative_mse(out.forward(x), y) < 1e-20
    assert metrics.alignment(inc, out.incoming(0), "softplus")["max"] < 1e-10


def test_grow_keeps_nothing_when_no_candidate_helps_enough():
    # Noisy outputs: the teacher's width is right, the relative MSE sits at the noise level, and
    # no extra neuron lowers it 100 times (overfitting alone cannot, at 2000 queries).
    t, x, y = _teacher("tanh", width=4)
    y = y + 1e-3 * np.random.default_rng(2).normal(size=y.shape)
    inc = t.incoming(0)
    net = reconstruct_one_hidden_layer(inc, x, y, "tanh")
    rng = np.random.default_rng(1)
    junk = [
        {"incoming": rng.normal(size=inc.shape[1]), "size": 6, "median_angle_degrees": 1.0}
        for _ in range(3)
    ]
    cfg = RepairConfig(iterations=100)
    out, added, trials = grow_neurons(net, junk, x, y, cfg)
    # the 3 candidates, then (none helped) the residual neurons: none helps either
    assert out is net and added == [] and trials == 3 + cfg.residual_candidates
    # Disabled growing tries nothing.
    out, added, trials = grow_neurons(net, junk, x, y, RepairConfig(grow_candidates=0))
    assert out is net and trials == 0


def test_repair_width_grows_then_prunes_and_reports():
    t, x, y = _teacher("tanh", width=4)
    inc = t.incoming(0)
    # Missing neuron 3, neuron 0 duplicated: the repair must add one and remove one.
    start = np.concatenate([inc[:3], inc[:1]], axis=0)
    start[3] *= 1.0  # exact duplicate of neuron 0
    net = reconstruct_one_hidden_layer(start, x, y, "tanh")
    cand = [{"incoming": inc[3].copy(), "size": 4, "median_angle_degrees": 0.5}]
    res = repair_width(net, cand, x, y, RepairConfig(), final_iterations=200)
    assert res.width_before == 4 and res.before is net
    assert res.network.hidden_sizes == [4]
    assert len(res.added) == 1 and len(res.pruned) == 1 and res.changed
    assert metrics.alignment(inc, res.network.incoming(0), "tanh")["max"] < 1e-9
    js = res.to_json()
    assert js["width_before"] == 4 and js["width_after"] == 4 and js["pruned"] == 1
    # Decisions on a subset of the queries reach the same network.
    sub = repair_width(net, cand, x, y, RepairConfig(trial_queries=500), final_iterations=200)
    assert len(sub.added) == 1 and len(sub.pruned) == 1
    assert metrics.alignment(inc, sub.network.incoming(0), "tanh")["max"] < 1e-9


def test_repair_rejects_deep_networks_and_bad_settings():
    t = planted_teacher(3, [3, 2], 1, "tanh", seed=0)
    x, y = probe(t, 200, "gaussian", seed=0)
    with pytest.raises(ValueError, match="one hidden layer"):
        repair_width(t, [], x, y)
    with pytest.raises(ValueError, match="grow_factor"):
        RepairConfig(grow_factor=1.0)
    with pytest.raises(ValueError, match="prune_tolerance"):
        RepairConfig(prune_tolerance=-1)
    with pytest.raises(ValueError, match="prune_factor"):
        RepairConfig(prune_factor=0.5)
    with pytest.raises(ValueError, match="residual_max_added"):
        RepairConfig(residual_max_added=-1)


def test_recover_repairs_the_last_layer_of_a_deep_network():
    from expand_and_cluster.config import RecoverConfig
    from expand_and_cluster.pipeline.repair import repair_deep

    t = planted_teacher(4, [4, 3], 1, "tanh", seed=1, min_angle_degrees=30)
    x, y = probe(t, 1000, "gaussian", seed=0)
    top = t.incoming(1)
    missing = 1
    # The teacher without neuron 1 of its last hidden layer, output layer refitted.
    h0 = np.tanh(x @ t.weights[0].T + t.biases[0])
    part = reconstruct_one_hidden_layer(np.delete(top, missing, axis=0), h0, y, "tanh")
    net = Network(
        [t.weights[0], part.weights[0], part.weights[1]],
        [t.biases[0], part.biases[0], part.biases[1]],
        "tanh",
    )
    assert metrics.relative_mse(net.forward(x), y) > 1e-6
    cand = [{"incoming": top[missing] * 1.001, "size": 3, "median_angle_degrees": 1.0}]
    cfg = RecoverConfig(activation="tanh", hidden_layers=2, finetune_iterations=300)
    res = repair_deep(net, [[], cand], x, y, cfg)
    assert res.changed and res.before is net and res.width_before == 2
    assert res.network.hidden_sizes == [4, 3]
    assert res.to_json()["layer"] == 1 and res.to_json()["width_after"] == 3
    assert res.to_json()["widths_after"] == [4, 3]
    assert metrics.relative_mse(res.network.forward(x), y) < 1e-12
    np.testing.assert_allclose(res.network.weights[0], t.weights[0], atol=1e-5)


@pytest.mark.parametrize("activation", ["tanh", "g"])
def test_grow_deep_residual_restores_the_missing_neuron_of_a_deep_teacher(activation):
    # A deep teacher without one neuron of its last hidden layer (output layer refitted): the
    # residual neuron, with every weight fine-tuned, is the teacher's, in both layers.
    from expand_and_cluster.pipeline.residual import grow_deep_residual

    t = planted_teacher(4, [4, 3], 1, activation, seed=1, min_angle_degrees=30)
    x, y = probe(t, 1000, "gaussian", seed=0)
    h0 = layer_features([t.incoming(0)], x, activation)[-1]
    part = reconstruct_one_hidden_layer(np.delete(t.incoming(1), 1, axis=0), h0, y, activation)
    net = Network(
        [t.weights[0], part.weights[0], part.weights[1]],
        [t.biases[0], part.biases[0], part.biases[1]],
        activation,
    )
    before = metrics.relative_mse(net.forward(x), y)
    assert before > 1e-4
    out, added, trials = grow_deep_residual(net, x, y, RepairConfig())
    assert out.hidden_sizes == [4, 3] and len(added) == 1 and trials == 2
    assert added[0]["source"] == "residual_joint"
    assert added[0]["relative_mse_after"] < 1e-20
    assert metrics.relative_mse(out.forward(x), y) < 1e-20
    assert max(a["max"] for a in metrics.deep_alignment(t, out)) < 1e-10
    # Nothing is added without residual neurons, or to an exact network.
    same, added, trials = grow_deep_residual(net, x, y, RepairConfig(residual_candidates=0))
    assert same is net and added == [] and trials == 0
    same, added, trials = grow_deep_residual(t, x, y, RepairConfig())
    assert same is t and added == [] and trials == 0
