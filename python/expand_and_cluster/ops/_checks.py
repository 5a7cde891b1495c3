"""Argument checks shared by the ops, and the handles they pass to the compiled kernels.

Every check raises TypeError for a wrong type or dtype and ValueError for a wrong shape, device,
layout or value, with a message that names the argument and what was expected.
"""

from __future__ import annotations

import torch

#: dtype codes of the compiled kernels (csrc/common/ops.h, ``eac::DType``).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


def lib():
    """The compiled module :mod:`expand_and_cluster._C` (imported on first use)."""
    from .. import _C

    return _C


def device_code(t: torch.Tensor) -> int:
    """-1 for a CPU tensor, else the CUDA device index."""
    return -1 if t.device.type == "cpu" else int(t.device.index or 0)


def stream(t: torch.Tensor) -> int:
    """The caller's current CUDA stream on ``t``'s device as an integer handle (0 on the CPU).

    The kernels are enqueued on it, so they order with the caller's torch work without a sync."""
    if t.device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def workspace(nbytes: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """Scratch device memory from torch's caching allocator: (tensor to keep alive, pointer)."""
    if nbytes <= 0:
        return None, 0
    buf = torch.empty(int(nbytes), dtype=torch.uint8, device=device)
    return buf, buf.data_ptr()


def check_tensor(t, name: str, ndim: int, dtype=None, device=None) -> torch.Tensor:
    """``t`` itself, after checking that it is a contiguous float32/float64 cpu or cuda tensor of
    ``ndim`` dimensions (and of ``dtype`` and on ``device`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_CODES:
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


def check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError when ``t`` holds NaN or Inf (one pass; a host read-back on CUDA)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


def check_ensemble(weights, biases) -> tuple[int, list[int], torch.dtype, torch.device]:
    """Validate an ensemble (lists of ``[N, out_l, in_l]`` weights and ``[N, out_l]`` biases);
    return (N, widths ``[d_in, hidden..., d_out]``, dtype, device)."""
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
    w0 = check_tensor(weights[0], "weights[0]", 3)
    dtype, device = w0.dtype, w0.device
    n = w0.shape[0]
    if n < 1:
        raise ValueError(f"weights[0]: expected N >= 1 students, got shape {tuple(w0.shape)}")
    widths = [int(w0.shape[2])]
    for l, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(w, f"weights[{l}]", 3, dtype, device)
        check_tensor(b, f"biases[{l}]", 2, dtype, device)
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


def check_inputs(x, y, widths, dtype, device, check_values: bool) -> None:
    """Validate a batch ``x`` ``[B, d_in]`` and, unless None, targets ``y`` ``[B, d_out]``
    (finite values too when ``check_values``)."""
    check_tensor(x, "x", 2, dtype, device)
    if x.shape[1] != widths[0]:
        raise ValueError(
            f"x: expected shape [B, {widths[0]}] (d_in of weights[0]), got {tuple(x.shape)}"
        )
    if check_values:
        check_finite(x, "x")
    if y is not None:
        check_tensor(y, "y", 2, dtype, device)
        if tuple(y.shape) != (x.shape[0], widths[-1]):
            raise ValueError(
                f"y: expected shape [{x.shape[0]}, {widths[-1]}] (B of x, d_out of the last "
                f"weight), got {tuple(y.shape)}"
            )
        if check_values:
            check_finite(y, "y")


def outputs_like(out, like, name: str) -> list[torch.Tensor]:
    """Preallocated outputs ``out`` checked against ``like`` (same count, shapes, dtype, device),
    or new empty tensors like ``like`` when ``out`` is None."""
    if out is None:
        return [torch.empty_like(t) for t in like]
    if len(out) != len(like):
        raise ValueError(f"{name}: expected {len(like)} tensors, got {len(out)}")
    for i, (o, t) in enumerate(zip(out, like)):
        check_tensor(o, f"{name}[{i}]", t.dim(), t.dtype, t.device)
        if o.shape != t.shape:
            raise ValueError(f"{name}[{i}]: expected shape {tuple(t.shape)}, got {tuple(o.shape)}")
    return list(out)
