"""The float64 finish of a student ensemble after Adam: batched L-BFGS and a batched
Levenberg-Marquardt, where every student stops on its own rule and leaves the batch.

Stop rule of a student (docs/method.md, step 1): it stops

- at the **target**: relative MSE <= ``target`` (float64 round-off is ~1e-30);
- when **stalled**: it gained fewer than ``stall_decades`` (:data:`LBFGS_MIN_DECADES`)
  decades of relative MSE over the last :data:`LBFGS_WINDOW` L-BFGS iterations, or fewer than
  :data:`LM_MIN_DECADES` over the last :data:`LM_WINDOW` Levenberg-Marquardt iterations (or its
  damping passed :data:`LM_MAX_DAMPING`: no damped step lowers its loss);
- at the **budget** of iterations.

Source: Martinelli et al. 2024, Sec. 3 step 1 (students trained to near-zero loss); Nocedal &
Wright, Numerical Optimization, Alg. 7.4 (L-BFGS two-loop recursion) and Sec. 10.3
(Levenberg-Marquardt); More, "The Levenberg-Marquardt algorithm", LNM 630 (1978) (Marquardt's
diagonal scaling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import ops
from ..activations import get_activation
from ..config.steps import FINISHES
from ..students import StudentEnsemble

#: Bytes of Jacobian rows held at once by the Levenberg-Marquardt normal equations.
JACOBIAN_BLOCK_BYTES = 32 * 2**20


@dataclass
class FinishResult:
    """Outcome of :func:`finish`.

    Attributes
    ----------
    method : "lm+lbfgs", "lm", "lbfgs" or "lbfgs-fixed" (what "auto" chose).
    mse : ``[N]`` final MSE of each student (not relative).
    iterations : ``[N]`` iterations each student ran (both phases of "lm+lbfgs").
    stop_reason : per student "target", "stalled" or "budget" (of its last phase).
    history : ``{"seconds": [...], "iteration": [...], "relative_mse": [[N floats], ...]}``,
        one entry per stop check of the first round (the benchmark's time-to-precision curves).
    seconds : wall time.
    rounds : finishes run (``TrainConfig.finish_rounds``); ``iterations`` counts them all.
    """

    method: str
    mse: np.ndarray
    iterations: np.ndarray
    stop_reason: list[str]
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    rounds: int = 1

    def summary(self, var_y: float) -> dict:
        """JSON-able per-student record: method, iterations, stop reasons, relative MSE."""
        return {
            "method": self.method,
            "iterations": self.iterations.tolist(),
            "stop_reason": list(self.stop_reason),
            "relative_mse": (self.mse / var_y).tolist(),
            "seconds": self.seconds,
            "rounds": self.rounds,
        }


def n_params(widths) -> int:
    """Parameters of one student of these widths ``[d_in, hidden..., d_out]``."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def choose_finish(method: str, widths, lm_max_params: int) -> str:
    """The finish "auto" means for students of ``widths``: "lm+lbfgs" (Levenberg-Marquardt,
    then L-BFGS for the students it left above relative MSE :data:`LM_SWITCH`) when a student's
    Jacobian has at most ``lm_max_params`` columns per query (parameters times d_out: a
    Levenberg-Marquardt iteration costs about that over 6 L-BFGS iterations), else "lbfgs"; any
    other method is returned as is.
    """
    if method not in FINISHES:
        raise ValueError(f"finish: expected one of {FINISHES}, got {method!r}")
    if method != "auto":
        return method
    return "lm+lbfgs" if n_params(widths) * widths[-1] <= lm_max_params else "lbfgs"


def finish(
    ens: StudentEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str = "auto",
    *,
    lbfgs_iterations: int = 1500,
    lm_iterations: int = 100,
    lm_max_params: int = 256,
    target: float = 1e-20,
    var_y: float = 1.0,
    progress: bool = False,
    stall_decades: float | None = None,
) -> FinishResult:
    """Finish every student in float64, in place (``ens`` must be float64).

    Parameters
    ----------
    ens : the students, updated in place.
    x, y : ``[P, d_in]``, ``[P, d_out]`` queries (converted to the ensemble's dtype).
    method : "auto" (:func:`choose_finish`), "lm", "lbfgs" or "lbfgs-fixed" (L-BFGS for exactly
        ``lbfgs_iterations``, no stop rule).
    lbfgs_iterations, lm_iterations : budgets of the two methods (iterations per student).
    lm_max_params : "auto"'s crossover (parameters per student times d_out).
    target : relative MSE at which a student stops. var_y : the relative-MSE denominator.
    stall_decades : the L-BFGS stall rule's least gain over :data:`LBFGS_WINDOW` iterations
        (None: :data:`LBFGS_MIN_DECADES`).

    Returns
    -------
    FinishResult

    Raises
    ------
    ValueError
        On an unknown method.
    """
    chosen = choose_finish(method, ens.widths, lm_max_params)
    stall = LBFGS_MIN_DECADES if stall_decades is None else stall_decades
    torch_path = ops.uses_torch_path(ens.widths, ens.device)
    with ops.threads(torch_threads=None if (torch_path or chosen == "lm") else 1):
        xs = x.to(dtype=ens.dtype, device=ens.device).contiguous()
        ys = y.to(dtype=ens.dtype, device=ens.device).contiguous()
        run = _Run(ens, var_y, target, progress)
        if chosen in ("lm", "lm+lbfgs"):
            _levenberg_marquardt(run, xs, ys, lm_iterations)
        if chosen == "lm+lbfgs":
            run.restart(run.mse / var_y > LM_SWITCH)
        if chosen != "lm":
            _lbfgs(run, xs, ys, lbfgs_iterations, chosen == "lbfgs-fixed", target, stall)
        return run.result(chosen)


def stalled(log_rel: list[np.ndarray], window: int, min_decades: float) -> np.ndarray:
    """The stall rule: per student, True when the decades of relative MSE it gained over the last
    ``window`` checks (``log_rel``: one ``[n]`` array of log10 relative MSE per check, latest
    last) are fewer than ``min_decades``. False while fewer than ``window + 1`` checks exist."""
    if len(log_rel) <= window:
        return np.zeros(len(log_rel[-1]) if log_rel else 0, dtype=bool)
    return log_rel[-window - 1] - log_rel[-1] < min_decades


class _Run:
    """Book-keeping shared by the two methods: which students are active, their results and
    the history, and the write-back into the full ensemble."""

    def __init__(self, ens: StudentEnsemble, var_y: float, target: float, progress: bool):
        self.ens, self.var_y, self.target = ens, var_y, target
        n = ens.n_students
        self.active = np.arange(n)
        self.mse = np.full(n, np.inf)
        self.iterations = np.zeros(n, dtype=np.int64)
        self.base = np.zeros(n, dtype=np.int64)  # iterations of earlier phases
        self.reason = ["budget"] * n
        self.history: dict = {"seconds": [], "iteration": [], "relative_mse": []}
        self.t0 = time.perf_counter()
        self.progress = progress
        self.sync_every = 16 if ens.device.type == "cuda" else 1

    def record(self, it: int, loss: torch.Tensor) -> np.ndarray:
        """Store the active students' MSE at iteration ``it``; returns their relative MSE."""
        host = loss.detach().to(torch.float64).cpu().numpy()
        self.mse[self.active] = host
        self.iterations[self.active] = self.base[self.active] + it
        self.history["seconds"].append(time.perf_counter() - self.t0)
        self.history["iteration"].append(it)
        self.history["relative_mse"].append((self.mse / self.var_y).tolist())
        return host / self.var_y

    def restart(self, which) -> None:
        """A next phase for the students in ``which`` (a mask over all students)."""
        self.active = np.flatnonzero(np.asarray(which, dtype=bool))
        self.base = self.iterations.copy()
        for i in self.active:
            self.reason[i] = "budget"

    def write_back(self, batch: StudentEnsemble, flat: torch.Tensor) -> None:
        """Put the flat parameters ``flat`` ``[n_active, n_params]`` into ``batch`` (the active
        students) and ``batch`` into the full ensemble."""
        _unflat_into(flat, batch.params())
        idx = torch.as_tensor(self.active, device=self.ens.device)
        for full, part in zip(self.ens.params(), batch.params()):
            full.index_copy_(0, idx, part)

    def leave(self, batch, flat, keep: np.ndarray, reasons: dict[int, str]):
        """The students not in ``keep`` leave the batch with their ``reasons``: the batch is
        written back (:meth:`write_back`); returns the positions kept (a device index tensor to
        compact the batch's state with), or None when no student is left."""
        self.write_back(batch, flat)
        for j, r in reasons.items():
            self.reason[self.active[j]] = r
        self.active = self.active[keep]
        if not keep.any():
            return None
        return torch.as_tensor(np.flatnonzero(keep), device=batch.device)

    def result(self, method: str) -> FinishResult:
        return FinishResult(
            method,
            self.mse.copy(),
            self.iterations.copy(),
            list(self.reason),
            self.history,
            time.perf_counter() - self.t0,
        )


def _flat(tensors: list[torch.Tensor], n: int) -> torch.Tensor:
    return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)


def _unflat_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    o = 0
    for t in tensors:
        k = t[0].numel()
        t.copy_(flat[:, o : o + k].reshape(t.shape))
        o += k


def _stop_checks(rel: np.ndarray, logs: list, window: int, target: float, min_decades: float):
    """Apply the stop rule to the active students (``rel`` their relative MSE); returns the
    keep mask and ``{position: reason}`` of the students that stop."""
    keep = np.ones(len(rel), dtype=bool)
    reasons = {}
    at_target = rel <= target
    stall = stalled(logs, window, min_decades)
    for j in np.flatnonzero(at_target | stall):
        reasons[int(j)] = "target" if at_target[j] else "stalled"
        keep[j] = False
    return keep, reasons


#: "lm+lbfgs": students that Levenberg-Marquardt leaves above this relative MSE continue with
#: L-BFGS (far from a solution L-BFGS makes more progress per unit of time).
LM_SWITCH = 1e-10
#: L-BFGS stall rule: a student stalls when it gained fewer than LBFGS_MIN_DECADES decades of
#: relative MSE over the last LBFGS_WINDOW iterations (L-BFGS progress comes in bursts, so no
#: projection to the target).
LBFGS_WINDOW = 200
LBFGS_MIN_DECADES = 0.1


def _lbfgs(run: _Run, xs, ys, iterations: int, fixed: bool, target, stall_decades, history_size=20):
    """Batched L-BFGS (one fused loss-and-gradient call per iteration for the active students,
    each with its own curvature pairs and step length; Armijo backtracking per student: a
    rejected student halves its step and retries the same direction at the next iteration).
    A student stops at relative MSE ``target`` or when it stalls (unless ``fixed``)."""
    if not len(run.active):
        return
    act = run.ens.activation
    cur = run.ens.select(run.active)  # the batch: a copy, written back as students leave
    n = cur.n_students
    params = cur.params()
    p = _flat(params, n)

    def evaluate(flat: torch.Tensor):
        _unflat_into(flat, params)
        loss, gw, gb = ops.mlp_mse_grad(cur.weights, cur.biases, xs, ys, act, check_finite=False)
        return loss.clone(), _flat(gw + gb, flat.shape[0])

    loss, g = evaluate(p)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []  # per pair: which students have it
    dev, dtype = p.device, p.dtype
    t = torch.ones(n, dtype=dtype, device=dev)
    first = torch.ones(n, dtype=torch.bool, device=dev)
    logs: list[np.ndarray] = []
    rel = run.record(0, loss)
    logs.append(np.log10(np.maximum(rel, 1e-300)))
    bar = tqdm(total=iterations, desc="L-BFGS finish", disable=not run.progress, leave=False)
    for it in range(1, iterations + 1):
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
        # Not a descent direction: restart from steepest descent (elementwise, no sync).
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
        stuck = t < 1e-12  # the step vanished: restart from steepest descent
        t = torch.where(stuck, torch.ones_like(t), t)
        first = first | stuck
        valid = [v & ~stuck for v in valid]
        bar.update(1)
        if it % run.sync_every and it != iterations:
            continue
        rel = run.record(it, loss)
        logs.append(np.log10(np.maximum(rel, 1e-300)))
        if fixed:
            continue
        window = max(1, LBFGS_WINDOW // run.sync_every)
        keep, reasons = _stop_checks(rel, logs, window, target, stall_decades)
        if keep.all():
            continue
        k = run.leave(cur, p, keep, reasons)
        if k is None:
            break
        cur = cur.select(k)  # compact the batch and its state
        params = cur.params()
        n = cur.n_students
        p, g, loss, t, first = (v.index_select(0, k) for v in (p, g, loss, t, first))
        s_hist = [v.index_select(0, k) for v in s_hist]
        y_hist = [v.index_select(0, k) for v in y_hist]
        rho_hist = [v.index_select(0, k) for v in rho_hist]
        valid = [v.index_select(0, k) for v in valid]
        logs = [v[keep] for v in logs]
    bar.close()
    if len(run.active):
        run.write_back(cur, p)


#: Levenberg-Marquardt stall rule: a student stalls when it gained fewer than LM_MIN_DECADES
#: decades of relative MSE over the last LM_WINDOW iterations.
LM_WINDOW = 10
LM_MIN_DECADES = 0.5
#: A student whose damping passes this stops as stalled (no step lowers its loss).
LM_MAX_DAMPING = 1e10


def normal_equations(
    ens: StudentEnsemble, x: torch.Tensor, y: torch.Tensor, block_bytes: int = JACOBIAN_BLOCK_BYTES
):
    """Gauss-Newton normal equations of every student's residuals ``r = f_n(x) - y``.

    The Jacobian ``J_n`` ``[P * d_out, n_params]`` (parameters in the order of
    :meth:`StudentEnsemble.params`, each flattened) is formed in blocks of queries of at most
    ``block_bytes`` and accumulated, so memory stays bounded.

    Returns
    -------
    (JtJ ``[N, n_params, n_params]``, Jtr ``[N, n_params]``, sse ``[N]``), the ensemble's dtype.
    """
    act = get_activation(ens.activation)
    ws, bs = ens.weights, ens.biases
    n, dtype, dev = ens.n_students, ens.dtype, ens.device
    widths = ens.widths
    d_out, n_layers = widths[-1], len(ws)
    sizes_w = [w[0].numel() for w in ws]
    off_w = np.concatenate([[0], np.cumsum(sizes_w)])[:-1]
    off_b = sum(sizes_w) + np.concatenate([[0], np.cumsum(widths[1:])])[:-1]
    k = n_params(widths)
    jtj = torch.zeros(n, k, k, dtype=dtype, device=dev)
    jtr = torch.zeros(n, k, dtype=dtype, device=dev)
    sse = torch.zeros(n, dtype=dtype, device=dev)
    rows = max(1, block_bytes // (8 * n * d_out * k))
    eye = torch.eye(d_out, dtype=dtype, device=dev)
    for s in range(0, x.shape[0], rows):
        xb, yb = x[s : s + rows], y[s : s + rows]
        b = xb.shape[0]
        hs, dfs = [xb.expand(n, b, xb.shape[1])], []
        for l in range(n_layers - 1):
            z = torch.baddbmm(bs[l][:, None, :], hs[-1], ws[l].transpose(1, 2))
            h = act.fn(z)
            dfs.append(act.derivative(z, h))
            hs.append(h)
        out = torch.baddbmm(bs[-1][:, None, :], hs[-1], ws[-1].transpose(1, 2))
        r = out - yb
        sse += (r * r).sum((1, 2))
        jac = torch.empty(n, b, d_out, k, dtype=dtype, device=dev)
        # d out_k / d W_out[k', j] = delta_kk' h_j; d out_k / d b_out[k'] = delta_kk'.
        top = n_layers - 1
        w_top = eye[None, None, :, :, None] * hs[top][:, :, None, None, :]
        jac[..., off_w[top] : off_w[top] + sizes_w[top]] = w_top.reshape(n, b, d_out, -1)
        jac[..., off_b[top] : off_b[top] + d_out] = eye
        delta = None  # d out / d z_l, [N, B, d_out, width_l]
        for l in range(top - 1, -1, -1):
            upper = ws[l + 1][:, None, :, :]  # [N, 1, out_{l+1}, width_l]
            if delta is None:
                delta = upper * dfs[l][:, :, None, :]
            else:
                delta = torch.matmul(delta, upper) * dfs[l][:, :, None, :]
            j_w = delta[..., :, None] * hs[l][:, :, None, None, :]
            jac[..., off_w[l] : off_w[l] + sizes_w[l]] = j_w.reshape(n, b, d_out, -1)
            jac[..., off_b[l] : off_b[l] + widths[l + 1]] = delta
        jac = jac.reshape(n, b * d_out, k)
        jtj.baddbmm_(jac.transpose(1, 2), jac)
        jtr += torch.bmm(jac.transpose(1, 2), r.reshape(n, b * d_out, 1))[..., 0]
    return jtj, jtr, sse


def _forward_sse(ens: StudentEnsemble, xs, ys) -> torch.Tensor:
    out = ops.mlp_forward(ens.weights, ens.biases, xs, ens.activation, check_finite=False)
    return ((out - ys) ** 2).sum((1, 2))


def _levenberg_marquardt(run: _Run, xs, ys, iterations: int) -> None:
    """Batched Levenberg-Marquardt: per student ``(J^T J + lam D) step = -J^T r`` with
    Marquardt's scaling ``D = diag(J^T J)`` (floored), solved by Cholesky; a step that lowers
    the student's loss is taken and its damping divided by 3, else the damping is multiplied by
    4 and the same normal equations are solved again at the next iteration (not recomputed)."""
    if not len(run.active):
        return
    cur = run.ens.select(run.active)  # the batch: a copy, written back as students leave
    n = cur.n_students
    dev, dtype = cur.device, cur.dtype
    count = ys.numel()
    params = cur.params()
    theta = _flat(params, n)
    lam = torch.full((n,), 1e-3, dtype=dtype, device=dev)
    jtj, jtr, sse = normal_equations(cur, xs, ys)
    rel = run.record(0, sse / count)
    logs = [np.log10(np.maximum(rel, 1e-300))]
    keep, reasons = _stop_checks(rel, logs, LM_WINDOW, run.target, LM_MIN_DECADES)
    bar = tqdm(total=iterations, desc="Levenberg-Marquardt", disable=not run.progress, leave=False)
    it = 0
    while True:
        if not keep.all():
            k = run.leave(cur, theta, keep, reasons)
            if k is None:
                break
            cur = cur.select(k)  # compact the batch and its state
            params = cur.params()
            theta, lam, jtj, jtr, sse = (v.index_select(0, k) for v in (theta, lam, jtj, jtr, sse))
            logs = [v[keep] for v in logs]
        if it == iterations:
            break
        it += 1
        diag = jtj.diagonal(dim1=1, dim2=2)
        floor = diag.amax(1, keepdim=True).clamp_min(1e-300) * 1e-12
        a = jtj + torch.diag_embed(lam[:, None] * torch.maximum(diag, floor))
        chol, info = torch.linalg.cholesky_ex(a)
        step = -torch.cholesky_solve(jtr[..., None], chol)[..., 0]
        solved = (info == 0) & torch.isfinite(step).all(1)
        step = torch.where(solved[:, None], step, torch.zeros_like(step))
        trial = theta + step
        _unflat_into(trial, params)
        sse_new = _forward_sse(cur, xs, ys)
        better = solved & torch.isfinite(sse_new) & (sse_new < sse)
        theta = torch.where(better[:, None], trial, theta)
        lam = torch.where(better, (lam / 3.0).clamp_min(1e-15), lam * 4.0)
        _unflat_into(theta, params)
        sse = torch.where(better, sse_new, sse)
        if bool(better.any()):  # new normal equations for the students that moved
            idx = torch.nonzero(better)[:, 0]
            jtj_new, jtr_new, _ = normal_equations(cur.select(idx), xs, ys)
            jtj.index_copy_(0, idx, jtj_new)
            jtr.index_copy_(0, idx, jtr_new)
        bar.update(1)
        rel = run.record(it, sse / count)
        logs.append(np.log10(np.maximum(rel, 1e-300)))
        keep, reasons = _stop_checks(rel, logs, LM_WINDOW, run.target, LM_MIN_DECADES)
        damped_out = (lam > LM_MAX_DAMPING).cpu().numpy()
        for j in np.flatnonzero(damped_out & keep):
            keep[j] = False
            reasons[int(j)] = "stalled"
    bar.close()
    if len(run.active):
        run.write_back(cur, theta)
