"""Public kernel API on torch tensors, and a pure-torch reference for each op.

An *ensemble* is N independent MLPs ("students", Martinelli et al. 2024, Sec. 3, step "Expand")
with L hidden layers that all read the same input batch:

- ``weights``: list of L + 1 tensors, layer l of shape ``[N, out_l, in_l]`` (torch.nn.Linear layout
  per student), ``biases``: list of L + 1 tensors ``[N, out_l]``;
- ``x``: ``[B, d_in]``, ``y``: ``[B, d_out]``;
- hidden layers apply the activation, the output layer is linear.

Every op validates its arguments first (TypeError for a wrong dtype or type, ValueError for shapes,
devices, non-contiguous tensors and NaN/Inf inputs, each message naming the argument and what was
expected), then calls the compiled kernel in :mod:`expand_and_cluster._C`. ``<op>_reference`` is a
pure-torch twin used by the tests and as a readable specification.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .activations import Activation, get_activation

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}

#: Above this many weights in one student's layer (in * out), the CPU ops use torch's batched
#: matrix products (MKL/oneDNN) instead of the fused kernel: measured on a 2-core AMD EPYC, the
#: fused kernel wins at 64-64-10 (3.2 vs 3.9 ms, N = 20, B = 512) and 64-256-10 (13.3 vs 16.1 ms),
#: torch wins at 200-100-10 and 784-256-10 (55 vs 243 ms), where one student's weights no longer
#: stay in cache across the batch tiles. See benchmarks/RESULTS.md.
TORCH_PATH_MIN_LAYER_SIZE = 16384 + 1
#: The same switch for the CUDA ops (cuBLAS products through torch). Measured on an H200
#: (benchmarks/RESULTS.md, float32, N = 20, B = 512): the fused kernel wins at 64-64-10
#: (0.067 ms gradient pass vs 0.10 ms for the torch path, both without Python overhead), cuBLAS
#: wins at 784-256-10 (7.3 vs 0.41 ms): the fused kernel's per-block gradient sums no longer fit in
#: shared memory there. Sizes in between are not measured; this bound is where the version-2
#: kernel's float32 gradient sums of a 2-layer student would pass ~128 KB.
CUDA_TORCH_PATH_MIN_LAYER_SIZE = 32768 + 1

__all__ = [
    "FusedTrainStep",
    "adam_step",
    "adam_step_reference",
    "average_linkage",
    "average_linkage_reference",
    "cuda_kernel_version",
    "cosine_distances",
    "cosine_distances_reference",
    "mlp_forward",
    "mlp_forward_reference",
    "mlp_mse_grad",
    "mlp_mse_grad_reference",
    "num_threads",
    "PlateauState",
    "plateau_step",
    "plateau_step_reference",
    "set_cuda_kernel_version",
    "set_num_threads",
    "uses_torch_path",
]


def _lib():
    from . import _C

    return _C


def num_threads() -> int:
    """Number of OpenMP threads the CPU kernels use."""
    return int(_lib().num_threads())


def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads of the CPU kernels (ValueError if ``n < 1``)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    _lib().set_num_threads(n)


def cuda_kernel_version() -> int:
    """The variant of the CUDA kernels in use (see :func:`set_cuda_kernel_version`)."""
    return int(_lib().cuda_kernel_version())


def set_cuda_kernel_version(version: int) -> None:
    """Choose the variant of the CUDA kernels (process-wide; the CPU kernels ignore it).

    3 (default): version 2, plus a kernel for the gradients of one-hidden-layer students with
    d_in <= 16, width <= 256 and d_out <= 4 (the toy sizes): one thread per hidden neuron walks
    the batch with that neuron's weights and gradient sums in registers. 2: register-tiled
    kernels; the fused MLP kernel keeps each block's gradient sums in shared memory across its
    batch tiles (when they fit; else it runs variant 1), and cosine_distances computes 64 x 64
    tiles with 4 x 4 outputs per thread. 1: the first, simplest kernels, kept as a reference and a
    fallback. 4 (opt-in, not yet timed on a GPU): version 3 with the toy-size kernel compiled
    for each output count (d_out 1 to 4), so its per-output loops and tests go at compile time,
    and its tile loads indexed from the tile's first row: fewer instructions per row, the same
    terms summed in the same order, so results equal version 3's bit for bit. All compute the
    same sums (versions 1 and 2 in the same order; versions 3 and 4 sum a student's gradient
    over the batch in another order, so float results differ by rounding). Each version is
    deterministic. Raises ValueError for any other value.
    """
    if version not in (1, 2, 3, 4):
        raise ValueError(f"version: expected 1, 2, 3 or 4, got {version!r}")
    _lib().set_cuda_kernel_version(int(version))


# ----------------------------------------------------------------------------------------------
# validation helpers


def _device_code(t: torch.Tensor) -> int:
    return -1 if t.device.type == "cpu" else int(t.device.index or 0)


def _stream(t: torch.Tensor) -> int:
    """The caller's current CUDA stream on ``t``'s device as an integer handle (0 on the CPU).

    The kernels are enqueued on it, so they order with the caller's torch work without a sync."""
    if t.device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def _workspace(nbytes: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """Scratch device memory from torch's caching allocator: (tensor to keep alive, pointer)."""
    if nbytes <= 0:
        return None, 0
    buf = torch.empty(int(nbytes), dtype=torch.uint8, device=device)
    return buf, buf.data_ptr()


def _check_tensor(t, name: str, ndim: int, dtype=None, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (as the other arguments), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(
            f"{name}: expected device {device} (as the other arguments), got {t.device}"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a cpu or cuda tensor, got device {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


def _check_ensemble(weights, biases):
    """Validate an ensemble; return (N, widths, dtype, device)."""
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("weights, biases: expected lists of tensors")
    if len(weights) < 1:
        raise ValueError("weights: expected at least one layer")
    if len(weights) > 9:
        raise ValueError(
            f"weights: at most 8 hidden layers (9 tensors) supported, got {len(weights)}"
        )
    if len(biases) != len(weights):
        raise ValueError(
            f"biases: expected {len(weights)} tensors (one per weight), got {len(biases)}"
        )
    w0 = _check_tensor(weights[0], "weights[0]", 3)
    dtype, device = w0.dtype, w0.device
    n = w0.shape[0]
    if n < 1:
        raise ValueError(f"weights[0]: expected N >= 1 students, got shape {tuple(w0.shape)}")
    widths = [int(w0.shape[2])]
    for l, (w, b) in enumerate(zip(weights, biases)):
        _check_tensor(w, f"weights[{l}]", 3, dtype, device)
        _check_tensor(b, f"biases[{l}]", 2, dtype, device)
        if w.shape[0] != n or w.shape[2] != widths[-1]:
            raise ValueError(
                f"weights[{l}]: expected shape [{n}, out, {widths[-1]}], got {tuple(w.shape)}"
            )
        if w.shape[1] < 1:
            raise ValueError(f"weights[{l}]: expected at least one output unit")
        if tuple(b.shape) != (n, w.shape[1]):
            raise ValueError(
                f"biases[{l}]: expected shape [{n}, {w.shape[1]}], got {tuple(b.shape)}"
            )
        widths.append(int(w.shape[1]))
    return n, widths, dtype, device


def _check_inputs(x, y, widths, dtype, device, check_finite: bool):
    _check_tensor(x, "x", 2, dtype, device)
    if x.shape[1] != widths[0]:
        raise ValueError(
            f"x: expected shape [B, {widths[0]}] (d_in of weights[0]), got {tuple(x.shape)}"
        )
    if check_finite:
        _check_finite(x, "x")
    if y is not None:
        _check_tensor(y, "y", 2, dtype, device)
        if tuple(y.shape) != (x.shape[0], widths[-1]):
            raise ValueError(
                f"y: expected shape [{x.shape[0]}, {widths[-1]}] (B of x, d_out of the last "
                f"weight), got {tuple(y.shape)}"
            )
        if check_finite:
            _check_finite(y, "y")


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


def _mlp_mse_grad_torch(weights, biases, x, y, act: Activation, gw, gb, loss):
    """The torch path of :func:`mlp_mse_grad`: explicit backward pass with batched matmuls and
    the activation's closed-form derivative (no autograd graph)."""
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


def uses_torch_path(widths: Sequence[int], device: str | torch.device = "cpu") -> bool:
    """True when :func:`mlp_mse_grad` / :func:`mlp_forward` dispatch to the torch path for an
    ensemble of these widths (``[d_in, hidden..., d_out]``) on ``device``."""
    largest = max(a * b for a, b in zip(widths[:-1], widths[1:]))
    if torch.device(device).type == "cuda":
        return largest >= CUDA_TORCH_PATH_MIN_LAYER_SIZE
    return largest >= TORCH_PATH_MIN_LAYER_SIZE


# ----------------------------------------------------------------------------------------------
# forward


def mlp_forward(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    activation: str | Activation,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Outputs of every student of the ensemble on one batch (fused C++ kernel).

    Parameters
    ----------
    weights, biases : lists of L + 1 tensors, ``[N, out_l, in_l]`` and ``[N, out_l]``, float32 or
        float64, contiguous, on one device.
    x : ``[B, d_in]``, same dtype and device.
    activation : name or :class:`~expand_and_cluster.activations.Activation` of the hidden layers.
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
    n, widths, dtype, device = _check_ensemble(weights, biases)
    _check_inputs(x, None, widths, dtype, device, check_finite)
    if uses_torch_path(widths, device):
        with torch.no_grad():
            return _forward_torch(weights, biases, x, act)[0][-1].contiguous()
    out = torch.empty((n, x.shape[0], widths[-1]), dtype=dtype, device=device)
    ws, ws_ptr, ws_bytes = None, 0, 0
    if device.type == "cuda" and x.shape[0] > 0:
        ws_bytes = _lib().mlp_workspace_bytes(
            widths, n, int(x.shape[0]), act.code, _DTYPE_CODES[dtype], _device_code(x), False
        )
        ws, ws_ptr = _workspace(ws_bytes, device)
    _lib().mlp_forward(
        [w.data_ptr() for w in weights],
        [b.data_ptr() for b in biases],
        widths,
        n,
        int(x.shape[0]),
        x.data_ptr(),
        out.data_ptr(),
        act.code,
        _DTYPE_CODES[dtype],
        _device_code(x),
        _stream(x),
        ws_ptr,
        ws_bytes,
    )
    del ws  # back to torch's allocator; stream-ordered, so the kernel's use stays safe
    return out


def mlp_forward_reference(weights, biases, x, activation) -> torch.Tensor:
    """Pure-torch twin of :func:`mlp_forward` (one batched matmul per layer)."""
    act = get_activation(activation)
    h = x.unsqueeze(0).expand(weights[0].shape[0], *x.shape)
    for l, (w, b) in enumerate(zip(weights, biases)):
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if l < len(weights) - 1:
            h = act.fn(h)
    return h


# ----------------------------------------------------------------------------------------------
# fused forward + MSE + backward


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
    student; students never mix). Gradients are exact (no sampling), accumulated in the dtype of the
    inputs, in a fixed order (the result does not depend on the number of threads' scheduling).

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
    n, widths, dtype, device = _check_ensemble(weights, biases)
    _check_inputs(x, y, widths, dtype, device, check_finite)
    if x.shape[0] < 1:
        raise ValueError("x: the batch must hold at least one query (B >= 1)")
    gw = _out_like(out_grad_weights, weights, "out_grad_weights")
    gb = _out_like(out_grad_biases, biases, "out_grad_biases")
    if out_loss is None:
        loss = torch.empty(n, dtype=dtype, device=device)
    else:
        loss = _check_tensor(out_loss, "out_loss", 1, dtype, device)
        if loss.shape[0] != n:
            raise ValueError(f"out_loss: expected shape [{n}], got {tuple(loss.shape)}")
    if uses_torch_path(widths, device):
        _mlp_mse_grad_torch(weights, biases, x, y, act, gw, gb, loss)
        return loss, gw, gb
    ws, ws_ptr, ws_bytes = None, 0, 0
    if device.type == "cuda":
        ws_bytes = _lib().mlp_workspace_bytes(
            widths, n, int(x.shape[0]), act.code, _DTYPE_CODES[dtype], _device_code(x), True
        )
        ws, ws_ptr = _workspace(ws_bytes, device)
    _lib().mlp_mse_grad(
        [w.data_ptr() for w in weights],
        [b.data_ptr() for b in biases],
        widths,
        n,
        int(x.shape[0]),
        x.data_ptr(),
        y.data_ptr(),
        loss.data_ptr(),
        [g.data_ptr() for g in gw],
        [g.data_ptr() for g in gb],
        act.code,
        _DTYPE_CODES[dtype],
        _device_code(x),
        _stream(x),
        ws_ptr,
        ws_bytes,
    )
    del ws  # back to torch's allocator; stream-ordered, so the kernel's use stays safe
    return loss, gw, gb


def _out_like(out, like, name):
    if out is None:
        return [torch.empty_like(t) for t in like]
    if len(out) != len(like):
        raise ValueError(f"{name}: expected {len(like)} tensors, got {len(out)}")
    for i, (o, t) in enumerate(zip(out, like)):
        _check_tensor(o, f"{name}[{i}]", t.dim(), t.dtype, t.device)
        if o.shape != t.shape:
            raise ValueError(f"{name}[{i}]: expected shape {tuple(t.shape)}, got {tuple(o.shape)}")
    return list(out)


def mlp_mse_grad_reference(weights, biases, x, y, activation):
    """Pure-torch twin of :func:`mlp_mse_grad` through torch.autograd."""
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    bs = [b.detach().clone().requires_grad_(True) for b in biases]
    out = mlp_forward_reference(ws, bs, x, activation)
    loss = ((out - y.unsqueeze(0)) ** 2).mean(dim=(1, 2))
    grads = torch.autograd.grad(loss.sum(), ws + bs)
    return loss.detach(), list(grads[: len(ws)]), list(grads[len(ws) :])


# ----------------------------------------------------------------------------------------------
# Adam with a learning rate per student


def _check_adam_args(
    params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, check_values=True, min_step=1
):
    """Validate :func:`adam_step`'s arguments; return (step tensor [N], numel per student)."""
    if not all(isinstance(s, (list, tuple)) for s in (params, grads, exp_avg, exp_avg_sq)):
        raise TypeError("params, grads, exp_avg, exp_avg_sq: expected lists of tensors")
    k = len(params)
    if not (len(grads) == len(exp_avg) == len(exp_avg_sq) == k):
        raise ValueError(
            "params, grads, exp_avg, exp_avg_sq: expected lists of the same length, got "
            f"{k}, {len(grads)}, {len(exp_avg)}, {len(exp_avg_sq)}"
        )
    if not (0.0 <= beta1 < 1.0) or not (0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1, beta2: expected values in [0, 1), got {beta1}, {beta2}")
    if not eps > 0.0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    lr = _check_tensor(lr, "lr", 1)
    dtype, device, n = lr.dtype, lr.device, lr.shape[0]
    if n < 1:
        raise ValueError("lr: expected shape [N] with N >= 1")
    if check_values and (bool(torch.isnan(lr).any()) or bool((lr < 0).any())):
        raise ValueError("lr: expected finite learning rates >= 0")
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.dim() != 1 or step.shape[0] != n:
            raise TypeError(f"step: expected an int or an int64 tensor of shape [{n}]")
        if step.device != device or not step.is_contiguous():
            raise ValueError(f"step: expected a contiguous tensor on {device}")
        step_t = step
    else:
        step_t = torch.full((n,), int(step), dtype=torch.int64, device=device)
    if check_values and bool((step_t < min_step).any()):
        raise ValueError(f"step: expected step numbers >= {min_step}")
    numels = []
    for i in range(k):
        p = params[i]
        if not isinstance(p, torch.Tensor) or p.dim() < 1:
            raise TypeError(f"params[{i}]: expected a tensor of shape [N, ...]")
        for name, t in (
            ("params", p),
            ("grads", grads[i]),
            ("exp_avg", exp_avg[i]),
            ("exp_avg_sq", exp_avg_sq[i]),
        ):
            _check_tensor(t, f"{name}[{i}]", p.dim(), dtype, device)
            if t.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}]: expected shape {tuple(p.shape)} (as params[{i}]), got "
                    f"{tuple(t.shape)}"
                )
        if p.shape[0] != n:
            raise ValueError(f"params[{i}]: expected {n} students (lr has {n}), got {p.shape[0]}")
        numels.append(p[0].numel() if n else 0)
    return step_t, numels


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    step: int | torch.Tensor,
    lr: torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    *,
    check_values: bool = True,
) -> None:
    """One Adam update, in place, with a learning rate (and step count) per student.

    Same arithmetic as ``torch.optim.Adam`` (Kingma & Ba 2015, Alg. 1, with torch's placement of
    eps): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr_n / (1 - b1^t_n) * m / (sqrt(v) / sqrt(1 - b2^t_n) + eps)``.
    A student with ``lr_n = 0`` keeps its parameters (its moments still move).

    Parameters
    ----------
    params, grads, exp_avg, exp_avg_sq : lists of tensors of matching shapes ``[N, ...]``, one
        dtype (float32 or float64), contiguous, on one device. ``params``, ``exp_avg`` and
        ``exp_avg_sq`` are updated in place.
    step : the step number t of this update (>= 1), an int or an int64 tensor ``[N]``.
    lr : ``[N]`` learning rates, the dtype of ``params`` (>= 0).
    beta1, beta2 : in [0, 1). eps : > 0.
    check_values : check the values of ``lr`` (finite, >= 0) and ``step`` (>= 1). On CUDA each
        check reads a flag back to the host, a synchronisation per call: training loops that
        validated their learning rates once pass False. Shapes, dtypes and devices are always
        checked (no synchronisation).

    Raises
    ------
    TypeError, ValueError
        On mismatched lists, shapes, dtypes or devices, step < 1, negative or NaN lr, or betas
        outside [0, 1).
    """
    step_t, numels = _check_adam_args(
        params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, check_values
    )
    k, n = len(params), lr.shape[0]
    dtype = lr.dtype
    # Empty tensors have nothing to update (and may have a null data pointer): left out.
    live = [i for i in range(k) if numels[i] > 0]
    if not live:
        return
    _lib().adam_step(
        [params[i].data_ptr() for i in live],
        [grads[i].data_ptr() for i in live],
        [exp_avg[i].data_ptr() for i in live],
        [exp_avg_sq[i].data_ptr() for i in live],
        [numels[i] for i in live],
        n,
        lr.data_ptr(),
        step_t.data_ptr(),
        float(beta1),
        float(beta2),
        float(eps),
        0.0,
        _DTYPE_CODES[dtype],
        _device_code(lr),
        _stream(lr),
    )


class FusedTrainStep:
    """One Adam training step of a student ensemble, validated once and then called per step:
    loss and gradients (:func:`mlp_mse_grad`), then the per-student Adam update
    (:func:`adam_step`), on the caller's current stream, with no host synchronisation.

    Same arithmetic as calling the two ops (the results are bitwise equal); the difference is the
    per-call cost: the ensemble, the optimiser state and the learning rates are checked once at
    construction, and each call checks only the shapes, dtype and device of ``x`` and ``y`` (no
    values, so no device-to-host read) and reuses the pointers and the device workspace. On a
    GPU, where one step of a small ensemble takes tens of microseconds, that is most of the time
    of a step driven from Python. Such a step can also be captured in a CUDA graph
    (``torch.cuda.graph``), its inputs living in fixed buffers.

    Parameters
    ----------
    weights, biases : the ensemble (see :func:`mlp_mse_grad`), updated in place by each call.
        They must stay the same tensors (same storage) for the life of the step.
    activation : name or :class:`~expand_and_cluster.activations.Activation`.
    lr : ``[N]`` learning rates (dtype of the weights, >= 0), read at every call: change them in
        place (``step.lr.copy_(...)``) between calls.
    beta1, beta2, eps : Adam's constants, as :func:`adam_step`.
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
        As :func:`mlp_mse_grad` and :func:`adam_step`, at construction; at a call, for ``x`` or
        ``y`` of the wrong shape, dtype or device.
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
        n, widths, dtype, device = _check_ensemble(weights, biases)
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
        _check_adam_args(
            self.params,
            grads,
            self.exp_avg,
            self.exp_avg_sq,
            self.step,
            lr,
            beta1,
            beta2,
            eps,
            min_step=0,
        )
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
        self._dev = _device_code(self.loss)
        self._dcode = _DTYPE_CODES[dtype]

    def _workspace_for(self, b: int):
        ws = self._workspaces.get(b)
        if ws is None:
            nbytes = 0
            if self.device.type == "cuda":
                nbytes = _lib().mlp_workspace_bytes(
                    self.widths, self.n_students, b, self.act.code, self._dcode, self._dev, True
                )
            buf, ptr = _workspace(nbytes, self.device)
            ws = self._workspaces[b] = (buf, ptr, nbytes)
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
        stream = _stream(x)
        if self.torch_path:
            _mlp_mse_grad_torch(
                self.weights,
                self.biases,
                x,
                y,
                self.act,
                self.grad_weights,
                self.grad_biases,
                self.loss,
            )
        else:
            _, ws_ptr, ws_bytes = self._workspace_for(b)
            _lib().mlp_mse_grad(
                self._w_ptrs,
                self._b_ptrs,
                self.widths,
                self.n_students,
                b,
                x.data_ptr(),
                y.data_ptr(),
                self.loss.data_ptr(),
                self._gw_ptrs,
                self._gb_ptrs,
                self.act.code,
                self._dcode,
                self._dev,
                stream,
                ws_ptr,
                ws_bytes,
            )
        self.step.add_(1)
        p, g, m, v, numels = self._adam_ptrs
        if p:
            _lib().adam_step(
                p,
                g,
                m,
                v,
                numels,
                self.n_students,
                self.lr.data_ptr(),
                self.step.data_ptr(),
                self.beta1,
                self.beta2,
                self.eps,
                0.0,
                self._dcode,
                self._dev,
                stream,
            )
        return self.loss


def adam_step_reference(
    params, grads, exp_avg, exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8
) -> None:
    """Pure-torch twin of :func:`adam_step` (in place)."""
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


# ----------------------------------------------------------------------------------------------
# the per-student training schedule (Sec. 3 step "Expand", App. training details)


class PlateauState:
    """State of N students' training schedules on one device, updated by :func:`plateau_step`.

    Attributes (each ``[N]``, contiguous, on ``device``)
    ----------------------------------------------------
    lr : float64 learning rate; best : float64 best epoch loss so far (inf at the start);
    bad, cool : int64 epochs without progress and cooldown epochs left (ReduceLROnPlateau's
    ``num_bad_epochs`` and ``cooldown_counter``); live : bool, still training; rel : float64 last
    relative MSE (loss / var_y; inf before the first epoch); epochs : int64 epochs trained;
    code : int64 why a student stopped (0 not stopped, 1 loss target, 2 lr below min_lr);
    diverged : int64 first epoch with a non-finite loss (0: none).
    """

    FIELDS = ("lr", "best", "bad", "cool", "live", "rel", "epochs", "code", "diverged")
    _DTYPES = {
        "lr": torch.float64,
        "best": torch.float64,
        "bad": torch.int64,
        "cool": torch.int64,
        "live": torch.bool,
        "rel": torch.float64,
        "epochs": torch.int64,
        "code": torch.int64,
        "diverged": torch.int64,
    }

    def __init__(self, n: int, lr: float, device: str | torch.device = "cpu"):
        if n < 1 or not lr > 0:
            raise ValueError(f"PlateauState: expected n >= 1 and lr > 0, got n={n}, lr={lr}")
        self.device = torch.device(device)
        start = {"lr": float(lr), "best": float("inf"), "live": True, "rel": float("inf")}
        for f in self.FIELDS:
            t = torch.full((n,), start.get(f, 0), dtype=self._DTYPES[f], device=self.device)
            setattr(self, f, t)
        self._ptrs = [getattr(self, f).data_ptr() for f in self.FIELDS]

    @property
    def n_students(self) -> int:
        return int(self.lr.shape[0])

    def select(self, idx: torch.Tensor) -> None:
        """Keep the students at positions ``idx`` (int64 ``[K]``, K >= 1), in that order."""
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f).index_select(0, idx).contiguous())
        self._ptrs = [getattr(self, f).data_ptr() for f in self.FIELDS]

    def to_numpy(self, extra: Sequence[torch.Tensor] = ()) -> tuple[dict, list[np.ndarray]]:
        """The state as numpy arrays ({field: array}), and ``extra`` float64 tensors of the same
        device, in one device-to-host transfer."""
        arrays = [getattr(self, f).to(torch.float64) for f in self.FIELDS] + list(extra)
        host = torch.stack(arrays).cpu().numpy()
        np_dtypes = {torch.float64: np.float64, torch.int64: np.int64, torch.bool: np.bool_}
        out = {f: host[i].astype(np_dtypes[self._DTYPES[f]]) for i, f in enumerate(self.FIELDS)}
        return out, list(host[len(self.FIELDS) :])


def _check_plateau_args(state, loss, step_lr, var_y, patience, cooldown, factor):
    if not isinstance(state, PlateauState):
        raise TypeError(f"state: expected a PlateauState, got {type(state).__name__}")
    n = state.n_students
    for name, t, dtypes in (
        ("loss", loss, (torch.float64,)),
        ("step_lr", step_lr, (torch.float32, torch.float64)),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            raise TypeError(
                f"{name}: expected a tensor of dtype {' or '.join(map(str, dtypes))}, got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
        if tuple(t.shape) != (n,) or t.device != state.device or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous [{n}] tensor on {state.device}, got "
                f"{tuple(t.shape)} on {t.device}"
            )
    if not var_y > 0:
        raise ValueError(f"var_y: expected > 0, got {var_y}")
    if patience < 0 or cooldown < 0 or not 0 < factor < 1:
        raise ValueError(
            f"patience, cooldown, factor: expected >= 0, >= 0 and in (0, 1), got {patience}, "
            f"{cooldown}, {factor}"
        )


def plateau_step(
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
    """One epoch of N students' training schedules, in place, in one kernel launch (no host
    synchronisation on a GPU).

    For every live student n: records a non-finite ``loss[n]`` in ``diverged`` (first epoch),
    sets ``rel = loss / var_y`` and ``epochs = epoch``; applies torch's ReduceLROnPlateau rule
    (mode min, threshold 0: a loss below ``best`` is progress; a cooldown epoch counts as
    progress; more than ``patience`` epochs without progress multiply lr by ``factor`` and
    restart the ``cooldown``); then stops the student (``live`` false; ``code`` 1) when
    ``rel <= target``, or (``code`` 2) when ``lr < min_lr``. Students that are not live are left
    unchanged. Finally ``step_lr[n]`` = lr for live students, 0 for those that stopped this epoch
    (Adam with lr 0 leaves their weights exactly as they are).

    Source: Martinelli et al. 2024, App. (training details: lr x 1/sqrt(10) on a plateau, stop
    at a loss target or lr < 1e-7), with one schedule per student (expand_and_cluster.training).

    Parameters
    ----------
    state : :class:`PlateauState` of N students.
    loss : ``[N]`` float64, the epoch's mean loss per student, on the state's device.
    epoch : the epoch number (>= 1).
    step_lr : ``[N]`` float32 or float64 (the parameters' dtype), written.
    var_y : relative-MSE denominator (> 0); patience, cooldown : epochs (>= 0);
    factor : in (0, 1); target : relative MSE to stop at; min_lr : stop below this lr.

    Raises
    ------
    TypeError, ValueError
        On a wrong state type, dtype, shape or device, or an out-of-range setting.
    """
    _check_plateau_args(state, loss, step_lr, var_y, patience, cooldown, factor)
    _lib().plateau_step(
        state.n_students,
        int(epoch),
        loss.data_ptr(),
        state._ptrs,
        step_lr.data_ptr(),
        _DTYPE_CODES[step_lr.dtype],
        float(var_y),
        int(patience),
        int(cooldown),
        float(factor),
        float(target),
        float(min_lr),
        _device_code(loss),
        _stream(loss),
    )


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
    """Pure-torch twin of :func:`plateau_step` (elementwise ops, same order, in place)."""
    _check_plateau_args(state, loss, step_lr, var_y, patience, cooldown, factor)
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


# ----------------------------------------------------------------------------------------------
# distances and linkage (clustering, Sec. 3 step "Cluster")


def cosine_distances(v: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Pairwise cosine distances between the rows of ``v``.

    ``d(i, j) = 1 - cos(v_i, v_j)``, or ``1 - |cos(v_i, v_j)|`` when ``absolute`` (for symmetry
    classes where v and -v are the same neuron). Computed in float64 whatever the input dtype.
    A zero row has distance 1 to every other row. Units: dimensionless, in [0, 2] ([0, 1] when
    absolute).

    Parameters
    ----------
    v : ``[M, D]`` float32 or float64, finite, contiguous.

    Returns
    -------
    torch.Tensor
        ``[M, M]`` float64, symmetric, zero diagonal.

    Raises
    ------
    TypeError, ValueError
        On a wrong dtype, shape, layout or non-finite values.
    """
    _check_tensor(v, "v", 2)
    if v.shape[1] < 1:
        raise ValueError(f"v: expected shape [M, D] with D >= 1, got {tuple(v.shape)}")
    _check_finite(v, "v")
    m = int(v.shape[0])
    out = torch.empty((m, m), dtype=torch.float64, device=v.device)
    ws, ws_ptr = None, 0
    if v.device.type == "cuda":  # per-row scale and inverse norm: 2 * M doubles
        ws, ws_ptr = _workspace(2 * m * 8, v.device)
    _lib().cosine_distances(
        v.data_ptr(),
        m,
        int(v.shape[1]),
        _DTYPE_CODES[v.dtype],
        bool(absolute),
        out.data_ptr(),
        _device_code(v),
        _stream(v),
        ws_ptr,
    )
    del ws
    return out


def cosine_distances_reference(v: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Pure-torch twin of :func:`cosine_distances`."""
    u = v.to(torch.float64)
    norms = u.norm(dim=1, keepdim=True)
    u = torch.where(norms > 0, u / norms.clamp_min(1e-300), torch.zeros_like(u))
    c = u @ u.T
    d = 1.0 - (c.abs() if absolute else c)
    d.fill_diagonal_(0.0)
    return d.clamp_min_(0.0)


def average_linkage(dist, overwrite: bool = False, check: bool = True) -> np.ndarray:
    """Average-linkage (UPGMA) hierarchical clustering of a square distance matrix (C++ kernel).

    Same result as ``scipy.cluster.hierarchy.linkage(squareform(dist), method="average")`` (up to
    the order of merges at exactly equal heights), with the nearest-neighbour-chain algorithm
    (Muellner 2011, arXiv:1109.2378) on a square matrix so every row scan is contiguous.

    Parameters
    ----------
    dist : ``[M, M]`` float64 numpy array or torch tensor (CPU), symmetric, finite, >= 0, M >= 2.
    overwrite : let the kernel use ``dist`` as its workspace (saves a copy of M^2 doubles, 3.2 GB
        and about 1 s of first-touch page faults at M = 20,000).
    check : scan ``dist`` for NaN/Inf and negative entries first (two passes over M^2 doubles,
        about 1 s at M = 20,000). Pass False for a matrix from :func:`cosine_distances`, which is
        finite and >= 0 by construction; the kernel still rejects NaN.

    Returns
    -------
    numpy.ndarray
        ``[M - 1, 4]`` float64 linkage matrix in scipy's format.

    Raises
    ------
    TypeError, ValueError
        On a wrong type or dtype, a non-square or too-small matrix, NaN, or negative entries.

    Notes
    -----
    O(M^2) time and memory (8 M^2 bytes for the matrix).
    """
    if isinstance(dist, torch.Tensor):
        if dist.device.type != "cpu":
            raise ValueError("dist: expected a CPU tensor")
        dist = dist.numpy()
    if not isinstance(dist, np.ndarray):
        raise TypeError(f"dist: expected a numpy array or torch tensor, got {type(dist).__name__}")
    if dist.dtype != np.float64:
        raise TypeError(f"dist: expected dtype float64, got {dist.dtype}")
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist: expected a square [M, M] matrix, got shape {dist.shape}")
    m = dist.shape[0]
    if m < 2:
        raise ValueError(f"dist: expected at least 2 observations, got {m}")
    if check and not np.isfinite(dist).all():
        raise ValueError("dist: contains NaN or Inf")
    if check and (dist < 0).any():
        raise ValueError("dist: expected distances >= 0")
    work = (
        dist
        if (overwrite and dist.flags.c_contiguous and dist.flags.writeable)
        else (np.array(dist, dtype=np.float64, order="C", copy=True))
    )
    z = np.empty((m - 1, 4), dtype=np.float64)
    _lib().average_linkage(work.ctypes.data, m, z.ctypes.data)
    return z


def average_linkage_reference(dist) -> np.ndarray:
    """SciPy twin of :func:`average_linkage`."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(dist, dtype=np.float64)
    return linkage(squareform(d, checks=False), method="average")
