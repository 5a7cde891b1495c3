"""Training of the student ensemble: Adam with a plateau schedule per student, a batched L-BFGS
polish in float64, and the expansion search over the student width.

Source: Martinelli et al. 2024, Sec. 3 step 1 ("Expand") and App. (training details): Adam, lr
1e-3, learning rate x 1/sqrt(10) on plateau (patience 200 epochs, cooldown 100, threshold 0) until
lr < 1e-7. Unlike the reference code, every student has its own schedule and stops on its own.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ops
from .activations import get_activation
from .students import StudentEnsemble

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the student training (validated: ValueError naming the field).

    Attributes
    ----------
    n_students : N, number of students (paper: 10 to 50, default 20).
    lr : initial Adam learning rate of every student.
    batch_size : queries per step; None for full batch.
    max_epochs : budget of passes over the queries per student.
    target_relative_mse : a student stops when its relative MSE (MSE / mean Var(y)) is below this.
    patience, cooldown : plateau schedule, in epochs (threshold 0: any decrease is progress).
    factor : learning-rate multiplier on a plateau (1/sqrt(10)).
    min_lr : a student stops when its learning rate falls below this.
    polish_iterations : batched L-BFGS iterations in float64 after Adam (0: none).
    dtype : "float32" or "float64" for the Adam phase.
    seed : seeds initialisation and mini-batch order.
    progress : show a progress bar.
    sync_every : read the losses back to the host every this many epochs (None: 1 on the CPU, 16
        on a GPU). The plateau schedules and stop rules run on the students' device every epoch,
        so the result does not depend on it: a student that stops keeps learning rate 0 (its
        weights frozen) until the next read-back, where it leaves the batch. A larger value saves
        a host synchronisation per epoch (on a GPU, per step in full batch) at the cost of up to
        ``sync_every - 1`` epochs of wasted work per stopped student; a diverged student (loss
        NaN/Inf) is reported at the next read-back, with the epoch it diverged.
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
    dtype: str = "float32"
    seed: int = 0
    progress: bool = True
    sync_every: int | None = None

    def __post_init__(self) -> None:
        checks = [
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
            ("dtype", self.dtype in _DTYPES, "'float32' or 'float64'"),
            ("sync_every", self.sync_every is None or self.sync_every >= 1, "None or >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")


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


@contextlib.contextmanager
def torch_single_thread(enabled: bool = True):
    """Run torch's own (small) ops on one thread while our kernels do the heavy work.

    The training loop's torch ops (schedules, index_select, L-BFGS vector algebra on [N, P]) are
    tiny; on one thread they skip waking the OpenMP team. torch and our extension share one
    libgomp (same soname), so our kernels keep their own thread count
    (:func:`expand_and_cluster.ops.set_num_threads`), unaffected by this.
    """
    n = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
    config: TrainConfig = TrainConfig(),
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
    config : :class:`TrainConfig`.
    students : start from these students instead of a fresh initialisation.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        On inconsistent shapes or non-finite queries, or invalid widths.
    """
    with torch_single_thread(
        not ops.uses_torch_path([x.shape[1], *hidden_widths, y.shape[1]], device)
    ):
        return _train_students(x, y, hidden_widths, activation, config, device, students, desc)


def _train_students(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden_widths: list[int],
    activation: str,
    config: TrainConfig = TrainConfig(),
    device: str | torch.device = "cpu",
    students: StudentEnsemble | None = None,
    desc: str = "students",
) -> TrainResult:
    """Implementation of :func:`train_students` (torch thread count already set)."""
    get_activation(activation)
    _validate_xy(x, y)
    cfg = config
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
    with torch_single_thread(not ops.uses_torch_path(ens.widths, ens.device)):
        return _lbfgs_polish(ens, x, y, iterations, history_size, progress)


def _lbfgs_polish(
    ens: StudentEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    iterations: int,
    history_size: int = 20,
    progress: bool = False,
) -> np.ndarray:
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


@dataclass(frozen=True)
class ExpansionSearchConfig:
    """The expansion search (Martinelli et al. 2024, Sec. 3: "train students of increasing size
    until they consistently reach near-zero loss").

    Attributes
    ----------
    start_width : first width tried. growth : each next width is ceil(growth * previous).
    max_width : give up above this (the largest width tried is then used).
    n_students : quick students per width. epochs : quick budget per width.
    target_relative_mse : "near-zero loss" for the quick runs.
    fraction : the share of quick students that must reach the target.
    expansion : the students of the main run get ceil(expansion * found width) neurons, so they
        are overparameterised beyond the smallest consistently successful width.
    polish_iterations : float64 L-BFGS iterations after the quick Adam epochs, times L^2 for
        students with L hidden layers. Adam alone rarely
        reaches a strict target quickly (digits teacher: relative MSE 5e-3 after 300 epochs at
        width 48, 1e-7 after the polish), so without it the search walks to very large widths.
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

    def __post_init__(self) -> None:
        checks = [
            ("start_width", self.start_width >= 1, ">= 1"),
            ("growth", self.growth > 1, "> 1"),
            ("max_width", self.max_width >= self.start_width, ">= start_width"),
            ("n_students", self.n_students >= 1, ">= 1"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("target_relative_mse", self.target_relative_mse > 0, "> 0"),
            ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
            ("expansion", self.expansion >= 1, ">= 1"),
            ("polish_iterations", self.polish_iterations >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")


def expansion_search(
    x: torch.Tensor,
    y: torch.Tensor,
    activation: str,
    n_hidden_layers: int = 1,
    search: ExpansionSearchConfig = ExpansionSearchConfig(),
    train: TrainConfig = TrainConfig(),
    device="cpu",
) -> tuple[int, list[dict]]:
    """Find the student width: quick runs at increasing widths until at least ``fraction`` of the
    quick students reach ``target_relative_mse``; return ``ceil(expansion * that width)`` and, per
    tried width, ``{"width", "relative_mse": [per quick student], "fraction_reached"}``.
    """
    tried: list[dict] = []
    width = search.start_width
    found = None
    while True:
        cfg = TrainConfig(
            n_students=search.n_students,
            lr=train.lr,
            batch_size=train.batch_size,
            max_epochs=search.epochs,
            target_relative_mse=search.target_relative_mse,
            patience=min(train.patience, max(10, search.epochs // 10)),
            cooldown=min(train.cooldown, max(5, search.epochs // 20)),
            factor=train.factor,
            min_lr=train.min_lr,
            dtype=train.dtype,
            seed=train.seed + 1000 + width,
            progress=train.progress,
            # deeper students need a longer polish to show that they can reach the target (deep
            # digits teacher 64-12-10-10 at width 14: 2e-4 after 300 iterations, 3e-7 after 1,000)
            polish_iterations=search.polish_iterations * n_hidden_layers**2,
        )
        res = train_students(
            x, y, [width] * n_hidden_layers, activation, cfg, device, desc=f"search width {width}"
        )
        frac = float(np.mean(res.relative_mse <= search.target_relative_mse))
        tried.append(
            {"width": width, "relative_mse": res.relative_mse.tolist(), "fraction_reached": frac}
        )
        if frac >= search.fraction:
            found = width
            break
        nxt = math.ceil(width * search.growth)
        if nxt > search.max_width:
            found = width
            break
        width = nxt
    return max(found, math.ceil(search.expansion * found)), tried
