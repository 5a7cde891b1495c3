"""Step 2 of Expand-and-Cluster for one hidden layer: cluster the neurons of N students and
collapse each cluster into one neuron.

Source: Martinelli, Simsek, Gerstner, Brea, "Expand-and-Cluster: Parameter Recovery of Neural
Networks", ICML 2024 (arXiv 2304.12794), Sec. 3, step "Cluster"; docs/method.md, step 2.

:func:`cluster_layer` canonicalises the students' incoming vectors by the activation's symmetry
class, links them (average linkage on masked cosine distances), cuts the tree
(:func:`~expand_and_cluster.pipeline.cut.cut_tree`), filters the clusters by size (gamma) and
angle (beta) and collapses each survivor into one neuron, bookkeeping the sign flips per student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ops
from ..activations import Activation, SymmetryClass, get_activation
from ..config import ClusterConfig
from ..errors import InputError, NoClusterError
from ..metrics import unit_rows
from .cut import cut_tree

__all__ = [
    "ClusterConfig",
    "DroppedCluster",
    "LayerClustering",
    "cluster_layer",
    "min_cluster_size",
]

#: At most this many members of a cluster enter its median pairwise angle (200 members give
#: 19,900 pairs, plenty for a median; the subsample is seeded, so results are deterministic).
_MAX_ANGLE_SAMPLE = 200
#: Round-off allowance when turning gamma * N into a whole number of members
#: (0.7 * 10 = 7.000000000000001 must mean 7).
_SIZE_ROUNDOFF = 1e-9


def min_cluster_size(gamma: float, n_students: int) -> int:
    """Smallest number of members a cluster needs to be kept: ``ceil(gamma * N)``.

    Parameters
    ----------
    gamma : float in (0, 1].
    n_students : int, N.

    Returns
    -------
    int
        ``ceil(gamma * N)``, with a 1e-9 allowance for round-off (``0.7 * 10`` gives 7).

    Raises
    ------
    InputError (a ValueError)
        If ``gamma * N < 2``: a cluster must hold members of at least two students, otherwise every
        neuron (junk included) would be its own cluster.

    Notes
    -----
    Source: Martinelli et al. 2024, Sec. 3, step "Cluster" (gamma filter); docs/method.md, step 2.
    """
    product = gamma * n_students
    if product < 2.0 - _SIZE_ROUNDOFF:
        raise InputError(
            f"gamma * N = {gamma:g} * {n_students} = {product:g} < 2: a cluster must be found in "
            f"at least 2 students; raise gamma or train more students (number of students "
            f"N = {n_students})"
        )
    return int(math.ceil(product - _SIZE_ROUNDOFF))


# ----------------------------------------------------------------------------------------------
# distances and linkage


def _l2_distances(u: np.ndarray) -> np.ndarray:
    """``[M, D]`` float64 -> ``[M, M]`` float64 Euclidean distances (symmetric, zero diagonal)."""
    t = torch.from_numpy(u)
    d = torch.cdist(t, t).numpy()
    d = 0.5 * (d + d.T)  # the matmul formulation of cdist is symmetric only up to round-off
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0, out=d)


def _distances(u: np.ndarray, metric: str, absolute: bool, backend: str, device="cpu"):
    """``[M, D]`` float64 -> ``[M, M]`` float64 distances: Euclidean, or cosine with the C++ (or,
    ``device`` "cuda", CUDA) kernel or its pure-torch reference; the matrix comes back to host
    memory for the linkage."""
    if metric == "l2":
        return _l2_distances(u)
    if backend == "native":
        return ops.cosine_distances(torch.from_numpy(u).to(device), absolute).cpu().numpy()
    return ops.cosine_distances_reference(torch.from_numpy(u), absolute).numpy()


def _linkage(dist: np.ndarray, backend: str) -> np.ndarray:
    """UPGMA linkage ``[M-1, 4]`` of a square float64 matrix: the C++ kernel (consuming
    ``dist``, which our distance functions make finite and >= 0, so its scan is skipped) or
    scipy's."""
    if backend == "native":
        return ops.average_linkage(dist, overwrite=True, check=False)
    return ops.average_linkage_reference(dist)


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class DroppedCluster:
    """A cluster (>= 2 members) at the cut that did not survive the filters.

    Attributes
    ----------
    size : int, number of members.
    median_angle_degrees : float, median pairwise angle between members, degrees.
    reason : str, ``"size < gamma*N"`` or ``"median angle > beta"``.
    members : ``[size]`` int64, row indices into the ``N * width`` vectors (student-major).
    students : ``[n]`` int64, sorted distinct students that have a member.
    """

    size: int
    median_angle_degrees: float
    reason: str
    members: np.ndarray = field(repr=False)
    students: np.ndarray = field(repr=False)


@dataclass
class LayerClustering:
    """Result of :func:`cluster_layer` for one hidden layer (k_hat surviving clusters).

    Rows of the ``N * width`` vectors are student-major: row ``n * width + j`` is hidden neuron j
    of student n.

    Attributes
    ----------
    incoming : ``[k_hat, fan_in + 1]`` float64
        Collapsed ``[w; b]`` of each surviving cluster, canonical form: unit masked norm for the
        scale-symmetric classes; for sign-symmetric classes, the sign that makes the
        largest-magnitude masked coordinate of the reference member positive. Masked-out
        coordinates are carried along untouched (only scaled/flipped with their vector).
    outgoing : ``[k_hat, d_next]`` float64
        The best student's summed (transformed) outgoing weights per cluster.
    student_outgoing : ``[N, k_hat, d_next]`` float64
        Every student's summed transformed outgoing weights per cluster (zeros where the student
        has no member); ``outgoing[c] == student_outgoing[best_student[c], c]``.
    next_bias_shift : ``[N, d_next]`` float64
        Per student, the sum over its flipped members of their outgoing weights (odd_constant
        class: ``a sigmoid(z) = -a sigmoid(-z) + a``); zeros for the other classes.
    linear_terms : ``[N, d_next, fan_in + 1]`` float64
        Per student, the linear map ``sum a * c * v^T`` left by flipped members of the even_linear
        classes (``s(z) = s(-z) + c z``, c = ``Activation.linear_coefficient``; v the canonical
        vector before the flip); zeros for the other classes. Acts on ``[x; 1]``.
    best_student : ``[k_hat]`` int64, the student whose member(s) gave each incoming vector.
    sizes : ``[k_hat]`` int64, number of members of each surviving cluster.
    median_angle_degrees : ``[k_hat]`` float64, degrees.
    labels : ``[N * width]`` int64, surviving cluster id of each vector, -1 if none.
    dropped : list of :class:`DroppedCluster`, clusters of >= 2 members that were dropped.
    n_dropped_singletons : int, vectors alone in their cluster at the cut (not listed).
    cut_height : float, the height of the tree cut (units of the metric).
    plateau : (h_a, h_b), see :func:`~expand_and_cluster.pipeline.cut.cut_tree`.
    linkage : ``[M-1, 4]`` float64, scipy format.
    counts : ``[M-1]`` int64, clusters of size >= gamma * N after each merge (for plots).
    min_size : int, ``ceil(gamma * N)``.
    input_mask : ``[fan_in]`` bool, inputs used for distances, angles and signs.
    n_students : int, N.
    width : int, hidden neurons per student in this layer.
    activation : str, name of the activation.
    """

    incoming: np.ndarray
    outgoing: np.ndarray
    student_outgoing: np.ndarray
    next_bias_shift: np.ndarray
    linear_terms: np.ndarray
    best_student: np.ndarray
    sizes: np.ndarray
    median_angle_degrees: np.ndarray
    labels: np.ndarray
    dropped: list[DroppedCluster]
    n_dropped_singletons: int
    cut_height: float
    plateau: tuple[float, float]
    linkage: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)
    min_size: int
    input_mask: np.ndarray = field(repr=False)
    n_students: int
    width: int
    activation: str

    @property
    def k_hat(self) -> int:
        """Recovered width of the layer: the number of surviving clusters."""
        return int(self.incoming.shape[0])


# ----------------------------------------------------------------------------------------------
# helpers


def _as_float64(a, name: str, ndim: int) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    a = np.array(a, dtype=np.float64, copy=True)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return a


def _median_pairwise_angle(u: np.ndarray, absolute: bool, seed: int) -> float:
    """Median angle (degrees) over the pairs of rows of ``u`` ``[n, D]``, n >= 2.

    Angle between lines (``arccos |cos|``) when ``absolute``. At most ``_MAX_ANGLE_SAMPLE`` rows,
    a seeded subsample, enter the median. A zero row is at 90 degrees from everything.
    """
    if u.shape[0] > _MAX_ANGLE_SAMPLE:
        rows = np.random.default_rng(seed).choice(u.shape[0], _MAX_ANGLE_SAMPLE, replace=False)
        u = u[np.sort(rows)]
    unit = unit_rows(u)
    cos = (unit @ unit.T)[np.triu_indices(u.shape[0], k=1)]
    if absolute:
        cos = np.abs(cos)
    return float(np.degrees(np.median(np.arccos(np.clip(cos, -1.0, 1.0)))))


def _largest_coordinate_sign(u: np.ndarray) -> np.ndarray:
    """``[M, D]`` -> ``[M]`` +-1: sign of each row's largest-magnitude coordinate (+1 for 0)."""
    pick = u[np.arange(u.shape[0]), np.argmax(np.abs(u), axis=1)]
    return np.where(pick < 0, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# the clustering step


def cluster_layer(
    incoming: np.ndarray | torch.Tensor,
    outgoing: np.ndarray | torch.Tensor,
    student_losses: np.ndarray | torch.Tensor,
    activation: str | Activation,
    config: ClusterConfig | None = None,
    input_mask: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> LayerClustering:
    """Cluster one hidden layer of N students and collapse each cluster into one neuron.

    Parameters
    ----------
    incoming : ``[N, width, fan_in + 1]`` array or tensor (any real dtype; used in float64)
        Per student, per hidden neuron, the incoming vector ``[w; b]`` (weights, then bias).
    outgoing : ``[N, d_next, width]``
        Per student, the next layer's weight matrix (torch ``Linear`` layout): column j holds the
        outgoing weights ``a`` of hidden neuron j.
    student_losses : ``[N]``, loss of each student (lower is better), finite.
    activation : name or :class:`~expand_and_cluster.activations.Activation` of the layer.
    config : :class:`~expand_and_cluster.config.ClusterConfig` (None: the defaults).
    input_mask : ``[fan_in]`` bool or None (all True)
        Inputs that carry signal
        (:func:`~expand_and_cluster.pipeline.stages.input_mask_from_queries`). The bias
        coordinate is always used. Masked-out coordinates are ignored for distances, angles,
        norms and sign decisions, and returned untouched (up to the vector's scale and sign) in
        ``incoming``.
    device : where the ``[M, M]`` cosine distances are computed ("cpu" or "cuda"; the native
        backend with the cosine metric only). The linkage and the rest run on the CPU.

    Returns
    -------
    LayerClustering
        Surviving clusters ordered by decreasing size (ties: by first member row), their
        collapsed neurons, per-student flip bookkeeping, the dropped clusters, the tree and cut.

    Raises
    ------
    ValueError
        On inconsistent shapes, NaN/Inf, or a non-boolean mask.
    InputError (a ValueError)
        If ``gamma * N < 2`` (the message names gamma and the number of students), or the mask
        masks every input.
    NoClusterError
        If no cluster survives the filters (the message counts clusters dropped by size and by
        angle and suggests what to change).

    Notes
    -----
    Steps (Martinelli et al. 2024, Sec. 3, step "Cluster"; docs/method.md, step 2):

    1. Canonicalise. Scale-symmetric classes (relu, leaky_relu): each v is divided by the norm of
       its masked part ``[w_mask; b]`` and its outgoing weights are multiplied by that norm
       (``relu(c z) = c relu(z)``, c > 0; a vector with a zero masked part is left as is). The
       masked norm, rather than the full one, keeps the canonical form and the l2 distances
       independent of the unidentifiable masked-out weights. Sign-symmetric classes are not flipped
       before clustering with the cosine metric: the distance ``1 - |cos|`` is sign-invariant.
       With the l2 metric they are flipped so their largest-magnitude masked coordinate is > 0.
    2. Distances in float64 on the masked vectors; average linkage (UPGMA).
    3. Tree cut by :func:`~expand_and_cluster.pipeline.cut.cut_tree` with ``config.cut_rule``
       (with ``config.cut_uses_beta``, only clusters whose mean pairwise distance is within beta
       count).
    4. Filters: clusters smaller than ``ceil(gamma * N)`` are dropped (listed in ``dropped`` if
       they have >= 2 members, otherwise counted in ``n_dropped_singletons``); clusters whose
       median pairwise angle (``arccos |cos|`` for sign-symmetric classes; a seeded subsample of at
       most 200 members) exceeds ``beta_degrees`` are dropped.
    5. Collapse. Best student = lowest loss among the students with a member (ties: lowest
       index); reference = its first member, oriented (sign classes) so that its
       largest-magnitude masked coordinate is positive. Every member with a negative masked dot
       product with the reference is flipped, and its outgoing weight ``a`` transforms by class:
       odd ``a -> -a``; odd_constant ``a -> -a`` and ``next_bias_shift[n] += a``; even_linear
       classes ``a`` unchanged and ``linear_terms[n] += c a v^T``. The incoming vector is the mean
       of the best student's aligned members (duplicates of one neuron); the outgoing weight is the
       sum of their transformed outgoing weights (duplicates merged by summing their outputs).

    Complexity: O(M^2 D) for the distances and O(M^2) time and memory for the linkage,
    ``M = N * width``; everything after the linkage is O(M log M) plus O(k_hat * 200^2 D).
    """
    config = ClusterConfig() if config is None else config
    if not isinstance(config, ClusterConfig):
        raise TypeError(f"config: expected a ClusterConfig, got {type(config).__name__}")
    act = get_activation(activation)
    sym = act.symmetry
    vin = _as_float64(incoming, "incoming", 3)
    vout = _as_float64(outgoing, "outgoing", 3)
    losses = _as_float64(student_losses, "student_losses", 1)
    n_students, width, dim = vin.shape
    fan_in = dim - 1
    if n_students < 1 or width < 1 or fan_in < 1:
        raise ValueError(
            f"incoming: expected shape [N, width, fan_in + 1] with N, width, fan_in >= 1, got "
            f"{vin.shape}"
        )
    if vout.shape[0] != n_students or vout.shape[2] != width or vout.shape[1] < 1:
        raise ValueError(
            f"outgoing: expected shape [{n_students}, d_next, {width}] (N and width of incoming), "
            f"got {vout.shape}"
        )
    if losses.shape != (n_students,):
        raise ValueError(f"student_losses: expected shape [{n_students}], got {losses.shape}")
    mask = _check_mask(input_mask, fan_in)
    min_size = min_cluster_size(config.gamma, n_students)
    d_next = vout.shape[1]

    m = n_students * width
    v = vin.reshape(m, dim)
    a = np.ascontiguousarray(vout.transpose(0, 2, 1).reshape(m, d_next))
    student_of = np.repeat(np.arange(n_students), width)
    cols = np.append(np.flatnonzero(mask), fan_in)  # used coordinates: unmasked inputs + bias

    # 1. Canonicalise (scale).
    if sym.scale_symmetric:
        norms = np.linalg.norm(v[:, cols], axis=1)
        scale = np.where(norms > 0, norms, 1.0)
        v /= scale[:, None]
        a *= scale[:, None]
    u = np.ascontiguousarray(v[:, cols])

    # 2. Distances and linkage.
    absolute = sym.sign_symmetric
    if config.metric == "l2" and absolute:
        dist_input = u * _largest_coordinate_sign(u)[:, None]
    else:
        dist_input = u
    dist = _distances(dist_input, config.metric, absolute, config.linkage_backend, device)
    Z = np.asarray(_linkage(dist, config.linkage_backend), dtype=np.float64)
    del dist

    # 3. Cut.
    max_mean = None
    if config.cut_uses_beta:
        max_mean = 1.0 - math.cos(math.radians(min(config.beta_degrees, 90.0 if absolute else 180)))
    cut = cut_tree(Z, min_size, max_mean, config.cut_rule)

    # 4. Filters.
    order = np.argsort(cut.labels, kind="stable")
    bounds = np.flatnonzero(np.diff(cut.labels[order])) + 1
    groups = np.split(order, bounds)  # members of each cluster at the cut, ascending rows
    survivors: list[tuple[np.ndarray, float]] = []
    dropped: list[DroppedCluster] = []
    n_singletons = 0
    for members in groups:
        if members.size == 1:
            n_singletons += 1
            continue
        angle = _median_pairwise_angle(u[members], absolute, seed=int(members[0]))
        reason = None
        if members.size < min_size:
            reason = "size < gamma*N"
        elif angle > config.beta_degrees:
            reason = "median angle > beta"
        if reason is None:
            survivors.append((members, angle))
        else:
            dropped.append(
                DroppedCluster(
                    size=int(members.size),
                    median_angle_degrees=angle,
                    reason=reason,
                    members=members,
                    students=np.unique(student_of[members]),
                )
            )
    if not survivors:
        raise NoClusterError(
            _no_cluster_message(dropped, n_singletons, min_size, config, n_students, m)
        )
    survivors.sort(key=lambda s: (-s[0].size, int(s[0][0])))

    # 5. Collapse.
    k_hat = len(survivors)
    out_in = np.empty((k_hat, dim))
    student_out = np.zeros((n_students, k_hat, d_next))
    bias_shift = np.zeros((n_students, d_next))
    linear_terms = np.zeros((n_students, d_next, dim))
    best = np.empty(k_hat, dtype=np.int64)
    labels = np.full(m, -1, dtype=np.int64)
    for c, (members, _) in enumerate(survivors):
        labels[members] = c
        studs = student_of[members]
        candidates = np.unique(studs)
        best[c] = candidates[np.argmin(losses[candidates])]
        own = studs == best[c]
        signs = np.ones(members.size)
        if sym.sign_symmetric:
            ref = u[members[np.argmax(own)]]
            ref = ref * _largest_coordinate_sign(ref[None])[0]
            signs[u[members] @ ref < 0] = -1.0
        flipped = members[signs < 0]
        a_t = a[members].copy()
        if flipped.size:
            fs = student_of[flipped]
            if sym in (SymmetryClass.ODD, SymmetryClass.ODD_CONSTANT):
                a_t[signs < 0] *= -1.0
                if sym is SymmetryClass.ODD_CONSTANT:
                    np.add.at(bias_shift, fs, a[flipped])
            elif sym.has_linear_term:
                terms = act.linear_coefficient * a[flipped][:, :, None] * v[flipped][:, None, :]
                np.add.at(linear_terms, fs, terms)
        np.add.at(student_out[:, c, :], studs, a_t)
        out_in[c] = (signs[own, None] * v[members[own]]).mean(axis=0)

    return LayerClustering(
        incoming=out_in,
        outgoing=student_out[best, np.arange(k_hat)].copy(),
        student_outgoing=student_out,
        next_bias_shift=bias_shift,
        linear_terms=linear_terms,
        best_student=best,
        sizes=np.array([s[0].size for s in survivors], dtype=np.int64),
        median_angle_degrees=np.array([s[1] for s in survivors]),
        labels=labels,
        dropped=dropped,
        n_dropped_singletons=n_singletons,
        cut_height=cut.cut_height,
        plateau=cut.plateau,
        linkage=Z,
        counts=cut.counts,
        min_size=min_size,
        input_mask=mask,
        n_students=n_students,
        width=width,
        activation=act.name,
    )


def _check_mask(input_mask, fan_in: int) -> np.ndarray:
    if input_mask is None:
        return np.ones(fan_in, dtype=bool)
    if isinstance(input_mask, torch.Tensor):
        input_mask = input_mask.detach().cpu().numpy()
    mask = np.asarray(input_mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"input_mask: expected a bool array, got dtype {mask.dtype}")
    if mask.shape != (fan_in,):
        raise ValueError(f"input_mask: expected shape [{fan_in}] (fan_in), got {mask.shape}")
    if not mask.any():
        raise InputError("input_mask: masks out every input; at least one input must be kept")
    return mask.copy()


def _no_cluster_message(dropped, n_singletons, min_size, config, n_students, m) -> str:
    by_size = sum(d.reason == "size < gamma*N" for d in dropped)
    by_angle = len(dropped) - by_size
    return (
        f"no cluster survived among {m} neurons of {n_students} students: {by_size} cluster(s) "
        f"of 2+ members and {n_singletons} singleton(s) had fewer than ceil(gamma * N) = "
        f"{min_size} members (gamma = {config.gamma:g}), {by_angle} cluster(s) had a median "
        f"angle above beta = {config.beta_degrees:g} degrees. Try more students, a lower gamma, "
        f"training the students longer (to lower loss), or a larger beta."
    )
