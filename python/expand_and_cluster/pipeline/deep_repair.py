"""Width repair of every hidden layer of a deep network (this package's, not the paper's): a
neuron is added to a layer from the clusters the gamma filter dropped there, or removed from a
layer whose network is exact without it, and each change is judged by the relative MSE of the
whole network after every weight is fine-tuned. docs/method.md, step 3, "Width repair".

A wrong width in an inner layer cannot be repaired on fixed features: a missing neuron of layer l
changes the input of every layer above it, and a spurious one is only seen to be spurious once
the layers above stop using it. So every trial here changes the network and fine-tunes all of it
(L-BFGS, then Levenberg-Marquardt; :func:`~expand_and_cluster.pipeline.fit.trial_fit`).
"""

from __future__ import annotations

import numpy as np

from ..config import RepairConfig
from ..metrics import relative_mse
from ..network import Network
from .fit import fit_output_layer, layer_features, trial_fit

#: A removal whose absorbed network is within this factor of the allowance is fine-tuned before
#: it is judged (a neuron the network needs leaves far more).
_PRUNE_WINDOW = 1e4


def _rebuilt(net: Network, weights: list, biases: list) -> Network:
    return Network(weights, biases, net.activation, input_mask=net.input_mask)


def add_neuron(net: Network, layer: int, incoming: np.ndarray, x: np.ndarray, y: np.ndarray):
    """``net`` with one more neuron in hidden layer ``layer``.

    Parameters
    ----------
    net : float64 network without a skip term. layer : hidden layer index, 0 .. L - 1.
    incoming : ``[fan_in + 1]`` the new neuron's ``[w; b]`` over the layer's input.
    x, y : ``[P, d_in]``, ``[P, d_out]`` training queries: for the last hidden layer, the output
        layer is refitted by least squares on them; an inner layer's new neuron starts with zero
        outgoing weights (the fine-tune that judges it moves them first; a Gauss-Newton step
        for them from zero led relu trials into worse minima).

    Returns
    -------
    Network
    """
    incoming = np.asarray(incoming, dtype=np.float64)
    w, b = list(net.weights), list(net.biases)
    w[layer] = np.vstack([w[layer], incoming[None, :-1]])
    b[layer] = np.append(b[layer], incoming[-1])
    if layer == len(w) - 2:
        below = [np.c_[w[i], b[i]] for i in range(layer + 1)]
        h = layer_features(below, x, net.activation)[-1]
        w_out, b_out, _ = fit_output_layer(h, x, y, linear_term=False)
        w[-1], b[-1] = w_out, b_out
    else:
        w[layer + 1] = np.hstack([w[layer + 1], np.zeros((w[layer + 1].shape[0], 1))])
    return _rebuilt(net, w, b)


def remove_neuron(net: Network, layer: int, j: int, x: np.ndarray) -> Network:
    """``net`` without neuron ``j`` of hidden layer ``layer``, its output absorbed into the layer
    above: ``h_j`` is fitted on the queries by least squares as ``H_{-j} a + c`` (the layer's
    other neurons and a constant), and the layer above gets ``W[:, i] += W[:, j] a_i`` and
    ``b += W[:, j] c``. A duplicate, a silent or a linearly dependent neuron leaves the function
    (nearly) unchanged.

    Parameters
    ----------
    net : float64 network without a skip term, hidden layer ``layer`` at least 2 wide.
    x : ``[P, d_in]`` queries the fit runs on.

    Returns
    -------
    Network
    """
    w, b = list(net.weights), list(net.biases)
    below = [np.c_[w[i], b[i]] for i in range(layer + 1)]
    h = layer_features(below, x, net.activation)[-1]
    a = np.c_[np.delete(h, j, axis=1), np.ones(len(h))]
    coef = np.linalg.lstsq(a, h[:, j], rcond=None)[0]
    out_j = w[layer + 1][:, j]
    w[layer + 1] = np.delete(w[layer + 1], j, axis=1) + np.outer(out_j, coef[:-1])
    b[layer + 1] = b[layer + 1] + out_j * coef[-1]
    w[layer] = np.delete(w[layer], j, axis=0)
    b[layer] = np.delete(b[layer], j)
    return _rebuilt(net, w, b)


def _contribution(net: Network, layer: int, x: np.ndarray) -> np.ndarray:
    """``||W_{l+1}[:, j]|| * std(h_j)`` of each neuron j of hidden layer ``layer``."""
    below = [np.c_[net.weights[i], net.biases[i]] for i in range(layer + 1)]
    h = layer_features(below, x, net.activation)[-1]
    return np.linalg.norm(net.weights[layer + 1], axis=0) * h.std(axis=0)


def grow_layers(
    net: Network,
    layer_candidates: list[list[dict]],
    x: np.ndarray,
    y: np.ndarray,
    config: RepairConfig,
) -> tuple[Network, list[dict], int]:
    """Add neurons to any hidden layer from its dropped clusters while that lowers the relative
    MSE of the whole network enough.

    Each round tries, in every hidden layer l, the ``config.grow_candidates`` largest of its
    candidates not yet used (:func:`add_neuron`, then every weight fine-tuned:
    ``config.iterations`` L-BFGS iterations and Levenberg-Marquardt) and keeps the best trial
    when it lowers the relative MSE at least ``config.deep_grow_factor`` times. Rounds stop at
    ``config.grow_target``, after ``config.max_added`` neurons, or at the first round that
    gains too little.

    Parameters
    ----------
    net : a fine-tuned float64 network with at least two hidden layers, no skip term.
    layer_candidates : per hidden layer, dicts ``{"incoming": [fan_in + 1], "size",
        "median_angle_degrees"}`` over that layer's input, largest first.
    x, y : ``[P, d_in]``, ``[P, d_out]`` float64 training queries.

    Returns
    -------
    (network, one record per added neuron ``{"source": "cluster_joint", "layer",
    "cluster_size", "median_angle_degrees", "relative_mse_before", "relative_mse_after"}``,
    fine-tunes run)
    """
    pools = [list(c) for c in layer_candidates]
    current = relative_mse(net.forward(x), y)
    added: list[dict] = []
    trials = 0
    k = config.grow_candidates
    while k > 0 and len(added) < config.max_added and current > config.grow_target:
        best = None
        for layer, pool in enumerate(pools):
            for i, cand in enumerate(pool[:k]):
                trial = add_neuron(net, layer, cand["incoming"], x, y)
                rel, trial = trial_fit(trial, x, y, config.iterations, lm=True)
                trials += 1
                if best is None or rel < best[0]:
                    best = (rel, trial, layer, i)
        if best is None or best[0] * config.deep_grow_factor > current:
            break
        rel, net, layer, i = best
        cand = pools[layer].pop(i)
        if layer + 1 < len(pools):
            # The layer above has one more input: its candidates get a zero weight on it.
            pools[layer + 1] = [
                {**c, "incoming": np.insert(np.asarray(c["incoming"]), -1, 0.0)}
                for c in pools[layer + 1]
            ]
        added.append(
            {
                "source": "cluster_joint",
                "layer": layer,
                "cluster_size": int(cand["size"]),
                "median_angle_degrees": float(cand["median_angle_degrees"]),
                "relative_mse_before": float(current),
                "relative_mse_after": float(rel),
            }
        )
        current = rel
    return net, added, trials


def prune_layers(
    net: Network, x: np.ndarray, y: np.ndarray, config: RepairConfig
) -> tuple[Network, list[dict], int]:
    """Remove neurons of any hidden layer that an exact network does not need.

    Only a network at or under ``config.prune_below`` is pruned; the allowance is ``a =
    max(prune_tolerance, prune_factor * r0)`` (r0 its relative MSE). Layer by layer from the
    top, neurons are tried in order of increasing contribution ``||W_{l+1}[:, j]|| *
    std(h_j)``: each removal is absorbed into the layer above (:func:`remove_neuron`) and, when
    that leaves the relative MSE above ``a`` but within 1e4 ``a``, every weight is fine-tuned
    (``config.iterations`` L-BFGS iterations and Levenberg-Marquardt); the removal is kept when
    the relative MSE is at most ``a``, and the search starts again.

    Returns
    -------
    (network, one record per removed neuron ``{"layer", "incoming": [fan_in + 1]}``, fine-tunes
    run)
    """
    removed: list[dict] = []
    trials = 0
    r0 = relative_mse(net.forward(x), y)
    if config.prune_tolerance <= 0 or r0 > config.prune_below:
        return net, removed, trials
    allowance = max(config.prune_tolerance, config.prune_factor * r0)
    changed = True
    while changed:
        changed = False
        for layer in reversed(range(len(net.hidden_sizes))):
            if net.hidden_sizes[layer] < 2:
                continue
            for j in np.argsort(_contribution(net, layer, x), kind="stable"):
                trial = remove_neuron(net, layer, int(j), x)
                rel = relative_mse(trial.forward(x), y)
                if allowance < rel <= _PRUNE_WINDOW * allowance:
                    rel, trial = trial_fit(trial, x, y, config.iterations, lm=True)
                    trials += 1
                if rel <= allowance:
                    inc = np.r_[net.weights[layer][j], net.biases[layer][j]]
                    removed.append({"layer": layer, "incoming": inc})
                    net, changed = trial, True
                    break
            if changed:
                break
    return net, removed, trials
