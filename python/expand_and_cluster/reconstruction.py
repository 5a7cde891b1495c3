"""Reconstruction of one network from the clustered students, and its fine-tuning.

Source: Martinelli et al. 2024, Sec. 3 step 3 ("reconstruct and fine-tune"): the collapsed hidden
layer, the output layer, the output-bias alignment, a least-squares linear term for the
even_linear symmetry classes, then fine-tuning of all weights on the queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .activations import get_activation
from .network import Network


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
    cols = [features, np.ones((features.shape[0], 1))]
    if linear_term:
        cols.append(x)
    a = np.concatenate(cols, axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
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
    with torch.no_grad():
        after = float(mse())
    out = model.to_network()
    return FinetuneResult(out, before, after, int(state.get("n_iter", 0)), time.perf_counter() - t0)


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
