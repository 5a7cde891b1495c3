"""Step 2 of Expand-and-Cluster: cluster the hidden neurons of N students, one layer at a time.

Source: Martinelli, Simsek, Gerstner, Brea, "Expand-and-Cluster: Parameter Recovery of Neural
Networks", ICML 2024 (arXiv 2304.12794), Sec. 3, step "Cluster"; this project's docs/METHOD.md,
"Step 2: Cluster".

Pipeline of :func:`cluster_layer` for one hidden layer of width ``w`` in each of ``N`` students:

1. collect the ``M = N * w`` incoming vectors ``v = [w; b]`` (float64);
2. canonicalise by the activation's symmetry class (relu: unit norm, outgoing weights rescaled;
   sign-symmetric classes: a sign-invariant distance instead of a flip);
3. pairwise distances on the masked vectors (inputs constant over the queries are left out);
4. average-linkage (UPGMA) clustering;
5. one pass over the merge list to find the cut that maximises the number of clusters with at
   least ``gamma * N`` members (:func:`cut_tree`);
6. filters: size ``>= gamma * N`` and median pairwise angle ``<= beta``;
7. collapse each surviving cluster into one neuron, taken from the best (lowest-loss) student that
   has a member in it, with the sign flips and their side effects (next layer's bias, linear term)
   bookkept per student.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ops
from .activations import Activation, SymmetryClass, get_activation
from .errors import InputError, NoClusterError

__all__ = [
    "ClusterConfig",
    "DroppedCluster",
    "LayerClustering",
    "TreeCut",
    "cluster_layer",
    "cut_tree",
    "input_mask_from_queries",
    "min_cluster_size",
]

#: Lower bound of the plateau start in the geometric-midpoint cut: exact duplicates merge at
#: height 0, and sqrt(0 * h_b) would put the cut at 0 (the plateau's very start).
_TINY_HEIGHT = 1e-15
#: At most this many members of a cluster enter its median pairwise angle (200 members give
#: 19,900 pairs, plenty for a median; the subsample is seeded, so results are deterministic).
_MAX_ANGLE_SAMPLE = 200
#: Round-off allowance when turning gamma * N into a whole number of members
#: (0.7 * 10 = 7.000000000000001 must mean 7).
_SIZE_ROUNDOFF = 1e-9

_METRICS = ("cosine", "l2")
_CUT_RULES = ("longest_plateau", "max_count", "persistent_max")
#: Rule "persistent_max": plateaus at least this fraction of the longest one (in decades of
#: height) compete, and the one with the most clusters wins.
_PERSISTENT_FRACTION = 0.5
_BACKENDS = ("native", "scipy")


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ClusterConfig:
    """Hyperparameters of the clustering step (Martinelli et al. 2024, Sec. 3, step "Cluster").

    Attributes
    ----------
    gamma : float, in (0, 1]
        Keep clusters with at least ``gamma * N`` members (N = number of students). Reference
        values: 0.5 (code default), 0.75 (the authors' runs for sigmoid, tanh, softplus, relu).
        ``gamma * N`` must be >= 2 (checked by :func:`cluster_layer`, which knows N).
    beta_degrees : float, in (0, 180], degrees
        Drop clusters whose median pairwise angle between members exceeds beta. Reference values:
        60 (pi/3, the authors' runs), 30 (pi/6, code default). For sign-symmetric classes angles are
        taken between lines (at most 90 degrees), so beta >= 90 disables the filter.
    metric : {"cosine", "l2"}
        Distance for the linkage. "cosine": ``1 - cos`` (``1 - |cos|`` for sign-symmetric classes,
        no flip needed); "l2": Euclidean distance after flipping every vector so that its
        largest-magnitude masked coordinate is positive (less stable: a vector whose two largest
        coordinates are close in magnitude can flip differently from its cluster mates).
    mask_tolerance : float, in [0, 1)
        Used by :func:`input_mask_from_queries`: inputs whose variance over the queries is
        ``<= mask_tolerance * max variance`` are masked out.
    linkage_backend : {"native", "scipy"}
        "native": :func:`expand_and_cluster.ops.cosine_distances` and
        :func:`expand_and_cluster.ops.average_linkage` (C++ kernels); "scipy": their reference
        twins (torch distances, ``scipy.cluster.hierarchy.linkage``), slower, for cross-checks.
    cut_rule : {"persistent_max", "longest_plateau", "max_count"}
        Where to cut the tree (see :func:`cut_tree`): inside the plateau of the number of clusters
        of ``>= gamma * N`` members with the most clusters among those that span at least half as
        many decades of height as the longest one (default), inside the longest plateau, or inside
        the first plateau of its maximum (the paper's rule, which junk neurons can mislead).
    cut_uses_beta : bool, default False (the paper's rule)
        When choosing the cut, count only big clusters whose mean pairwise distance is at most
        ``1 - cos(beta)`` (the distance of two vectors at angle beta), instead of every cluster of
        ``>= gamma * N`` members. Clumps of unrelated junk neurons then no longer inflate the count
        (with the paper's rule, random-direction junk that outnumbers about k/2 neurons per
        student wins the count and moves the cut to junk heights). Cosine metric only. The final
        beta filter (median angle) still applies.

    Raises
    ------
    InputError (a ValueError)
        On construction, for any field out of range; the message names the field.
    """

    gamma: float = 0.5
    beta_degrees: float = 60.0
    metric: str = "cosine"
    mask_tolerance: float = 1e-10
    linkage_backend: str = "native"
    cut_uses_beta: bool = False
    cut_rule: str = "persistent_max"

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise InputError(f"{name}: expected a number, got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"{name}: expected a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))  # store plain floats (np.float32 -> float)
            return float(value)

        if not 0.0 < number("gamma") <= 1.0:
            raise InputError(f"gamma: expected a value in (0, 1], got {self.gamma!r}")
        if not 0.0 < number("beta_degrees") <= 180.0:
            raise InputError(
                f"beta_degrees: expected an angle in (0, 180] degrees, got {self.beta_degrees!r}"
            )
        if not 0.0 <= number("mask_tolerance") < 1.0:
            raise InputError(
                f"mask_tolerance: expected a value in [0, 1), got {self.mask_tolerance!r}"
            )
        if self.metric not in _METRICS:
            raise InputError(f"metric: expected one of {_METRICS}, got {self.metric!r}")
        if self.linkage_backend not in _BACKENDS:
            raise InputError(
                f"linkage_backend: expected one of {_BACKENDS}, got {self.linkage_backend!r}"
            )
        if self.cut_rule not in _CUT_RULES:
            raise InputError(f"cut_rule: expected one of {_CUT_RULES}, got {self.cut_rule!r}")
        if not isinstance(self.cut_uses_beta, (bool, np.bool_)):
            raise InputError(f"cut_uses_beta: expected a bool, got {self.cut_uses_beta!r}")
        if self.cut_uses_beta and self.metric != "cosine":
            raise InputError(
                f"cut_uses_beta: needs metric='cosine' (an angle has no l2 distance), got "
                f"metric={self.metric!r}"
            )


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
    Source: Martinelli et al. 2024, Sec. 3, step "Cluster" (gamma filter); METHOD.md step 2.6.
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
# input mask


def input_mask_from_queries(X: np.ndarray | torch.Tensor, tolerance: float = 1e-10) -> np.ndarray:
    """Inputs that carry signal: those whose variance over the queries is not ~0.

    Weights on an input that is constant over the queries are unidentifiable (only their product
    with the constant, absorbed in the bias, matters), so such inputs are left out of distances,
    angles and sign decisions (METHOD.md step 2.2; the authors used a per-pixel mask on MNIST).

    Parameters
    ----------
    X : ``[P, d]`` array or tensor of queries (any real dtype; computed in float64), finite.
    tolerance : float >= 0
        Input i is masked out when ``Var(X[:, i]) <= tolerance * max_j Var(X[:, j])``.

    Returns
    -------
    numpy.ndarray
        ``[d]`` bool, True where the input carries signal.

    Raises
    ------
    ValueError
        If ``X`` is not 2-D or not finite, or ``tolerance`` is negative.
    InputError (a ValueError)
        If no input varies over the queries (fewer than 2 distinct queries).

    Notes
    -----
    Source: Martinelli et al. 2024, MNIST experiments (per-pixel mask of the reference code);
    METHOD.md step 2.2.
    """
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X: expected a 2-D array [P, d], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X: contains NaN or Inf")
    if not (math.isfinite(tolerance) and tolerance >= 0.0):
        raise ValueError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")
    var = X.var(axis=0) if X.shape[0] else np.zeros(X.shape[1])
    top = float(var.max()) if var.size else 0.0
    if top <= 0.0:
        raise InputError(
            f"X: no input varies over the {X.shape[0]} queries; cannot build an input mask"
        )
    return var > tolerance * top


# ----------------------------------------------------------------------------------------------
# distances and linkage (thin wrappers: one place to swap kernels)


def _cosine_distances_native(u: np.ndarray, absolute: bool, device="cpu") -> np.ndarray:
    """``[M, D]`` float64 -> ``[M, M]`` float64 cosine distances, C++ kernel (CUDA kernel when
    ``device`` is a GPU; the matrix comes back to host memory for the linkage)."""
    return ops.cosine_distances(torch.from_numpy(u).to(device), absolute).cpu().numpy()


def _cosine_distances_scipy(u: np.ndarray, absolute: bool) -> np.ndarray:
    """``[M, D]`` float64 -> ``[M, M]`` float64 cosine distances, pure-torch reference."""
    return ops.cosine_distances_reference(torch.from_numpy(u), absolute).numpy()


def _average_linkage_native(dist: np.ndarray) -> np.ndarray:
    """UPGMA linkage ``[M-1, 4]`` of a square float64 matrix, C++ kernel (consumes ``dist``; the
    matrix comes from our distance functions, finite and >= 0, so the input scan is skipped)."""
    return ops.average_linkage(dist, overwrite=True, check=False)


def _average_linkage_scipy(dist: np.ndarray) -> np.ndarray:
    """UPGMA linkage ``[M-1, 4]`` of a square float64 matrix, scipy."""
    return ops.average_linkage_reference(dist)


def _l2_distances(u: np.ndarray) -> np.ndarray:
    """``[M, D]`` float64 -> ``[M, M]`` float64 Euclidean distances (symmetric, zero diagonal)."""
    t = torch.from_numpy(u)
    d = torch.cdist(t, t).numpy()
    d = 0.5 * (d + d.T)  # the matmul formulation of cdist is symmetric only up to round-off
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0, out=d)


def _distances(u: np.ndarray, metric: str, absolute: bool, backend: str, device="cpu"):
    if metric == "l2":
        return _l2_distances(u)
    if backend == "native":
        return _cosine_distances_native(u, absolute, device)
    return _cosine_distances_scipy(u, absolute)


def _linkage(dist: np.ndarray, backend: str) -> np.ndarray:
    if backend == "native":
        return _average_linkage_native(dist)
    return _average_linkage_scipy(dist)


# ----------------------------------------------------------------------------------------------
# tree cut


@dataclass
class TreeCut:
    """Result of :func:`cut_tree`.

    Attributes
    ----------
    counts : ``[M-1]`` int64, number of clusters with ``>= min_size`` members after each merge.
    max_count : int, the maximum of ``counts`` (over whole groups of equal-height merges).
    plateau_count : int, the count on the chosen plateau (``max_count`` for rule "max_count").
    plateau : (h_a, h_b), float: the height where the chosen plateau starts and the height of the
        next merge group that changes the count (the root height if it never changes).
    cut_height : float, the cut h; the partition is formed by every merge with height <= h.
    n_merges_below : int, number of merges (a prefix of the linkage) with height <= h.
    labels : ``[M]`` int64, cluster id of each observation at the cut (ids 0, 1, ... in order of
        each cluster's first observation).
    """

    counts: np.ndarray
    max_count: int
    plateau_count: int
    plateau: tuple[float, float]
    cut_height: float
    n_merges_below: int
    labels: np.ndarray


def cut_tree(
    linkage: np.ndarray,
    min_size: int,
    max_mean_distance: float | None = None,
    rule: str = "longest_plateau",
) -> TreeCut:
    """Cut a linkage tree inside a plateau of the number of clusters with ``>= min_size`` members.

    One pass over the merges (vectorised): merge i joins clusters of sizes ``s_a`` and ``s_b``
    into one of size ``Z[i, 3]``, so the count of big clusters changes by
    ``[Z[i,3] >= min_size] - [s_a >= min_size] - [s_b >= min_size]``; a cumulative sum gives the
    count after each merge. Merges at exactly equal heights count as one step (the count at a
    height is the count after all merges at that height), as a cut by height cannot separate them.

    ``rule="max_count"`` (the paper's rule): the maximum count is first reached at height ``h_a``;
    this first plateau of the maximum ends at the next merge height ``h_b`` where the count drops
    (the root height if it never drops). ``rule="longest_plateau"`` (default): among the plateaus
    of a constant non-zero count, take the one that spans the most decades of height,
    ``log(h_b) - log(h_a)`` (heights floored at 1e-15). Copies of one teacher neuron across
    students merge many decades below the gap between distinct neurons, so the true partition is
    the most persistent one, while junk neurons (students' spare neurons in random directions) can
    clump into more clusters of ``>= min_size`` members just below the root and win the
    "max_count" rule (seen on planted tanh teachers with 15 spare neurons per student: 12 clusters
    kept for 5 teacher neurons). ``rule="persistent_max"``: among the plateaus that span at least
    half as many decades as the longest one, the one with the most clusters; it guards against
    a long plateau of a few extremely tight clusters far below the height where the other
    neurons' clusters complete (seen in the second hidden layer of the deep digits teacher: 4
    clusters over 3.1 decades, 10, the teacher's width, over 3.0). In every rule the cut
    is the geometric midpoint ``h = sqrt(max(h_a, 1e-15) * h_b)``, clamped into ``[h_a, h_b)``
    (``h = h_a`` when the midpoint falls outside): the middle of the plateau on a log scale.
    Cutting at ``h_a`` itself (the paper's "first height of the maximum") stops as soon as the last
    cluster reaches ``min_size`` members, leaving out its (and other clusters') noisier members
    that join a little higher; cutting near ``h_b`` absorbs junk neurons, whose distances to
    anything are comparable to the gap between distinct neurons. Copies of one neuron across
    students typically sit many decades below that gap, so the log-scale midpoint holds the
    complete clusters and no junk.

    Parameters
    ----------
    linkage : ``[M-1, 4]`` float64 linkage matrix in scipy's format, heights non-decreasing (as
        UPGMA produces: it has no inversions), M >= 2.
    min_size : int >= 1, smallest size of a "big" cluster (``ceil(gamma * N)``).
    rule : "longest_plateau" (default), "persistent_max" or "max_count" (the paper's rule), see
        above.
    max_mean_distance : float or None
        If given, a cluster counts only if, besides its size, the mean distance over its pairs of
        members is ``<= max_mean_distance`` (see ``ClusterConfig.cut_uses_beta``). Exact for an
        average linkage, whose merge height is the mean distance across the two children: the sum
        of within-cluster distances follows ``S = S_a + S_b + h n_a n_b``, one step per merge.

    Returns
    -------
    TreeCut
        Counts, plateau, cut height and the labels at the cut.

    Raises
    ------
    ValueError
        On a malformed linkage (shape, NaN, decreasing heights).

    Notes
    -----
    O(M log M) after the linkage (the labels use pointer jumping over the parent array), instead of
    the reference code's ``fcluster`` at every merge height (O(M^2)).
    Source: Martinelli et al. 2024, Sec. 3, step "Cluster"; METHOD.md step 2.5.
    """
    Z = np.asarray(linkage, dtype=np.float64)
    if Z.ndim != 2 or Z.shape[1] != 4 or Z.shape[0] < 1:
        raise ValueError(f"linkage: expected a [M-1, 4] matrix with M >= 2, got shape {Z.shape}")
    if not np.isfinite(Z).all():
        raise ValueError("linkage: contains NaN or Inf")
    heights = Z[:, 2]
    if (np.diff(heights) < 0).any():
        raise ValueError("linkage: merge heights must be non-decreasing (UPGMA has no inversions)")
    if min_size < 1:
        raise ValueError(f"min_size: expected >= 1, got {min_size}")
    if rule not in _CUT_RULES:
        raise ValueError(f"rule: expected one of {_CUT_RULES}, got {rule!r}")
    n_merges = Z.shape[0]
    m = n_merges + 1
    children = Z[:, :2].astype(np.int64)
    sizes = np.concatenate([np.ones(m), Z[:, 3]])  # size of every node id 0 .. 2M-2
    big = sizes >= min_size  # per node id
    if max_mean_distance is not None:
        big &= _mean_within_distance(Z, children, sizes) <= max_mean_distance
    delta = big[m:].astype(np.int64) - big[children[:, 0]] - big[children[:, 1]]
    counts = np.cumsum(delta)

    # Groups of equal-height merges: a cut sees only the count after the last merge of a group.
    group_ends = np.flatnonzero(np.append(heights[1:] != heights[:-1], True))
    group_counts = counts[group_ends]
    group_heights = heights[group_ends]
    max_count = int(group_counts.max())
    if rule == "max_count":
        first = int(np.argmax(group_counts == max_count))
        drops = np.flatnonzero(group_counts[first + 1 :] < max_count)
        end = first + 1 + drops[0] if drops.size else None
    else:  # (most clusters among the) longest plateau(s) of a constant, non-zero count
        starts = np.flatnonzero(np.append(True, group_counts[1:] != group_counts[:-1]))
        ends = np.append(starts[1:], -1)  # the group where the next plateau begins
        h_start = np.log(np.maximum(group_heights[starts], _TINY_HEIGHT))
        h_end = np.log(
            np.maximum(np.where(ends >= 0, group_heights[ends], heights[-1]), _TINY_HEIGHT)
        )
        length = np.where(group_counts[starts] > 0, h_end - h_start, -np.inf)
        best = int(np.argmax(length))
        if rule == "persistent_max":
            ok = length >= _PERSISTENT_FRACTION * length[best]
            # most clusters among the persistent plateaus; ties: the longer one
            best = int(np.lexsort((-length, -np.where(ok, group_counts[starts], -1)))[0])
        first = int(starts[best])
        end = int(ends[best]) if ends[best] >= 0 else None
    plateau_count = int(group_counts[first])
    h_a = float(group_heights[first])
    h_b = float(group_heights[end]) if end is not None else float(heights[-1])
    cut = math.sqrt(max(h_a, _TINY_HEIGHT) * h_b)
    if not h_a <= cut < h_b:
        cut = h_a
    n_below = int(np.searchsorted(heights, cut, side="right"))

    # Partition formed by the first n_below merges: parent pointers, then pointer jumping.
    parent = np.arange(2 * m - 1)
    parent[children[:n_below, 0]] = m + np.arange(n_below)
    parent[children[:n_below, 1]] = m + np.arange(n_below)
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    _, labels = np.unique(parent[:m], return_inverse=True)
    # Relabel in order of first appearance so ids do not depend on node numbering.
    _, first_index = np.unique(labels, return_index=True)
    rank = np.empty_like(first_index)
    rank[np.argsort(first_index, kind="stable")] = np.arange(first_index.size)
    return TreeCut(
        counts=counts,
        max_count=max_count,
        plateau_count=plateau_count,
        plateau=(h_a, h_b),
        cut_height=cut,
        n_merges_below=n_below,
        labels=rank[labels].astype(np.int64),
    )


def _mean_within_distance(Z: np.ndarray, children: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Mean distance over the pairs of members of every node of an average-linkage tree
    ``[2M - 1]`` (0 for leaves), from ``S = S_a + S_b + h n_a n_b``."""
    m = Z.shape[0] + 1
    total = np.zeros(2 * m - 1)
    cross = Z[:, 2] * sizes[children[:, 0]] * sizes[children[:, 1]]
    for i, (a, b) in enumerate(children.tolist()):
        total[m + i] = total[a] + total[b] + cross[i]
    pairs = np.maximum(sizes * (sizes - 1) / 2, 1.0)
    return total / pairs


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
    plateau : (h_a, h_b), see :func:`cut_tree`.
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


def _unit_rows(u: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    return np.divide(u, norms, out=np.zeros_like(u), where=norms > 0)


def _median_pairwise_angle(u: np.ndarray, absolute: bool, seed: int) -> float:
    """Median angle (degrees) over the pairs of rows of ``u`` ``[n, D]``, n >= 2.

    Angle between lines (``arccos |cos|``) when ``absolute``. At most ``_MAX_ANGLE_SAMPLE`` rows,
    a seeded subsample, enter the median. A zero row is at 90 degrees from everything.
    """
    if u.shape[0] > _MAX_ANGLE_SAMPLE:
        rows = np.random.default_rng(seed).choice(u.shape[0], _MAX_ANGLE_SAMPLE, replace=False)
        u = u[np.sort(rows)]
    unit = _unit_rows(u)
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
    config: ClusterConfig = ClusterConfig(),
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
    config : :class:`ClusterConfig`.
    input_mask : ``[fan_in]`` bool or None (all True)
        Inputs that carry signal (see :func:`input_mask_from_queries`). The bias coordinate is
        always used. Masked-out coordinates are ignored for distances, angles, norms and sign
        decisions, and returned untouched (up to the vector's scale and sign) in ``incoming``.
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
    Steps (Martinelli et al. 2024, Sec. 3, step "Cluster"; METHOD.md step 2):

    1. Canonicalise. Scale-symmetric classes (relu, leaky_relu): each v is divided by the norm of
       its masked part ``[w_mask; b]`` and its outgoing weights are multiplied by that norm
       (``relu(c z) = c relu(z)``, c > 0; a vector with a zero masked part is left as is). The
       masked norm, rather than the full one, keeps the canonical form and the l2 distances
       independent of the unidentifiable masked-out weights. Sign-symmetric classes are not flipped
       before clustering with the cosine metric: the distance ``1 - |cos|`` is sign-invariant.
       With the l2 metric they are flipped so their largest-magnitude masked coordinate is > 0.
    2. Distances in float64 on the masked vectors; average linkage (UPGMA).
    3. Tree cut by :func:`cut_tree` (one pass; geometric midpoint of the first plateau of the
       maximal number of clusters with ``>= ceil(gamma * N)`` members; with
       ``config.cut_uses_beta``, only clusters whose mean pairwise distance is within beta count).
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
