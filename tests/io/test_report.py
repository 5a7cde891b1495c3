"""report.json and a run's files from a recovery (expand_and_cluster.io.report), without the
command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expand_and_cluster import RecoverConfig, TrainConfig, build_report, metrics, recover, write_run
from expand_and_cluster.io.files import load_network, write_json_atomic
from expand_and_cluster.io.report import REPORT_KEYS, check_report, summary_text
from expand_and_cluster.teachers import planted_teacher, probe


@pytest.fixture(scope="module")
def planted():
    """A quick recovery of a planted 3-3-1 tanh teacher: (teacher, result)."""
    teacher = planted_teacher(3, [3], 1, "tanh", seed=4, min_angle_degrees=30)
    X, Y = probe(teacher, 1500, "gaussian", seed=0)
    train = TrainConfig(
        n_students=6, max_epochs=60, batch_size=256, polish_iterations=300, progress=False,
        patience=10, cooldown=5,
    )  # fmt: skip
    cfg = RecoverConfig("tanh", width=6, train=train, finetune_iterations=300)
    return teacher, recover(X, Y, cfg, source="gaussian:1500")


def test_build_report_from_a_recovery_scores_the_teacher(planted, tmp_path):
    teacher, res = planted
    report = build_report(res, teacher, probe_seconds=0.5, extra={"note": "x"})
    assert list(report)[: len(REPORT_KEYS)] == list(REPORT_KEYS)
    assert list(report)[-1] == "note"
    assert report["recovered_sizes"] == res.network.hidden_sizes == [3]
    assert report["teacher_sizes"] == [3] and report["queries"]["source"] == "gaussian:1500"
    assert report["queries"]["train"] + report["queries"]["held_out"] == 1500
    # The alignment is the metrics' own, and the recovery is exact.
    expected = metrics.deep_alignment(teacher, res.network, res.network.input_mask)
    assert report["alignment"] == expected and report["alignment"][0]["max"] < 1e-3
    assert report["bits_of_precision"] == metrics.bits_of_precision(
        teacher, res.network, res.network.input_mask
    )
    assert report["timings_s"]["total"] == pytest.approx(0.5 + res.timings_s["total"])
    assert report["student_losses"] == res.training.relative_mse.tolist()
    # JSON-able as it is (numpy scalars, NaN and Inf converted by the writer).
    loaded = json.loads(write_json_atomic(tmp_path / "r.json", report).read_text())
    assert loaded["recovered_sizes"] == [3]
    assert loaded["layers"][0]["recovered_width"] == report["layers"][0]["recovered_width"]


def test_build_report_without_a_teacher(planted):
    _, res = planted
    report = build_report(res)
    assert report["teacher_sizes"] is None and report["alignment"] is None
    assert report["bits_of_precision"] is None
    assert "recovered hidden widths: [3]" in summary_text(report, "out")


def test_write_run_writes_the_files_a_run_loads_back(planted, tmp_path):
    teacher, res = planted
    report = write_run(res, tmp_path, teacher)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.json", "recovered.npz", "students.npz", "dendrogram.png"} <= names
    assert {"distance_matrix.png", "alignment.png", "training.png"} <= names
    assert json.loads((tmp_path / "report.json").read_text())["recovered_sizes"] == [3]
    net = load_network(tmp_path / "recovered.npz")
    np.testing.assert_array_equal(net.weights[0], res.network.weights[0])
    with np.load(tmp_path / "students.npz") as s:
        np.testing.assert_array_equal(s["relative_mse"], res.training.relative_mse)
        np.testing.assert_array_equal(s["held_out_index"], res.held_out_index)
    assert report["alignment"][0]["count_below_1e-3"] == 3
    bare = tmp_path / "new" / "bare"  # created
    write_run(res, bare, figures=False)
    assert {p.name for p in bare.iterdir()} == {"report.json", "recovered.npz", "students.npz"}


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


def test_check_report_accepts_the_schema():
    check_report(_fields())
    check_report(_fields(teacher_sizes=None, alignment=None))


@pytest.mark.parametrize("key", REPORT_KEYS)
def test_check_report_missing_key(key):
    fields = _fields()
    del fields[key]
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        check_report(fields)


@pytest.mark.parametrize(
    ("parent", "key"),
    [("timings_s", "cluster"), ("queries", "source"), ("recovered_relative_mse", "held_out")],
)
def test_check_report_missing_nested_key(parent, key):
    fields = _fields()
    fields[parent] = {k: v for k, v in fields[parent].items() if k != key}
    with pytest.raises(ValueError, match=f"missing key '{parent}.{key}'"):
        check_report(fields)


def test_check_report_checks_backend_and_alignment():
    with pytest.raises(ValueError, match="backend"):
        check_report(_fields(backend="tpu"))
    with pytest.raises(ValueError, match=r"missing key 'alignment\[0\].median'"):
        check_report(_fields(alignment=[{"layer": 0, "per_teacher_neuron": [], "max": 0.0}]))
