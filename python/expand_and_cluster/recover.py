"""The whole Expand-and-Cluster procedure on a query set: expand (train students), cluster,
reconstruct, fine-tune. One hidden layer (deep teachers: see the deep-recovery issue).

Source: Martinelli et al. 2024, Sec. 3 (Alg. 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .activations import get_activation
from .clustering import ClusterConfig, LayerClustering, cluster_layer, input_mask_from_queries
from .errors import InputError
from .network import Network
from .reconstruction import FinetuneResult, finetune, reconstruct_one_hidden_layer
from .training import (
    ExpansionSearchConfig,
    TrainConfig,
    TrainResult,
    expansion_search,
    output_variance,
    train_students,
)


@dataclass(frozen=True)
class RecoverConfig:
    """Everything :func:`recover` needs besides the queries.

    Attributes
    ----------
    activation : the teacher's hidden activation (known, as in the paper).
    width : student hidden width; None runs the expansion search.
    cluster : gamma, beta, metric (:class:`~expand_and_cluster.clustering.ClusterConfig`).
    train : student training (:class:`~expand_and_cluster.training.TrainConfig`).
    search : expansion search (used when ``width`` is None).
    held_out_fraction : share of the queries kept aside to score the recovered network.
    finetune_iterations : L-BFGS iterations of the final fine-tune (0: none).
    device : "cpu" (the CUDA backend is its own issue).
    """

    activation: str
    width: int | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: ExpansionSearchConfig = field(default_factory=ExpansionSearchConfig)
    held_out_fraction: float = 0.1
    finetune_iterations: int = 3000
    device: str = "cpu"

    def __post_init__(self) -> None:
        get_activation(self.activation)
        if self.width is not None and self.width < 1:
            raise ValueError(f"width: expected None or an integer >= 1, got {self.width}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(
                f"held_out_fraction: expected a value in [0, 1), got {self.held_out_fraction}"
            )
        if self.finetune_iterations < 0:
            raise ValueError("finetune_iterations: expected >= 0")


@dataclass
class RecoveryResult:
    """Outcome of :func:`recover`.

    Attributes
    ----------
    network : the recovered network (fine-tuned), float64.
    initial_network : the reconstruction before fine-tuning.
    clustering : the hidden layer's :class:`~expand_and_cluster.clustering.LayerClustering`.
    training : the students' :class:`~expand_and_cluster.training.TrainResult`.
    student_width : width of the students' hidden layer.
    expansion_search : per tried width, the quick students' losses (None if ``width`` was given).
    relative_mse : {"train": r, "held_out": r2 or None} of the recovered network.
    finetune : the fine-tune's :class:`~expand_and_cluster.reconstruction.FinetuneResult` or None.
    timings_s : {"search", "train", "cluster", "finetune", "total"} in seconds.
    n_train, n_held_out : query counts.
    """

    network: Network
    initial_network: Network
    clustering: LayerClustering
    training: TrainResult
    student_width: int
    expansion_search: list | None
    relative_mse: dict
    finetune: FinetuneResult | None
    timings_s: dict
    n_train: int
    n_held_out: int
    held_out_index: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, int))


def split_queries(n: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (seeded) split of ``n`` query indices into (train, held_out)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(held_out_fraction * n))
    if n - n_held < 2:
        n_held = 0
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def relative_mse(y_pred: np.ndarray, y: np.ndarray) -> float:
    """MSE / mean over outputs of Var(y) (1 when Var(y) = 0)."""
    var = float(np.var(y, axis=0).mean())
    return float(np.mean((y_pred - y) ** 2) / (var if var > 0 else 1.0))


def recover(X: np.ndarray, Y: np.ndarray, config: RecoverConfig, log=None) -> RecoveryResult:
    """Recover a one-hidden-layer teacher from its queries.

    Parameters
    ----------
    X : ``[P, d_in]`` float64 queries; Y : ``[P, d_out]`` teacher outputs (raw, pre-softmax).
    config : :class:`RecoverConfig`.
    log : callable taking one string (progress messages), or None.

    Returns
    -------
    RecoveryResult

    Raises
    ------
    ValueError
        On bad shapes or non-finite queries; InputError (a ValueError) when gamma * N < 2.
    expand_and_cluster.errors.NoClusterError
        When no cluster survives the gamma and beta filters.
    """
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X, Y: expected [P, d_in] and [P, d_out], got {X.shape} and {Y.shape}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("X, Y: contain NaN or Inf")
    cfg = config
    if cfg.cluster.gamma * cfg.train.n_students < 2:
        raise InputError(
            f"gamma * N = {cfg.cluster.gamma} * {cfg.train.n_students} < 2: a cluster must be "
            "shared by at least 2 students; raise gamma or the number of students"
        )
    train_idx, held_idx = split_queries(len(X), cfg.held_out_fraction, cfg.train.seed)
    Xtr, Ytr = X[train_idx], Y[train_idx]
    xt = torch.as_tensor(Xtr)
    yt = torch.as_tensor(Ytr)
    mask = input_mask_from_queries(Xtr, cfg.cluster.mask_tolerance)
    say(
        f"queries: {len(train_idx)} train, {len(held_idx)} held out; d_in {X.shape[1]}, "
        f"d_out {Y.shape[1]}; {int((~mask).sum())} input(s) masked (no variance)"
    )

    timings = {"search": 0.0}
    search_log = None
    width = cfg.width
    if width is None:
        t0 = time.perf_counter()
        width, search_log = expansion_search(
            xt, yt, cfg.activation, 1, cfg.search, cfg.train, cfg.device
        )
        timings["search"] = time.perf_counter() - t0
        say(
            "expansion search: "
            + ", ".join(
                f"width {s['width']}: {s['fraction_reached']:.0%} reached" for s in search_log
            )
            + f" -> student width {width}"
        )
    t0 = time.perf_counter()
    tr = train_students(xt, yt, [width], cfg.activation, cfg.train, cfg.device)
    timings["train"] = time.perf_counter() - t0
    rel = tr.relative_mse
    say(
        f"trained {len(rel)} students of width {width} in {timings['train']:.1f} s: relative MSE "
        f"best {rel.min():.2e}, median {np.median(rel):.2e}"
    )

    t0 = time.perf_counter()
    ens = tr.students
    # clustering runs on the CPU (numpy, scipy, the C++ linkage) wherever the students trained
    incoming = torch.cat([ens.weights[0], ens.biases[0][:, :, None]], dim=2).cpu()
    outgoing = ens.weights[1].cpu()
    clustering = cluster_layer(incoming, outgoing, rel, cfg.activation, cfg.cluster, mask)
    timings["cluster"] = time.perf_counter() - t0
    say(
        f"clustering: {clustering.k_hat} cluster(s) kept at cut height "
        f"{clustering.cut_height:.3g}, {len(clustering.dropped)} dropped"
    )

    initial = reconstruct_one_hidden_layer(clustering.incoming, Xtr, Ytr, cfg.activation, mask)
    t0 = time.perf_counter()
    ft = None
    network = initial
    if cfg.finetune_iterations > 0:
        ft = finetune(initial, Xtr, Ytr, max_iterations=cfg.finetune_iterations)
        network = ft.network
        network.input_mask = mask
    timings["finetune"] = time.perf_counter() - t0
    var_out = output_variance(yt)
    rmse = {
        "train": relative_mse(network.forward(Xtr), Ytr),
        "held_out": relative_mse(network.forward(X[held_idx]), Y[held_idx])
        if len(held_idx)
        else None,
        "initial_train": float(np.mean((initial.forward(Xtr) - Ytr) ** 2) / var_out),
    }
    timings["total"] = time.perf_counter() - t_start
    say(
        f"recovered width {network.hidden_sizes[0]}; relative MSE train {rmse['train']:.2e}"
        + (f", held out {rmse['held_out']:.2e}" if rmse["held_out"] is not None else "")
    )
    return RecoveryResult(
        network,
        initial,
        clustering,
        tr,
        width,
        search_log,
        rmse,
        ft,
        timings,
        len(train_idx),
        len(held_idx),
        held_idx,
    )
