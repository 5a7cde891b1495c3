"""Cosine-distance matrices and average linkage: the kernels of the clustering step
(Martinelli et al. 2024, Sec. 3, step "Cluster")."""

from __future__ import annotations

import numpy as np
import torch

from ._checks import DTYPE_CODES, check_finite, check_tensor, device_code, lib, stream, workspace


def cosine_distances(v: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Pairwise cosine distances between the rows of ``v``.

    ``d(i, j) = 1 - cos(v_i, v_j)``, or ``1 - |cos(v_i, v_j)|`` when ``absolute`` (for symmetry
    classes where v and -v are the same neuron). Computed in float64 whatever the input dtype.
    A zero row has distance 1 to every other row. Units: dimensionless, in [0, 2] ([0, 1] when
    absolute).

    Parameters
    ----------
    v : ``[M, D]`` float32 or float64, finite, contiguous, cpu or cuda.

    Returns
    -------
    torch.Tensor
        ``[M, M]`` float64 on ``v``'s device, symmetric, zero diagonal.

    Raises
    ------
    TypeError, ValueError
        On a wrong dtype, shape, layout or non-finite values.
    """
    check_tensor(v, "v", 2)
    if v.shape[1] < 1:
        raise ValueError(f"v: expected shape [M, D] with D >= 1, got {tuple(v.shape)}")
    check_finite(v, "v")
    m = int(v.shape[0])
    out = torch.empty((m, m), dtype=torch.float64, device=v.device)
    ws, ws_ptr = None, 0
    if v.device.type == "cuda":  # per-row scale and inverse norm: 2 * M doubles
        ws, ws_ptr = workspace(2 * m * 8, v.device)
    lib().cosine_distances(
        v.data_ptr(),
        m,
        int(v.shape[1]),
        DTYPE_CODES[v.dtype],
        bool(absolute),
        out.data_ptr(),
        device_code(v),
        stream(v),
        ws_ptr,
    )
    del ws
    return out


def average_linkage(dist, overwrite: bool = False, check: bool = True) -> np.ndarray:
    """Average-linkage (UPGMA) hierarchical clustering of a square distance matrix (C++ kernel).

    Same result as ``scipy.cluster.hierarchy.linkage(squareform(dist), method="average")`` (up to
    the order of merges at exactly equal heights), with the nearest-neighbour-chain algorithm
    (Muellner 2011, arXiv:1109.2378) on a square matrix so every row scan is contiguous.

    Parameters
    ----------
    dist : ``[M, M]`` float64 numpy array or torch tensor (CPU), symmetric, finite, >= 0, M >= 2.
    overwrite : let the kernel use ``dist`` as its workspace (saves a copy of M^2 doubles).
    check : scan ``dist`` for NaN/Inf and negative entries first (two passes over M^2 doubles).
        Pass False for a matrix from :func:`cosine_distances`, which is finite and >= 0 by
        construction; the kernel still rejects NaN.

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
    lib().average_linkage(work.ctypes.data, m, z.ctypes.data)
    return z
