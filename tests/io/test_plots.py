"""Figures (expand_and_cluster.io.plots)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist, squareform

from expand_and_cluster.io.plots import (
    _square_block,
    plot_alignment,
    plot_dendrogram,
    plot_distance_matrix,
    plot_training,
)
from expand_and_cluster.pipeline.cut import cut_tree

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def _only_file(tmp_path, name: str) -> bool:
    return [p.name for p in tmp_path.iterdir()] == [name]


def _counts(z: np.ndarray, min_size: int) -> np.ndarray:
    """Clusters of >= min_size members after each merge (the tree cut's count)."""
    return cut_tree(z, int(min_size)).counts


def _random_linkage(m: int, rng: np.random.Generator, n_zero: int = 0) -> np.ndarray:
    """A valid average-linkage-like tree of m leaves merged in random order (monotone heights)."""
    active = list(range(m))
    size = np.ones(2 * m - 1)
    heights = np.sort(rng.random(m - 1))
    heights[:n_zero] = 0.0
    z = np.empty((m - 1, 4))
    for i in range(m - 1):
        picks = []
        for _ in range(2):
            k = int(rng.integers(len(active)))
            active[k], active[-1] = active[-1], active[k]
            picks.append(active.pop())
        size[m + i] = size[picks[0]] + size[picks[1]]
        z[i] = [min(picks), max(picks), heights[i], size[m + i]]
        active.append(m + i)
    return z


def test_plot_dendrogram_small_with_zero_heights(tmp_path):
    rng = np.random.default_rng(0)
    v = np.repeat(rng.standard_normal((5, 3)), 4, axis=0)  # duplicates: zero merge heights
    z = linkage(v + 1e-9 * (np.arange(20) % 2)[:, None], method="average")
    z[:5, 2] = 0.0
    path = plot_dendrogram(z, 0.1, 2, _counts(z, 2), tmp_path / "d.png", title="layer 0")
    assert path == tmp_path / "d.png" and _is_png(path) and _only_file(tmp_path, "d.png")


def test_plot_dendrogram_checks_the_counts(tmp_path):
    z = linkage(np.random.default_rng(1).standard_normal((30, 2)), method="average")
    counts = _counts(z, 4)
    assert _is_png(plot_dendrogram(z, 0.5, 4, counts, tmp_path / "c.png"))
    with pytest.raises(ValueError, match="counts: expected 29 entries"):
        plot_dendrogram(z, 0.5, 4, counts[:-1], tmp_path / "c.png")


def test_plot_dendrogram_all_zero_heights(tmp_path):
    z = linkage(np.zeros((4, 2)), method="average")
    assert _is_png(plot_dendrogram(z, 0.0, 2, _counts(z, 2), tmp_path / "z.png"))


def test_plot_dendrogram_20000_leaves(tmp_path):
    z = _random_linkage(20_000, np.random.default_rng(0), n_zero=500)
    assert _is_png(plot_dendrogram(z, 0.5, 10, _counts(z, 10), tmp_path / "big.png"))


def test_plot_dendrogram_deep_chain(tmp_path):
    m = 1500  # a caterpillar tree of depth m - 1: deeper than Python's recursion limit
    z = np.array([[0 if i == 0 else m + i - 1, i + 1, i + 1.0, i + 2] for i in range(m - 1)])
    assert _is_png(plot_dendrogram(z, 10.0, 5, _counts(z, 5), tmp_path / "chain.png"))


def test_square_block_of_condensed_matrix():
    rng = np.random.default_rng(0)
    condensed = pdist(rng.standard_normal((9, 2)))
    idx = np.array([4, 0, 8, 4, 2])
    np.testing.assert_array_equal(
        _square_block(condensed, idx), squareform(condensed)[np.ix_(idx, idx)]
    )


@pytest.mark.parametrize("form", ["square", "condensed"])
def test_plot_distance_matrix(tmp_path, form):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 3))
    condensed = pdist(v, "cosine")
    dist = squareform(condensed) if form == "square" else condensed
    z = linkage(condensed, method="average")
    assert _is_png(plot_distance_matrix(dist, z, tmp_path / "m.png"))
    with pytest.raises(ValueError, match="dist"):
        plot_distance_matrix(np.ones((3, 3)), z, tmp_path / "m.png")


def test_plot_distance_matrix_subsamples(tmp_path):
    rng = np.random.default_rng(1)
    m = 3000
    condensed = rng.random(m * (m - 1) // 2)
    z = _random_linkage(m, rng)
    assert _is_png(plot_distance_matrix(condensed, z, tmp_path / "m.png", max_points=500))


def test_plot_alignment(tmp_path):
    d = [0.0, 1e-20, 1e-7, 5e-4, 0.3, float("nan"), None]
    assert _is_png(plot_alignment(d, tmp_path / "a.png"))
    assert _is_png(plot_alignment([], tmp_path / "empty.png", thresholds=()))


def test_plot_training(tmp_path):
    history = {"step": [0, 10, 20], "losses": [[1.0, 2.0], [1e-3, 0.0], [1e-9, np.nan]]}
    assert _is_png(plot_training(history, tmp_path / "t.png"))
    records = [{"step": s, "losses": [1.0 / (s + 1)]} for s in range(5)]
    assert _is_png(plot_training(records, tmp_path / "r.png"))
    assert _is_png(plot_training({"step": [0, 1], "losses": [0.5, 0.1]}, tmp_path / "one.png"))
    training_log = {"epoch": [0, 100], "relative_mse": [[1.0, 0.5, 0.2], [1e-6, 1e-12, 0.1]]}
    assert _is_png(plot_training(training_log, tmp_path / "log.png"))
    with pytest.raises(ValueError, match="3 steps but 2 rows"):
        plot_training({"step": [0, 1, 2], "losses": [[1.0], [2.0]]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'losses' or 'relative_mse'"):
        plot_training({"step": [0, 1]}, tmp_path / "x.png")
