"""What the compiled kernels can do here (backends, devices) and their process-wide settings:
CPU threads, and the private choice of the CUDA thin-width kernel's variant (for tests and
benchmarks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import InputError
from ._checks import lib

#: Variants of the CUDA thin-width gradient kernel (one-hidden-layer students with d_in <= 16,
#: width <= 256, d_out <= 4): the output count tested at run time (default), or compiled for each
#: output count (1 to 4). Both sum the same terms in the same order, so results are bitwise
#: equal; which is faster is to be measured on a GPU (benchmarks/bench_gpu.py).
THIN_KERNEL_VARIANTS = ("runtime_outputs", "compiled_outputs")


def backends() -> list[str]:
    """Backends compiled into ``expand_and_cluster._C``: ``["cpu"]`` or ``["cpu", "cuda"]``."""
    return list(lib().backends())


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when this build has the CUDA kernels and torch sees a GPU, else
    ``"cpu"``; ``"cpu"`` and ``"cuda"`` are checked and returned.

    Raises
    ------
    InputError
        For another name, or ``"cuda"`` without the CUDA kernels or without a GPU.
    """
    import torch

    has_cuda = "cuda" in backends()
    if device == "auto":
        return "cuda" if has_cuda and torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not has_cuda:
        raise InputError(
            "--device: cuda requested but this build has no CUDA kernels (install with nvcc "
            "on the PATH), use --device cpu"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: cuda requested but torch sees no GPU; use --device cpu")
    return device


def num_threads() -> int:
    """Number of OpenMP threads the CPU kernels use."""
    return int(lib().num_threads())


def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads of the CPU kernels (ValueError if ``n < 1``).

    The kernels keep their own count (not OpenMP's global one), so ``torch.set_num_threads``
    does not change it, nor does this change torch's."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    lib().set_num_threads(n)


@contextlib.contextmanager
def threads(torch_threads: int | None = None, kernel_threads: int | None = None) -> Iterator[None]:
    """Run a block with torch's intra-op thread count and/or the CPU kernels' thread count set
    (None: left as it is); both are restored afterwards.

    torch and the compiled module share one libgomp (same soname), but the kernels keep their own
    count (:func:`set_num_threads`), so each is set on its own. Uses: the training loop runs
    torch's own tiny ops on one thread while the kernels do the heavy work (one thread skips
    waking the OpenMP team); a suite runs every problem on one thread of each, as its worker
    processes do, because torch's thread count changes the order of its float sums.
    """
    import torch

    before = torch.get_num_threads(), num_threads()
    try:
        if torch_threads is not None:
            torch.set_num_threads(int(torch_threads))
        if kernel_threads is not None:
            set_num_threads(int(kernel_threads))
        yield
    finally:
        torch.set_num_threads(before[0])
        set_num_threads(before[1])


def cuda_thin_kernel_variant() -> str:
    """The CUDA thin-width kernel's variant in use, one of :data:`THIN_KERNEL_VARIANTS`."""
    return THIN_KERNEL_VARIANTS[int(lib().cuda_thin_kernel_variant())]


def set_cuda_thin_kernel_variant(variant: str) -> None:
    """Choose the CUDA thin-width kernel's variant, process-wide (the CPU kernels ignore it).

    Raises ValueError for a name not in :data:`THIN_KERNEL_VARIANTS`."""
    if variant not in THIN_KERNEL_VARIANTS:
        raise ValueError(f"variant: expected one of {THIN_KERNEL_VARIANTS}, got {variant!r}")
    lib().set_cuda_thin_kernel_variant(THIN_KERNEL_VARIANTS.index(variant))
