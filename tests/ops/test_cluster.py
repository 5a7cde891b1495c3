"""Cosine distances and average linkage (C++ kernels) against torch and scipy (docs/design.md,
Tests).

The linkage kernel follows scipy's nn_chain step for step (same tie rules, same floating-point
operations in the same order), so its linkage matrix is compared with scipy's exactly; the
partition checks with fcluster are kept as well, as they are the property the pipeline relies on.
"""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from expand_and_cluster import ops

# ----------------------------------------------------------------------------------------------
# cosine distances

COS_SHAPES = [(1, 3), (2, 1), (3, 5), (4, 1), (8, 8), (9, 2), (97, 65), (513, 7), (130, 300)]


def _vectors(m, d, dtype, seed=0, zero_row=None):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(m, d, generator=g, dtype=torch.float64)
    if zero_row is not None and m > zero_row:
        v[zero_row] = 0.0
    return v.to(dtype)


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
@pytest.mark.parametrize("m,d", COS_SHAPES)
def test_cosine_distances_match_reference(m, d, absolute, dtype):
    v = _vectors(m, d, dtype, zero_row=m // 2 if m > 2 else None)
    out = ops.cosine_distances(v, absolute=absolute)
    assert out.dtype == torch.float64 and out.shape == (m, m)
    # The kernel upcasts to float64 before normalising, so the float32 input compares with the
    # reference on the same values, upcast.
    ref = ops.cosine_distances_reference(v.double(), absolute=absolute)
    assert float((out - ref).abs().max()) < 1e-12
    assert torch.equal(out, out.T)
    assert bool((out.diagonal() == 0).all())
    assert bool((out >= 0).all())
    if absolute:
        assert float(out.max()) <= 1.0 + 1e-12


def test_cosine_distances_zero_row_and_parallel_rows():
    v = torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [-1.0, -2.0, -3.0]], dtype=torch.float64
    )
    out = ops.cosine_distances(v)
    assert out[0].tolist() == [0.0, 1.0, 1.0, 1.0]  # zero row: cos 0 with everything
    assert float(out[1, 2]) < 1e-15  # parallel rows (clamped at 0)
    assert abs(float(out[1, 3]) - 2.0) < 1e-15  # opposite rows
    assert float(ops.cosine_distances(v, absolute=True)[1, 3]) < 1e-15


def test_cosine_distances_extreme_scales():
    # Rows whose squared norm under- or overflows are rescaled before normalising.
    base = _vectors(6, 5, torch.float64, seed=3)
    v = torch.cat([base * 1e-170, base * 1e170, base])
    out = ops.cosine_distances(v)
    ref = ops.cosine_distances_reference(base)
    for a in range(3):
        for b in range(3):
            blk = out[6 * a : 6 * a + 6, 6 * b : 6 * b + 6]
            off = ~torch.eye(6, dtype=torch.bool) if a == b else torch.ones(6, 6, dtype=torch.bool)
            assert float((blk - ref)[off].abs().max()) < 1e-12


def test_cosine_distances_errors():
    with pytest.raises(TypeError, match="v"):
        ops.cosine_distances(torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="v"):
        ops.cosine_distances(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="v"):
        ops.cosine_distances(torch.zeros(3))
    with pytest.raises(ValueError, match="v"):
        ops.cosine_distances(torch.zeros(3, 0))
    bad = torch.zeros(3, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="v"):
        ops.cosine_distances(bad)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="v"):
        ops.cosine_distances(bad)


def test_cosine_distances_empty():
    assert ops.cosine_distances(torch.zeros(0, 4)).shape == (0, 0)


# ----------------------------------------------------------------------------------------------
# average linkage


def _partitions(z, heights):
    """The flat clusterings of z cut at each height, each as a set of frozensets of leaves."""
    out = []
    for t in heights:
        labels = fcluster(z, t, criterion="distance")
        groups = {}
        for leaf, lab in enumerate(labels):
            groups.setdefault(lab, []).append(leaf)
        out.append({frozenset(g) for g in groups.values()})
    return out


def _check_against_scipy(dist):
    dist = np.ascontiguousarray(dist, dtype=np.float64)
    z = ops.average_linkage(dist)
    ref = ops.average_linkage_reference(dist)
    m = dist.shape[0]
    assert z.shape == (m - 1, 4) and z.dtype == np.float64
    # scipy's format: ids a < b, new cluster of row i is m + i, sizes, sorted heights
    assert bool((z[:, 0] < z[:, 1]).all())
    assert bool((np.diff(z[:, 2]) >= 0).all())
    np.testing.assert_allclose(z[:, 2], ref[:, 2], rtol=1e-12, atol=0)
    # same partitions at heights between merges (robust to the order of equal heights)
    h = np.unique(ref[:, 2])
    cuts = np.concatenate([[0.0], (h[:-1] + h[1:]) / 2, [h[-1] * 1.5 + 1]])
    picks = cuts[np.linspace(0, len(cuts) - 1, min(len(cuts), 12)).astype(int)]
    assert _partitions(z, picks) == _partitions(ref, picks)
    return z, ref


def _uniform(m, d, seed):
    x = np.random.default_rng(seed).standard_normal((m, d))
    return squareform(pdist(x))


def _planted(m, d=10, n_groups=None, seed=0):
    """Tight groups (noise 1e-3 around random centres) plus uniformly random junk points."""
    rng = np.random.default_rng(seed)
    n_groups = n_groups or max(1, m // 20)
    per = max(1, m // (2 * n_groups))
    centres = rng.standard_normal((n_groups, d))
    pts = np.repeat(centres, per, axis=0) + 1e-3 * rng.standard_normal((n_groups * per, d))
    junk = rng.standard_normal((m - len(pts), d))
    return squareform(pdist(np.concatenate([pts, junk])[rng.permutation(m)]))


@pytest.mark.parametrize("m", [2, 3, 10, 257, 1000])
def test_average_linkage_uniform(m):
    z, ref = _check_against_scipy(_uniform(m, 5, seed=m))
    assert np.array_equal(z, ref)  # step-for-step scipy: identical, not merely close


@pytest.mark.parametrize("m", [10, 257, 1000, 3000])
def test_average_linkage_planted(m):
    z, ref = _check_against_scipy(_planted(m, seed=m))
    assert np.array_equal(z, ref)


def test_average_linkage_from_cosine_distances():
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(12, 65, generator=g, dtype=torch.float64)
    v = centres.repeat(20, 1) + 1e-3 * torch.randn(240, 65, generator=g, dtype=torch.float64)
    v = torch.cat([v, torch.randn(160, 65, generator=g, dtype=torch.float64)])
    d = ops.cosine_distances(v)
    z, ref = _check_against_scipy(d.numpy())
    assert np.array_equal(z, ref)
    # the same from a torch tensor, and in place
    assert np.array_equal(ops.average_linkage(d), ref)
    work = d.numpy().copy()
    assert np.array_equal(ops.average_linkage(work, overwrite=True), ref)
    # the tight groups are recovered
    labels = fcluster(z, 0.01, criterion="distance")
    assert len(set(labels[:240])) == 12


def test_average_linkage_ties_and_duplicates():
    # Many exactly equal distances (grid points, duplicated points, all-zero matrix): the kernel
    # applies scipy's tie rules, so even here the result is identical.
    grid = np.random.default_rng(0).integers(0, 4, size=(300, 2)).astype(float)
    _check_against_scipy(squareform(pdist(grid, "cityblock")))
    dups = np.repeat(np.random.default_rng(1).standard_normal((50, 3)), 4, axis=0)
    z, ref = _check_against_scipy(squareform(pdist(dups)))
    assert np.array_equal(z, ref)
    z, ref = _check_against_scipy(np.zeros((7, 7)))
    assert np.array_equal(z, ref)


def test_average_linkage_reads_upper_triangle():
    # As scipy (squareform(checks=False)), an asymmetric input is read from its upper triangle.
    rng = np.random.default_rng(2)
    d = _uniform(300, 4, seed=2)
    d += np.tril(rng.uniform(0.0, 0.5, d.shape), -1)
    z = ops.average_linkage(d)
    assert np.array_equal(z, ops.average_linkage_reference(d))


def test_average_linkage_does_not_modify_input():
    d = _uniform(50, 3, seed=4)
    before = d.copy()
    ops.average_linkage(d)
    assert np.array_equal(d, before)


def test_average_linkage_matches_scipy_linkage_on_observations():
    x = np.random.default_rng(6).standard_normal((200, 3))
    assert np.array_equal(ops.average_linkage(squareform(pdist(x))), linkage(x, "average"))


def test_average_linkage_errors():
    with pytest.raises(ValueError, match="dist"):
        ops.average_linkage(np.zeros((1, 1)))
    with pytest.raises(ValueError, match="dist"):
        ops.average_linkage(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dist"):
        ops.average_linkage(np.zeros(4))
    bad = _uniform(4, 2, seed=0)
    bad[1, 2] = bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="dist"):
        ops.average_linkage(bad)
    bad[1, 2] = bad[2, 1] = -1.0
    with pytest.raises(ValueError, match="dist"):
        ops.average_linkage(bad)
    with pytest.raises(TypeError, match="dist"):
        ops.average_linkage(_uniform(4, 2, seed=0).astype(np.float32))
    with pytest.raises(TypeError, match="dist"):
        ops.average_linkage(_uniform(4, 2, seed=0).tolist())
