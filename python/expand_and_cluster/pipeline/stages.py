"""What each stage of a recovery hands to the next: the prepared :class:`Queries`, the trained
students (:class:`Expansion`), the recovered hidden layers (:class:`Layers`, one
:class:`LayerSummary` each) and the reconstructed network (:class:`Reconstruction`).

The stages (docs/method.md): :func:`~expand_and_cluster.pipeline.expand.expand` ->
:func:`~expand_and_cluster.pipeline.layerwise.cluster_layers` ->
:func:`~expand_and_cluster.pipeline.reconstruct.reconstruct` ->
:func:`~expand_and_cluster.pipeline.repair.repair`, in order in
:func:`~expand_and_cluster.pipeline.recover.recover`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InputError
from ..network import Network
from .train import TrainResult, output_variance

if TYPE_CHECKING:
    from .cluster import LayerClustering
    from .fit import FinetuneResult

#: A progress-message sink: one line of text per call.
Log = Callable[[str], None]


def quiet(_: str) -> None:
    """The :data:`Log` that drops every message."""


def input_mask_from_queries(X: np.ndarray | torch.Tensor, tolerance: float = 1e-10) -> np.ndarray:
    """Inputs that carry signal: those whose variance over the queries is not ~0.

    Weights on an input that is constant over the queries are unidentifiable (only their product
    with the constant, absorbed in the bias, matters), so such inputs are left out of distances,
    angles and sign decisions (docs/method.md, step 2; the authors used a per-pixel mask on
    MNIST).

    Parameters
    ----------
    X : ``[P, d]`` array or tensor of queries (any real dtype; computed in float64), finite.
    tolerance : input i is masked out when ``Var(X[:, i]) <= tolerance * max_j Var(X[:, j])``.

    Returns
    -------
    numpy.ndarray
        ``[d]`` bool, True where the input carries signal.

    Raises
    ------
    ValueError
        If ``X`` is not 2-D or not finite, or ``tolerance`` is negative.
    InputError (a ValueError)
        If no input varies over the queries (fewer than 2 distinct queries).
    """
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X: expected a 2-D array [P, d], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X: contains NaN or Inf")
    if not (math.isfinite(tolerance) and tolerance >= 0.0):
        raise ValueError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")
    var = X.var(axis=0) if X.shape[0] else np.zeros(X.shape[1])
    top = float(var.max()) if var.size else 0.0
    if top <= 0.0:
        raise InputError(
            f"X: no input varies over the {X.shape[0]} queries; cannot build an input mask"
        )
    return var > tolerance * top


def split_queries(n: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (seeded) split of ``n`` query indices into sorted (train, held_out) index arrays;
    no held-out queries when fewer than 2 would be left to train on."""
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(held_out_fraction * n))
    if n - n_held < 2:
        n_held = 0
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


@dataclass
class Queries:
    """The queries of a recovery, split into training and held-out rows.

    Attributes
    ----------
    X, Y : ``[P, d_in]``, ``[P, d_out]`` float64, every query (Y: raw teacher outputs).
    train_index, held_out_index : sorted int64 row indices of the split.
    x, y : ``[P1, d_in]``, ``[P1, d_out]`` float64, the training rows (every decision of the
        recovery uses these only; the held-out rows only score the result).
    input_mask : ``[d_in]`` bool, inputs that vary over the training rows.
    var_y : mean over outputs of Var(y) on the training rows, the relative-MSE denominator.
    source : where the queries came from (``"file:probes.npz"``, ``"gaussian:20000"``, ...).
    """

    X: np.ndarray
    Y: np.ndarray
    train_index: np.ndarray
    held_out_index: np.ndarray
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    input_mask: np.ndarray = field(repr=False)
    var_y: float = 1.0
    source: str = "arrays"

    @classmethod
    def prepare(
        cls,
        X,
        Y,
        held_out_fraction: float,
        seed: int,
        mask_tolerance: float = 1e-10,
        source: str = "arrays",
    ) -> Queries:
        """Check, split (:func:`split_queries`) and mask (:func:`input_mask_from_queries`).

        Raises
        ------
        ValueError
            When ``X`` and ``Y`` are not ``[P, d_in]`` and ``[P, d_out]`` or hold NaN/Inf.
        """
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X, Y: expected [P, d_in] and [P, d_out], got {X.shape} and {Y.shape}"
            )
        if not (np.isfinite(X).all() and np.isfinite(Y).all()):
            raise ValueError("X, Y: contain NaN or Inf")
        train, held = split_queries(len(X), held_out_fraction, seed)
        x, y = X[train], Y[train]
        return cls(
            X,
            Y,
            train,
            held,
            x,
            y,
            input_mask_from_queries(x, mask_tolerance),
            output_variance(torch.as_tensor(y)),
            source,
        )

    @property
    def n_train(self) -> int:
        return len(self.train_index)

    @property
    def n_held_out(self) -> int:
        return len(self.held_out_index)


@dataclass
class Expansion:
    """Stage 1's result: the trained students.

    Attributes
    ----------
    training : the students and their training record
        (:class:`~expand_and_cluster.pipeline.train.TrainResult`).
    width : the students' hidden width (every layer).
    search : the expansion search's record (:func:`~expand_and_cluster.pipeline.expand.
        expansion_search`: found width, reason, and per width tried its quick students' losses
        and the decision); None when the width was given or resumed without one.
    resumed : True when the students came from a checkpoint.
    seconds : ``{"search", "train"}`` wall time.
    """

    training: TrainResult
    width: int
    search: dict | None = None
    resumed: bool = False
    seconds: dict = field(default_factory=lambda: {"search": 0.0, "train": 0.0})


@dataclass
class LayerSummary:
    """What the clustering of one hidden layer found (for reports, figures and checkpoints).

    Attributes
    ----------
    layer : hidden-layer index (0 = first).
    recovered_width : k_hat, surviving clusters.
    cut_height, sizes, median_angle_degrees, dropped, n_dropped_singletons, min_size :
        as in :class:`~expand_and_cluster.pipeline.cluster.LayerClustering` (dropped: list of
        dicts ``{"size", "median_angle_degrees", "reason"}``).
    linkage : ``[M-1, 4]`` and counts ``[M-1]``, for the dendrogram.
    input_mask : ``[fan_in]`` bool, inputs of this layer used for the distances.
    students_relative_mse : ``[N]`` relative MSE of the students after the fine-tune that
        followed this layer's insertion (None for the last hidden layer).
    sign_resolution : even_linear classes in deep networks: ``{"flipped": [...], "residual": r}``
        of the orientation chosen for this layer
        (:func:`~expand_and_cluster.pipeline.fit.resolve_linear_signs`), else None.
    seconds : ``{"cluster", "finetune"}`` wall time.
    """

    layer: int
    recovered_width: int
    cut_height: float
    sizes: list
    median_angle_degrees: list
    dropped: list
    n_dropped_singletons: int
    min_size: int
    linkage: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)
    input_mask: np.ndarray = field(repr=False)
    students_relative_mse: np.ndarray | None = None
    sign_resolution: dict | None = None
    seconds: dict = field(default_factory=dict)

    @classmethod
    def from_clustering(cls, layer: int, cl: LayerClustering, seconds: float) -> LayerSummary:
        return cls(
            layer=layer,
            recovered_width=cl.k_hat,
            cut_height=float(cl.cut_height),
            sizes=cl.sizes.tolist(),
            median_angle_degrees=cl.median_angle_degrees.tolist(),
            dropped=[
                {"size": d.size, "median_angle_degrees": d.median_angle_degrees, "reason": d.reason}
                for d in cl.dropped
            ],
            n_dropped_singletons=int(cl.n_dropped_singletons),
            min_size=int(cl.min_size),
            linkage=cl.linkage,
            counts=cl.counts,
            input_mask=cl.input_mask,
            seconds={"cluster": seconds, "finetune": 0.0},
        )

    def to_json(self) -> dict:
        """The JSON part (no arrays but the short per-student losses)."""
        rel = self.students_relative_mse
        return {
            "layer": self.layer,
            "recovered_width": self.recovered_width,
            "cut_height": self.cut_height,
            "cluster_sizes": self.sizes,
            "cluster_median_angle_degrees": self.median_angle_degrees,
            "dropped_clusters": self.dropped,
            "dropped_singletons": self.n_dropped_singletons,
            "min_cluster_size": self.min_size,
            "masked_inputs": np.flatnonzero(~self.input_mask).tolist(),
            "students_relative_mse_after_finetune": None
            if rel is None
            else {
                "best": float(np.min(rel)),
                "median": float(np.median(rel)),
                "per_student": np.asarray(rel).tolist(),
            },
            "sign_resolution": self.sign_resolution,
            "seconds": self.seconds,
        }

    def to_arrays(self) -> dict:
        """The tree arrays, keyed ``tree_linkage``, ``tree_counts``, ``tree_input_mask``."""
        return {
            "tree_linkage": self.linkage,
            "tree_counts": self.counts,
            "tree_input_mask": self.input_mask,
        }

    @classmethod
    def from_saved(cls, meta: dict, arrays) -> LayerSummary:
        """Inverse of :meth:`to_json` plus :meth:`to_arrays`."""
        rel = meta["students_relative_mse_after_finetune"]
        return cls(
            layer=meta["layer"],
            recovered_width=meta["recovered_width"],
            cut_height=meta["cut_height"],
            sizes=meta["cluster_sizes"],
            median_angle_degrees=meta["cluster_median_angle_degrees"],
            dropped=meta["dropped_clusters"],
            n_dropped_singletons=meta["dropped_singletons"],
            min_size=meta["min_cluster_size"],
            linkage=np.asarray(arrays["tree_linkage"]),
            counts=np.asarray(arrays["tree_counts"]),
            input_mask=np.asarray(arrays["tree_input_mask"], dtype=bool),
            students_relative_mse=None if rel is None else np.asarray(rel["per_student"]),
            sign_resolution=meta["sign_resolution"],
            seconds=meta["seconds"],
        )


@dataclass
class Layers:
    """Stage 2's result: every hidden layer recovered, in the input space of the layer below.

    Attributes
    ----------
    incoming : per hidden layer l, ``[k_l, k_{l-1} + 1]`` float64 incoming vectors ``[w; b]``
        (``k_{-1}`` = d_in), in the canonical orientation of the clustering (deep even_linear
        networks: every layer but the last already oriented so that no linear term is left).
    summaries : one :class:`LayerSummary` per hidden layer.
    first : the first hidden layer's full
        :class:`~expand_and_cluster.pipeline.cluster.LayerClustering` (None after a resume
        past it).
    candidates : the last hidden layer's dropped clusters within beta, one representative
        each (:func:`~expand_and_cluster.pipeline.layerwise.dropped_representatives`), for the
        width repair; None after a resume past that layer.
    layer_candidates : per hidden layer, its dropped clusters within beta as for
        ``candidates``, over that layer's plain input ``[h_{l-1}; 1]`` (the grow candidates of
        the deep width repair); empty for a layer taken from a checkpoint.
    resumed_from : ``"layer_<l>"`` when finished layers came from a checkpoint, else None.
    seconds : ``{"cluster", "finetune"}`` wall time (finetune: the students' per-layer
        fine-tunes of a deep network).
    """

    incoming: list[np.ndarray]
    summaries: list[LayerSummary]
    first: LayerClustering | None = None
    candidates: list[dict] | None = None
    layer_candidates: list[list[dict]] = field(default_factory=list)
    resumed_from: str | None = None
    seconds: dict = field(default_factory=lambda: {"cluster": 0.0, "finetune": 0.0})


@dataclass
class Reconstruction:
    """Stage 3's result: the recovered network before the width repair.

    Attributes
    ----------
    network : the fine-tuned network (float64; ``input_mask`` set).
    initial : the reconstruction before the final fine-tune.
    summaries : the layers' summaries, the last one's ``sign_resolution`` set where the output
        layer oriented it (deep even_linear networks).
    finetune : the final fine-tune's :class:`~expand_and_cluster.pipeline.fit.FinetuneResult`
        (None with ``finetune_iterations`` 0).
    seconds : wall time of the output layer and the final fine-tune.
    """

    network: Network
    initial: Network
    summaries: list[LayerSummary]
    finetune: FinetuneResult | None = None
    seconds: float = 0.0
