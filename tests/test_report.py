"""report.json and figures (expand_and_cluster.report)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from expand_and_cluster.report import (
    REPORT_KEYS,
    _square_block,
    atomic_write,
    build_report,
    cluster_counts,
    plot_alignment,
    plot_dendrogram,
    plot_distance_matrix,
    plot_training,
    write_json_atomic,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def _only_file(tmp_path, name: str) -> bool:
    return [p.name for p in tmp_path.iterdir()] == [name]


def _fields(**override):
    fields = {
        "version": "0.1.0",
        "backend": "cpu",
        "activation": "tanh",
        "dtype": "float64",
        "students": 10,
        "student_widths": [16],
        "gamma": 0.5,
        "beta_degrees": 60.0,
        "queries": {"train": 1000, "held_out": 200, "source": "probe:gaussian"},
        "recovered_sizes": [4],
        "teacher_sizes": [4],
        "alignment": [{"layer": 0, "per_teacher_neuron": [1e-9], "median": 1e-9, "max": 1e-9}],
        "student_losses": np.array([1e-8, 2e-8]),
        "recovered_relative_mse": {"train": 1e-9, "held_out": 2e-9},
        "timings_s": {"probe": 0.1, "train": 1.0, "cluster": 0.2, "finetune": 0.5, "total": 1.8},
    }
    fields.update(override)
    return fields


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


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------


def test_write_json_converts_numpy_and_non_finite(tmp_path):
    obj = {
        "a": np.float32(1.5),
        "b": np.int64(3),
        "c": np.array([[1.0, np.nan], [np.inf, -2.0]]),
        "d": (np.bool_(True), None, "s"),
        "e": float("nan"),
        3: [np.float64(-np.inf)],
    }
    path = write_json_atomic(tmp_path / "report.json", obj)
    text = path.read_text()
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "a": 1.5,
        "b": 3,
        "c": [[1.0, None], [None, -2.0]],
        "d": [True, None, "s"],
        "e": None,
        "3": [None],
    }
    assert _only_file(tmp_path, "report.json")


def test_write_json_rejects_unknown_objects_and_keeps_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError, match="object"):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _only_file(tmp_path, "r.json")


def test_atomic_write_failure_leaves_nothing(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"new, partial")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and _only_file(tmp_path, "f.bin")


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def test_build_report_orders_keys_and_keeps_extras(tmp_path):
    report = build_report(**_fields(cut_height=0.01, input_mask=[True, False]))
    assert list(report)[: len(REPORT_KEYS)] == list(REPORT_KEYS)
    assert list(report)[len(REPORT_KEYS) :] == ["cut_height", "input_mask"]
    loaded = json.loads(write_json_atomic(tmp_path / "report.json", report).read_text())
    assert loaded["student_losses"] == [1e-8, 2e-8] and loaded["teacher_sizes"] == [4]
    assert build_report(**_fields(teacher_sizes=None, alignment=None))["alignment"] is None


@pytest.mark.parametrize("key", REPORT_KEYS)
def test_build_report_missing_key(key):
    fields = _fields()
    del fields[key]
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        build_report(**fields)


@pytest.mark.parametrize(
    ("parent", "key"),
    [("timings_s", "cluster"), ("queries", "source"), ("recovered_relative_mse", "held_out")],
)
def test_build_report_missing_nested_key(parent, key):
    fields = _fields()
    fields[parent] = {k: v for k, v in fields[parent].items() if k != key}
    with pytest.raises(ValueError, match=f"missing key '{parent}.{key}'"):
        build_report(**fields)


def test_build_report_checks_backend_and_alignment():
    with pytest.raises(ValueError, match="backend"):
        build_report(**_fields(backend="tpu"))
    with pytest.raises(ValueError, match=r"missing key 'alignment\[0\].median'"):
        build_report(**_fields(alignment=[{"layer": 0, "per_teacher_neuron": [], "max": 0.0}]))


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------


def test_cluster_counts_matches_fcluster():
    rng = np.random.default_rng(0)
    z = linkage(rng.standard_normal((60, 3)), method="average")
    heights, counts = cluster_counts(z, min_size=3)
    assert counts[0] == 0 and counts[-1] == 1 and heights[0] == 0.0
    for i in range(0, 59, 7):
        labels = fcluster(z, t=z[i, 2], criterion="distance")
        assert counts[i + 1] == int(np.sum(np.bincount(labels) >= 3))
    assert cluster_counts(z, min_size=1)[1][0] == 60


def test_plot_dendrogram_small_with_zero_heights(tmp_path):
    rng = np.random.default_rng(0)
    v = np.repeat(rng.standard_normal((5, 3)), 4, axis=0)  # duplicates: zero merge heights
    z = linkage(v + 1e-9 * (np.arange(20) % 2)[:, None], method="average")
    z[:5, 2] = 0.0
    path = plot_dendrogram(z, cut_height=0.1, gamma_n=2, path=tmp_path / "d.png", title="layer 0")
    assert path == tmp_path / "d.png" and _is_png(path) and _only_file(tmp_path, "d.png")


def test_plot_dendrogram_with_given_counts(tmp_path):
    z = linkage(np.random.default_rng(1).standard_normal((30, 2)), method="average")
    counts = cluster_counts(z, 4)[1][1:]
    assert _is_png(plot_dendrogram(z, 0.5, 4, tmp_path / "c.png", counts=counts))
    with pytest.raises(ValueError, match="counts: expected 29 entries"):
        plot_dendrogram(z, 0.5, 4, tmp_path / "c.png", counts=counts[:-1])


def test_plot_dendrogram_all_zero_heights(tmp_path):
    z = linkage(np.zeros((4, 2)), method="average")
    assert _is_png(plot_dendrogram(z, cut_height=0.0, gamma_n=2, path=tmp_path / "z.png"))


def test_plot_dendrogram_20000_leaves(tmp_path):
    z = _random_linkage(20_000, np.random.default_rng(0), n_zero=500)
    assert _is_png(plot_dendrogram(z, cut_height=0.5, gamma_n=10, path=tmp_path / "big.png"))


def test_plot_dendrogram_deep_chain(tmp_path):
    m = 1500  # a caterpillar tree of depth m - 1: deeper than Python's recursion limit
    z = np.array([[0 if i == 0 else m + i - 1, i + 1, i + 1.0, i + 2] for i in range(m - 1)])
    assert _is_png(plot_dendrogram(z, cut_height=10.0, gamma_n=5, path=tmp_path / "chain.png"))


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
