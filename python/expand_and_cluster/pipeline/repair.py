"""Stage 4, width repair (this package's, not the paper's: Martinelli et al. 2024, Sec. 3 ends
with the fine-tune): correct the width of a hidden layer where the fine-tuned network shows it
is wrong. Decisions use the training queries only, so the held-out relative MSE stays
an unbiased score. docs/method.md, step 3, "Width repair", describes the rules and the cases
that motivate them.

* **prune** (too wide): a hidden neuron whose removal (output layer refitted, fine-tuned when
  that comes close) keeps the relative MSE under ``max(prune_tolerance, prune_factor * r0)``
  goes; the teacher is the minimal exact network.
* **grow** (too narrow): when the relative MSE is above ``grow_target``, the clusters the gamma
  filter dropped (within beta) are tried as extra neurons, then residual neurons
  (:mod:`~expand_and_cluster.pipeline.residual`), each kept when it gains enough.

A deep network (:func:`repair_deep`) has its last hidden layer repaired first as a
one-hidden-layer network on the features of the fixed layers below; then neurons are added to any
hidden layer from its dropped clusters, residual neurons to the last one, and neurons an exact
network does not need are removed from any layer, each change judged by the whole network with
every weight fine-tuned (:mod:`~expand_and_cluster.pipeline.deep_repair`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..activations import get_activation
from ..config import RecoverConfig, RepairConfig
from ..metrics import relative_mse
from ..network import Network
from .deep_repair import grow_layers, prune_layers
from .fit import (
    finetune,
    finetuned,
    hidden_features,
    layer_features,
    reconstruct_one_hidden_layer,
    trial_fit,
)
from .residual import grow_deep_residual, require_one_hidden_layer, residual_neurons
from .stages import Layers, Log, Queries, Reconstruction, quiet

#: At most this many candidates (the first ones given) are scored by a least-squares refit per
#: added neuron.
_MAX_SCORED = 64
#: A grow round that lowers the relative MSE less than this many times ends the rounds.
_MIN_ROUND_GAIN = 1.5
#: Deep networks: the grow trials of :func:`repair_deep` see at most this many training queries
#: (``repair.trial_queries`` 0).
DEEP_TRIAL_QUERIES = 4096


def _subset(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of ``n`` rows of (x, y) in their order, or (x, y) when n >= P."""
    if not 0 < n < len(x):
        return x, y
    pick = np.sort(np.random.default_rng(0).choice(len(x), n, replace=False))
    return x[pick], y[pick]


@dataclass
class RepairResult:
    """Outcome of :func:`repair_width`.

    Attributes
    ----------
    network : the repaired network (the input network when nothing changed).
    before : the input network.
    pruned : incoming vectors ``[w; b]`` of the removed neurons, in removal order.
    added : one dict per added neuron (see :func:`grow_neurons`).
    trials : fine-tunes run (prune and grow).
    seconds : wall time.
    pruned_layers : the hidden layer of each removed neuron (deep networks; the last hidden
        layer's index for a shallow one).
    """

    network: Network
    before: Network
    pruned: list = field(default_factory=list)
    added: list = field(default_factory=list)
    trials: int = 0
    seconds: float = 0.0
    pruned_layers: list = field(default_factory=list)

    @property
    def width_before(self) -> int:
        """Width of the repaired (last) hidden layer before the repair."""
        return self.before.hidden_sizes[-1]

    @property
    def changed(self) -> bool:
        return bool(self.pruned or self.added)

    def to_json(self) -> dict:
        return {
            "layer": len(self.network.hidden_sizes) - 1,
            "width_before": self.width_before,
            "width_after": self.network.hidden_sizes[-1],
            "widths_before": self.before.hidden_sizes,
            "widths_after": self.network.hidden_sizes,
            "pruned": len(self.pruned),
            "pruned_layers": self.pruned_layers
            or [len(self.network.hidden_sizes) - 1] * len(self.pruned),
            "added": self.added,
            "trials": self.trials,
            "seconds": self.seconds,
        }


def _rebuild(incoming: np.ndarray, net: Network, x: np.ndarray, y: np.ndarray) -> Network:
    """Network with hidden layer ``incoming`` and a least-squares output layer (and linear term
    for the even_linear classes)."""
    return reconstruct_one_hidden_layer(incoming, x, y, net.activation, net.input_mask)


def prune_neurons(
    net: Network,
    x: np.ndarray,
    y: np.ndarray,
    tolerance: float,
    iterations: int = 500,
    factor: float = 1.0,
    below: float = 1e-8,
) -> tuple[Network, list[np.ndarray], int]:
    """Remove hidden neurons of a one-hidden-layer network that it does not need.

    Only a nearly exact network is pruned: its relative MSE ``r0`` on ``(x, y)`` must be at most
    ``below`` (an imprecise network loses little with any one neuron, needed or not). The
    allowance is ``a = max(tolerance, factor * r0)``: a removal is kept when the relative MSE
    stays at or under ``a``. Neurons are tried in order of increasing contribution
    ``||W_out[:, j]|| * std(h_j)``; each removal refits the output layer by least squares, and
    when that leaves a relative MSE above ``a`` but under ``1e4 a``, fine-tunes (``iterations``
    L-BFGS iterations, then Levenberg-Marquardt, which two near-parallel neurons standing in for
    one teacher neuron need). A neuron the network needs leaves orders of magnitude more and is
    not fine-tuned for.

    Parameters
    ----------
    net : one hidden layer, float64. x : ``[P, d_in]``; y : ``[P, d_out]`` (float64).
    tolerance : relative MSE (dimensionless); 0 disables pruning.
    below : relative MSE above which nothing is pruned.
    factor : how much worse than ``net`` a pruned network may fit (1: no worse; an exact
        network, at or under ``tolerance``, may always go up to ``tolerance``).

    Returns
    -------
    (network, removed incoming vectors, fine-tunes run)

    Raises
    ------
    ValueError
        When ``net`` has more than one hidden layer.
    """
    require_one_hidden_layer(net)
    removed: list[np.ndarray] = []
    trials = 0
    r0 = relative_mse(net.forward(x), y)
    if tolerance <= 0 or r0 > below:
        return net, removed, trials
    allowance = max(tolerance, factor * r0)
    changed = True
    while changed and net.hidden_sizes[0] > 1:
        changed = False
        inc = net.incoming(0)
        h = hidden_features(x, inc, net.activation)
        contribution = np.linalg.norm(net.weights[1], axis=0) * h.std(axis=0)
        for j in np.argsort(contribution, kind="stable"):
            trial = _rebuild(np.delete(inc, j, axis=0), net, x, y)
            rel = relative_mse(trial.forward(x), y)
            if allowance < rel <= 1e4 * allowance:
                trial = finetuned(trial, x, y, iterations, lm=True)
                trials += 1
                rel = relative_mse(trial.forward(x), y)
            if rel <= allowance:
                removed.append(inc[j].copy())
                net = trial
                changed = True
                break
    return net, removed, trials


def _with_neuron(net: Network, cand: dict, x: np.ndarray, y: np.ndarray) -> Network:
    """``net`` with the candidate's neuron added to its hidden layer, output layer refitted."""
    inc = np.concatenate([net.incoming(0), np.asarray(cand["incoming"])[None, :]], axis=0)
    return _rebuild(inc, net, x, y)


def grow_neurons(
    net: Network,
    candidates: list[dict],
    x: np.ndarray,
    y: np.ndarray,
    config: RepairConfig,
) -> tuple[Network, list[dict], int]:
    """Add neurons from ``candidates``, then from the residual, when they lower the relative MSE
    on ``(x, y)`` enough.

    Two greedy passes with look-ahead. Pass 1 (the clusters' candidates): each round tries, as
    one extra neuron, the ``grow_candidates`` largest candidates and the ``grow_candidates`` best
    by a least-squares refit of the output layer (of the first 64), each fine-tuned for
    ``config.iterations`` L-BFGS iterations, and tentatively keeps the best; rounds go on while
    a round lowers the relative MSE at least 1.5 times, up to ``max_added`` neurons or
    ``grow_target``. Then the first m tentative neurons are kept for the largest m whose
    relative MSE is at most ``grow_target`` or at least ``grow_factor ** m`` times lower than at
    the start (when two teacher neurons are missing, the first one added may gain little until
    the second is in). Pass 2, when the network is still above ``grow_target`` and
    ``residual_candidates > 0``: the same rounds from pass 1's result, each trying the
    ``residual_candidates`` best residual neurons of the current network
    (:func:`~expand_and_cluster.pipeline.residual.residual_neurons`), fine-tuned with the
    Levenberg-Marquardt finish (L-BFGS alone stalls short of the teacher neuron from such a
    start), up to ``residual_max_added`` neurons. The passes are not mixed (a cluster candidate
    that wins a round can lead to a dead end that residual neurons avoid). Between the passes,
    when pass 1 added neurons but left the network above ``grow_target``, its result is
    fine-tuned once more with the Levenberg-Marquardt finish (kept when it fits better; the last
    record's ``relative_mse_after`` is then the finished fit), so that pass 2 builds on a
    precise network.

    Parameters
    ----------
    net : one hidden layer, float64.
    candidates : dicts ``{"incoming": [d_in + 1] float64, "size": int,
        "median_angle_degrees": float}``.
    x, y : ``[P, d_in]``, ``[P, d_out]`` float64 training queries.

    Returns
    -------
    (network, one record per added neuron, fine-tunes run); a record is ``{"source": "cluster"
    or "residual", "cluster_size", "median_angle_degrees" (None for a residual neuron),
    "relative_mse_before", "relative_mse_after"}``.
    """
    if config.grow_candidates <= 0:
        return net, [], 0
    out, added, trials = _grow_pass(net, candidates, x, y, config, residual=False)
    rel = relative_mse(out.forward(x), y)
    if added and rel > config.grow_target:
        # Pass 1's trials are L-BFGS only (cheaper over many candidates); its result gets the
        # Levenberg-Marquardt finish before pass 2 starts from it.
        polished_rel, polished = trial_fit(out, x, y, config.iterations, lm=True)
        trials += 1
        if polished_rel < rel:
            out, rel = polished, polished_rel
            added[-1]["relative_mse_after"] = float(rel)
    if config.residual_candidates > 0 and rel > config.grow_target:
        out, more, more_trials = _grow_pass(out, [], x, y, config, residual=True)
        added, trials = added + more, trials + more_trials
    return out, added, trials


def _grow_pass(
    net: Network, candidates: list[dict], x, y, config: RepairConfig, residual: bool
) -> tuple[Network, list[dict], int]:
    """One pass of :func:`grow_neurons`: the clusters' ``candidates``, or (``residual``)
    residual neurons."""
    trials = 0
    original = net
    pool = list(candidates)
    start = current = relative_mse(net.forward(x), y)
    k = config.grow_candidates
    steps: list[tuple[Network, float, dict]] = []
    limit = config.residual_max_added if residual else config.max_added
    while len(steps) < limit and current > config.grow_target:
        tried: dict[int, tuple[float, Network]] = {}
        if residual:
            pool = residual_neurons(
                net, x, y, config.residual_starts, keep=config.residual_candidates, seed=len(steps)
            )
            for i, cand in enumerate(pool):
                tried[i] = trial_fit(
                    _with_neuron(net, cand, x, y), x, y, config.iterations, lm=True
                )
        else:
            scored = []
            for i, cand in enumerate(pool[:_MAX_SCORED]):
                trial = _with_neuron(net, cand, x, y)
                score = relative_mse(trial.forward(x), y)
                scored.append((score if np.isfinite(score) else np.inf, i, trial))
            by_fit = sorted(scored, key=lambda r: (r[0], r[1]))[:k]
            by_size = sorted(scored, key=lambda r: (-pool[r[1]]["size"], r[1]))[:k]
            for _, i, trial in by_size + by_fit:
                if i not in tried:
                    tried[i] = trial_fit(trial, x, y, config.iterations, lm=False)
        trials += len(tried)
        if not tried:
            break
        i = min(tried, key=lambda j: (tried[j][0], j))
        rel, trial = tried[i]
        if rel * _MIN_ROUND_GAIN > current:
            break
        cand = pool.pop(i)
        angle = cand["median_angle_degrees"]
        steps.append(
            (
                trial,
                rel,
                {
                    "source": "residual" if residual else "cluster",
                    "cluster_size": int(cand["size"]),
                    "median_angle_degrees": None if angle is None else float(angle),
                    "relative_mse_before": float(current),
                    "relative_mse_after": float(rel),
                },
            )
        )
        net, current = trial, rel
    keep = 0
    for m, (_, rel, _) in enumerate(steps, start=1):
        if rel <= config.grow_target or rel * config.grow_factor**m <= start:
            keep = m
    if keep == 0:
        return original, [], trials
    return steps[keep - 1][0], [rec for _, _, rec in steps[:keep]], trials


def repair_width(
    net: Network,
    candidates: list[dict],
    x: np.ndarray,
    y: np.ndarray,
    config: RepairConfig | None = None,
    final_iterations: int = 3000,
) -> RepairResult:
    """Grow, then prune, a fine-tuned one-hidden-layer network (see the module docstring); when
    anything changed, fine-tune the result for ``final_iterations`` L-BFGS iterations (with the
    Levenberg-Marquardt finish of :func:`~expand_and_cluster.pipeline.fit.finetune`).

    Parameters
    ----------
    net : the fine-tuned recovered network (one hidden layer, float64).
    candidates : see :func:`grow_neurons`.
    x, y : ``[P, d_in]``, ``[P, d_out]`` float64 training queries.
    config : :class:`~expand_and_cluster.config.RepairConfig` (None: the defaults; not
        ``enabled``: nothing changes).

    Returns
    -------
    RepairResult

    Raises
    ------
    ValueError
        When ``net`` has more than one hidden layer.
    """
    require_one_hidden_layer(net)
    config = RepairConfig() if config is None else config
    t0 = time.perf_counter()
    if not config.enabled:
        return RepairResult(net, net, seconds=time.perf_counter() - t0)
    xs, ys = _subset(x, y, config.trial_queries)
    grown, added, t_grow = grow_neurons(net, candidates, xs, ys, config)
    pruned_net, pruned, t_prune = prune_neurons(
        grown,
        xs,
        ys,
        config.prune_tolerance,
        config.iterations,
        config.prune_factor,
        config.prune_below,
    )
    out = RepairResult(pruned_net, net, pruned, added, t_grow + t_prune)
    if out.changed and final_iterations > 0:
        mask = pruned_net.input_mask
        out.network = finetune(pruned_net, x, y, max_iterations=final_iterations).network
        out.network.input_mask = mask
    out.seconds = time.perf_counter() - t0
    return out


def repair_deep(
    network: Network, layer_candidates: list[list[dict]], x: np.ndarray, y: np.ndarray, cfg
) -> RepairResult:
    """Width repair of every hidden layer of a deep network, each change judged by the whole
    network after every weight is fine-tuned.

    1. The last hidden layer and the output layer are repaired by :func:`repair_width` on the
       features of the fixed layers below (classes without a linear term), and the whole
       network is fine-tuned when anything changed.
    2. Neurons are added to any hidden layer from its dropped clusters
       (:func:`~expand_and_cluster.pipeline.deep_repair.grow_layers`, trials on
       ``repair.trial_queries`` or :data:`DEEP_TRIAL_QUERIES` of the queries, the grown network
       then fine-tuned on all), then (classes without a
       linear term) residual neurons to the last one
       (:func:`~expand_and_cluster.pipeline.residual.grow_deep_residual`), while the network is
       above ``grow_target``.
    3. Neurons an exact network does not need are removed from any hidden layer
       (:func:`~expand_and_cluster.pipeline.deep_repair.prune_layers`).
    Each step that changed the network is followed by a fine-tune of every weight on all the
    queries (``cfg.finetune_iterations``).

    Parameters
    ----------
    network : the fine-tuned recovered network (at least two hidden layers, float64).
    layer_candidates : per hidden layer, its dropped clusters' representatives over that
        layer's input (``Layers.layer_candidates``; empty lists for layers resumed from a
        checkpoint).
    x, y : ``[P, d_in]``, ``[P, d_out]`` float64 training queries.
    cfg : the :class:`~expand_and_cluster.config.RecoverConfig`.

    Returns
    -------
    RepairResult whose ``network`` and ``before`` are whole networks.
    """
    t0 = time.perf_counter()
    res = RepairResult(network, network)
    if not cfg.repair.enabled:
        return res
    linear = get_activation(network.activation).symmetry.has_linear_term
    full = network
    fixed = [network.incoming(i) for i in range(len(network.weights) - 2)]
    if not linear:
        below = layer_features(fixed, x, network.activation)[-1]
        top = Network(network.weights[-2:], network.biases[-2:], network.activation)
        last = layer_candidates[-1] if layer_candidates else []
        part = repair_width(top, last, below, y, cfg.repair, final_iterations=0)
        res.added, res.pruned, res.trials = part.added, part.pruned, part.trials
        res.pruned_layers = [len(fixed)] * len(part.pruned)
        if part.changed:
            full = Network(
                network.weights[:-2] + part.network.weights,
                network.biases[:-2] + part.network.biases,
                network.activation,
            )
            full = finetuned(full, x, y, cfg.finetune_iterations, lm=True)
    candidates = list(layer_candidates) + [[]] * (len(network.hidden_sizes) - len(layer_candidates))
    # The grow trials fine-tune the whole network: they see a seeded subset of the queries.
    xs, ys = _subset(x, y, cfg.repair.trial_queries or DEEP_TRIAL_QUERIES)
    grown, added, trials = grow_layers(full, candidates, xs, ys, cfg.repair)
    if added:
        full = finetuned(grown, x, y, cfg.finetune_iterations, lm=True)
    res.added, res.trials = res.added + added, res.trials + trials
    if not linear and cfg.repair.grow_candidates > 0:
        # Residual neurons with every weight fine-tuned; it returns at once when ``full`` is
        # within grow_target.
        grown, added, trials = grow_deep_residual(full, xs, ys, cfg.repair)
        res.added, res.trials = res.added + added, res.trials + trials
        if added:
            full = finetuned(grown, x, y, cfg.finetune_iterations, lm=True)
    full, removed, trials = prune_layers(full, x, y, cfg.repair)
    res.pruned = res.pruned + [r["incoming"] for r in removed]
    res.pruned_layers = res.pruned_layers + [r["layer"] for r in removed]
    res.trials += trials
    if removed:
        full = finetuned(full, x, y, cfg.finetune_iterations, lm=True)
    res.network = full
    res.seconds = time.perf_counter() - t0
    return res


def repair(
    reconstruction: Reconstruction,
    layers: Layers,
    queries: Queries,
    config: RecoverConfig,
    *,
    log: Log = quiet,
) -> RepairResult | None:
    """Stage 4, on the training queries: :func:`repair_width` of a one-hidden-layer network from
    its dropped clusters (``layers.candidates``), or :func:`repair_deep` of every hidden layer
    of a deep one (``layers.layer_candidates``).

    Returns
    -------
    RepairResult (its ``network`` with the queries' ``input_mask``), or None when the network
    has one hidden layer and it was not clustered in this run (resumed past it).
    """
    x, y = queries.x, queries.y
    t0 = time.perf_counter()
    if len(layers.incoming) > 1:
        res = repair_deep(reconstruction.network, layers.layer_candidates, x, y, config)
    elif layers.candidates is None:
        return None
    else:
        res = repair_width(
            reconstruction.network,
            layers.candidates,
            x,
            y,
            config.repair,
            final_iterations=config.finetune_iterations,
        )
    res.network.input_mask = queries.input_mask
    if res.changed:
        log(
            f"width repair: widths {res.before.hidden_sizes} -> {res.network.hidden_sizes} "
            f"({len(res.added)} added, {len(res.pruned)} pruned, {res.trials} trials, "
            f"{time.perf_counter() - t0:.1f} s)"
        )
    return res
