"""The tree cut of the clustering step: where to cut an average-linkage tree of student neurons
so that its clusters of at least gamma * N members are the teacher's neurons.

Source: Martinelli et al. 2024, Sec. 3, step "Cluster"; docs/method.md, step 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import CUT_RULES

#: Lower bound of the plateau start in the geometric-midpoint cut: exact duplicates merge at
#: height 0, and sqrt(0 * h_b) would put the cut at 0 (the plateau's very start).
_TINY_HEIGHT = 1e-15
#: Rule "persistent_max": plateaus at least this fraction of the longest one (in decades of
#: height) compete, and the one with the most clusters wins.
_PERSISTENT_FRACTION = 0.5


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
    (the root height if it never drops). ``rule="longest_plateau"``: among the plateaus of a
    constant non-zero count, take the one that spans the most decades of height,
    ``log(h_b) - log(h_a)`` (heights floored at 1e-15). Copies of one teacher neuron across
    students merge many decades below the gap between distinct neurons, so the true partition is
    the most persistent one, while junk neurons (students' spare neurons in random directions) can
    clump into more clusters of ``>= min_size`` members just below the root and win the
    "max_count" rule. ``rule="persistent_max"`` (the pipeline's default,
    :class:`~expand_and_cluster.config.ClusterConfig`): among the plateaus that span at least
    half as many decades as the longest one, the one with the most clusters; it guards against
    a long plateau of a few extremely tight clusters far below the height where the other
    neurons' clusters complete (docs/method.md, step 2, has an example). In every rule the cut
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
    rule : "longest_plateau" (this function's default), "persistent_max" or "max_count" (the
        paper's rule), see above.
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
    Source: Martinelli et al. 2024, Sec. 3, step "Cluster"; docs/method.md, step 2.
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
    if rule not in CUT_RULES:
        raise ValueError(f"rule: expected one of {CUT_RULES}, got {rule!r}")
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
