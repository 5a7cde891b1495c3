"""What the tests share: the devices, dtypes and activations they run over, the tolerances
(with where their numbers come from), and small builders of ensembles and comparisons."""

from __future__ import annotations

import torch

from expand_and_cluster import backends
from expand_and_cluster.activations import ACTIVATIONS

#: "cuda" joins when the build has the CUDA kernels and torch sees a GPU.
HAS_CUDA = "cuda" in backends() and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float64]
ACTIVATION_NAMES = sorted(ACTIVATIONS)
#: Relative tolerances of a kernel against torch.autograd (in float64, so the float32 comparison
#: measures the kernel's own rounding). float64: the kernels sum the same terms in another
#: order, a few ulp (1e-16) per term times the terms summed (up to ~1e4 here), far below 1e-10;
#: float32: the same with ulp 6e-8, times the depth (<= 4 layers), about 1e-5, so 1e-4.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}

#: Depth 1-3, N = 1, B = 1, widths that are not multiples of any tile.
SHAPES = [
    ([3, 7, 2], 1, 1),
    ([5, 13, 11, 3], 4, 300),
    ([2, 65, 1], 3, 129),
    ([4, 6, 9, 5, 2], 2, 70),
    ([1, 1, 1], 1, 2),
    ([7, 33, 4], 5, 1025),
]


def ensemble(n, widths, dtype, device="cpu", seed=0):
    """Random weights ``[n, out, in]`` (scaled by 1/sqrt(in)) and biases (std 0.3) of an
    ensemble with widths ``[d_in, hidden..., d_out]``, drawn in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    ws = [
        (
            torch.randn(n, widths[l + 1], widths[l], generator=g, dtype=torch.float64)
            / widths[l] ** 0.5
        ).to(dtype=dtype, device=device)
        for l in range(len(widths) - 1)
    ]
    bs = [
        (0.3 * torch.randn(n, widths[l + 1], generator=g, dtype=torch.float64)).to(
            dtype=dtype, device=device
        )
        for l in range(len(widths) - 1)
    ]
    return ws, bs


def rel(a, b) -> float:
    """Relative error ``||a - b|| / ||b||`` (Frobenius)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def networks_equal(a, b) -> bool:
    """Bit-equal networks: the same ``.npz`` keys, dtypes and arrays."""
    import numpy as np

    da, db = a.to_arrays(), b.to_arrays()
    return da.keys() == db.keys() and all(
        da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]) for k in da
    )
