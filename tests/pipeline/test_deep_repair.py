"""Width repair of every hidden layer of a deep network: neurons removed from and added to inner
layers, judged by the whole network after a fine-tune, on planted teachers with known answers."""

import numpy as np
import pytest

from expand_and_cluster import metrics
from expand_and_cluster.config import RepairConfig
from expand_and_cluster.network import Network
from expand_and_cluster.pipeline.deep_repair import (
    add_neuron,
    grow_layers,
    prune_layers,
    remove_neuron,
)
from expand_and_cluster.pipeline.fit import finetuned
from expand_and_cluster.teachers import planted_teacher, probe


def _split(t: Network, layer: int, j: int, share: float) -> Network:
    """The teacher with neuron j of ``layer`` duplicated, its outgoing weights shared between
    the two copies: the same function, one neuron too many."""
    w, b = [v.copy() for v in t.weights], [v.copy() for v in t.biases]
    w[layer] = np.vstack([w[layer], w[layer][j]])
    b[layer] = np.append(b[layer], b[layer][j])
    out = w[layer + 1][:, j].copy()
    w[layer + 1][:, j] = share * out
    w[layer + 1] = np.hstack([w[layer + 1], (1 - share) * out[:, None]])
    return Network(w, b, t.activation)


@pytest.mark.parametrize("activation, layer", [("tanh", 0), ("sigmoid", 1), ("g", 0)])
def test_prune_layers_removes_a_duplicated_neuron_of_any_layer(activation, layer):
    t = planted_teacher(3, [4, 3], 2, activation, seed=5, min_angle_degrees=20)
    x, y = probe(t, 800, "gaussian", seed=1)
    wide = _split(t, layer, 1, 0.3)
    assert metrics.relative_mse(wide.forward(x), y) < 1e-24
    # The absorbed network is the teacher itself: no fine-tune needed.
    absorbed = remove_neuron(wide, layer, 4 if layer == 0 else 3, x)
    assert metrics.relative_mse(absorbed.forward(x), y) < 1e-20
    out, removed, trials = prune_layers(wide, x, y, RepairConfig())
    assert out.hidden_sizes == [4, 3] and len(removed) == 1 and removed[0]["layer"] == layer
    assert metrics.relative_mse(out.forward(x), y) < 1e-12
    assert max(a["max"] for a in metrics.deep_alignment(t, out)) < 1e-8
    # The teacher itself loses nothing: every neuron is needed.
    same, removed, _ = prune_layers(t, x, y, RepairConfig())
    assert same is t and removed == []


def test_add_neuron_keeps_the_function_of_an_inner_layer():
    t = planted_teacher(3, [3, 2], 1, "tanh", seed=2)
    x, y = probe(t, 300, "gaussian", seed=0)
    grown = add_neuron(t, 0, np.array([0.3, -0.2, 0.5, 0.1]), x, y)
    assert grown.hidden_sizes == [4, 2]
    np.testing.assert_allclose(grown.forward(x), t.forward(x), atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_grow_layers_restores_a_missing_neuron_of_the_first_layer(activation):
    # A deep teacher without neuron 1 of its first (inner) hidden layer, fine-tuned: the repair
    # of the last layer alone cannot bring it back; a candidate near the teacher's neuron in
    # layer 0, judged with every weight fine-tuned, does, and the result is the teacher.
    t = planted_teacher(3, [4, 3], 1, activation, seed=3, min_angle_degrees=25)
    x, y = probe(t, 1500, "gaussian", seed=2)
    w, b = [v.copy() for v in t.weights], [v.copy() for v in t.biases]
    w[0], b[0], w[1] = np.delete(w[0], 1, axis=0), np.delete(b[0], 1), np.delete(w[1], 1, axis=1)
    narrow = finetuned(Network(w, b, activation), x, y, 500, lm=True)
    before = metrics.relative_mse(narrow.forward(x), y)
    assert before > 1e-8
    rng = np.random.default_rng(0)
    decoy = {"incoming": rng.standard_normal(4), "size": 8, "median_angle_degrees": 5.0}
    near = t.incoming(0)[1] * 1.01
    # A layer-1 candidate over the narrow layer 0: padded when layer 0 grows, then tried again.
    v = t.incoming(1)[0]
    above = {"incoming": 0.5 * np.r_[v[[0, 2, 3]], v[-1]], "size": 2, "median_angle_degrees": 9.0}
    cands = [[decoy, {"incoming": near, "size": 6, "median_angle_degrees": 2.0}], [above]]
    out, added, trials = grow_layers(narrow, cands, x, y, RepairConfig())
    assert out.hidden_sizes == [4, 3] and len(added) == 1 and trials >= 2
    assert added[0]["layer"] == 0 and added[0]["cluster_size"] == 6
    assert metrics.relative_mse(out.forward(x), y) < 1e-16
    assert max(a["max"] for a in metrics.deep_alignment(t, out)) < 1e-6
