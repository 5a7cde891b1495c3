"""The identifiability benchmark engine: suite files, generation, a run, resume, summary."""

import json

import pytest

from expand_and_cluster.bench import SUITE_FORMAT, Problem, load_suite, run_suite, summarise
from expand_and_cluster.cli import main
from expand_and_cluster.errors import InputError

QUICK = {
    "students": 6,
    "epochs": 60,
    "batch_size": 256,
    "polish_iterations": 300,
    "finetune_iterations": 300,
}


def _write(tmp_path, suite):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    return path


def test_load_suite_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_suite(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_suite(tmp_path / "bad.json")
    with pytest.raises(InputError, match="format"):
        load_suite(_write(tmp_path, {"problems": []}))
    with pytest.raises(InputError, match="unknown settings"):
        load_suite(
            _write(
                tmp_path,
                {"format": SUITE_FORMAT, "settings": {"studnets": 3}, "problems": [{"id": "a"}]},
            )
        )
    with pytest.raises(InputError, match="unique"):
        load_suite(
            _write(tmp_path, {"format": SUITE_FORMAT, "problems": [{"id": "a"}, {"id": "a"}]})
        )
    with pytest.raises(InputError, match="invalid rho"):
        load_suite(
            _write(tmp_path, {"format": SUITE_FORMAT, "problems": [{"id": "a", "rho": 0.5}]})
        )
    with pytest.raises(InputError, match="unknown axis"):
        load_suite(
            _write(
                tmp_path, {"format": SUITE_FORMAT, "generate": {"n": 2, "choices": {"colour": [1]}}}
            )
        )


def test_generated_suite_is_deterministic_and_within_ranges(tmp_path):
    spec = {
        "format": SUITE_FORMAT,
        "generate": {
            "n": 30,
            "seed": 3,
            "choices": {"activation": ["tanh", "relu"], "rho": [1.0, 4.0]},
            "ranges": {"d_in": [2, 16], "width": [2, 16], "queries_per_param": [20.0, 300.0]},
        },
    }
    a = load_suite(_write(tmp_path, spec)).problems
    b = load_suite(_write(tmp_path, spec)).problems
    assert a == b and len(a) == 30
    assert all(2 <= p.d_in <= 16 and 2 <= p.width <= 16 for p in a)
    assert all(20.0 <= p.queries_per_param <= 300.0 for p in a)
    assert {p.activation for p in a} == {"tanh", "relu"}


def test_repo_suites_load():
    small = load_suite("benchmarks/suites/small.json")
    full = load_suite("benchmarks/suites/full.json")
    assert len(small.problems) == 20 and len(full.problems) >= 150
    assert {p.activation for p in full.problems} == {"g", "tanh", "sigmoid", "softplus", "relu"}


def test_run_resume_and_summary(tmp_path, capsys):
    suite = {
        "format": SUITE_FORMAT,
        "name": "tiny",
        "settings": QUICK,
        "problems": [
            {"id": "tanh", "activation": "tanh", "d_in": 4, "width": 3, "seed": 2},
            {"id": "relu", "activation": "relu", "d_in": 4, "width": 3, "seed": 2},
        ],
    }
    path = _write(tmp_path, suite)
    out = tmp_path / "run"
    assert main(["bench", str(path), "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["tanh", "relu"]
    assert all(r["success"] and r["recovered_width"] == 3 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success_rate"] == 1.0 and summary["per_activation"]["relu"]["problems"] == 1
    for fig in ["success_vs_rho.png", "success_vs_axes.png", "time_per_problem.png"]:
        assert (out / fig).stat().st_size > 1000
    # resume: a third problem is added; only it runs
    suite["problems"].append({"id": "g", "activation": "g", "d_in": 3, "width": 2, "seed": 1})
    path = _write(tmp_path, suite)
    rows = run_suite(load_suite(path), out)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and [r["id"] for r in rows] == ["tanh", "relu", "g"]
    assert "Suite tiny" in capsys.readouterr().out


def test_summary_counts_failure_kinds():
    base = {"activation": "tanh", "rho": 2.0, "width": 3, "seconds": 1.0, "success_1e-6": False}
    rows = [
        {**base, "id": "a", "recovered_width": 3, "success": True},
        {**base, "id": "b", "recovered_width": 4, "success": False},
        {**base, "id": "c", "recovered_width": 3, "success": False},
        {**base, "id": "d", "recovered_width": 0, "success": False, "status": "no_cluster"},
    ]
    s = summarise(rows)
    assert s["success_rate"] == 0.25
    assert s["failures"] == {"wrong_width": 2, "no_cluster": 1, "imprecise": 1}


def test_problem_validation():
    with pytest.raises(InputError, match="distribution"):
        Problem(id="x", distribution="cauchy")
    assert Problem(id="x", d_in=4, width=3, d_out=1).n_params == 3 * 5 + 1 * 4
