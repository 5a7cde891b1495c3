"""The whole Expand-and-Cluster procedure on a query set, as a sequence of stages:
expand -> cluster (layer by layer) -> reconstruct -> repair, then the retrain when the network is
far worse than its students.

Source: Martinelli et al. 2024, Sec. 3 (Alg. 1) and Sec. 3.3 (deep networks); docs/method.md.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import RecoverConfig
from ..errors import InputError, NoClusterError
from ..io.checkpoint import Checkpoint
from ..metrics import relative_mse
from ..network import Network
from .cluster import LayerClustering
from .expand import expand
from .fit import FinetuneResult
from .layerwise import cluster_layers
from .reconstruct import reconstruct
from .repair import RepairResult, repair
from .stages import Expansion, Layers, LayerSummary, Log, Queries, Reconstruction, quiet
from .train import TrainResult


@dataclass
class RecoveryResult:
    """Outcome of :func:`recover`: each stage's result, and the scores of the final network.

    Attributes
    ----------
    config : the :class:`~expand_and_cluster.config.RecoverConfig` of the run.
    queries, expansion, layers, reconstruction : the stages' results
        (:mod:`~expand_and_cluster.pipeline.stages`).
    repair : the width repair's :class:`~expand_and_cluster.pipeline.repair.RepairResult` (None
        for a one-hidden-layer network whose layer was not clustered in this run).
    relative_mse : ``{"train", "held_out" (None without held-out queries), "initial_train"}`` of
        :attr:`network` (initial_train: of the reconstruction before its fine-tune).
    timings_s : ``{"search", "train", "cluster", "finetune", "repair", "total"}`` seconds
        (finetune includes the students' per-layer fine-tunes of a deep network; "retrain" when
        one ran).
    retrain : None when no retrain ran; else ``{"epochs" (the retrain's budget), "first" and
        "retrained" (each ``{"widths", "relative_mse"}``, or ``{"error"}`` when the retrain found
        no cluster), "kept" ("first" or "retrained"), "seconds"}``.
    first_attempt : the first pass's result when a retrain ran (this result itself when that
        pass was kept), else None.
    status : "ok", or "degraded" when the final network fails the retrain rule's test
        (:func:`degradation`): its training relative MSE is above ``config.retrain_above`` and
        far above the students', or the students' is above it too.
    status_reason : why the result is degraded (one sentence), else None.
    """

    config: RecoverConfig
    queries: Queries = field(repr=False)
    expansion: Expansion = field(repr=False)
    layers_result: Layers = field(repr=False)
    reconstruction: Reconstruction = field(repr=False)
    repair: RepairResult | None = field(repr=False)
    relative_mse: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    retrain: dict | None = None
    first_attempt: RecoveryResult | None = field(default=None, repr=False)
    status: str = "ok"
    status_reason: str | None = None

    @property
    def network(self) -> Network:
        """The recovered network (float64; after the width repair when one ran)."""
        return self.reconstruction.network if self.repair is None else self.repair.network

    @property
    def initial_network(self) -> Network:
        """The reconstruction before the final fine-tune."""
        return self.reconstruction.initial

    @property
    def layers(self) -> list[LayerSummary]:
        """One :class:`~expand_and_cluster.pipeline.stages.LayerSummary` per hidden layer."""
        return self.reconstruction.summaries

    @property
    def clustering(self) -> LayerClustering | None:
        """The first hidden layer's full clustering (None after a resume past it)."""
        return self.layers_result.first

    @property
    def training(self) -> TrainResult:
        """The students as trained (before any layer was put into them)."""
        return self.expansion.training

    @property
    def student_width(self) -> int:
        return self.expansion.width

    @property
    def expansion_search(self) -> dict | None:
        return self.expansion.search

    @property
    def finetune(self) -> FinetuneResult | None:
        return self.reconstruction.finetune

    @property
    def n_train(self) -> int:
        return self.queries.n_train

    @property
    def n_held_out(self) -> int:
        return self.queries.n_held_out

    @property
    def held_out_index(self) -> np.ndarray:
        return self.queries.held_out_index

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint stage the run started from (``"students"``, ``"layer_<l>"``) or None."""
        if self.layers_result.resumed_from is not None:
            return self.layers_result.resumed_from
        return "students" if self.expansion.resumed else None


def recover(
    X: np.ndarray,
    Y: np.ndarray,
    config: RecoverConfig,
    log: Log | None = None,
    checkpoint: Checkpoint | None = None,
    resume_from: Checkpoint | None = None,
    resume_layers: bool = True,
    source: str = "arrays",
) -> RecoveryResult:
    """Recover a teacher with ``config.hidden_layers`` hidden layers from its queries.

    Stages (Martinelli et al. 2024, Sec. 3; docs/method.md), each taking the previous one's
    result:

    1. :func:`~expand_and_cluster.pipeline.expand.expand`: the expansion search (unless
       ``config.width`` is set) and N students trained on the training queries;
    2. :func:`~expand_and_cluster.pipeline.layerwise.cluster_layers`: each hidden layer
       clustered and collapsed; in a deep network, put into the students, whose upper layers are
       fine-tuned before the next layer is clustered;
    3. :func:`~expand_and_cluster.pipeline.reconstruct.reconstruct`: the least-squares output
       layer and the fine-tune of every weight;
    4. :func:`~expand_and_cluster.pipeline.repair.repair`: the width repair of every hidden
       layer (``config.repair``; not in the paper);
    5. with ``config.retrain_factor > 1``, when the network fails the test of
       :func:`degradation` (training relative MSE above ``retrain_above`` and ``retrain_gap``
       times the median student's, or the median student's above ``retrain_above`` too):
       stages 1-4 once more with a ``retrain_factor`` times longer schedule (same seed and
       width), keeping the result with the lower training relative MSE (checkpointed in
       ``checkpoint/retrain``);
    6. the final result still failing that test is marked ``status`` "degraded" with
       ``status_reason`` (and the log says so).

    Parameters
    ----------
    X : ``[P, d_in]`` queries; Y : ``[P, d_out]`` teacher outputs (raw, pre-softmax); float64.
    config : :class:`~expand_and_cluster.config.RecoverConfig`.
    log : callable taking one string (progress messages), or None.
    checkpoint : write each finished stage there (:class:`~expand_and_cluster.io.checkpoint.
        Checkpoint`); the caller writes the run's inputs (``Checkpoint.save_run``).
    resume_from : start from this checkpoint's trained students (no search, no training) and,
        with ``resume_layers``, from its last finished layer.
    source : where the queries came from, recorded in the result (and the report).

    Returns
    -------
    RecoveryResult

    Raises
    ------
    ValueError
        On bad shapes or non-finite queries; InputError (a ValueError) when gamma * N < 2 or the
        checkpoint does not match the queries.
    FloatingPointError
        When a student diverges.
    expand_and_cluster.errors.NoClusterError
        When no cluster of some layer survives the gamma and beta filters.
    """
    say = log or quiet
    res = _recover_once(X, Y, config, say, checkpoint, resume_from, resume_layers, source)
    out = _retrained(res, X, Y, config, say, checkpoint, resume_from, resume_layers, source)
    reason = degradation(out)
    if reason is not None:
        out.status, out.status_reason = "degraded", reason
        say(f"degraded result: {reason}")
    return out


def degradation(result: RecoveryResult) -> str | None:
    """Why ``result`` is degraded, or None. It is when its network's training relative MSE is
    above ``retrain_above`` and either (a) at least ``retrain_gap`` times the median student's
    (the students imitate the teacher far better: some layer's width or weights are wrong) or
    (b) the median student's is above ``retrain_above`` too (the students did not converge, so
    the clusters they give are not reliable). The same test starts the retrain
    (:func:`recover`, step 5)."""
    cfg = result.config
    student = float(np.median(result.training.relative_mse))
    train = result.relative_mse["train"]
    if not train > cfg.retrain_above:
        return None
    if train >= cfg.retrain_gap * student:
        ratio = train / student if student > 0 else float("inf")
        return (
            f"the recovered network's training relative MSE {train:.2e} is {ratio:.3g} times "
            f"the median student's ({student:.2e}): some layer's width or weights are wrong"
        )
    if student > cfg.retrain_above:
        return (
            f"the students imitate the teacher only to relative MSE {student:.2e} (median; the "
            f"recovered network {train:.2e}), above {cfg.retrain_above:g}: they did not "
            "converge, so the recovered widths are not reliable"
        )
    return None


def _retrained(
    res: RecoveryResult,
    X,
    Y,
    cfg: RecoverConfig,
    say: Log,
    checkpoint,
    resume_from,
    resume_layers,
    source,
) -> RecoveryResult:
    """``res``, or when it fails the retrain rule's test and ``cfg.retrain_factor > 1``, the
    better of it and a pass with a ``retrain_factor`` times longer schedule (:func:`recover`,
    step 5)."""
    reason = degradation(res)
    if cfg.retrain_factor <= 1 or reason is None:
        return res
    train = res.relative_mse["train"]
    t0 = time.perf_counter()
    retry_cfg = dataclasses.replace(
        cfg,
        width=res.student_width,
        train=cfg.train.stretched(cfg.retrain_factor),
        retrain_factor=1,
    )
    say(f"retrain: {reason}; training the students again with {retry_cfg.train.max_epochs} epochs")
    sub = None if checkpoint is None else Checkpoint(Path(checkpoint.path) / "retrain")
    sub_resume = None
    if resume_from is not None:
        c = Checkpoint(Path(resume_from.path) / "retrain")
        sub_resume = c if c.has("students") else None
    try:
        res2 = _recover_once(X, Y, retry_cfg, say, sub, sub_resume, resume_layers, source)
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
    outcome = (
        f"widths {res2.network.hidden_sizes}, relative MSE train {res2.relative_mse['train']:.2e}"
        if res2 is not None
        else second["error"]
    )
    say(f"retrain: {outcome}; kept the {kept} result")
    return out


def _recover_once(
    X, Y, cfg: RecoverConfig, say: Log, checkpoint, resume_from, resume_layers, source
) -> RecoveryResult:
    """Stages 1-4 of :func:`recover` (no retrain), and the scores."""
    t_start = time.perf_counter()
    if cfg.cluster.gamma * cfg.train.n_students < 2:
        raise InputError(
            f"gamma * N = {cfg.cluster.gamma} * {cfg.train.n_students} < 2: a cluster must be "
            "shared by at least 2 students; raise gamma or the number of students"
        )
    queries = Queries.prepare(
        X, Y, cfg.held_out_fraction, cfg.train.seed, cfg.cluster.mask_tolerance, source
    )
    say(
        f"queries: {queries.n_train} train, {queries.n_held_out} held out; d_in "
        f"{queries.X.shape[1]}, d_out {queries.Y.shape[1]}; "
        f"{int((~queries.input_mask).sum())} input(s) masked (no variance); "
        f"{cfg.hidden_layers} hidden layer(s)"
    )
    stage = {"checkpoint": checkpoint, "log": say}
    expansion = expand(queries, cfg, resume_from=resume_from, **stage)
    layers = cluster_layers(
        expansion, queries, cfg, resume_from=resume_from if resume_layers else None, **stage
    )
    reconstruction = reconstruct(layers, queries, cfg, log=say)
    t0 = time.perf_counter()
    repaired = repair(reconstruction, layers, queries, cfg, log=say)
    t_repair = time.perf_counter() - t0 if repaired is not None else 0.0
    result = RecoveryResult(cfg, queries, expansion, layers, reconstruction, repaired)
    network, held = result.network, queries.held_out_index
    result.relative_mse = {
        "train": relative_mse(network.forward(queries.x), queries.y),
        "held_out": relative_mse(network.forward(queries.X[held]), queries.Y[held])
        if len(held)
        else None,
        "initial_train": float(
            np.mean((reconstruction.initial.forward(queries.x) - queries.y) ** 2) / queries.var_y
        ),
    }
    result.timings_s = {
        **expansion.seconds,
        "cluster": layers.seconds["cluster"],
        "finetune": layers.seconds["finetune"] + reconstruction.seconds,
        "repair": t_repair,
        "total": time.perf_counter() - t_start,
    }
    rmse = result.relative_mse
    say(
        f"recovered widths {network.hidden_sizes}; relative MSE train {rmse['train']:.2e}"
        + (f", held out {rmse['held_out']:.2e}" if rmse["held_out"] is not None else "")
    )
    return result
