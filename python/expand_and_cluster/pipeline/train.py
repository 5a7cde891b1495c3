"""Training of a student ensemble: Adam with a plateau schedule per student, then the batched
float64 finish (:mod:`~expand_and_cluster.pipeline.finish`). Used by the expansion step and by
the layer-wise fine-tune of deep recoveries.

Source: Martinelli et al. 2024, Sec. 3 step 1 ("Expand") and App. (training details): Adam, lr
1e-3, learning rate x 1/sqrt(10) on plateau (patience 200 epochs, cooldown 100, threshold 0) until
lr < 1e-7. Unlike the reference code, every student has its own schedule and stops on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import ops
from ..activations import get_activation
from ..config import TrainConfig
from ..students import StudentEnsemble
from .finish import finish

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainResult:
    """Outcome of :func:`train_students`.

    Attributes
    ----------
    students : the trained ensemble (float64 after a polish, else the training dtype).
    relative_mse : ``[N]`` final relative MSE of each student on the training queries.
    epochs : ``[N]`` epochs each student trained.
    stop_reason : per student, how Adam ended: "target", "min_lr", "stalled" (handed over to
        the finish, ``TrainConfig.handover_window``) or "budget".
    final_lr : ``[N]``.
    history : {"epoch": [e...], "relative_mse": [[N floats]...]}, subsampled.
    seconds : wall time.
    finish : the finish's record (:meth:`FinishResult.summary
        <expand_and_cluster.pipeline.finish.FinishResult.summary>`: method, per-student
        iterations, stop reasons and relative MSE, seconds), or None without a finish.
    """

    students: StudentEnsemble
    relative_mse: np.ndarray
    epochs: np.ndarray
    stop_reason: list[str]
    final_lr: np.ndarray
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    finish: dict | None = None

    @property
    def still_improving(self) -> int:
        """Students whose finish ended at its budget, still improving (not converged)."""
        return sum(r == "budget" for r in (self.finish or {}).get("stop_reason", []))

    def describe(self) -> str:
        """One line: best and median relative MSE, and how many students had not converged."""
        rel = self.relative_mse
        text = f"relative MSE best {rel.min():.2e}, median {np.median(rel):.2e}"
        if self.still_improving:
            text += (
                f"; {self.still_improving} of {len(rel)} still improving at the end of the "
                "finish budget (not converged)"
            )
        return text


def output_variance(y: torch.Tensor) -> float:
    """Mean over outputs of Var(y) over the queries (the relative-MSE denominator; 1 if 0)."""
    v = float(y.to(torch.float64).var(dim=0, unbiased=False).mean())
    return v if v > 0 else 1.0


def _validate_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(
            f"x, y: expected [P, d_in] and [P, d_out] with P >= 1, got {tuple(x.shape)}, "
            f"{tuple(y.shape)}"
        )
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x, y: contain NaN or Inf")


def train_students(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden_widths: list[int],
    activation: str,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    students: StudentEnsemble | None = None,
    desc: str = "students",
) -> TrainResult:
    """Train N students to imitate the teacher on the queries (x, y).

    Each student n minimises its own MSE_n = mean over queries and outputs of (f_n(x) - y)^2 with
    Adam (fused kernels :func:`~expand_and_cluster.ops.mlp_mse_grad` and
    :func:`~expand_and_cluster.ops.adam_step`) and its own plateau schedule; it stops when its
    relative MSE falls below ``target_relative_mse``, when its learning rate falls below
    ``min_lr``, when its progress stalls (``handover_window``), or when the epoch budget is
    spent. Stopped students leave the batch (the kernels then run on the active ones only).
    With ``polish_iterations > 0`` the float64 finish follows
    (:func:`~expand_and_cluster.pipeline.finish.finish`, method ``config.finish``).

    Parameters
    ----------
    x : ``[P, d_in]`` queries; y : ``[P, d_out]`` teacher outputs (any float dtype, finite).
    hidden_widths : widths of the students' hidden layers.
    activation : hidden activation name.
    config : :class:`~expand_and_cluster.config.TrainConfig` (None: the defaults).
    students : start from these students instead of a fresh initialisation.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        On inconsistent shapes or non-finite queries, or invalid widths.
    FloatingPointError
        When a student's loss becomes NaN or Inf (the message names the students and the epoch).
    """
    # torch's own ops here are tiny: one thread, unless the torch path does the heavy work.
    torch_path = ops.uses_torch_path([x.shape[1], *hidden_widths, y.shape[1]], device)
    with ops.threads(torch_threads=None if torch_path else 1):
        return _train_students(x, y, hidden_widths, activation, config, device, students, desc)


def _train_students(x, y, hidden_widths, activation, config, device, students, desc):
    """Implementation of :func:`train_students` (torch thread count already set)."""
    get_activation(activation)
    _validate_xy(x, y)
    cfg = TrainConfig() if config is None else config
    dtype = _DTYPES[cfg.dtype]
    t0 = time.perf_counter()
    xs = x.to(dtype=dtype, device=device).contiguous()
    ys = y.to(dtype=dtype, device=device).contiguous()
    n_queries = xs.shape[0]
    var_y = output_variance(ys)
    if students is None:
        widths = [xs.shape[1], *hidden_widths, ys.shape[1]]
        ens = StudentEnsemble.initialise(
            cfg.n_students, widths, activation, cfg.seed, dtype, device
        )
    else:
        ens = students.to(dtype=dtype, device=device)
    n = ens.n_students
    dev = ens.device
    sync_every = cfg.sync_every or (16 if dev.type == "cuda" else 1)
    # Host copies, filled at each read-back, indexed by student.
    rel = np.full(n, np.inf)
    epochs = np.zeros(n, dtype=np.int64)
    reason = ["budget"] * n
    final_lr = np.full(n, float(cfg.lr))
    done = np.zeros(n, dtype=bool)
    gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    batch = n_queries if cfg.batch_size is None else min(cfg.batch_size, n_queries)
    hist_every = max(1, cfg.max_epochs // 400)
    handover = cfg.handover_epochs
    rel_at_check = np.full(n, np.inf)  # relative MSE at the last hand-over check
    history: dict = {"epoch": [], "relative_mse": []}

    # State of the students in the batch (`active`, in this order), on their device. A stopped
    # student trains with learning rate 0 (frozen) until the next read-back removes it.
    active = np.arange(n)
    cur = ens.select(active)
    state = ops.PlateauState(n, cfg.lr, dev)
    rule = dict(
        var_y=var_y,
        patience=cfg.patience,
        cooldown=cfg.cooldown,
        factor=cfg.factor,
        target=cfg.target_relative_mse,
        min_lr=cfg.min_lr,
    )
    pending: list = []  # (epoch, relative MSEs) history entries not read back yet
    # Loss, gradients and Adam of the batch, validated once (ops.FusedTrainStep); rebuilt with
    # the kept optimiser state whenever students leave. Its lr is written by ops.plateau_step.
    fstep = ops.FusedTrainStep(
        cur.weights, cur.biases, activation, torch.full((n,), cfg.lr, dtype=dtype, device=dev)
    )

    bar = tqdm(
        total=cfg.max_epochs, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True
    )
    last_post = 0.0
    for epoch in range(1, cfg.max_epochs + 1):
        if batch == n_queries:
            epoch_loss = fstep(xs, ys).to(torch.float64)
        else:
            perm = torch.randperm(n_queries, generator=gen)
            if dev.type == "cuda":
                # A copy from pageable memory would wait for the stream (a sync per epoch);
                # from pinned memory it is queued like a kernel.
                perm = perm.pin_memory().to(dev, non_blocking=True)
            acc = torch.zeros(len(active), dtype=torch.float64, device=dev)
            for s in range(0, n_queries, batch):
                idx = perm[s : s + batch]
                loss = fstep(xs.index_select(0, idx), ys.index_select(0, idx))
                acc += loss.to(torch.float64) * idx.shape[0]
            epoch_loss = acc / n_queries
        ops.plateau_step(state, epoch_loss, epoch, fstep.lr, **rule)
        if epoch % hist_every == 0 or epoch == 1:
            pending.append((epoch, state.rel.clone()))
        bar.update(1)
        if (
            epoch % sync_every
            and epoch != cfg.max_epochs
            and not (handover and epoch % handover == 0)
        ):
            continue
        # Read-back: one device-to-host transfer.
        host, hist = state.to_numpy([r for _, r in pending])
        if (host["diverged"] > 0).any():
            j = np.flatnonzero(host["diverged"] > 0)
            raise FloatingPointError(
                f"students {active[j].tolist()} diverged (loss NaN/Inf) at epoch "
                f"{int(host['diverged'][j].min())}; lower the learning rate (--lr) or use float64"
            )
        rel[active] = host["rel"]
        epochs[active] = host["epochs"]
        final_lr[active] = host["lr"]
        for j in np.flatnonzero(host["code"] > 0):
            reason[active[j]] = "target" if host["code"][j] == 1 else "min_lr"
        for (e, _), r in zip(pending, hist):
            row = rel.copy()
            row[active] = r
            history["epoch"].append(e)
            history["relative_mse"].append(row.tolist())
        pending = []
        live = host["live"]
        if handover and epoch % handover == 0:
            # Hand-over: too little progress since the last check leaves Adam for the finish.
            now = host["rel"]
            slow = live & (
                np.log10(rel_at_check[active] / np.maximum(now, 1e-300)) < cfg.handover_decades
            )
            for j in np.flatnonzero(slow):
                reason[active[j]] = "stalled"
            live = live & ~slow
            rel_at_check[active] = now
        if cfg.progress and time.perf_counter() - last_post > 0.5:
            last_post = time.perf_counter()
            bar.set_postfix_str(
                f"active {int(live.sum())}/{n} best {rel.min():.2e} median {np.median(rel):.2e} "
                f"lr {np.median(host['lr'][live]) if live.any() else 0.0:.1e}"
            )
        if not live.all():
            _write_back(ens, cur, active)
            done[active[~live]] = True
            if not live.any():
                break
            keep = np.flatnonzero(live)
            active = active[keep]
            kidx = torch.as_tensor(keep, device=dev)
            cur = cur.select(kidx)
            fstep = ops.FusedTrainStep(
                cur.weights,
                cur.biases,
                activation,
                fstep.lr.index_select(0, kidx).contiguous(),
                exp_avg=[t.index_select(0, kidx).contiguous() for t in fstep.exp_avg],
                exp_avg_sq=[t.index_select(0, kidx).contiguous() for t in fstep.exp_avg_sq],
                step=fstep.step.index_select(0, kidx).contiguous(),
            )
            state.select(kidx)
    bar.close()
    if not done.all():
        _write_back(ens, cur, active)
    last = int(epochs.max())
    if history["epoch"] and history["epoch"][-1] != last:
        history["epoch"].append(last)
        history["relative_mse"].append(rel.tolist())
    summary = None
    if cfg.polish_iterations > 0:
        ens = ens.to(dtype=torch.float64)
        fin = _finish(ens, x, y, cfg, var_y)
        for _ in range(cfg.finish_rounds):
            more = np.flatnonzero(np.asarray(fin.stop_reason) == "budget")
            if not len(more):
                break
            _finish_more(ens, fin, more, x, y, cfg, var_y)
        rel = fin.mse / var_y
        summary = fin.summary(var_y)
    return TrainResult(
        ens, rel, epochs, reason, final_lr, history, time.perf_counter() - t0, summary
    )


def _finish(ens: StudentEnsemble, x, y, cfg: TrainConfig, var_y: float):
    """:func:`~expand_and_cluster.pipeline.finish.finish` of ``ens`` (float64, in place) with
    ``cfg``'s finish settings."""
    return finish(
        ens,
        x,
        y,
        cfg.finish,
        lbfgs_iterations=cfg.polish_iterations,
        lm_iterations=cfg.lm_iterations,
        lm_max_params=cfg.lm_max_params,
        target=cfg.finish_target,
        var_y=var_y,
        progress=cfg.progress,
        stall_decades=cfg.finish_stall_decades,
    )


def _finish_more(ens, fin, index: np.ndarray, x, y, cfg: TrainConfig, var_y: float) -> None:
    """One more finish of the students ``index`` (still improving at the end of the last),
    written into ``ens`` and merged into ``fin`` (iterations added, MSE and stop reasons
    replaced, ``rounds`` counted)."""
    part = ens.select(index)
    more = _finish(part, x, y, cfg, var_y)
    _write_back(ens, part, index)
    fin.mse[index] = more.mse
    fin.iterations[index] += more.iterations
    for j, i in enumerate(index):
        fin.stop_reason[i] = more.stop_reason[j]
    fin.seconds += more.seconds
    fin.rounds += 1


def _write_back(ens: StudentEnsemble, cur: StudentEnsemble, active: np.ndarray) -> None:
    idx = torch.as_tensor(active, device=ens.device)
    for full, part in zip(ens.params(), cur.params()):
        full.index_copy_(0, idx, part)
