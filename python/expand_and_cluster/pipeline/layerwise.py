"""Stage 2, "Cluster", over every hidden layer: cluster layer l of the students in the space of
the recovered layer l - 1, then (unless l is the last hidden layer) put the collapsed layer into
every student and fine-tune their upper layers before layer l + 1 is clustered.

Source: Martinelli et al. 2024, Sec. 3 and Sec. 3.3 (deep networks: "the reconstructed layer is
plugged into all students, which are fine-tuned before the next layer is clustered");
docs/method.md, steps 2 and 4.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..activations import get_activation
from ..config import RecoverConfig
from ..io.checkpoint import Checkpoint
from ..network import Network
from ..students import StudentEnsemble
from .cluster import LayerClustering, cluster_layer
from .fit import finetune, hidden_features, layer_features, orient_layer
from .stages import Expansion, Layers, LayerSummary, Log, Queries, input_mask_from_queries, quiet
from .train import TrainResult, train_students


def cluster_layers(
    expansion: Expansion,
    queries: Queries,
    config: RecoverConfig,
    *,
    checkpoint: Checkpoint | None = None,
    resume_from: Checkpoint | None = None,
    log: Log = quiet,
) -> Layers:
    """Stage 2: every hidden layer of the students clustered and collapsed, layer by layer.

    For l = 0 .. L - 1: cluster the students' layer l
    (:func:`~expand_and_cluster.pipeline.cluster.cluster_layer`) in the space of the recovered
    layer l - 1 (the raw inputs for l = 0). Unless l is the last hidden layer: refine the
    recovered layers by fine-tuning them with the best student's upper layers
    (``config.layer_refine_iterations``), put the collapsed layer into all N students (each keeps
    its own upper layers, fed by its summed outgoing weights), and fine-tune their upper layers on
    the recovered layer's activations (``config.upper_students``). The recovered layers are
    frozen from then on, so every student shares them exactly.

    Even_linear classes with several hidden layers (flips leave linear maps, ``s(z) - s(-z) = c
    z``): the students' next layer is also fed the current layer's input (a skip that absorbs
    those maps), the next layer is clustered in that joint space, and its skip part fixes the
    orientation of the current layer (:func:`~expand_and_cluster.pipeline.fit.orient_layer`).

    With ``resume_from``, the layers finished in that checkpoint are taken as they are and the
    loop continues after them; with ``checkpoint``, each finished layer is written there
    (``layer_<l>``).

    Returns
    -------
    Layers

    Raises
    ------
    InputError
        When gamma * N < 2.
    NoClusterError
        When no cluster of some layer survives the gamma and beta filters.
    """
    cfg = config
    act = get_activation(cfg.activation)
    n_layers = int(cfg.hidden_layers)
    linear = act.symmetry.has_linear_term and n_layers > 1
    x, y = queries.x, queries.y
    ens = expansion.training.students.to(device="cpu")
    losses = expansion.training.relative_mse
    out = Layers([], [])
    plain = [x]  # plain[i]: input of hidden layer i on the training queries
    u = x  # the students' current input: plain[l] (and plain[l - 1], even_linear deep nets)
    start = 0
    if resume_from is not None:
        last = min(resume_from.last_layer(), n_layers - 1)
        if last >= 0:
            arrays = _load_layers(resume_from, last, out)
            plain = [x] + layer_features(out.incoming, x, act.name)
            if last < n_layers - 1:
                ens = StudentEnsemble.from_arrays(arrays, dtype=torch.float64)
                losses = np.asarray(arrays["relative_mse"])
                u = np.concatenate([plain[-1], plain[-2]], axis=1) if linear else plain[-1]
            start = last + 1
            out.layer_candidates = [[] for _ in range(start)]
            out.resumed_from = f"layer_{last}"
            log(f"resumed after hidden layer {last} (widths {[len(v) for v in out.incoming]})")

    for l in range(start, n_layers):
        t0 = time.perf_counter()
        incoming = ens.incoming(0).cpu()
        mask = (
            queries.input_mask if l == 0 else input_mask_from_queries(u, cfg.cluster.mask_tolerance)
        )
        cl = cluster_layer(
            incoming, ens.weights[1].cpu(), losses, act.name, cfg.cluster, mask, cfg.device
        )
        if l == 0:
            out.first = cl
        candidates = dropped_representatives(cl, incoming.numpy(), losses, cfg.cluster.beta_degrees)
        if l == n_layers - 1:
            out.candidates = candidates
        dt = time.perf_counter() - t0
        out.seconds["cluster"] += dt
        summary = LayerSummary.from_clustering(l, cl, dt)
        log(
            f"layer {l}: {cl.k_hat} cluster(s) kept at cut height {cl.cut_height:.3g}, "
            f"{len(cl.dropped)} dropped"
        )
        v = cl.incoming
        lin_terms = cl.linear_terms if linear else None
        if linear and l > 0:
            # v is over [h_{l-1}; p_{l-1}; 1]: orient layer l - 1 so that no skip is left.
            out.incoming[-1], res = orient_layer(v, out.incoming[-1], act.linear_coefficient)
            out.summaries[-1].sign_resolution = res.to_json()
            log(
                f"layer {l - 1}: {int(res.flipped.sum())} neuron(s) flipped to remove the "
                f"linear term (residual {res.residual:.1e})"
            )
            v = v @ res.transform.T
            lin_terms = lin_terms @ res.transform.T
            for c in candidates:
                c["incoming"] = c["incoming"] @ res.transform.T
            plain[l] = hidden_features(plain[l - 1], out.incoming[-1], act.name)
        out.incoming.append(v)
        out.summaries.append(summary)
        out.layer_candidates.append(candidates)
        if l < n_layers - 1:
            t0 = time.perf_counter()
            upper = _insert_layer(ens, cl, lin_terms)
            if cfg.layer_refine_iterations > 0 and not linear:
                out.incoming = _refine(out.incoming, upper, losses, queries, cfg, log)
                plain = [x] + layer_features(out.incoming, x, act.name)[:l]
            plain.append(hidden_features(plain[l], out.incoming[l], act.name))
            u = np.concatenate([plain[l + 1], plain[l]], axis=1) if linear else plain[l + 1]
            trained = _train_upper(upper, u, y, l, cfg)
            ens = trained.students.to(dtype=torch.float64, device="cpu")
            losses = trained.relative_mse
            summary.students_relative_mse = losses
            dt = time.perf_counter() - t0
            summary.seconds["finetune"] = dt
            out.seconds["finetune"] += dt
            what = "trained afresh" if cfg.upper_students == "fresh" else "fine-tuned"
            log(f"students {what} on the recovered layer {l} in {dt:.1f} s: {trained.describe()}")
        if checkpoint is not None:
            _save_layer(checkpoint, l, out, ens if l < n_layers - 1 else None, losses)
    return out


def _insert_layer(
    ens: StudentEnsemble, cl: LayerClustering, linear_terms: np.ndarray | None
) -> StudentEnsemble:
    """The students' upper parts, fed by the collapsed layer.

    Student n's next layer gets the weights ``cl.student_outgoing[n]`` (its summed, transformed
    outgoing weights; zero for a cluster it has no member in) and its bias plus
    ``cl.next_bias_shift[n]`` (odd_constant class). With ``linear_terms`` ``[N, d_next, q + 1]``
    (even_linear classes: the linear maps left by the flipped members, over the layer's plain
    input ``[p; 1]``), the next layer also gets ``q`` extra input columns (the skip from p) and
    the constant column is added to its bias. Returns float64 CPU students of depth L - l - 1.
    """
    w_out = np.transpose(cl.student_outgoing, (0, 2, 1))  # [N, d_next, k]
    bias = ens.biases[1].detach().cpu().double().numpy() + cl.next_bias_shift
    if linear_terms is not None:
        bias = bias + linear_terms[:, :, -1]
        w_out = np.concatenate([w_out, linear_terms[:, :, :-1]], axis=2)
    f64 = torch.float64
    weights = [torch.as_tensor(w_out, dtype=f64).contiguous()]
    biases = [torch.as_tensor(bias, dtype=f64).contiguous()]
    weights += [
        w.detach().to(dtype=f64, device="cpu").contiguous().clone() for w in ens.weights[2:]
    ]
    biases += [b.detach().to(dtype=f64, device="cpu").contiguous().clone() for b in ens.biases[2:]]
    return StudentEnsemble(weights, biases, ens.activation)


def _refine(
    incoming: list[np.ndarray], upper: StudentEnsemble, losses, queries: Queries, cfg, log: Log
) -> list[np.ndarray]:
    """The recovered layers fine-tuned together with the best student's upper layers (L-BFGS,
    every weight), so the layer the students are then fed is as exact as that student allows."""
    best = int(np.argmin(losses))
    net = Network(
        [q[:, :-1] for q in incoming] + [w[best].numpy() for w in upper.weights],
        [q[:, -1] for q in incoming] + [b[best].numpy() for b in upper.biases],
        cfg.activation,
    )
    ref = finetune(net, queries.x, queries.y, max_iterations=cfg.layer_refine_iterations)
    log(
        f"layer {len(incoming) - 1}: refined with student {best}'s upper layers, relative MSE "
        f"{ref.mse_before / queries.var_y:.2e} -> {ref.mse_after / queries.var_y:.2e}"
    )
    return [ref.network.incoming(i) for i in range(len(incoming))]


def _train_upper(upper: StudentEnsemble, u: np.ndarray, y: np.ndarray, l: int, cfg) -> TrainResult:
    """The students above recovered layer ``l`` trained on its outputs ``u``: ``upper``
    fine-tuned (Adam at ``layer_finetune_lr_factor`` times the learning rate, then the polish)
    or, with ``upper_students`` "fresh", new students of the same widths from scratch.
    Returns the :class:`~expand_and_cluster.pipeline.train.TrainResult`."""
    seed = cfg.train.seed + 7919 * (l + 1)
    if cfg.upper_students == "fresh":
        train, start_from = dataclasses.replace(cfg.student_train, seed=seed), None
    else:
        train = dataclasses.replace(
            cfg.student_train,
            max_epochs=cfg.layer_finetune_epochs or max(1, cfg.train.max_epochs // 2),
            lr=cfg.train.lr * cfg.layer_finetune_lr_factor,
            seed=seed,
        )
        start_from = upper
    res = train_students(
        torch.as_tensor(u),
        torch.as_tensor(y),
        upper.hidden_widths,
        cfg.activation,
        train,
        cfg.device,
        students=start_from,
        desc=f"students above layer {l}",
    )
    return res


def _save_layer(ckpt: Checkpoint, l: int, layers: Layers, ens, losses) -> None:
    """Stage ``layer_<l>``: the recovered layers so far, the layer's tree and summary (and the
    one below's, whose orientation it may have changed) and, unless ``ens`` is None, the
    students' upper parts and losses."""
    arrays = {f"incoming_{i}": v for i, v in enumerate(layers.incoming)}
    arrays.update(layers.summaries[-1].to_arrays())
    if ens is not None:
        arrays.update(ens.to_arrays())
        arrays["relative_mse"] = np.asarray(losses)
    meta = {"summary": layers.summaries[-1].to_json()}
    if len(layers.summaries) > 1:
        meta["below"] = layers.summaries[-2].to_json()
    ckpt.save_stage(f"layer_{l}", arrays, meta)


def _load_layers(ckpt: Checkpoint, last: int, out: Layers) -> dict:
    """Stages ``layer_0`` .. ``layer_<last>`` into ``out`` (summaries and recovered layers);
    returns the arrays of ``layer_<last>``."""
    for l in range(last + 1):
        arrays, meta = ckpt.load_stage(f"layer_{l}")
        out.summaries.append(LayerSummary.from_saved(meta["summary"], arrays))
        if "below" in meta:
            out.summaries[l - 1].sign_resolution = meta["below"]["sign_resolution"]
    out.incoming = [np.asarray(arrays[f"incoming_{i}"]) for i in range(last + 1)]
    return arrays


def dropped_representatives(
    cl: LayerClustering, incoming: np.ndarray, losses: np.ndarray, beta_degrees: float
) -> list[dict]:
    """One neuron per cluster the gamma filter dropped whose median angle is within beta: the
    member of its lowest-loss student. These are the width repair's grow candidates
    (:func:`~expand_and_cluster.pipeline.repair.grow_neurons`).

    Parameters
    ----------
    cl : the layer's clustering.
    incoming : ``[N, width, fan_in + 1]`` the students' incoming vectors that were clustered.
    losses : ``[N]`` the students' losses. beta_degrees : the beta filter, degrees.

    Returns
    -------
    list of ``{"incoming": [fan_in + 1] float64, "size": int, "median_angle_degrees": float}``,
    largest cluster first (ties: smaller angle first).
    """
    n, width = incoming.shape[:2]
    flat = incoming.reshape(n * width, -1)
    out = []
    for d in cl.dropped:
        if d.median_angle_degrees > beta_degrees:
            continue
        members = np.asarray(d.members)
        best = members[np.argmin(np.asarray(losses)[members // width])]
        out.append(
            {
                "incoming": flat[best].astype(np.float64),
                "size": int(d.size),
                "median_angle_degrees": float(d.median_angle_degrees),
            }
        )
    out.sort(key=lambda c: (-c["size"], c["median_angle_degrees"]))
    return out
