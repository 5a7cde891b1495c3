"""The whole Expand-and-Cluster procedure on a query set: expand (train students), cluster layer
by layer, reconstruct, fine-tune; for any number of hidden layers, with per-stage checkpoints.

Source: Martinelli et al. 2024, Sec. 3 (Alg. 1) and Sec. 3.3 (deep networks: "the reconstructed
layer is plugged into all students, which are fine-tuned before the next layer is clustered");
docs/METHOD.md, steps 1-3.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .activations import get_activation
from .checkpoint import Checkpoint
from .clustering import ClusterConfig, LayerClustering, cluster_layer, input_mask_from_queries
from .errors import InputError, NoClusterError
from .metrics import relative_mse
from .network import Network
from .reconstruction import (
    FinetuneResult,
    finetune,
    fit_output_layer,
    hidden_features,
    layer_features,
    reconstruct_one_hidden_layer,
    resolve_linear_signs,
)
from .repair import RepairConfig, RepairResult, grow_deep_residual, repair_width
from .students import StudentEnsemble
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
    hidden_layers : L >= 1, the teacher's number of hidden layers (known; the widths are not).
    width : student hidden width (every layer); None runs the expansion search over a common
        width for all layers.
    cluster : gamma, beta, metric (:class:`~expand_and_cluster.clustering.ClusterConfig`).
    train : student training (:class:`~expand_and_cluster.training.TrainConfig`).
    search : expansion search (used when ``width`` is None).
    held_out_fraction : share of the queries kept aside to score the recovered network.
    finetune_iterations : L-BFGS iterations of the final fine-tune (0: none).
    layer_finetune_epochs : deep networks: Adam epochs of the students' fine-tune after a layer
        has been put into them (then the polish of ``train``); None: ``train.max_epochs // 2``.
    layer_finetune_lr_factor : that fine-tune's Adam learning rate, as a fraction of ``train.lr``
        (the students start next to a solution; the reference fine-tunes at lr 1e-4).
    layer_refine_iterations : deep networks: before a collapsed layer is put into the students,
        the network made of the recovered layers and the best student's upper layers is
        fine-tuned (L-BFGS, every weight) for this many iterations, so the layer the students
        are then fed is as exact as the best student allows (0: no refinement; even_linear
        classes skip it).
    upper_students : deep networks: the students above a recovered layer l. "finetune" (the
        paper's step 3): the trained students with the collapsed layer put in, fine-tuned on its
        outputs. "fresh": N new students of the remaining depth trained from scratch (``train``,
        full budget) on the recovered layer's outputs, i.e. layer l + 1 recovered as the first
        layer of the sub-network above (a new random start instead of the students' own
        upper layers; costs one more full training per layer).
    device : "cpu" or "cuda": student training and the clustering's distance matrices (the
        linkage, reconstruction and fine-tune run on the CPU).
    repair : width repair of the last hidden layer after the final fine-tune
        (:class:`~expand_and_cluster.repair.RepairConfig`; not part of the paper's procedure;
        deep networks of the even_linear classes are not repaired).
    retrain_factor : escalation when the reconstruction lost neurons that the students had
        (not part of the paper's procedure): when the recovered network's training relative MSE
        is above ``retrain_above`` and at least ``retrain_gap`` times the students' median, the
        students are trained once more, from the same seed at the same width, with the epoch
        budget, plateau patience and cooldown all ``retrain_factor`` times the first's (the same
        schedule, stretched), and everything after the training reruns; the result with the
        lower training relative MSE is kept. 1: never retrain.
    retrain_above : relative MSE (on the training queries) above which a retrain is considered.
    retrain_gap : the retrain runs only when the recovered network is at least this many times
        worse than the median student, i.e. the students explain the queries but the
        clusters they agree on do not (too few students found a neuron); a network as poor as
        its students (an expansion factor too small to fit) is not retrained.
    """

    activation: str
    hidden_layers: int = 1
    width: int | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: ExpansionSearchConfig = field(default_factory=ExpansionSearchConfig)
    held_out_fraction: float = 0.1
    finetune_iterations: int = 3000
    layer_finetune_epochs: int | None = None
    layer_finetune_lr_factor: float = 0.1
    layer_refine_iterations: int = 1000
    upper_students: str = "finetune"
    device: str = "cpu"
    repair: RepairConfig = field(default_factory=RepairConfig)
    retrain_factor: int = 1
    retrain_above: float = 1e-6
    retrain_gap: float = 10.0

    def __post_init__(self) -> None:
        get_activation(self.activation)
        if int(self.hidden_layers) < 1:
            raise ValueError(f"hidden_layers: expected an integer >= 1, got {self.hidden_layers}")
        if self.width is not None and self.width < 1:
            raise ValueError(f"width: expected None or an integer >= 1, got {self.width}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(
                f"held_out_fraction: expected a value in [0, 1), got {self.held_out_fraction}"
            )
        if self.finetune_iterations < 0:
            raise ValueError("finetune_iterations: expected >= 0")
        if self.layer_finetune_epochs is not None and self.layer_finetune_epochs < 1:
            raise ValueError("layer_finetune_epochs: expected None or >= 1")
        if self.layer_refine_iterations < 0:
            raise ValueError("layer_refine_iterations: expected >= 0")
        if not 0.0 < self.layer_finetune_lr_factor <= 1.0:
            raise ValueError("layer_finetune_lr_factor: expected a value in (0, 1]")
        if int(self.retrain_factor) != self.retrain_factor or self.retrain_factor < 1:
            raise ValueError(
                f"retrain_factor: expected an integer >= 1, got {self.retrain_factor!r}"
            )
        if not self.retrain_above >= 0:
            raise ValueError(f"retrain_above: expected >= 0, got {self.retrain_above!r}")
        if not self.retrain_gap >= 1:
            raise ValueError(f"retrain_gap: expected >= 1, got {self.retrain_gap!r}")
        if self.upper_students not in ("finetune", "fresh"):
            raise ValueError(
                f"upper_students: expected 'finetune' or 'fresh', got {self.upper_students!r}"
            )

    def to_dict(self) -> dict:
        """JSON-able form (nested configs as dicts), for checkpoints and reports."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RecoverConfig:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        InputError
            When ``d`` has missing or unknown fields (a checkpoint written by another version).
        """
        try:
            d = dict(d)
            d["cluster"] = ClusterConfig(**d["cluster"])
            d["train"] = TrainConfig(**d["train"])
            d["search"] = ExpansionSearchConfig(**d["search"])
            d["repair"] = RepairConfig(**d.get("repair", {}))  # absent in checkpoints before 0.1.0
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise InputError(
                f"config: not a RecoverConfig of this version ({e}); rerun from the queries"
            ) from None


@dataclass
class LayerSummary:
    """What the clustering of one hidden layer found (kept for reports, figures and checkpoints).

    Attributes
    ----------
    layer : hidden-layer index (0 = first).
    recovered_width : k_hat, surviving clusters.
    cut_height, sizes, median_angle_degrees, dropped, n_dropped_singletons, min_size :
        as in :class:`~expand_and_cluster.clustering.LayerClustering` (dropped: list of dicts
        ``{"size", "median_angle_degrees", "reason"}``).
    linkage : ``[M-1, 4]`` and counts ``[M-1]``, for the dendrogram.
    input_mask : ``[fan_in]`` bool, inputs of this layer used for the distances.
    students_relative_mse : ``[N]`` relative MSE of the students after the fine-tune that
        followed this layer's insertion (None for the last hidden layer).
    sign_resolution : even_linear classes in deep networks: ``{"flipped": [...], "residual": r}``
        of the orientation chosen for this layer (see
        :func:`~expand_and_cluster.reconstruction.resolve_linear_signs`), else None.
    seconds : {"cluster", "finetune"} wall time.
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
            if self.students_relative_mse is None
            else {
                "best": float(np.min(self.students_relative_mse)),
                "median": float(np.median(self.students_relative_mse)),
                "per_student": np.asarray(self.students_relative_mse).tolist(),
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
class RecoveryResult:
    """Outcome of :func:`recover`.

    Attributes
    ----------
    network : the recovered network (fine-tuned), float64.
    initial_network : the reconstruction before the final fine-tune.
    layers : one :class:`LayerSummary` per hidden layer.
    clustering : the first hidden layer's full
        :class:`~expand_and_cluster.clustering.LayerClustering` (None after a resume past it).
    training : the students' :class:`~expand_and_cluster.training.TrainResult` (the initial
        students, before any layer was put into them).
    student_width : width of the students' hidden layers.
    expansion_search : per tried width, the quick students' losses (None if ``width`` was given).
    relative_mse : {"train", "held_out" (None without held-out queries), "initial_train"}.
    finetune : the final fine-tune's :class:`~expand_and_cluster.reconstruction.FinetuneResult`.
    timings_s : {"search", "train", "cluster", "finetune", "repair", "total"} in seconds
        ("finetune" includes the students' per-layer fine-tunes of a deep network).
    n_train, n_held_out : query counts; held_out_index : indices of the held-out queries.
    resumed_from : name of the checkpoint stage the run started from, or None.
    retrain : None when no retrain ran (``RecoverConfig.retrain_factor``); else {"epochs" (the
        retrain's budget), "first" and "retrained" (each {"widths", "relative_mse"} with the
        train and held-out relative MSE), "kept" ("first" or "retrained"), "seconds"}.
    first_attempt : the first pass's :class:`RecoveryResult` when a retrain ran (this result
        itself when that pass was kept), else None.
    repair : the width repair's :class:`~expand_and_cluster.repair.RepairResult` of the last
        hidden layer (None when that layer was not clustered in this run, i.e. resumed past it,
        or for a deep even_linear network).
    """

    network: Network
    initial_network: Network
    layers: list[LayerSummary]
    clustering: LayerClustering | None
    training: TrainResult
    student_width: int
    expansion_search: list | None
    relative_mse: dict
    finetune: FinetuneResult | None
    timings_s: dict
    n_train: int
    n_held_out: int
    held_out_index: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, int))
    resumed_from: str | None = None
    repair: RepairResult | None = None
    retrain: dict | None = None
    first_attempt: RecoveryResult | None = field(default=None, repr=False)


def split_queries(n: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (seeded) split of ``n`` query indices into (train, held_out)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(held_out_fraction * n))
    if n - n_held < 2:
        n_held = 0
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def _insert_layer(
    ens: StudentEnsemble, cl: LayerClustering, linear_terms: np.ndarray | None
) -> StudentEnsemble:
    """The students' upper parts, fed by the collapsed layer (METHOD.md step 3, deep nets).

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


def _check_queries(X, Y) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X, Y: expected [P, d_in] and [P, d_out], got {X.shape} and {Y.shape}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("X, Y: contain NaN or Inf")
    return X, Y


def recover(
    X: np.ndarray,
    Y: np.ndarray,
    config: RecoverConfig,
    log=None,
    checkpoint: Checkpoint | None = None,
    resume_from: Checkpoint | None = None,
    resume_layers: bool = True,
) -> RecoveryResult:
    """Recover a teacher with ``config.hidden_layers`` hidden layers from its queries.

    Steps (Martinelli et al. 2024, Sec. 3; docs/method.md):

    1. expansion search (a common student width for all layers) unless ``config.width`` is set;
    2. N students of depth L trained on the queries (Adam, per-student plateau schedule, float64
       L-BFGS polish);
    3. for each hidden layer l = 0 .. L - 1: cluster the students' layer l in the space of the
       already reconstructed layer l - 1 (the raw inputs for l = 0) and collapse it; unless it is
       the last hidden layer, refine the reconstructed layers by fine-tuning them together with
       the best student's upper layers (``layer_refine_iterations``), put the collapsed layer into
       all N students (each keeps its own upper layers, fed by its summed outgoing weights,
       :func:`_insert_layer`) and fine-tune their upper layers on the reconstructed layer's
       activations (the reconstructed layers are frozen, so every student shares them exactly);
    4. output layer by least squares; final fine-tune of every weight (L-BFGS, then
       Levenberg-Marquardt when the Jacobian is small); width repair of the last hidden layer
       (``config.repair``);
    5. with ``config.retrain_factor > 1``, when the recovered network's training relative MSE
       is above ``retrain_above`` and ``retrain_gap`` times the median student's: steps 2-4
       once more with a ``retrain_factor`` times longer training schedule (same seed, same
       width); the result with the lower training relative MSE is kept (``result.retrain``).
       Its stages are checkpointed in ``checkpoint/retrain``.

    Even_linear classes (softplus, gelu, silu, relu, leaky_relu), whose flips leave linear maps
    (``s(z) - s(-z) = c z``): with one hidden layer the leftover map is kept as the network's
    linear skip term (``linear_weight``), fitted by least squares. With several, the students'
    next layer is also fed the current layer's own input (a skip that absorbs the linear maps
    of the flipped members), the next layer is clustered in that joint space, and its skip part
    fixes the orientation of the current layer (:func:`~expand_and_cluster.reconstruction.
    resolve_linear_signs`): the neurons are flipped to the one orientation that leaves no linear
    term, so the recovered deep network has no skip terms. The last hidden layer is oriented the
    same way from a least-squares output layer fitted with a skip.

    Parameters
    ----------
    X : ``[P, d_in]`` float64 queries; Y : ``[P, d_out]`` teacher outputs (raw, pre-softmax).
    config : :class:`RecoverConfig`.
    log : callable taking one string (progress messages), or None.
    checkpoint : write each finished stage there (see :mod:`expand_and_cluster.checkpoint`);
        the caller writes the run's inputs (:meth:`Checkpoint.save_run`).
    resume_from : start from this checkpoint's trained students (no search, no training) and,
        with ``resume_layers``, from its last finished layer.

    Returns
    -------
    RecoveryResult

    Raises
    ------
    ValueError
        On bad shapes or non-finite queries; InputError (a ValueError) when gamma * N < 2 or the
        checkpoint does not match the queries.
    expand_and_cluster.errors.NoClusterError
        When no cluster of some layer survives the gamma and beta filters.
    """
    say = log or (lambda s: None)
    res = _recover_once(X, Y, config, say, checkpoint, resume_from, resume_layers)
    # 5. Retrain (not in the paper) when the students explain the queries but the network not.
    cfg = config
    student = float(np.median(res.training.relative_mse))
    train = res.relative_mse["train"]
    if not (
        cfg.retrain_factor > 1 and train > cfg.retrain_above and train >= cfg.retrain_gap * student
    ):
        return res
    t0 = time.perf_counter()
    f = int(cfg.retrain_factor)
    tc = cfg.train
    retry_cfg = dataclasses.replace(
        cfg,
        width=res.student_width,
        train=dataclasses.replace(
            tc, max_epochs=tc.max_epochs * f, patience=tc.patience * f, cooldown=tc.cooldown * f
        ),
        retrain_factor=1,
    )
    say(
        f"retrain: the recovered network's relative MSE {train:.2e} is at least "
        f"{cfg.retrain_gap:g} times the median student's ({student:.2e}); training the "
        "students again with "
        f"{retry_cfg.train.max_epochs} epochs"
    )
    sub = None if checkpoint is None else Checkpoint(Path(checkpoint.path) / "retrain")
    sub_resume = None
    if resume_from is not None:
        c = Checkpoint(Path(resume_from.path) / "retrain")
        sub_resume = c if c.has("students") else None
    try:
        res2 = _recover_once(X, Y, retry_cfg, say, sub, sub_resume, resume_layers)
        second = {"widths": res2.network.hidden_sizes, "relative_mse": res2.relative_mse}
    except NoClusterError as e:
        res2, second = None, {"error": str(e)}
    seconds = time.perf_counter() - t0
    better = res2 is not None and res2.relative_mse["train"] < train
    kept = "retrained" if better else "first"
    out = res2 if better else res
    out.retrain = {
        "epochs": retry_cfg.train.max_epochs,
        "first": {"widths": res.network.hidden_sizes, "relative_mse": res.relative_mse},
        "retrained": second,
        "kept": kept,
        "seconds": seconds,
    }
    out.first_attempt = res
    out.timings_s = {**out.timings_s, "retrain": seconds}
    out.timings_s["total"] = res.timings_s["total"] + seconds
    say(
        "retrain: "
        + (
            f"widths {res2.network.hidden_sizes}, relative MSE train "
            f"{res2.relative_mse['train']:.2e}"
            if res2 is not None
            else second["error"]
        )
        + f"; kept the {kept} result"
    )
    return out


def _recover_once(
    X: np.ndarray,
    Y: np.ndarray,
    config: RecoverConfig,
    say,
    checkpoint: Checkpoint | None = None,
    resume_from: Checkpoint | None = None,
    resume_layers: bool = True,
) -> RecoveryResult:
    """One pass of :func:`recover` (no retrain); ``say`` takes one string."""
    t_start = time.perf_counter()
    X, Y = _check_queries(X, Y)
    cfg = config
    act = get_activation(cfg.activation)
    n_layers = int(cfg.hidden_layers)
    linear = act.symmetry.has_linear_term and n_layers > 1
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
        f"d_out {Y.shape[1]}; {int((~mask).sum())} input(s) masked (no variance); "
        f"{n_layers} hidden layer(s)"
    )
    var_out = output_variance(yt)
    timings = {"search": 0.0, "train": 0.0, "cluster": 0.0, "finetune": 0.0, "repair": 0.0}
    resumed = None

    # 1-2. Expand: the students.
    if resume_from is not None:
        arrays, meta = resume_from.load_stage("students")
        ens0 = StudentEnsemble.from_arrays(arrays, dtype=torch.float64)
        if ens0.widths[0] != X.shape[1] or ens0.widths[-1] != Y.shape[1]:
            raise InputError(
                f"checkpoint {resume_from.path}: its students map {ens0.widths[0]} -> "
                f"{ens0.widths[-1]} but the queries are {X.shape[1]} -> {Y.shape[1]}"
            )
        if len(ens0.hidden_widths) != n_layers:
            raise InputError(
                f"checkpoint {resume_from.path}: its students have {len(ens0.hidden_widths)} "
                f"hidden layer(s), the run asks for {n_layers}"
            )
        tr = TrainResult(
            ens0,
            np.asarray(arrays["relative_mse"]),
            np.asarray(arrays["epochs"]),
            list(meta["stop_reason"]),
            np.asarray(arrays["final_lr"]),
            meta.get("history", {}),
            meta.get("seconds", 0.0),
        )
        width, search_log = int(meta["student_width"]), meta.get("expansion_search")
        resumed = "students"
        say(f"resumed: {ens0.n_students} trained students of width {width} from {resume_from.path}")
    else:
        search_log = None
        width = cfg.width
        if width is None:
            t0 = time.perf_counter()
            width, search_log = expansion_search(
                xt, yt, cfg.activation, n_layers, cfg.search, cfg.train, cfg.device
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
        tr = train_students(xt, yt, [width] * n_layers, cfg.activation, cfg.train, cfg.device)
        timings["train"] = time.perf_counter() - t0
        rel = tr.relative_mse
        say(
            f"trained {len(rel)} students of width {width} in {timings['train']:.1f} s: "
            f"relative MSE best {rel.min():.2e}, median {np.median(rel):.2e}"
        )
    if checkpoint is not None:
        checkpoint.save_stage(
            "students",
            {
                **tr.students.to_arrays(),
                "relative_mse": tr.relative_mse,
                "epochs": tr.epochs,
                "final_lr": tr.final_lr,
            },
            {
                "student_width": width,
                "expansion_search": search_log,
                "stop_reason": tr.stop_reason,
                "history": tr.history,
                "seconds": tr.seconds,
            },
        )

    # 3. Cluster layer by layer.
    ens = tr.students.to(device="cpu")
    losses = tr.relative_mse
    prefix: list[np.ndarray] = []  # recovered incoming vectors, over [plain input; 1]
    layers: list[LayerSummary] = []
    first_clustering = None
    candidates: list[dict] | None = None  # grow candidates of the width repair (last layer)
    plain = [Xtr]  # plain[i]: input of hidden layer i on the training queries
    u = Xtr  # the students' current input: plain[l] (and plain[l - 1], even_linear deep nets)
    start = 0
    if resume_from is not None and resume_layers:
        last = min(resume_from.last_layer(), n_layers - 1)
        for l in range(last + 1):
            arrays, meta = resume_from.load_stage(f"layer_{l}")
            layers.append(LayerSummary.from_saved(meta["summary"], arrays))
            if "below" in meta:
                layers[l - 1].sign_resolution = meta["below"]["sign_resolution"]
        if last >= 0:  # ``arrays`` now holds the stage of layer ``last``
            prefix = [np.asarray(arrays[f"incoming_{i}"]) for i in range(last + 1)]
            plain = [Xtr] + layer_features(prefix, Xtr, act.name)
            if last < n_layers - 1:
                ens = StudentEnsemble.from_arrays(arrays, dtype=torch.float64)
                losses = np.asarray(arrays["relative_mse"])
                u = (
                    np.concatenate([plain[last + 1], plain[last]], axis=1)
                    if linear
                    else plain[last + 1]
                )
            start = last + 1
            resumed = f"layer_{last}"
            say(f"resumed after hidden layer {last} (widths {[len(v) for v in prefix]})")

    for l in range(start, n_layers):
        t0 = time.perf_counter()
        incoming = torch.cat([ens.weights[0], ens.biases[0][:, :, None]], dim=2).cpu()
        outgoing = ens.weights[1].cpu()
        mask_l = mask if l == 0 else input_mask_from_queries(u, cfg.cluster.mask_tolerance)
        cl = cluster_layer(
            incoming, outgoing, losses, act.name, cfg.cluster, mask_l, device=cfg.device
        )
        if l == 0:
            first_clustering = cl
        if l == n_layers - 1:
            candidates = _grow_candidates(cl, incoming.numpy(), losses, cfg.cluster.beta_degrees)
        dt = time.perf_counter() - t0
        timings["cluster"] += dt
        summary = LayerSummary.from_clustering(l, cl, dt)
        say(
            f"layer {l}: {cl.k_hat} cluster(s) kept at cut height {cl.cut_height:.3g}, "
            f"{len(cl.dropped)} dropped"
        )
        v = cl.incoming
        lin_terms = cl.linear_terms if linear else None
        if linear and l > 0:
            # v is over [h_{l-1}; p_{l-1}; 1]: orient layer l - 1 so that no skip is left.
            res = _orient_last_layer(v, prefix, layers, act.linear_coefficient, say)
            v = v @ res.transform.T
            lin_terms = lin_terms @ res.transform.T
            plain[l] = hidden_features(plain[l - 1], prefix[-1], act.name)
        prefix.append(v)
        layers.append(summary)
        if l < n_layers - 1:
            t0 = time.perf_counter()
            upper = _insert_layer(ens, cl, lin_terms)
            if cfg.layer_refine_iterations > 0 and not linear:
                best = int(np.argmin(losses))
                net = Network(
                    [q[:, :-1] for q in prefix] + [w[best].numpy() for w in upper.weights],
                    [q[:, -1] for q in prefix] + [b[best].numpy() for b in upper.biases],
                    act.name,
                )
                ref = finetune(net, Xtr, Ytr, max_iterations=cfg.layer_refine_iterations)
                prefix = [ref.network.incoming(i) for i in range(l + 1)]
                plain = [Xtr] + layer_features(prefix, Xtr, act.name)[:l]
                say(
                    f"layer {l}: refined with student {best}'s upper layers, relative MSE "
                    f"{ref.mse_before / var_out:.2e} -> {ref.mse_after / var_out:.2e}"
                )
            plain.append(hidden_features(plain[l], prefix[l], act.name))
            u = np.concatenate([plain[l + 1], plain[l]], axis=1) if linear else plain[l + 1]
            seed = cfg.train.seed + 7919 * (l + 1)
            if cfg.upper_students == "fresh":
                ft_cfg = dataclasses.replace(cfg.train, seed=seed)
                start_from = None
            else:
                ft_cfg = dataclasses.replace(
                    cfg.train,
                    max_epochs=cfg.layer_finetune_epochs or max(1, cfg.train.max_epochs // 2),
                    lr=cfg.train.lr * cfg.layer_finetune_lr_factor,
                    seed=seed,
                )
                start_from = upper
            ftr = train_students(
                torch.as_tensor(u),
                yt,
                upper.hidden_widths,
                act.name,
                ft_cfg,
                cfg.device,
                students=start_from,
                desc=f"students above layer {l}",
            )
            ens = ftr.students.to(dtype=torch.float64, device="cpu")
            losses = ftr.relative_mse
            summary.students_relative_mse = losses
            dt = time.perf_counter() - t0
            summary.seconds["finetune"] = dt
            timings["finetune"] += dt
            what = "trained afresh" if cfg.upper_students == "fresh" else "fine-tuned"
            say(
                f"students {what} on the recovered layer {l} in {dt:.1f} s: relative MSE "
                f"best {losses.min():.2e}, median {np.median(losses):.2e}"
            )
        if checkpoint is not None:
            _save_layer(checkpoint, l, prefix, layers, ens if l < n_layers - 1 else None, losses)

    # 4. Output layer and final fine-tune.
    t0 = time.perf_counter()
    if n_layers == 1:
        initial = reconstruct_one_hidden_layer(prefix[0], Xtr, Ytr, act.name, mask)
    else:
        plain = [Xtr] + layer_features(prefix, Xtr, act.name)
        h, p = plain[-1], plain[-2]
        if act.symmetry.has_linear_term:
            w, b, theta = fit_output_layer(h, p, Ytr, linear_term=True)
            upper = np.concatenate([w, theta, b[:, None]], axis=1)
            _orient_last_layer(upper, prefix, layers, act.linear_coefficient, say)
            h = hidden_features(p, prefix[-1], act.name)
        w, b, _ = fit_output_layer(h, p, Ytr, linear_term=False)
        initial = Network(
            [v[:, :-1].copy() for v in prefix] + [w],
            [v[:, -1].copy() for v in prefix] + [b],
            act.name,
            input_mask=mask,
        )
    ft = None
    network = initial
    if cfg.finetune_iterations > 0:
        ft = finetune(initial, Xtr, Ytr, max_iterations=cfg.finetune_iterations)
        network = ft.network
        network.input_mask = mask
    timings["finetune"] += time.perf_counter() - t0
    repaired = None
    if candidates is not None and (n_layers == 1 or not act.symmetry.has_linear_term):
        t0 = time.perf_counter()
        repaired = _repair_last_layer(network, candidates, Xtr, Ytr, cfg)
        network = repaired.network
        network.input_mask = mask
        timings["repair"] = time.perf_counter() - t0
        if repaired.changed:
            say(
                f"width repair of hidden layer {n_layers - 1}: {repaired.width_before} -> "
                f"{network.hidden_sizes[-1]} ({len(repaired.added)} added, "
                f"{len(repaired.pruned)} pruned, {repaired.trials} trials, "
                f"{timings['repair']:.1f} s)"
            )
    rmse = {
        "train": relative_mse(network.forward(Xtr), Ytr),
        "held_out": relative_mse(network.forward(X[held_idx]), Y[held_idx])
        if len(held_idx)
        else None,
        "initial_train": float(np.mean((initial.forward(Xtr) - Ytr) ** 2) / var_out),
    }
    timings["total"] = time.perf_counter() - t_start
    say(
        f"recovered widths {network.hidden_sizes}; relative MSE train {rmse['train']:.2e}"
        + (f", held out {rmse['held_out']:.2e}" if rmse["held_out"] is not None else "")
    )
    return RecoveryResult(
        network,
        initial,
        layers,
        first_clustering,
        tr,
        width,
        search_log,
        rmse,
        ft,
        timings,
        len(train_idx),
        len(held_idx),
        held_idx,
        resumed,
        repaired,
    )


def _repair_last_layer(
    network: Network, candidates: list[dict], x: np.ndarray, y: np.ndarray, cfg: RecoverConfig
) -> RepairResult:
    """Width repair (:func:`~expand_and_cluster.repair.repair_width`) of the last hidden layer.

    With one hidden layer, the network itself. With several (classes without a linear term
    only), the top part (last hidden layer and output layer) is repaired on the features of the
    fixed layers below, and the whole network is then fine-tuned when anything changed; when it
    is still above ``grow_target``, residual neurons are grown with every weight fine-tuned
    (:func:`~expand_and_cluster.repair.grow_deep_residual`). The returned result's ``network``
    and ``before`` are whole networks.
    """
    if len(network.hidden_sizes) == 1:
        return repair_width(
            network, candidates, x, y, cfg.repair, final_iterations=cfg.finetune_iterations
        )
    below = layer_features(
        [network.incoming(i) for i in range(len(network.weights) - 2)], x, network.activation
    )[-1]
    top = Network(network.weights[-2:], network.biases[-2:], network.activation)
    res = repair_width(top, candidates, below, y, cfg.repair, final_iterations=0)
    res.before = network
    full = network
    if res.changed:
        full = Network(
            network.weights[:-2] + res.network.weights,
            network.biases[:-2] + res.network.biases,
            network.activation,
        )
        if cfg.finetune_iterations > 0:
            full = finetune(full, x, y, max_iterations=cfg.finetune_iterations).network
    # Then residual neurons with every weight fine-tuned (the fixed features may be bent); it
    # returns at once when ``full`` is within grow_target.
    if cfg.repair.grow_candidates > 0:
        t0 = time.perf_counter()
        grown, added, trials = grow_deep_residual(full, x, y, cfg.repair)
        res.trials += trials
        if added:
            res.added = res.added + added
            full = grown
            if cfg.finetune_iterations > 0:
                full = finetune(full, x, y, max_iterations=cfg.finetune_iterations).network
        res.seconds += time.perf_counter() - t0
    res.network = full
    return res


def _grow_candidates(
    cl: LayerClustering, incoming: np.ndarray, losses: np.ndarray, beta_degrees: float
) -> list[dict]:
    """Candidate neurons for :func:`~expand_and_cluster.repair.grow_neurons`: the clusters the
    gamma filter dropped whose median angle is within beta, largest first; each represented by
    the member of its lowest-loss student. ``incoming`` is ``[N, width, fan_in + 1]``."""
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


def _orient_last_layer(
    upper: np.ndarray, prefix: list[np.ndarray], layers: list[LayerSummary], coefficient, say
):
    """Flip the neurons of the last recovered layer ``prefix[-1]`` (in place) so that the layer
    above, ``upper`` ``[m, k + q + 1]`` over ``[h; p; 1]``, needs no linear skip; record it in
    ``layers[-1]``. Returns the :class:`~expand_and_cluster.reconstruction.SignResolution`."""
    res = resolve_linear_signs(upper, prefix[-1], coefficient)
    prefix[-1] = prefix[-1] * np.where(res.flipped, -1.0, 1.0)[:, None]
    layers[-1].sign_resolution = res.to_json()
    say(
        f"layer {len(prefix) - 1}: {int(res.flipped.sum())} neuron(s) flipped to remove the "
        f"linear term (residual {res.residual:.1e})"
    )
    return res


def _save_layer(ckpt: Checkpoint, l: int, prefix, layers, ens, losses) -> None:
    arrays = {f"incoming_{i}": v for i, v in enumerate(prefix)}
    arrays.update(layers[-1].to_arrays())
    if ens is not None:
        arrays.update(ens.to_arrays())
        arrays["relative_mse"] = np.asarray(losses)
    meta = {"summary": layers[-1].to_json()}
    if len(layers) > 1:  # the sign resolution of the layer below may have changed it
        meta["below"] = layers[-2].to_json()
    ckpt.save_stage(f"layer_{l}", arrays, meta)
