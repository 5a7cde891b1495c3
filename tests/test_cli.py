"""The command line: user errors exit 2 with one line and no output folder; a run writes
report.json (docs/formats.md schema), recovered.npz and the figures."""

import json
from pathlib import Path

import numpy as np
import pytest

from expand_and_cluster.cli import main
from expand_and_cluster.errors import InputError
from expand_and_cluster.io.files import load_network, save_network
from expand_and_cluster.teachers import planted_teacher, probe

FAST = [
    "--students",
    "6",
    "--width",
    "6",
    "--epochs",
    "60",
    "--batch-size",
    "256",
    "--polish-iterations",
    "300",
    "--finetune-iterations",
    "300",
    "--quiet",
]


@pytest.fixture
def queries(tmp_path):
    teacher = planted_teacher(4, [3], 1, "tanh", seed=2, min_angle_degrees=30)
    X, Y = probe(teacher, 3000, "gaussian", seed=0)
    path = tmp_path / "q.npz"
    np.savez(path, X=X, Y=Y)
    tpath = tmp_path / "teacher.npz"
    save_network(teacher, tpath)
    return path, tpath, teacher


def _run_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert match in err
    return err


def test_bad_inputs_exit_2_without_output(tmp_path, capsys, queries):
    qpath, _, _ = queries
    out = tmp_path / "out"
    base = ["recover", "--activation", "tanh", "--out", str(out)]
    _run_error(capsys, base + ["--queries", str(tmp_path / "missing.npz")], "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("not an npz")
    _run_error(capsys, base + ["--queries", str(bad)], "bad.npz")
    X = np.random.default_rng(0).standard_normal((10, 2))
    X[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, Y=np.ones((10, 1)))
    _run_error(capsys, base + ["--queries", str(tmp_path / "nan.npz")], "NaN")
    np.savez(tmp_path / "len.npz", X=np.ones((10, 2)), Y=np.ones((9, 1)))
    _run_error(capsys, base + ["--queries", str(tmp_path / "len.npz")], "len.npz")
    np.savez(tmp_path / "nokey.npz", X=np.ones((10, 2)))
    _run_error(capsys, base + ["--queries", str(tmp_path / "nokey.npz")], "Y")
    argv = ["recover", "--activation", "swish", "--out", str(out), "--queries", str(qpath)]
    _run_error(capsys, argv, "swish")
    _run_error(
        capsys, base + ["--queries", str(qpath), "--students", "3", "--gamma", "0.5"], "gamma * N"
    )
    assert not out.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_argparse_errors_exit_2(capsys):
    assert main(["recover", "--activation", "tanh"]) == 2
    assert (
        main(
            ["recover", "--queries", "q.npz", "--activation", "tanh", "--out", "x", "--gamma", "2"]
        )
        == 2
    )


def test_recover_writes_report_network_and_figures(tmp_path, capsys, queries):
    qpath, tpath, teacher = queries
    out = tmp_path / "run"
    assert (
        main(["recover", "--queries", str(qpath), "--activation", "tanh", "--out", str(out), *FAST])
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    for key in [
        "version",
        "backend",
        "activation",
        "dtype",
        "students",
        "student_widths",
        "gamma",
        "beta_degrees",
        "queries",
        "recovered_sizes",
        "teacher_sizes",
        "alignment",
        "student_losses",
        "recovered_relative_mse",
        "timings_s",
    ]:
        assert key in rep
    assert rep["recovered_sizes"] == [3]
    assert rep["teacher_sizes"] is None  # black box
    assert rep["status"] == "ok" and rep["status_reason"] is None
    repair = rep["width_repair"]
    assert repair["layer"] == 0 and repair["width_before"] == 3 and repair["width_after"] == 3
    assert rep["timings_s"]["repair"] >= 0.0
    net = load_network(out / "recovered.npz")
    assert net.hidden_sizes == [3]
    with np.load(out / "students.npz") as students:  # closed: an open one warns (as error)
        assert students["weight_0"].shape == (6, 6, 4) and students["relative_mse"].shape == (6,)
    for fig in ["dendrogram.png", "distance_matrix.png", "training.png"]:
        assert (out / fig).stat().st_size > 1000
    # an existing non-empty folder is not overwritten without --force
    _run_error(
        capsys,
        ["recover", "--queries", str(qpath), "--activation", "tanh", "--out", str(out), *FAST],
        "exists",
    )


def test_recover_from_teacher_scores_alignment(tmp_path, capsys, queries):
    _, tpath, teacher = queries
    out = tmp_path / "run"
    assert (
        main(
            [
                "recover",
                "--teacher",
                str(tpath),
                "--activation",
                "tanh",
                "--n-queries",
                "2000",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher_sizes"] == [3]
    assert rep["alignment"][0]["max"] < 1e-3
    assert (out / "alignment.png").exists()
    assert "recovered hidden widths: [3] (teacher: [3])" in capsys.readouterr().out


def test_cuda_device_without_gpu_is_a_user_error(tmp_path, capsys, queries):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    qpath, _, _ = queries
    out = tmp_path / "out"
    argv = [
        "recover",
        "--queries",
        str(qpath),
        "--activation",
        "tanh",
        "--out",
        str(out),
        "--device",
        "cuda",
        *FAST,
    ]
    _run_error(capsys, argv, "--device")
    assert not out.exists()
    suite = str(Path(__file__).resolve().parents[1] / "benchmarks" / "suites" / "small.json")
    _run_error(capsys, ["bench", suite, "--out", str(out), "--device", "cuda"], "--device")
    assert not out.exists()


def test_device_auto_resolves_to_what_is_available():
    import torch

    from expand_and_cluster import backends
    from expand_and_cluster.ops import resolve_device

    has_gpu = "cuda" in backends() and torch.cuda.is_available()
    assert resolve_device("auto") == ("cuda" if has_gpu else "cpu")
    assert resolve_device("cpu") == "cpu"
    if has_gpu:
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(InputError, match="--device: cuda requested but"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")


def test_a_degraded_result_is_written_marked_and_exits_4(tmp_path, capsys):
    # A recovery cut far too short (6 students, 10 Adam epochs, 100 L-BFGS iterations, no
    # repair, no retrain) of a teacher with a weak neuron: the network keeps too few neurons
    # and is far worse than its students. The files are still written; the report and the
    # summary say why, and the exit code is 4.
    teacher = planted_teacher(4, [4], 1, "tanh", seed=3, min_angle_degrees=20)
    teacher.weights[1][:, -1] *= 0.1
    save_network(teacher, tmp_path / "t.npz")
    out = tmp_path / "run"
    args = ["recover", "--teacher", str(tmp_path / "t.npz"), "--activation", "tanh"]
    args += ["--n-queries", "2000", "--students", "6", "--epochs", "10", "--batch-size", "256"]
    args += ["--polish-iterations", "100", "--width", "8", "--finetune-iterations", "300"]
    args += ["--no-repair", "--retrain-factor", "1", "--set", "train.handover_window=0"]
    code = main([*args, "--out", str(out), "--no-figures", "--quiet"])
    rep = json.loads((out / "report.json").read_text())
    assert code == 4 and rep["status"] == "degraded"
    assert "times the median student's" in rep["status_reason"]
    assert rep["recovered_relative_mse"]["train"] > 1e-6
    assert capsys.readouterr().out.startswith("DEGRADED: ")
    assert (out / "recovered.npz").exists()
