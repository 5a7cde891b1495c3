"""Stage 3, "Reconstruct": the output layer on the recovered hidden layers, then the fine-tune of
every weight.

Source: Martinelli et al. 2024, Sec. 3 step 3 ("reconstruct and fine-tune"); docs/method.md,
step 3.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..activations import get_activation
from ..config import RecoverConfig
from ..network import Network
from .fit import (
    finetune,
    fit_output_layer,
    hidden_features,
    layer_features,
    orient_layer,
    reconstruct_one_hidden_layer,
)
from .stages import Layers, Log, Queries, Reconstruction, quiet


def reconstruct(
    layers: Layers, queries: Queries, config: RecoverConfig, *, log: Log = quiet
) -> Reconstruction:
    """Stage 3: the network made of the recovered hidden layers and a least-squares output layer
    (the output-bias alignment included), fine-tuned on the training queries (L-BFGS, then
    Levenberg-Marquardt when its Jacobian is small; ``config.finetune_iterations``).

    One hidden layer of an even_linear class keeps the least-squares linear skip term the
    flipped neurons leave (the network's ``linear_weight``). With several, the last hidden layer
    is oriented so that an output layer fitted with a skip needs none
    (:func:`~expand_and_cluster.pipeline.fit.orient_layer`), and the recovered network has no
    skip term.

    Returns
    -------
    Reconstruction
    """
    t0 = time.perf_counter()
    act = get_activation(config.activation)
    x, y, mask = queries.x, queries.y, queries.input_mask
    incoming = list(layers.incoming)
    summaries = list(layers.summaries)
    if len(incoming) == 1:
        initial = reconstruct_one_hidden_layer(incoming[0], x, y, act.name, mask)
    else:
        plain = [x] + layer_features(incoming, x, act.name)
        h, p = plain[-1], plain[-2]
        if act.symmetry.has_linear_term:
            w, b, theta = fit_output_layer(h, p, y, linear_term=True)
            upper = np.concatenate([w, theta, b[:, None]], axis=1)
            incoming[-1], res = orient_layer(upper, incoming[-1], act.linear_coefficient)
            summaries[-1] = dataclasses.replace(summaries[-1], sign_resolution=res.to_json())
            log(
                f"layer {len(incoming) - 1}: {int(res.flipped.sum())} neuron(s) flipped to "
                f"remove the linear term (residual {res.residual:.1e})"
            )
            h = hidden_features(p, incoming[-1], act.name)
        w, b, _ = fit_output_layer(h, p, y, linear_term=False)
        initial = Network(
            [v[:, :-1].copy() for v in incoming] + [w],
            [v[:, -1].copy() for v in incoming] + [b],
            act.name,
            input_mask=mask,
        )
    ft = None
    network = initial
    if config.finetune_iterations > 0:
        ft = finetune(initial, x, y, max_iterations=config.finetune_iterations)
        network = ft.network
        network.input_mask = mask
    return Reconstruction(network, initial, summaries, ft, time.perf_counter() - t0)
