"""Cosine distances and average linkage (C++ kernels) against scipy's pdist(metric="cosine") and
linkage(method="average"), on the data the clustering step sees.

Run: ``pytest benchmarks/bench_linkage.py --benchmark-json out.json`` (a few minutes: scipy takes
about 20 s at M = 20,000, and the [M, M] float64 matrices take 3.2 GB each, up to ~7 GB at once).
Data: M rows of dimension 65, M / 80 planted centres with 20 noisy copies each (noise 1e-3; 250
centres at M = 20,000), the rest random junk rows, shuffled. Every one of our results is checked
against scipy's before it is timed: distances to 1e-12, linkage heights to 1e-10 (the inputs
differ by rounding: scipy links its own pdist), and the same flat clusters at a cut of 0.01.
The scipy tests run first and keep their results for these checks.
"""

import platform

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from expand_and_cluster import ops

M_VALUES = [5000, 20000]
DIM = 65
_REF: dict = {}  # m -> {"condensed": pdist output, "z": scipy linkage}


def planted(m, dim=DIM, copies=20, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    n_centres = m // 80
    centres = rng.standard_normal((n_centres, dim))
    rows = np.repeat(centres, copies, axis=0)
    rows += noise * rng.standard_normal(rows.shape)
    junk = rng.standard_normal((m - len(rows), dim))
    return np.ascontiguousarray(np.concatenate([rows, junk])[rng.permutation(m)])


def _ref(m, key):
    ref = _REF.setdefault(m, {})
    if key == "condensed" and "condensed" not in ref:
        ref["condensed"] = pdist(planted(m), "cosine")
    if key == "z" and "z" not in ref:
        ref["z"] = linkage(_ref(m, "condensed"), "average")
    return ref[key]


def _info(benchmark, m):
    benchmark.extra_info.update(m=m, dim=DIM, machine=platform.processor() or platform.machine())


def _check_distances(d, condensed):
    """max |d - squareform(condensed)| over the upper triangle, row by row (no second matrix)."""
    m = d.shape[0]
    worst, start = 0.0, 0
    for i in range(m - 1):
        n = m - 1 - i
        worst = max(worst, float(np.abs(d[i, i + 1 :] - condensed[start : start + n]).max()))
        start += n
    return worst


def _partition(z, t):
    labels = fcluster(z, t, criterion="distance")
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
    return {frozenset(g.tolist()) for g in groups}


@pytest.mark.parametrize("m", M_VALUES)
def test_scipy_pdist_cosine(benchmark, m):
    _info(benchmark, m)
    v = planted(m)
    _REF.setdefault(m, {})["condensed"] = benchmark.pedantic(
        pdist, args=(v, "cosine"), rounds=1, iterations=1
    )


@pytest.mark.parametrize("m", M_VALUES)
def test_scipy_linkage_average(benchmark, m):
    _info(benchmark, m)
    condensed = _ref(m, "condensed")
    _REF[m]["z"] = benchmark.pedantic(linkage, args=(condensed, "average"), rounds=1, iterations=1)


@pytest.mark.parametrize("m", M_VALUES)
def test_ours_cosine_distances(benchmark, m):
    import torch

    _info(benchmark, m)
    v = torch.from_numpy(planted(m))
    d = ops.cosine_distances(v).numpy()
    assert _check_distances(d, _ref(m, "condensed")) < 1e-12
    del d
    benchmark.pedantic(ops.cosine_distances, args=(v,), rounds=3, iterations=1)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("m", M_VALUES)
def test_ours_average_linkage(benchmark, m, inplace):
    import torch

    _info(benchmark, m)
    benchmark.extra_info["inplace"] = inplace
    d = ops.cosine_distances(torch.from_numpy(planted(m))).numpy()
    z = ops.average_linkage(d)
    z_ref = _ref(m, "z")
    np.testing.assert_allclose(z[:, 2], z_ref[:, 2], rtol=0, atol=1e-10)
    assert _partition(z, 0.01) == _partition(z_ref, 0.01)
    _REF[m].pop("condensed", None)  # 1.6 GB at M = 20,000, no longer needed
    if inplace:  # the copy is made in setup, outside the timing
        benchmark.pedantic(
            ops.average_linkage,
            setup=lambda: ((d.copy(),), {"overwrite": True}),
            rounds=2,
            iterations=1,
        )
    else:
        benchmark.pedantic(ops.average_linkage, args=(d,), rounds=2, iterations=1)
