"""The settings of each step of the method, as frozen dataclasses validated on construction
(:class:`~expand_and_cluster.errors.InputError`, a ValueError, naming the field)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

DTYPES = ("float32", "float64")
METRICS = ("cosine", "l2")
CUT_RULES = ("longest_plateau", "max_count", "persistent_max")
LINKAGE_BACKENDS = ("native", "reference")
UPPER_STUDENTS = ("finetune", "fresh")
FINISHES = ("auto", "lm+lbfgs", "lm", "lbfgs", "lbfgs-fixed")


def _validate(obj, checks) -> None:
    for name, ok, expected in checks:
        if not ok:
            raise InputError(f"{name}: expected {expected}, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Student training (Martinelli et al. 2024, Sec. 3 step 1 and App., training details).

    Attributes
    ----------
    n_students : N, number of students (paper: 10 to 50).
    lr : initial Adam learning rate of every student.
    batch_size : queries per step; None for full batch.
    max_epochs : budget of passes over the queries per student.
    target_relative_mse : a student stops when its relative MSE (MSE / mean Var(y)) is below this.
    patience, cooldown : plateau schedule, in epochs (threshold 0: any decrease is progress).
    factor : learning-rate multiplier on a plateau (1/sqrt(10)).
    min_lr : a student stops when its learning rate falls below this.
    polish_iterations : the float64 finish after Adam: the L-BFGS budget in iterations per
        student (0: no finish).
    finish : "lbfgs" (default), "auto" ("lm+lbfgs" for students of at most ``lm_max_params``
        parameters times d_out, else "lbfgs"), "lm+lbfgs" (Levenberg-Marquardt, then L-BFGS for
        the students it left above relative MSE 1e-10) or "lm", each with the per-student stop
        rule of :mod:`~expand_and_cluster.pipeline.finish`; or "lbfgs-fixed" (L-BFGS for exactly
        ``polish_iterations`` iterations, no stop rule).
    lm_iterations : the Levenberg-Marquardt budget in iterations per student.
    lm_max_params : "auto"'s crossover: parameters per student times d_out (Jacobian entries
        per query; benchmarks/RESULTS.md).
    finish_target : relative MSE at which a student's finish stops.
    finish_rounds : students whose finish ended at its budget (still improving: neither at
        ``finish_target`` nor stalled) get up to this many more finishes of the same budget.
    finish_stall_decades : the L-BFGS finish's stall rule: a student stalls when it gains fewer
        decades of relative MSE than this over 200 iterations.
    handover_window : epochs; at every multiple of it, a student whose relative MSE fell by
        fewer than ``handover_decades`` decades since the previous multiple leaves Adam for the
        finish (stop reason "stalled"). None: ``max(16, max_epochs // 10)`` rounded up to a
        multiple of 16 (so a GPU read-back every 16 epochs sees the same epochs); 0: never.
    handover_decades : see ``handover_window``.
    dtype : "float32" or "float64" for the Adam phase.
    seed : seeds initialisation and mini-batch order.
    progress : show a progress bar.
    sync_every : read the losses back to the host every this many epochs (None: 1 on the CPU, 16
        on a GPU). The schedules and stop rules run on the students' device every epoch, so the
        result does not depend on it: a student that stops trains at learning rate 0 (frozen)
        until the next read-back, where it leaves the batch.
    """

    n_students: int = 20
    lr: float = 1e-3
    batch_size: int | None = None
    max_epochs: int = 5000
    target_relative_mse: float = 1e-10
    patience: int = 200
    cooldown: int = 100
    factor: float = 10.0**-0.5
    min_lr: float = 1e-7
    polish_iterations: int = 0
    finish: str = "lbfgs"
    lm_iterations: int = 100
    lm_max_params: int = 256
    finish_target: float = 1e-20
    finish_rounds: int = 0
    finish_stall_decades: float = 0.1
    handover_window: int | None = 0
    handover_decades: float = 0.05
    dtype: str = "float32"
    seed: int = 0
    progress: bool = True
    sync_every: int | None = None

    def __post_init__(self) -> None:
        _validate(
            self,
            [
                ("n_students", self.n_students >= 1, "an integer >= 1"),
                ("lr", self.lr > 0, "> 0"),
                ("batch_size", self.batch_size is None or self.batch_size >= 1, "None or >= 1"),
                ("max_epochs", self.max_epochs >= 1, ">= 1"),
                ("target_relative_mse", self.target_relative_mse >= 0, ">= 0"),
                ("patience", self.patience >= 0, ">= 0"),
                ("cooldown", self.cooldown >= 0, ">= 0"),
                ("factor", 0 < self.factor < 1, "in (0, 1)"),
                ("min_lr", self.min_lr >= 0, ">= 0"),
                ("polish_iterations", self.polish_iterations >= 0, ">= 0"),
                ("finish", self.finish in FINISHES, f"one of {FINISHES}"),
                ("lm_iterations", self.lm_iterations >= 0, ">= 0"),
                ("lm_max_params", self.lm_max_params >= 0, ">= 0"),
                ("finish_target", self.finish_target >= 0, ">= 0"),
                ("finish_rounds", self.finish_rounds >= 0, ">= 0"),
                ("finish_stall_decades", self.finish_stall_decades >= 0, ">= 0"),
                (
                    "handover_window",
                    self.handover_window is None or self.handover_window >= 0,
                    "None or >= 0",
                ),
                ("handover_decades", self.handover_decades >= 0, ">= 0"),
                ("dtype", self.dtype in DTYPES, "'float32' or 'float64'"),
                ("sync_every", self.sync_every is None or self.sync_every >= 1, "None or >= 1"),
            ],
        )

    @property
    def handover_epochs(self) -> int:
        """The hand-over window in epochs (``handover_window`` resolved; 0: no hand-over)."""
        if self.handover_window is not None:
            return int(self.handover_window)
        return 16 * math.ceil(max(16, self.max_epochs // 10) / 16)

    def scaled(self, max_epochs: int) -> TrainConfig:
        """The schedule-scaling rule: this config with an epoch budget of ``max_epochs`` and the
        plateau patience and cooldown scaled to it, ``max(10, E // 10)`` and ``max(5, E // 20)``
        epochs (the paper's 200 and 100 are for budgets of thousands of epochs)."""
        e = int(max_epochs)
        return dataclasses.replace(
            self, max_epochs=e, patience=max(10, e // 10), cooldown=max(5, e // 20)
        )

    def stretched(self, factor: int) -> TrainConfig:
        """The same schedule ``factor`` times longer: budget, patience and cooldown multiplied."""
        f = int(factor)
        return dataclasses.replace(
            self,
            max_epochs=self.max_epochs * f,
            patience=self.patience * f,
            cooldown=self.cooldown * f,
        )


@dataclass(frozen=True)
class ExpansionSearchConfig:
    """The expansion search (Martinelli et al. 2024, Sec. 3: "train students of increasing size
    until they consistently reach near-zero loss"; the rules in docs/method.md, step 1).

    Attributes
    ----------
    start_width : first width tried. growth : each next width is ceil(growth * previous).
    max_width : no width above this is tried.
    n_students : quick students per width. epochs : quick Adam budget per width (per round).
    target_relative_mse : "near-zero loss" for the quick runs.
    fraction : a width qualifies when at least this share of its quick students reach the target.
    expansion : the students of the main run get ceil(expansion * found width) neurons, so they
        are overparameterised beyond the smallest consistently successful width.
    polish_iterations : the quick students' finish budget (as ``TrainConfig.polish_iterations``),
        times L^2 for students with L hidden layers.
    extensions : a width whose quick students still gain at least ``trend_decades`` decades of
        median relative MSE over the last third of their Adam epochs trains up to this many more
        rounds of ``epochs`` (slow-starting activations) before it is judged.
    trend_decades : see ``extensions``.
    patience : the search stops after this many consecutive widths that lower the best median
        relative MSE by less than ``min_gain_decades`` decades ("wider students stop helping");
        then, as at ``max_width``, the smallest width within ``min_gain_decades`` decades of the
        best median is taken.
    min_gain_decades : see ``patience``.
    """

    start_width: int = 4
    growth: float = 1.5
    max_width: int = 512
    n_students: int = 6
    epochs: int = 1500
    target_relative_mse: float = 1e-4
    fraction: float = 0.5
    expansion: float = 2.0
    polish_iterations: int = 300
    extensions: int = 2
    trend_decades: float = 0.3
    patience: int = 2
    min_gain_decades: float = 0.1

    def __post_init__(self) -> None:
        _validate(
            self,
            [
                ("start_width", self.start_width >= 1, ">= 1"),
                ("growth", self.growth > 1, "> 1"),
                ("max_width", self.max_width >= self.start_width, ">= start_width"),
                ("n_students", self.n_students >= 1, ">= 1"),
                ("epochs", self.epochs >= 1, ">= 1"),
                ("target_relative_mse", self.target_relative_mse > 0, "> 0"),
                ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
                ("expansion", self.expansion >= 1, ">= 1"),
                ("polish_iterations", self.polish_iterations >= 0, ">= 0"),
                ("extensions", self.extensions >= 0, ">= 0"),
                ("trend_decades", self.trend_decades >= 0, ">= 0"),
                ("patience", self.patience >= 1, ">= 1"),
                ("min_gain_decades", self.min_gain_decades >= 0, ">= 0"),
            ],
        )


@dataclass(frozen=True)
class ClusterConfig:
    """The clustering step (Martinelli et al. 2024, Sec. 3, step "Cluster"; docs/method.md).

    Attributes
    ----------
    gamma : in (0, 1]; keep clusters with at least ``gamma * N`` members (N students; ``gamma *
        N`` must be >= 2, checked where N is known). Reference values: 0.5 (the authors' code
        default), 0.75 (their runs for sigmoid, tanh, softplus, relu).
    beta_degrees : in (0, 180], degrees; drop clusters whose median pairwise angle between members
        exceeds beta. For sign-symmetric classes angles are between lines (at most 90 degrees),
        so beta >= 90 disables the filter. Reference values: 60 (their runs), 30 (code default).
    metric : "cosine" (``1 - cos``, ``1 - |cos|`` for sign-symmetric classes) or "l2" (Euclidean,
        after flipping each vector so that its largest-magnitude masked coordinate is positive).
    mask_tolerance : in [0, 1); inputs whose variance over the queries is ``<= mask_tolerance *
        max variance`` are masked out.
    linkage_backend : "native" (the C++ kernels) or "reference" (their reference twins:
        torch distances, scipy's linkage), for cross-checks.
    cut_rule : where to cut the tree: "persistent_max" (default), "longest_plateau" or
        "max_count" (the paper's rule); see :func:`~expand_and_cluster.pipeline.cut.cut_tree`.
    cut_uses_beta : when choosing the cut, count only big clusters whose mean pairwise distance
        is at most ``1 - cos(beta)`` (cosine metric only).
    """

    gamma: float = 0.5
    beta_degrees: float = 60.0
    metric: str = "cosine"
    mask_tolerance: float = 1e-10
    linkage_backend: str = "native"
    cut_uses_beta: bool = False
    cut_rule: str = "persistent_max"

    def __post_init__(self) -> None:
        for name in ("gamma", "beta_degrees", "mask_tolerance"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise InputError(f"{name}: expected a number, got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"{name}: expected a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))  # plain floats (np.float32 -> float)
        _validate(
            self,
            [
                ("gamma", 0.0 < self.gamma <= 1.0, "a value in (0, 1]"),
                ("beta_degrees", 0.0 < self.beta_degrees <= 180.0, "an angle in (0, 180] degrees"),
                ("mask_tolerance", 0.0 <= self.mask_tolerance < 1.0, "a value in [0, 1)"),
                ("metric", self.metric in METRICS, f"one of {METRICS}"),
                ("linkage_backend", self.linkage_backend in LINKAGE_BACKENDS,
                 f"one of {LINKAGE_BACKENDS}"),
                ("cut_rule", self.cut_rule in CUT_RULES, f"one of {CUT_RULES}"),
                ("cut_uses_beta", isinstance(self.cut_uses_beta, (bool, np.bool_)), "a bool"),
            ],
        )  # fmt: skip
        if self.cut_uses_beta and self.metric != "cosine":
            raise InputError(
                f"cut_uses_beta: needs metric='cosine' (an angle has no l2 distance), got "
                f"metric={self.metric!r}"
            )


@dataclass(frozen=True)
class RepairConfig:
    """The width repair of the last hidden layer (this package's, not the paper's; see
    :mod:`expand_and_cluster.pipeline.repair` and docs/method.md).

    Attributes
    ----------
    enabled : False skips the repair (the paper's procedure alone).
    prune_tolerance : relative MSE under which a network counts as exact; a removal is kept when
        the relative MSE stays under ``max(prune_tolerance, prune_factor * r0)``, r0 the
        network's relative MSE before pruning. 0 disables pruning.
    prune_factor : see ``prune_tolerance``.
    prune_below : pruning is tried only when the network's relative MSE is at most this.
    grow_candidates : k; per round the k largest candidates and the k best by a least-squares
        refit are fine-tuned as an extra neuron (at most 2k trials). 0 disables growing.
    grow_target : relative MSE above which growing is tried.
    grow_factor : m added neurons are kept when together they lower the relative MSE at least
        ``grow_factor ** m`` times (or reach ``grow_target``).
    max_added : most neurons added by the clusters' pass (and by the deep residual pass).
    iterations : L-BFGS iterations of each trial's fine-tune.
    trial_queries : the trials see a seeded random subset of this many training queries (0: all);
        the final fine-tune sees all.
    residual_candidates : per round of the residual pass, this many residual neurons are
        fine-tuned as an extra neuron. 0 disables the pass.
    residual_starts : random starts of the residual-neuron search.
    residual_max_added : most neurons added by the residual pass.
    deep_grow_factor : deep networks: a residual neuron added with every weight fine-tuned is
        kept when it lowers the relative MSE at least this many times.
    """

    enabled: bool = True
    prune_tolerance: float = 1e-12
    prune_factor: float = 10.0
    prune_below: float = 1e-8
    grow_candidates: int = 4
    grow_target: float = 1e-10
    grow_factor: float = 100.0
    max_added: int = 4
    iterations: int = 500
    trial_queries: int = 0
    residual_candidates: int = 2
    residual_starts: int = 128
    residual_max_added: int = 8
    deep_grow_factor: float = 10.0

    def __post_init__(self) -> None:
        _validate(
            self,
            [
                ("enabled", isinstance(self.enabled, (bool, np.bool_)), "a bool"),
                ("prune_tolerance", 0 <= self.prune_tolerance < 1, "in [0, 1)"),
                ("prune_factor", self.prune_factor >= 1, ">= 1"),
                ("prune_below", self.prune_below >= 0, ">= 0"),
                ("grow_candidates", self.grow_candidates >= 0, ">= 0"),
                ("grow_target", self.grow_target >= 0, ">= 0"),
                ("grow_factor", self.grow_factor > 1, "> 1"),
                ("max_added", self.max_added >= 0, ">= 0"),
                ("iterations", self.iterations >= 0, ">= 0"),
                ("trial_queries", self.trial_queries >= 0, ">= 0"),
                ("residual_candidates", self.residual_candidates >= 0, ">= 0"),
                ("residual_starts", self.residual_starts >= 1, ">= 1"),
                ("residual_max_added", self.residual_max_added >= 0, ">= 0"),
                ("deep_grow_factor", self.deep_grow_factor > 1, "> 1"),
            ],
        )

    @classmethod
    def off(cls) -> RepairConfig:
        """No repair (the paper's procedure alone)."""
        return cls(enabled=False)
