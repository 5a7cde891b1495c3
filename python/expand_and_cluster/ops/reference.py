"""Pure-torch (and scipy) twins of the ops: readable specifications, and what the tests compare
the kernels against. ``<op>_reference`` takes the arguments of ``<op>``."""

from __future__ import annotations

import numpy as np
import torch

from ..activations import get_activation
from .optim import PlateauState, check_plateau_args


def mlp_forward_reference(weights, biases, x, activation) -> torch.Tensor:
    """Twin of :func:`~expand_and_cluster.ops.mlp_forward` (one batched matmul per layer)."""
    act = get_activation(activation)
    h = x.unsqueeze(0).expand(weights[0].shape[0], *x.shape)
    for l, (w, b) in enumerate(zip(weights, biases)):
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if l < len(weights) - 1:
            h = act.fn(h)
    return h


def mlp_mse_grad_reference(weights, biases, x, y, activation):
    """Twin of :func:`~expand_and_cluster.ops.mlp_mse_grad` through torch.autograd."""
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    bs = [b.detach().clone().requires_grad_(True) for b in biases]
    out = mlp_forward_reference(ws, bs, x, activation)
    loss = ((out - y.unsqueeze(0)) ** 2).mean(dim=(1, 2))
    grads = torch.autograd.grad(loss.sum(), ws + bs)
    return loss.detach(), list(grads[: len(ws)]), list(grads[len(ws) :])


def adam_step_reference(
    params, grads, exp_avg, exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8
) -> None:
    """Twin of :func:`~expand_and_cluster.ops.adam_step` (in place)."""
    n = lr.shape[0]
    if not isinstance(step, torch.Tensor):
        step = torch.full((n,), int(step), dtype=torch.int64, device=lr.device)
    t = step.to(lr.dtype)
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        shape = (n,) + (1,) * (p.dim() - 1)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt() / bc2.sqrt().view(shape) + eps
        p.sub_((lr / bc1).view(shape) * m / denom)


def plateau_step_reference(
    state: PlateauState,
    loss: torch.Tensor,
    epoch: int,
    step_lr: torch.Tensor,
    *,
    var_y: float,
    patience: int,
    cooldown: int,
    factor: float,
    target: float,
    min_lr: float,
) -> None:
    """Twin of :func:`~expand_and_cluster.ops.plateau_step` (elementwise ops, same order, in
    place)."""
    check_plateau_args(state, loss, step_lr, var_y, patience, cooldown, factor)
    s, live = state, state.live
    s.diverged.copy_(
        torch.where(live & ~torch.isfinite(loss) & (s.diverged == 0), epoch, s.diverged)
    )
    s.rel.copy_(torch.where(live, loss / var_y, s.rel))
    s.epochs.copy_(torch.where(live, epoch, s.epochs))
    better = loss < s.best
    best = torch.where(better, loss, s.best)
    bad = torch.where(better, 0, s.bad + 1)
    cooling = s.cool > 0
    cool = torch.where(cooling, s.cool - 1, 0)
    bad = torch.where(cooling, 0, bad)
    reduce = bad > patience
    lr = torch.where(reduce, s.lr * factor, s.lr)
    cool = torch.where(reduce, cooldown, cool)
    bad = torch.where(reduce, 0, bad)
    for f, new in (("best", best), ("bad", bad), ("cool", cool), ("lr", lr)):
        getattr(s, f).copy_(torch.where(live, new, getattr(s, f)))
    hit = live & (s.rel <= target)
    low = live & (s.lr < min_lr)
    s.code.copy_(torch.where(hit, 1, torch.where(low, 2, s.code)))
    stopped = hit | low
    step_lr.copy_(torch.where(live, torch.where(stopped, 0.0, s.lr), step_lr))
    live &= ~stopped


def cosine_distances_reference(v: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Twin of :func:`~expand_and_cluster.ops.cosine_distances`."""
    u = v.to(torch.float64)
    norms = u.norm(dim=1, keepdim=True)
    u = torch.where(norms > 0, u / norms.clamp_min(1e-300), torch.zeros_like(u))
    c = u @ u.T
    d = 1.0 - (c.abs() if absolute else c)
    d.fill_diagonal_(0.0)
    return d.clamp_min_(0.0)


def average_linkage_reference(dist) -> np.ndarray:
    """SciPy twin of :func:`~expand_and_cluster.ops.average_linkage`."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(dist, dtype=np.float64)
    return linkage(squareform(d, checks=False), method="average")
