"""The ensemble's fused forward pass and its fused forward + MSE + backward pass, and
:class:`FusedTrainStep` (gradients and Adam in one call).

Small layers run in the compiled kernels; above :data:`TORCH_PATH_MIN_LAYER_SIZE` weights per
layer (CPU) or :data:`CUDA_TORCH_PATH_MIN_LAYER_SIZE` (CUDA) the same ops run as batched matrix
products in torch ("the torch path"), which the vendor BLAS does faster at those sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..activations import Activation, get_activation
from ._checks import (
    DTYPE_CODES,
    check_ensemble,
    check_inputs,
    check_tensor,
    device_code,
    lib,
    outputs_like,
    stream,
    workspace,
)
from .optim import check_adam_args

#: CPU: from this many weights in one student's layer (in * out) on, the ops take the torch
#: path. Below it one student's weights stay in cache across the batch tiles and the fused
#: kernel wins; above it the BLAS products win (benchmarks/RESULTS.md, training step).
TORCH_PATH_MIN_LAYER_SIZE = 16384 + 1
#: CUDA: the same switch. Above it the fused kernel's per-block gradient sums no longer fit in
#: shared memory and cuBLAS wins (benchmarks/RESULTS.md, GPU).
CUDA_TORCH_PATH_MIN_LAYER_SIZE = 32768 + 1


def uses_torch_path(widths: Sequence[int], device: str | torch.device = "cpu") -> bool:
    """True when :func:`mlp_mse_grad` / :func:`mlp_forward` run the torch path for an ensemble of
    these widths (``[d_in, hidden..., d_out]``) on ``device``."""
    largest = max(a * b for a, b in zip(widths[:-1], widths[1:]))
    if torch.device(device).type == "cuda":
        return largest >= CUDA_TORCH_PATH_MIN_LAYER_SIZE
    return largest >= TORCH_PATH_MIN_LAYER_SIZE


def _forward_torch(weights, biases, x, act: Activation):
    """Pre-activations ``zs`` and activations ``hs`` (hs[0] = x) with batched matmuls."""
    zs, hs = [], [x]
    h = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        if l == 0:  # x is shared by all students: one [B, d_in] x [N, d_in, out] product
            z = torch.matmul(x, w.transpose(1, 2)) + b[:, None, :]
        else:
            z = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        zs.append(z)
        if l < len(weights) - 1:
            h = act.fn(z)
            hs.append(h)
    return zs, hs


def _mlp_mse_grad_torch(weights, biases, x, y, act: Activation, gw, gb, loss) -> None:
    """The torch path of :func:`mlp_mse_grad`: explicit backward pass with batched matmuls and
    the activation's closed-form derivative (no autograd graph), into ``gw``, ``gb``, ``loss``."""
    with torch.no_grad():
        zs, hs = _forward_torch(weights, biases, x, act)
        r = zs[-1] - y
        scale = 2.0 / (x.shape[0] * y.shape[1])
        torch.sum(r * r, dim=(1, 2), out=loss).mul_(0.5 * scale)
        d = r.mul_(scale)
        for l in range(len(weights) - 1, -1, -1):
            torch.matmul(d.transpose(1, 2), hs[l], out=gw[l])
            torch.sum(d, dim=1, out=gb[l])
            if l > 0:
                d = torch.bmm(d, weights[l]).mul_(act.derivative(zs[l - 1], hs[l]))


def _mlp_workspace(widths, n, batch, act, dtype, device, grad: bool):
    """Device scratch of one CUDA call (None, 0, 0 on the CPU)."""
    if device.type != "cuda" or batch == 0:
        return None, 0, 0
    nbytes = lib().mlp_workspace_bytes(
        widths, n, int(batch), act.code, DTYPE_CODES[dtype], int(device.index or 0), grad
    )
    buf, ptr = workspace(nbytes, device)
    return buf, ptr, nbytes


def _ptrs(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _kernel_args(weights, biases, widths, n, x, act, grad: bool):
    """The arguments of ``_C.mlp_forward`` / ``_C.mlp_mse_grad`` before their outputs (head) and
    after them (tail), and the device workspace to keep alive until the call is enqueued."""
    dtype, device = x.dtype, x.device
    ws, ws_ptr, ws_bytes = _mlp_workspace(widths, n, x.shape[0], act, dtype, device, grad)
    head = (_ptrs(weights), _ptrs(biases), widths, n, int(x.shape[0]), x.data_ptr())
    tail = (act.code, DTYPE_CODES[dtype], device_code(x), stream(x), ws_ptr, ws_bytes)
    return head, tail, ws


def mlp_forward(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    activation: str | Activation,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Outputs of every student of the ensemble on one batch (fused kernel).

    Parameters
    ----------
    weights, biases : lists of L + 1 tensors, ``[N, out_l, in_l]`` and ``[N, out_l]``, float32 or
        float64, contiguous, on one device (cpu or cuda); L <= 8.
    x : ``[B, d_in]``, same dtype and device.
    activation : name or :class:`~expand_and_cluster.activations.Activation` of the hidden layers
        (the output layer is linear).
    check_finite : reject NaN/Inf in ``x`` (one extra pass; training loops validate once).

    Returns
    -------
    torch.Tensor
        ``[N, B, d_out]``, the dtype of the inputs.

    Raises
    ------
    TypeError, ValueError
        On a wrong dtype, shape, device, layout, or a non-finite ``x``.
    """
    act = get_activation(activation)
    n, widths, dtype, device = check_ensemble(weights, biases)
    check_inputs(x, None, widths, dtype, device, check_finite)
    if uses_torch_path(widths, device):
        with torch.no_grad():
            return _forward_torch(weights, biases, x, act)[0][-1].contiguous()
    out = torch.empty((n, x.shape[0], widths[-1]), dtype=dtype, device=device)
    head, tail, ws = _kernel_args(weights, biases, widths, n, x, act, False)
    lib().mlp_forward(*head, out.data_ptr(), *tail)
    del ws  # back to torch's allocator; stream-ordered, so the kernel's use stays safe
    return out


def mlp_mse_grad(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    activation: str | Activation,
    *,
    out_grad_weights: Sequence[torch.Tensor] | None = None,
    out_grad_biases: Sequence[torch.Tensor] | None = None,
    out_loss: torch.Tensor | None = None,
    check_finite: bool = True,
):
    """Loss and gradients of every student in one fused forward + MSE + backward pass.

    ``loss_n = mean over B and d_out of (f_n(x) - y)^2`` (Martinelli et al. 2024, Eq. 1, per
    student; students never mix). Gradients are exact, accumulated in the dtype of the inputs, in
    an order that does not depend on the number of threads.

    Parameters
    ----------
    weights, biases, x, activation : as :func:`mlp_forward`.
    y : ``[B, d_out]`` targets (teacher outputs), same dtype and device; B >= 1.
    out_grad_weights, out_grad_biases, out_loss : optional preallocated outputs (shapes as the
        returned ones) so training loops allocate nothing per step.
    check_finite : reject NaN/Inf in ``x`` and ``y``.

    Returns
    -------
    loss : ``[N]``
    grad_weights : list of ``[N, out_l, in_l]``
    grad_biases : list of ``[N, out_l]``

    Raises
    ------
    TypeError, ValueError
        As :func:`mlp_forward`, and for ``y`` of the wrong shape or an empty batch.
    """
    act = get_activation(activation)
    n, widths, dtype, device = check_ensemble(weights, biases)
    check_inputs(x, y, widths, dtype, device, check_finite)
    if x.shape[0] < 1:
        raise ValueError("x: the batch must hold at least one query (B >= 1)")
    gw = outputs_like(out_grad_weights, weights, "out_grad_weights")
    gb = outputs_like(out_grad_biases, biases, "out_grad_biases")
    if out_loss is None:
        loss = torch.empty(n, dtype=dtype, device=device)
    else:
        loss = check_tensor(out_loss, "out_loss", 1, dtype, device)
        if loss.shape[0] != n:
            raise ValueError(f"out_loss: expected shape [{n}], got {tuple(loss.shape)}")
    if uses_torch_path(widths, device):
        _mlp_mse_grad_torch(weights, biases, x, y, act, gw, gb, loss)
        return loss, gw, gb
    head, tail, ws = _kernel_args(weights, biases, widths, n, x, act, True)
    lib().mlp_mse_grad(*head, y.data_ptr(), loss.data_ptr(), _ptrs(gw), _ptrs(gb), *tail)
    del ws
    return loss, gw, gb


class FusedTrainStep:
    """One Adam training step of a student ensemble, validated once and then called per step:
    loss and gradients (:func:`mlp_mse_grad`), then the per-student Adam update
    (:func:`~expand_and_cluster.ops.adam_step`), on the caller's current stream, with no host
    synchronisation.

    Same arithmetic as calling the two ops (bitwise equal results); the ensemble, the optimiser
    state and the learning rates are checked once at construction, and each call checks only the
    shapes, dtype and device of ``x`` and ``y`` (no values, so no device-to-host read) and reuses
    the pointers and the device workspace. A step can be captured in a CUDA graph
    (``torch.cuda.graph``), its inputs living in fixed buffers.

    Parameters
    ----------
    weights, biases : the ensemble (see :func:`mlp_mse_grad`), updated in place by each call.
        They must stay the same tensors (same storage) for the life of the step.
    activation : name or :class:`~expand_and_cluster.activations.Activation`.
    lr : ``[N]`` learning rates (dtype of the weights, >= 0), read at every call: change them in
        place (``step.lr.copy_(...)``) between calls.
    beta1, beta2, eps : Adam's constants, as :func:`~expand_and_cluster.ops.adam_step`.
    exp_avg, exp_avg_sq, step : optional optimiser state to continue from (lists like the
        parameters, weights first then biases; int64 ``[N]`` steps done); zeros by default.

    Attributes
    ----------
    params, exp_avg, exp_avg_sq : lists of tensors (weights first, then biases).
    grad_weights, grad_biases : the gradients of the last call.
    loss : ``[N]`` the loss of the last call (before its update), a device tensor.
    step : ``[N]`` int64, the number of updates done.

    Raises
    ------
    TypeError, ValueError
        As :func:`mlp_mse_grad` and :func:`~expand_and_cluster.ops.adam_step`, at construction;
        at a call, for ``x`` or ``y`` of the wrong shape, dtype or device.
    """

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor],
        activation: str | Activation,
        lr: torch.Tensor,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        exp_avg: Sequence[torch.Tensor] | None = None,
        exp_avg_sq: Sequence[torch.Tensor] | None = None,
        step: torch.Tensor | None = None,
    ):
        self.act = get_activation(activation)
        n, widths, dtype, device = check_ensemble(weights, biases)
        self.n_students, self.widths, self.dtype, self.device = n, widths, dtype, device
        self.weights, self.biases = list(weights), list(biases)
        self.params = self.weights + self.biases
        self.exp_avg = [torch.zeros_like(p) for p in self.params] if exp_avg is None else exp_avg
        self.exp_avg_sq = (
            [torch.zeros_like(p) for p in self.params] if exp_avg_sq is None else exp_avg_sq
        )
        if step is None:
            step = torch.zeros(n, dtype=torch.int64, device=device)
        self.step = step
        self.lr = lr
        self.grad_weights = [torch.empty_like(w) for w in self.weights]
        self.grad_biases = [torch.empty_like(b) for b in self.biases]
        self.loss = torch.empty(n, dtype=dtype, device=device)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        grads = self.grad_weights + self.grad_biases
        # The optimiser part validated once (steps done >= 0: the next update is step + 1).
        check_adam_args(
            self.params, grads, self.exp_avg, self.exp_avg_sq, self.step, lr, beta1, beta2, eps,
            min_step=0,
        )  # fmt: skip
        self.torch_path = uses_torch_path(widths, device)
        live = [i for i, p in enumerate(self.params) if p[0].numel() > 0]
        self._adam_ptrs = (
            [self.params[i].data_ptr() for i in live],
            [grads[i].data_ptr() for i in live],
            [self.exp_avg[i].data_ptr() for i in live],
            [self.exp_avg_sq[i].data_ptr() for i in live],
            [self.params[i][0].numel() for i in live],
        )
        self._w_ptrs = [w.data_ptr() for w in self.weights]
        self._b_ptrs = [b.data_ptr() for b in self.biases]
        self._gw_ptrs = [g.data_ptr() for g in self.grad_weights]
        self._gb_ptrs = [g.data_ptr() for g in self.grad_biases]
        self._workspaces: dict[int, tuple[torch.Tensor | None, int, int]] = {}
        self._dev = device_code(self.loss)
        self._dcode = DTYPE_CODES[dtype]

    def _workspace_for(self, b: int):
        ws = self._workspaces.get(b)
        if ws is None:
            ws = self._workspaces[b] = _mlp_workspace(
                self.widths, self.n_students, b, self.act, self.dtype, self.device, True
            )
        return ws

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step on the queries ``x [B, d_in]`` and targets ``y [B, d_out]``; returns
        :attr:`loss` (``[N]``, the loss before the update)."""
        for t, name, width in ((x, "x", self.widths[0]), (y, "y", self.widths[-1])):
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype != self.dtype
                or t.device != self.device
                or t.dim() != 2
                or t.shape[1] != width
                or not t.is_contiguous()
            ):
                raise ValueError(
                    f"{name}: expected a contiguous {self.dtype} tensor [B, {width}] on "
                    f"{self.device}, got {getattr(t, 'dtype', type(t).__name__)} "
                    f"{tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', '?')}"
                )
        b = x.shape[0]
        if b < 1 or y.shape[0] != b:
            raise ValueError(f"x, y: expected the same batch B >= 1, got {b} and {y.shape[0]}")
        s = stream(x)
        if self.torch_path:
            _mlp_mse_grad_torch(
                self.weights, self.biases, x, y, self.act, self.grad_weights, self.grad_biases,
                self.loss,
            )  # fmt: skip
        else:
            _, ws_ptr, ws_bytes = self._workspace_for(b)
            lib().mlp_mse_grad(
                self._w_ptrs, self._b_ptrs, self.widths, self.n_students, b, x.data_ptr(),
                y.data_ptr(), self.loss.data_ptr(), self._gw_ptrs, self._gb_ptrs, self.act.code,
                self._dcode, self._dev, s, ws_ptr, ws_bytes,
            )  # fmt: skip
        self.step.add_(1)
        p, g, m, v, numels = self._adam_ptrs
        if p:
            lib().adam_step(
                p, g, m, v, numels, self.n_students, self.lr.data_ptr(), self.step.data_ptr(),
                self.beta1, self.beta2, self.eps, self._dcode, self._dev, s,
            )  # fmt: skip
        return self.loss
