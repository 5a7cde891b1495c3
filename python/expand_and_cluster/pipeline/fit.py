"""Fitting one network (float64): hidden features, the least-squares output layer (and linear
skip term), the fine-tune of every weight (L-BFGS, then Levenberg-Marquardt), and the
orientation of an even_linear layer that leaves no linear term. Used by the reconstruction, the
layer-wise refinement of deep recoveries and the width repair.

Source: Martinelli et al. 2024, Sec. 3 step 3 ("reconstruct and fine-tune"): the collapsed hidden
layer, the output layer, the output-bias alignment, a least-squares linear term for the
even_linear symmetry classes, then fine-tuning of all weights on the queries.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..activations import get_activation
from ..metrics import relative_mse
from ..network import Network


class RecoveredMLP(torch.nn.Module):
    """A one-network MLP with an optional linear skip term, for fine-tuning in float64.

    ``f(x) = W_L s(... s(W_0 x + b_0) ...) + b_L [+ linear_weight x]``
    """

    def __init__(self, net: Network, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.activation = get_activation(net.activation)
        self.weights = torch.nn.ParameterList(
            [
                torch.nn.Parameter(torch.as_tensor(w, dtype=dtype).contiguous().clone())
                for w in net.weights
            ]
        )
        self.biases = torch.nn.ParameterList(
            [
                torch.nn.Parameter(torch.as_tensor(b, dtype=dtype).contiguous().clone())
                for b in net.biases
            ]
        )
        self.linear_weight = (
            torch.nn.Parameter(torch.as_tensor(net.linear_weight, dtype=dtype).contiguous().clone())
            if net.linear_weight is not None
            else None
        )
        # The skip term's constant is folded into the output bias (they are redundant).
        self._linear_bias0 = None if net.linear_bias is None else np.asarray(net.linear_bias)
        self.input_mask = net.input_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        n = len(self.weights)
        for l in range(n):
            h = torch.nn.functional.linear(h, self.weights[l], self.biases[l])
            if l < n - 1:
                h = self.activation.fn(h)
        if self.linear_weight is not None:
            h = h + x @ self.linear_weight.T
        return h

    def to_network(self) -> Network:
        lw = None if self.linear_weight is None else self.linear_weight.detach().cpu().numpy()
        lb = None
        biases = [b.detach().cpu().numpy().astype(np.float64) for b in self.biases]
        if lw is not None:
            lb = np.zeros(lw.shape[0])
        return Network(
            [w.detach().cpu().numpy().astype(np.float64) for w in self.weights],
            biases,
            self.activation.name,
            lw,
            lb,
            self.input_mask,
        )


def hidden_features(x: np.ndarray, incoming: np.ndarray, activation: str) -> np.ndarray:
    """``[P, k]`` activations of neurons with incoming vectors ``[k, d_in + 1]`` ([w; b])."""
    act = get_activation(activation)
    xt = torch.as_tensor(x, dtype=torch.float64)
    w = torch.as_tensor(incoming[:, :-1], dtype=torch.float64)
    b = torch.as_tensor(incoming[:, -1], dtype=torch.float64)
    with torch.no_grad():
        return act.fn(xt @ w.T + b).numpy()


def layer_features(incoming: list[np.ndarray], x: np.ndarray, activation: str) -> list[np.ndarray]:
    """Activations of a stack of hidden layers: entry l is ``[P, k_l]``, the output of layer l
    (incoming vectors ``incoming[l]``, ``[k_l, k_{l-1} + 1]``) fed by the layers below it and the
    queries ``x`` ``[P, d_in]``; float64. Empty for an empty stack."""
    feats, h = [], x
    for inc in incoming:
        h = hidden_features(h, inc, activation)
        feats.append(h)
    return feats


def output_design(features: np.ndarray, x: np.ndarray, linear_term: bool) -> np.ndarray:
    """``[P, k + 1 (+ d_in)]`` float64 design of the least-squares output layer: the hidden
    features ``[P, k]``, a column of ones (the output bias) and, with ``linear_term``, the inputs
    ``x`` ``[P, d_in]`` (the even_linear classes' skip term)."""
    cols = [features, np.ones((features.shape[0], 1))]
    if linear_term:
        cols.append(x)
    return np.concatenate(cols, axis=1)


def fit_output_layer(
    features: np.ndarray, x: np.ndarray, y: np.ndarray, linear_term: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Least-squares output layer ``y ~ features W^T + b [+ x Theta^T]`` (float64).

    Given the hidden layer, this is the exact minimiser of the MSE over the output weights, the
    output bias (the bias alignment of Sec. 3 step 3) and, for the even_linear classes, the linear
    skip term (whose least-squares fit the paper prescribes).

    Returns
    -------
    (W ``[d_out, k]``, b ``[d_out]``, Theta ``[d_out, d_in]`` or None)
    """
    coef, *_ = np.linalg.lstsq(output_design(features, x, linear_term), y, rcond=None)
    k = features.shape[1]
    w = coef[:k].T
    b = coef[k]
    theta = coef[k + 1 :].T if linear_term else None
    return w, b, theta


@dataclass
class FinetuneResult:
    network: Network
    mse_before: float
    mse_after: float
    iterations: int
    seconds: float


def finetune(
    net: Network,
    x: np.ndarray,
    y: np.ndarray,
    max_iterations: int = 2000,
    adam_steps: int = 0,
    adam_lr: float = 1e-4,
    progress: bool = False,
    lm_iterations: int = 50,
    lm_max_jacobian_entries: float = 2e7,
) -> FinetuneResult:
    """Fine-tune every weight of ``net`` on the queries, in float64.

    Optionally ``adam_steps`` of full-batch Adam (the reference uses Adam, lr 1e-4, 1e-3 with the
    linear term), then L-BFGS with a strong-Wolfe line search (torch.optim.LBFGS) until the
    gradient or the change of loss vanishes, which brings a correctly reconstructed network to
    machine precision.

    Parameters
    ----------
    net : start point (with or without a linear skip term).
    x, y : ``[P, d_in]``, ``[P, d_out]`` float64 queries.

    Returns
    -------
    FinetuneResult
    """
    t0 = time.perf_counter()
    model = RecoveredMLP(net)
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)

    def mse() -> torch.Tensor:
        return ((model(xt) - yt) ** 2).mean()

    with torch.no_grad():
        before = float(mse())
    if adam_steps > 0:
        opt = torch.optim.Adam(model.parameters(), lr=adam_lr)
        for _ in range(adam_steps):
            opt.zero_grad()
            loss = mse()
            loss.backward()
            opt.step()
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iterations,
        max_eval=int(max_iterations * 1.25),
        tolerance_grad=1e-15,
        tolerance_change=1e-30,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = mse()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    n_params = sum(p.numel() for p in model.parameters())
    if lm_iterations > 0 and n_params * yt.numel() <= lm_max_jacobian_entries:
        levenberg_marquardt(model, xt, yt, lm_iterations)
    with torch.no_grad():
        after = float(mse())
    out = model.to_network()
    return FinetuneResult(out, before, after, int(state.get("n_iter", 0)), time.perf_counter() - t0)


def levenberg_marquardt(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int
) -> float:
    """Levenberg-Marquardt on the MSE of ``model`` (in place, float64), Marquardt's diagonal
    scaling, damping x 1/3 on success and x 3 on failure; stops early when a step no longer
    lowers the loss at the 1e-15 relative level. The Jacobian ``[P * d_out, n_params]`` is formed
    with forward-mode autodiff (torch.func.jacfwd). More, "The Levenberg-Marquardt algorithm",
    Lecture Notes in Mathematics 630 (1978).

    Returns
    -------
    float
        The final MSE.
    """
    from torch.func import functional_call, jacfwd

    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def unflatten(theta):
        return {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}

    def residual(theta):
        return (functional_call(model, unflatten(theta), (x,)) - y).reshape(-1)

    theta = torch.cat([p.reshape(-1) for p in params])
    with torch.no_grad():
        r = residual(theta)
    loss = float(r @ r)
    lam = 1e-3
    for _ in range(iterations):
        with warnings.catch_warnings():
            # torch's forward-mode AD loads its jvp decompositions through torch.jit.script, which
            # torch itself deprecates (torch 2.13): nothing for us to act on.
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.script.*", category=DeprecationWarning
            )
            jac = jacfwd(residual)(theta)
        g = jac.T @ r
        h = jac.T @ jac
        diag = h.diagonal().clamp_min(1e-30)
        improved = False
        for _ in range(10):
            a = h + lam * torch.diag(diag)
            try:
                step = torch.linalg.solve(a, -g)
            except RuntimeError:  # singular even with damping: damp more
                lam *= 3.0
                continue
            with torch.no_grad():
                r_new = residual(theta + step)
            new_loss = float(r_new @ r_new)
            if np.isfinite(new_loss) and new_loss < loss:
                rel = (loss - new_loss) / max(loss, 1e-300)
                theta, r, loss = theta + step, r_new, new_loss
                lam = max(lam / 3.0, 1e-12)
                improved = rel > 1e-15
                break
            lam *= 3.0
        if not improved:
            break
    with torch.no_grad():
        for p, t in zip(model.parameters(), torch.split(theta, sizes)):
            p.copy_(t.view(p.shape))
    return loss / y.numel()


def reconstruct_one_hidden_layer(
    incoming: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    activation: str,
    input_mask: np.ndarray | None = None,
) -> Network:
    """The network before fine-tuning: the collapsed hidden layer ``incoming`` ([k, d_in + 1]),
    the least-squares output layer, and the least-squares linear skip term when the activation's
    symmetry class leaves one (even_linear classes; see :func:`fit_output_layer`)."""
    act = get_activation(activation)
    feats = hidden_features(x, incoming, activation)
    linear = act.symmetry.has_linear_term
    w, b, theta = fit_output_layer(feats, x, y, linear)
    return Network(
        [incoming[:, :-1].copy(), w],
        [incoming[:, -1].copy(), b],
        act.name,
        theta,
        None if theta is None else np.zeros(w.shape[0]),
        input_mask,
    )


@dataclass
class SignResolution:
    """Orientation of a layer of an even_linear network chosen so that no linear term is left.

    Attributes
    ----------
    flipped : ``[k]`` bool, neurons of the layer below whose incoming vector is negated.
    residual : ``||S'|| / ||[W, S]||`` (Frobenius) of the skip part left after the flips; ~0 when
        the canonical orientation differs from a skip-free one only by the flips found.
    transform : ``[k + 1, k + q + 1]``, maps a vector ``[W; S; b]`` over ``[h; p; 1]`` (canonical
        layer below h, its input p) to ``[W; b']`` over ``[h'; 1]`` (flipped layer below h').
    """

    flipped: np.ndarray
    residual: float
    transform: np.ndarray

    def to_json(self) -> dict:
        return {"flipped": np.flatnonzero(self.flipped).tolist(), "residual": self.residual}


def resolve_linear_signs(
    upper: np.ndarray, below: np.ndarray, coefficient: float
) -> SignResolution:
    """Orient the neurons of a layer of an even_linear network so that the layer above needs no
    linear skip term.

    Identity: for the even_linear classes ``s(z) - s(-z) = c z`` (c = ``coefficient``: 1 for
    softplus, gelu, silu, relu; 1 + alpha for leaky_relu). Clustering gives the neurons of a layer
    only up to sign (``below`` ``[k, q + 1]``, vectors ``v_j`` over that layer's input ``[p; 1]``,
    canonical orientation). A skip-free teacher seen in that orientation has, in the layer above,
    incoming vectors ``[W; S; b]`` over ``[h; p; 1]`` (``upper`` ``[m, k + q + 1]``) whose skip
    part is ``S = -c sum_j d_j W[:, j] w_j^T`` with ``d_j = 1`` for the neurons the canonical
    form flipped relative to the teacher. ``d`` is found by least squares on that linear system
    (``m q`` equations, ``k`` unknowns) and rounded to {0, 1}; flipping those neurons
    (``v_j -> -v_j``, ``h'_j = s(-z_j) = h_j - c z_j``) turns the layer above into
    ``S' = S + c sum_{j in d} W[:, j] w_j^T`` (about 0, dropped) and
    ``b' = b + c sum_{j in d} W[:, j] b_j``, with ``W`` unchanged.

    Parameters
    ----------
    upper : ``[m, k + q + 1]`` float64, the layer above over ``[h; p; 1]``.
    below : ``[k, q + 1]`` float64, the layer's canonical incoming vectors over ``[p; 1]``.
    coefficient : c of the identity.

    Returns
    -------
    SignResolution

    Raises
    ------
    ValueError
        On inconsistent shapes.
    """
    upper = np.asarray(upper, dtype=np.float64)
    below = np.asarray(below, dtype=np.float64)
    k, q1 = below.shape
    q = q1 - 1
    if upper.ndim != 2 or upper.shape[1] != k + q + 1:
        raise ValueError(f"upper: expected [m, {k + q + 1}] (k + q + 1), got {upper.shape}")
    m = upper.shape[0]
    w, s = upper[:, :k], upper[:, k : k + q]
    a = (-coefficient * w[:, None, :] * below[None, :, :q].transpose(0, 2, 1)).reshape(m * q, k)
    d_ls = np.linalg.lstsq(a, s.reshape(-1), rcond=None)[0] if q > 0 else np.zeros(k)
    flipped = d_ls > 0.5
    t = np.eye(k + q + 1)
    t[k : k + q, :k] += coefficient * (below[:, :q] * flipped[:, None]).T
    t[k + q, :k] += coefficient * below[:, q] * flipped
    keep = np.r_[np.arange(k), k + q]
    new = upper @ t.T
    denom = float(np.linalg.norm(upper[:, : k + q]))
    residual = float(np.linalg.norm(new[:, k : k + q]) / denom) if denom > 0 else 0.0
    return SignResolution(flipped, residual, t[keep])


def orient_layer(
    upper: np.ndarray, below: np.ndarray, coefficient: float
) -> tuple[np.ndarray, SignResolution]:
    """``below`` (``[k, q + 1]``) with the neurons flipped that :func:`resolve_linear_signs` finds
    from the layer above (``upper`` ``[m, k + q + 1]``), and that resolution."""
    res = resolve_linear_signs(upper, below, coefficient)
    return below * np.where(res.flipped, -1.0, 1.0)[:, None], res


def finetuned(net: Network, x, y, iterations: int, lm: bool = False) -> Network:
    """``net`` fine-tuned by :func:`finetune` for ``iterations`` L-BFGS iterations (then
    Levenberg-Marquardt when ``lm``), its ``input_mask`` kept; ``net`` itself when
    ``iterations`` <= 0."""
    if iterations <= 0:
        return net
    out = finetune(net, x, y, max_iterations=iterations, lm_iterations=50 if lm else 0).network
    out.input_mask = net.input_mask
    return out


def trial_fit(net: Network, x, y, iterations: int, lm: bool) -> tuple[float, Network]:
    """(relative MSE on ``(x, y)``, network) of ``net`` :func:`finetuned`; the relative MSE is
    inf when it is not finite."""
    out = finetuned(net, x, y, iterations, lm=lm)
    rel = relative_mse(out.forward(x), y)
    return (rel if np.isfinite(rel) else np.inf), out
