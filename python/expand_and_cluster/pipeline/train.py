"""Training of a student ensemble: Adam with a plateau schedule per student, then a batched
L-BFGS polish in float64. Used by the expansion step and by the layer-wise fine-tune of deep
recoveries.

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

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainResult:
    """Outcome of :func:`train_students`.

    Attributes
    ----------
    students : the trained ensemble (float64 after a polish, else the training dtype).
    relative_mse : ``[N]`` final relative MSE of each student on the training queries.
    epochs : ``[N]`` epochs each student trained.
    stop_reason : per student, "target", "min_lr" or "budget".
    final_lr : ``[N]``.
    history : {"epoch": [e...], "relative_mse": [[N floats]...]}, subsampled.
    seconds : wall time.
    """

    students: StudentEnsemble
    relative_mse: np.ndarray
    epochs: np.ndarray
    stop_reason: list[str]
    final_lr: np.ndarray
    history: dict = field(default_factory=dict)
    seconds: float = 0.0


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
    ``min_lr``, or when the epoch budget is spent. Stopped students leave the batch (the kernels
    then run on the active ones only). Optionally a batched L-BFGS polish in float64 follows
    (:func:`lbfgs_polish`).

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
        if epoch % sync_every and epoch != cfg.max_epochs:
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
    if cfg.polish_iterations > 0:
        ens = ens.to(dtype=torch.float64)
        rel = lbfgs_polish(ens, x, y, cfg.polish_iterations, progress=cfg.progress) / var_y
    return TrainResult(ens, rel, epochs, reason, final_lr, history, time.perf_counter() - t0)


def _write_back(ens: StudentEnsemble, cur: StudentEnsemble, active: np.ndarray) -> None:
    idx = torch.as_tensor(active, device=ens.device)
    for full, part in zip(ens.params(), cur.params()):
        full.index_copy_(0, idx, part)


def _flat(tensors: list[torch.Tensor], n: int) -> torch.Tensor:
    return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)


def _unflat_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    o = 0
    for t in tensors:
        k = t[0].numel()
        t.copy_(flat[:, o : o + k].reshape(t.shape))
        o += k


def lbfgs_polish(
    ens: StudentEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    iterations: int,
    history_size: int = 20,
    progress: bool = False,
) -> np.ndarray:
    """Batched L-BFGS on every student at once, in the ensemble's dtype (float64 intended), in
    place; each student has its own curvature history and step length.

    Every iteration costs one fused loss-and-gradient call for all students. A student's trial
    point ``p + t d`` is accepted when it satisfies the Armijo condition
    ``loss_new <= loss + 1e-4 t g.d``; otherwise the student stays, halves t and retries the same
    direction at the next iteration (no extra evaluations for the others). Nocedal & Wright,
    Numerical Optimization, Alg. 7.4 (two-loop recursion).

    Parameters
    ----------
    ens : the students, updated in place.
    x, y : ``[P, d_in]``, ``[P, d_out]`` queries.
    iterations : number of iterations (fused evaluations).
    history_size : curvature pairs kept per student.

    Returns
    -------
    numpy.ndarray
        ``[N]`` final MSE of each student (not relative).
    """
    with ops.threads(torch_threads=None if ops.uses_torch_path(ens.widths, ens.device) else 1):
        return _lbfgs_polish(ens, x, y, iterations, history_size, progress)


def _lbfgs_polish(ens, x, y, iterations, history_size, progress) -> np.ndarray:
    """Implementation of :func:`lbfgs_polish` (torch thread count already set)."""
    dtype, device, act = ens.dtype, ens.device, ens.activation
    xs = x.to(dtype=dtype, device=device).contiguous()
    ys = y.to(dtype=dtype, device=device).contiguous()
    n = ens.n_students
    params = ens.params()
    p = _flat(params, n)

    def evaluate(flat: torch.Tensor):
        _unflat_into(flat, params)
        loss, gw, gb = ops.mlp_mse_grad(ens.weights, ens.biases, xs, ys, act, check_finite=False)
        return loss.clone(), _flat(gw + gb, n)

    loss, g = evaluate(p)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []  # per pair: which students have it
    t = torch.ones(n, dtype=dtype, device=device)
    first = torch.ones(n, dtype=torch.bool, device=device)
    bar = tqdm(total=iterations, desc="L-BFGS polish", disable=not progress, leave=False)
    for _ in range(iterations):
        # Two-loop recursion, per student (pairs a student lacks contribute nothing).
        q = -g
        alphas = []
        for s_i, y_i, r_i, ok in zip(
            reversed(s_hist), reversed(y_hist), reversed(rho_hist), reversed(valid)
        ):
            a = torch.where(ok, r_i * (s_i * q).sum(1), torch.zeros_like(r_i))
            q = q - a[:, None] * y_i
            alphas.append(a)
        if s_hist:
            sy = (s_hist[-1] * y_hist[-1]).sum(1)
            yy = (y_hist[-1] * y_hist[-1]).sum(1)
            gamma = torch.where(
                valid[-1] & (yy > 0), sy / yy.clamp_min(1e-300), torch.ones_like(sy)
            )
            q = q * gamma[:, None]
        for s_i, y_i, r_i, ok, a in zip(s_hist, y_hist, rho_hist, valid, reversed(alphas)):
            b = torch.where(ok, r_i * (y_i * q).sum(1), torch.zeros_like(r_i))
            q = q + (a - b)[:, None] * s_i
        d = q
        gd = (g * d).sum(1)
        # Students whose direction is not a descent direction restart from steepest descent
        # (elementwise, no host synchronisation).
        d = torch.where((gd >= 0)[:, None], -g, d)
        gd = (g * d).sum(1)
        # First step of a student: scale to unit length, as torch.optim.LBFGS does.
        t_eff = torch.where(first, torch.minimum(t, 1.0 / g.abs().sum(1).clamp_min(1e-300)), t)
        p_new = p + t_eff[:, None] * d
        loss_new, g_new = evaluate(p_new)
        ok = torch.isfinite(loss_new) & (loss_new <= loss + 1e-4 * t_eff * gd)
        s = (p_new - p) * ok[:, None]
        yv = (g_new - g) * ok[:, None]
        sy = (s * yv).sum(1)
        good_pair = ok & (sy > 1e-300)
        s_hist.append(s)
        y_hist.append(yv)
        rho_hist.append(torch.where(good_pair, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy)))
        valid.append(good_pair)
        if len(s_hist) > history_size:
            s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0), valid.pop(0)
        p = torch.where(ok[:, None], p_new, p)
        g = torch.where(ok[:, None], g_new, g)
        loss = torch.where(ok, loss_new, loss)
        first = first & ~ok
        t = torch.where(ok, torch.ones_like(t), t * 0.5)
        # A student whose step vanished restarts from steepest descent.
        stuck = t < 1e-12
        t = torch.where(stuck, torch.ones_like(t), t)
        first = first | stuck
        valid = [v & ~stuck for v in valid]
        bar.update(1)
    bar.close()
    _unflat_into(p, params)
    return loss.to(torch.float64).cpu().numpy()
