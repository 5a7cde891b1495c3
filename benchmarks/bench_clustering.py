"""Clustering one layer end to end (distances, linkage, cut, filters, collapse) against the
reference procedure (scipy pdist + average linkage + one fcluster call per merge height).

Run: ``pytest benchmarks/bench_clustering.py --benchmark-json out.json``. Data: N = 20 students of
width ``M / 20``, a planted layer of ``M / 80`` teacher neurons (dimension 65), every student holds
each teacher neuron with noise 1e-4, the rest of its neurons are junk.
"""

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from expand_and_cluster.config import ClusterConfig
from expand_and_cluster.pipeline.cluster import cluster_layer


def planted_layer(m, dim=65, n_students=20, seed=0):
    rng = np.random.default_rng(seed)
    width = m // n_students
    k = max(1, width // 4)
    teacher = rng.standard_normal((k, dim))
    inc = rng.standard_normal((n_students, width, dim))
    for s in range(n_students):
        inc[s, :k] = teacher + 1e-4 * rng.standard_normal((k, dim))
    out = rng.standard_normal((n_students, 1, width))
    losses = rng.uniform(1e-8, 1e-6, n_students)
    return inc, out, losses, k


def reference_procedure(v, n_students, gamma=0.5):
    z = linkage(pdist(v, "cosine"), "average")
    best = (-1, None)
    for h in np.unique(z[:, 2]):
        labels = fcluster(z, h, criterion="distance")
        count = int(np.sum(np.bincount(labels) >= gamma * n_students))
        if count > best[0]:
            best = (count, h)
    return best


@pytest.mark.parametrize("m", [5000, 20000])
def test_cluster_layer(benchmark, m):
    inc, out, losses, k = planted_layer(m)
    res = benchmark.pedantic(
        cluster_layer, args=(inc, out, losses, "g", ClusterConfig()), rounds=1, iterations=1
    )
    assert res.k_hat == k


@pytest.mark.parametrize("m", [1000, 2000])
def test_reference_procedure(benchmark, m):
    inc, out, losses, k = planted_layer(m)
    count, _ = benchmark.pedantic(
        reference_procedure, args=(inc.reshape(m, -1), 20), rounds=1, iterations=1
    )
    assert count >= k
