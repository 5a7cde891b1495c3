"""Residual neurons: single hidden neurons fitted, from many random starts, to what a network's
hidden layer leaves unexplained (greedy forward selection, as in projection pursuit regression;
Friedman & Stuetzle 1981). The width repair grows them where no student found a teacher
neuron (:mod:`expand_and_cluster.pipeline.repair`; not part of the paper).
"""

from __future__ import annotations

import numpy as np
import torch

from ..activations import get_activation
from ..config import RepairConfig
from ..metrics import relative_mse
from ..network import Network
from .fit import (
    hidden_features,
    layer_features,
    output_design,
    reconstruct_one_hidden_layer,
    trial_fit,
)


def require_one_hidden_layer(net: Network) -> None:
    """ValueError unless ``net`` has exactly one hidden layer."""
    if len(net.hidden_sizes) != 1:
        raise ValueError(f"net: expected one hidden layer, got widths {net.hidden_sizes}")


def residual_neurons(
    net: Network,
    x: np.ndarray,
    y: np.ndarray,
    n_starts: int = 128,
    steps: int = 300,
    keep: int = 4,
    seed: int = 0,
) -> list[dict]:
    """Single hidden neurons that best fit what the hidden layer of ``net`` leaves unexplained.

    Let ``A = [H, 1 (, x)]`` be the design of the least-squares output layer (the hidden
    features ``H`` of ``net``, the bias column, and the inputs for the even_linear classes'
    linear term), ``R`` the residual of ``y`` after that fit, and for a candidate incoming vector
    ``v = [w; b]`` let ``h = s(x w + b)`` and ``h~`` its part orthogonal to ``A``. Adding the
    neuron and refitting the output layer lowers the squared error by ``|h~^T R|^2 / |h~|^2``
    (variable projection: the optimal output weights are eliminated). This function maximises
    that fraction of ``|R|^2`` over ``v`` from ``n_starts`` random starts at once (Adam,
    ``steps`` steps; directions uniform over the inputs that carry signal, norms drawn from the
    network's own incoming weights, each hyperplane through a random query) and returns the
    ``keep`` best, one per direction (up to sign). This is greedy forward selection as in
    projection pursuit regression (Friedman & Stuetzle 1981); not part of the paper.

    Parameters
    ----------
    net : one hidden layer, float64. x : ``[P, d_in]``; y : ``[P, d_out]`` (float64).
    n_starts : random starts, optimised together. steps : Adam steps (learning rate 0.01 times
        the median norm of the network's incoming weights, at least 0.001).
    keep : most neurons returned. seed : seeds the starts (the same seed, the same neurons).

    Returns
    -------
    list of ``{"incoming": [d_in + 1] float64, "size": 0, "median_angle_degrees": None,
    "explained": float}`` (the fraction of the residual's squared norm the neuron explains
    alone), best first; empty when the residual is rounding error (relative MSE of the
    least-squares fit under 1e-20).

    Raises
    ------
    ValueError
        When ``net`` has more than one hidden layer.
    """
    require_one_hidden_layer(net)
    act = get_activation(net.activation)
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    inc = net.incoming(0)
    design = output_design(hidden_features(x, inc, net.activation), x, act.symmetry.has_linear_term)
    q, _ = torch.linalg.qr(torch.as_tensor(design, dtype=torch.float64))
    r = yt - q @ (q.T @ yt)
    r2 = float((r * r).sum())
    spread = float(((yt - yt.mean(dim=0)) ** 2).sum())
    if not np.isfinite(r2) or r2 <= 1e-20 * spread or r2 <= 1e-300:
        return []  # nothing left to fit but rounding (relative MSE under 1e-20)
    d_in = x.shape[1]
    mask = torch.ones(d_in, dtype=torch.float64)
    if net.input_mask is not None:
        mask = torch.as_tensor(net.input_mask, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_starts, d_in, generator=g, dtype=torch.float64) * mask
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    norms = torch.as_tensor(np.linalg.norm(inc[:, :-1], axis=1), dtype=torch.float64)
    if len(norms) == 0:  # no hidden neuron yet: unit norms
        norms = torch.ones(1, dtype=torch.float64)
    pick = torch.randint(len(norms), (n_starts,), generator=g)
    scale = 2.0 ** (2.0 * torch.rand(n_starts, generator=g, dtype=torch.float64) - 1.0)
    w = (dirs * (norms[pick].clamp_min(1e-3) * scale)[:, None]).requires_grad_(True)
    through = xt[torch.randint(len(x), (n_starts,), generator=g)]
    b = (-(through * w.detach()).sum(dim=1)).requires_grad_(True)

    def explained() -> torch.Tensor:
        h = act.fn(xt @ (w * mask).T + b)
        h = h - q @ (q.T @ h)
        num = ((h.T @ r) ** 2).sum(dim=1)
        return num / ((h * h).sum(dim=0).clamp_min(1e-300) * r2)

    lr = 0.01 * float(norms.median().clamp_min(0.1))
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = -explained().nan_to_num(0.0).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        frac = explained().nan_to_num(-1.0)
        v = torch.cat([w * mask, b[:, None]], dim=1)
    out: list[dict] = []
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    chosen: list[int] = []
    for m in torch.argsort(frac, descending=True).tolist():
        if len(out) >= keep or frac[m] <= 0:
            break
        if any(abs(float(unit[m] @ unit[c])) > 1 - 1e-3 for c in chosen):
            continue
        chosen.append(m)
        out.append(
            {
                "incoming": v[m].numpy().copy(),
                "size": 0,
                "median_angle_degrees": None,
                "explained": float(frac[m]),
            }
        )
    return out


def grow_deep_residual(
    net: Network, x: np.ndarray, y: np.ndarray, config: RepairConfig
) -> tuple[Network, list[dict], int]:
    """Deep networks: add residual neurons to the last hidden layer, each trial fine-tuning
    every weight.

    The repair of the top part on the features of fixed layers below cannot move those layers,
    which the final fine-tune of a too-narrow network has bent to make up for the missing
    neurons (docs/method.md, step 3, has an example). Here each round fits the
    ``residual_candidates`` best residual neurons (:func:`residual_neurons`) of the top part on
    the current features, adds each to the last hidden layer (output layer refitted by least
    squares) and fine-tunes the whole network (``iterations`` L-BFGS iterations, then
    Levenberg-Marquardt); the best is kept when it lowers the relative MSE at least
    ``deep_grow_factor`` times, and the rounds stop at the first that does not (or at
    ``max_added``, or at ``grow_target``).

    Parameters
    ----------
    net : a fine-tuned network with at least two hidden layers, float64.
    x, y : ``[P, d_in]``, ``[P, d_out]`` float64 training queries.

    Returns
    -------
    (network, one record per added neuron as in :func:`grow_neurons` with ``"source":
    "residual_joint"``, fine-tunes run).
    """
    act = net.activation
    current = relative_mse(net.forward(x), y)
    added: list[dict] = []
    trials = 0
    while (
        len(added) < config.max_added
        and current > config.grow_target
        and config.residual_candidates > 0
    ):
        fixed = [net.incoming(i) for i in range(len(net.hidden_sizes) - 1)]
        below = layer_features(fixed, x, act)[-1]
        top = Network(net.weights[-2:], net.biases[-2:], act)
        pool = residual_neurons(
            top,
            below,
            y,
            config.residual_starts,
            keep=config.residual_candidates,
            seed=len(added),
        )
        best: tuple[float, Network] | None = None
        for cand in pool:
            inc = np.concatenate([top.incoming(0), np.asarray(cand["incoming"])[None, :]], axis=0)
            grown = reconstruct_one_hidden_layer(inc, below, y, act, top.input_mask)
            full = Network(
                net.weights[:-2] + grown.weights,
                net.biases[:-2] + grown.biases,
                act,
                input_mask=net.input_mask,
            )
            rel, full = trial_fit(full, x, y, config.iterations, lm=True)
            trials += 1
            if best is None or rel < best[0]:
                best = (rel, full)
        if best is None or best[0] * config.deep_grow_factor > current:
            break
        added.append(
            {
                "source": "residual_joint",
                "cluster_size": 0,
                "median_angle_degrees": None,
                "relative_mse_before": float(current),
                "relative_mse_after": float(best[0]),
            }
        )
        current, net = best
    return net, added, trials
