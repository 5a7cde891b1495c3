"""The identifiability suites: suite files, generation, settings, a run, resume, summary
(expand_and_cluster.suite)."""

import json

import pytest

from expand_and_cluster.cli import main
from expand_and_cluster.errors import InputError
from expand_and_cluster.suite import (
    SUITE_DEFAULTS,
    SUITE_FORMAT,
    Problem,
    Suite,
    load_suite,
    override_settings,
    problem_config,
    run_suite,
    select_problems,
    summarise,
    summary_markdown,
)

QUICK = {
    "train.n_students": 6,
    "train.max_epochs": 60,
    "train.batch_size": 256,
    "train.polish_iterations": 300,
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
    with pytest.raises(InputError, match="unknown setting"):
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
    depths = [p.depth for p in full.problems]
    assert depths.count(1) == 150 and depths.count(2) >= 30 and depths.count(3) >= 3
    deep = [p for p in full.problems if p.depth > 1]
    assert {p.activation for p in deep} == {"g", "tanh", "sigmoid", "softplus", "relu"}
    assert any(p.hidden_widths[0] > p.d_in for p in deep)  # a first layer wider than its input


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
    # Easy problems need no repair: the network before it is the same and scores the same.
    assert all(r["success_without_repair"] and r["width_before_repair"] == 3 for r in rows)
    assert all(r["repair_added"] == 0 and r["repair_pruned"] == 0 for r in rows)
    assert all(not r["retrained"] and r["success_without_retrain"] for r in rows)
    assert all(r["epochs"] == QUICK["train.max_epochs"] for r in rows)
    # Stage times: each part of the total, the finish part of the students' training.
    for r in rows:
        st = r["stage_seconds"]
        parts = st["search"] + st["train"] + st["cluster"] + st["finetune"] + st["repair"]
        assert 0 < parts <= st["total"] + 1e-6 <= r["seconds"] + 1e-6
        assert 0 < st["finish"] <= st["train"]
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
        {**base, "id": "b", "recovered_width": 4, "success": False, "failure_modes": ["extra"]},
        {**base, "id": "c", "recovered_width": 3, "success": False},
        {**base, "id": "d", "recovered_width": 0, "success": False, "status": "no_cluster"},
        {**base, "id": "e", "recovered_width": 0, "success": False, "status": "error"},
        {**base, "id": "f", "recovered_width": 0, "success": False, "status": "timeout"},
        {
            **base,
            "id": "g",
            "recovered_width": 2,
            "success": False,
            "failure_modes": ["students", "merged"],
        },
    ]
    s = summarise(rows)
    assert s["success_rate"] == 1 / 7
    assert s["failures"] == {
        "wrong_width": 5,
        "no_cluster": 1,
        "error": 1,
        "timeout": 1,
        "imprecise": 1,
        "degraded": 0,
        "unflagged": 3,
        "modes": {
            "extra": 1,
            "unknown": 1,
            "no_cluster": 1,
            "error": 1,
            "timeout": 1,
            "students": 1,
            "merged": 1,
        },
    }
    rows[1]["degraded"] = True
    assert summarise(rows)["failures"]["unflagged"] == 2
    assert "merged 1" in summary_markdown(summarise(rows))


def test_problem_validation():
    with pytest.raises(InputError, match="distribution"):
        Problem(id="x", distribution="cauchy")
    assert Problem(id="x", d_in=4, width=3, d_out=1).n_params == 3 * 5 + 1 * 4


def test_select_problems(tmp_path, capsys):
    full = load_suite("benchmarks/suites/full.json")
    rho4 = select_problems(full, ["rho=4"])
    assert rho4.problems and all(p.rho == 4.0 for p in rho4.problems)
    assert len(rho4.problems) == sum(p.rho == 4.0 for p in full.problems)
    two = select_problems(full, ["rho=4", "activation=tanh,g"])
    assert {p.activation for p in two.problems} == {"tanh", "g"}
    assert all(p.rho == 4.0 for p in two.problems)
    with pytest.raises(InputError, match="unknown field"):
        select_problems(full, ["colour=red"])
    with pytest.raises(InputError, match="KEY=VALUE"):
        select_problems(full, ["rho"])
    with pytest.raises(InputError, match="no problem"):
        select_problems(full, ["activation=nope"])
    # The command line: a user error, exit code 2, one line, no traceback.
    code = main(
        [
            "bench",
            "benchmarks/suites/full.json",
            "--out",
            str(tmp_path / "r"),
            "--select",
            "activation=nope",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no problem" in err and "Traceback" not in err


def test_override_settings(tmp_path, capsys):
    full = load_suite("benchmarks/suites/full.json")
    changed = override_settings(
        full,
        ["train.max_epochs=1000", "cluster.gamma=0.25", "repair.enabled=false",
         "repair.trial_queries=2000", "min_steps=10"],
    )  # fmt: skip
    s = changed.effective_settings()
    assert s["train.max_epochs"] == 1000 and s["cluster.gamma"] == 0.25
    assert s["repair.enabled"] is False and s["repair.trial_queries"] == 2000
    assert s["min_steps"] == 10 and isinstance(s["train.max_epochs"], int)
    assert changed.problems == full.problems
    assert full.effective_settings()["train.max_epochs"] == 300  # the original is unchanged
    assert override_settings(full, ["repair.enabled=1"]).settings["repair.enabled"] is True
    with pytest.raises(InputError, match="unknown setting 'colour'"):
        override_settings(full, ["colour=red"])
    with pytest.raises(InputError, match=r"unknown setting 'epochs' \(now 'train.max_epochs'\)"):
        override_settings(full, ["epochs=1000"])
    with pytest.raises(InputError, match="train.max_epochs: expected int"):
        override_settings(full, ["train.max_epochs=many"])
    with pytest.raises(InputError, match="gamma: expected a value in"):
        override_settings(full, ["cluster.gamma=1.5"])
    with pytest.raises(InputError, match="repair.enabled: expected bool"):
        override_settings(full, ["repair.enabled=maybe"])
    with pytest.raises(InputError, match="KEY=VALUE"):
        override_settings(full, ["train.max_epochs"])
    argv = ["bench", "benchmarks/suites/full.json", "--out", str(tmp_path / "r"), "--quiet"]
    code = main(argv + ["--select", "rho=4", "--setting", "train.max_epochs=-"])
    err = capsys.readouterr().err
    assert code == 2 and "--setting: train.max_epochs: expected" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"train.max_epochs": -5}, "max_epochs: expected >= 1"),
        ({"train.max_epochs": "many"}, "train.max_epochs: expected int"),
        ({"cluster.gamma": "half"}, "cluster.gamma: expected float"),
        ({"repair.enabled": "maybe"}, "repair.enabled: expected bool"),
        ({"min_steps": -1}, "min_steps expects an integer >= 0"),
        ({"train.max_epochs": 0}, "max_epochs: expected >= 1"),
        ({"held_out_fraction": 1.0}, "held_out_fraction"),
        ({"cluster.gamma": 1.5}, "gamma: expected a value in"),
        ({"cluster.gamma": 0.05, "train.n_students": 20}, "gamma \\* N"),
        ({"studnets": 3}, "unknown setting 'studnets'"),
    ],
)
def test_suite_settings_are_checked_when_the_file_loads(tmp_path, settings, message):
    path = tmp_path / "s.json"
    problem = {"id": "p", "d_in": 2, "width": 2}
    bad = {"format": SUITE_FORMAT, "settings": settings, "problems": [problem]}
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=message):
        load_suite(path)
    ok = {
        "format": SUITE_FORMAT,
        "settings": {"train.max_epochs": 10, "cluster.gamma": 1},
        "problems": [problem],
    }
    path.write_text(json.dumps(ok))
    loaded = load_suite(path).effective_settings()
    assert loaded["train.max_epochs"] == 10 and loaded["cluster.gamma"] == 1


def test_format_1_suites_are_read_with_their_flat_setting_names(tmp_path):
    old = {
        "format": "expand-and-cluster-suite/1",
        "settings": {"students": 8, "epochs": 200, "repair": False, "repair_trial_queries": 50},
        "problems": [{"id": "p", "d_in": 2, "width": 2}],
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    suite = load_suite(path)
    assert suite.settings == {
        "train.n_students": 8,
        "train.max_epochs": 200,
        "repair.enabled": False,
        "repair.trial_queries": 50,
    }
    cfg, epochs = problem_config(suite.problems[0], suite.effective_settings())
    assert cfg.train.n_students == 8 and epochs == 200 and not cfg.repair.enabled
    old["settings"] = {"train.max_epochs": 3}
    path.write_text(json.dumps(old))
    with pytest.raises(InputError, match="unknown settings"):
        load_suite(path)


def test_override_settings_refuses_values_the_configs_refuse():
    full = load_suite("benchmarks/suites/full.json")
    with pytest.raises(InputError, match="max_epochs"):
        override_settings(full, ["train.max_epochs=0"])


def test_min_steps_raises_the_epoch_budget_of_small_problems(monkeypatch):
    from expand_and_cluster.errors import NoClusterError
    from expand_and_cluster.suite import problem as runner

    seen = {}

    def fake_recover(X, Y, cfg):
        seen["cfg"] = cfg
        raise NoClusterError("stop here")

    monkeypatch.setattr(runner, "recover", fake_recover)
    p = Problem(id="x", d_in=3, width=2, queries_per_param=100.0)  # 11 params: 990 train queries

    def run(**settings):
        return runner.run_problem(p, {**SUITE_DEFAULTS, **settings})

    row = run(**{"train.max_epochs": 50, "train.batch_size": 512, "min_steps": 3000})
    # 2 mini-batches per epoch: 1500 epochs give the 3000 steps; patience scales with them.
    assert p.n_queries == 1100
    assert row["status"] == "no_cluster" and seen["cfg"].train.max_epochs == 1500
    assert seen["cfg"].train.patience == 150 and seen["cfg"].train.cooldown == 75
    run(**{"train.max_epochs": 50, "train.batch_size": 512, "min_steps": 0})
    assert seen["cfg"].train.max_epochs == 50
    run(**{"repair.enabled": False})
    assert not seen["cfg"].repair.enabled
    run(**{"repair.trial_queries": 500})
    assert seen["cfg"].repair.trial_queries == 500 and seen["cfg"].repair.enabled


def test_summary_reports_the_rate_without_repair_per_rho_and_class():
    base = {"rho": 4.0, "width": 3, "seconds": 1.0, "success_1e-6": True, "recovered_width": 3}
    rows = [
        {**base, "id": "a", "activation": "tanh", "success": True, "success_without_repair": True},
        {**base, "id": "b", "activation": "tanh", "success": True, "success_without_repair": False},
        {**base, "id": "c", "activation": "g", "success": True, "success_without_repair": False},
        {**base, "id": "d", "activation": "g", "rho": 8.0, "success": False},  # an older row
    ]
    s = summarise(rows)
    assert s["success_rate"] == 0.75 and s["success_rate_without_repair"] == 0.25
    assert s["per_rho"]["4.0"]["per_activation"]["tanh"]["success_rate_without_repair"] == 0.5
    assert s["per_rho"]["4.0"]["success_rate"] == 1.0
    assert list(s["per_rho"]) == ["4.0", "8.0"]
    md = summary_markdown(s)
    assert "| 4.0 | 3/3 (1) | 1/1 (0) | 2/2 (1) |" in md


def test_summary_counts_retrains():
    base = {"rho": 4.0, "width": 3, "seconds": 1.0, "success_1e-6": True, "recovered_width": 3}
    rows = [
        {**base, "id": "a", "activation": "tanh", "success": True, "retrained": False},
        {
            **base,
            "id": "b",
            "activation": "tanh",
            "success": True,
            "retrained": True,
            "retrain_kept": "retrained",
            "success_without_retrain": False,
        },
        {
            **base,
            "id": "c",
            "activation": "g",
            "success": False,
            "retrained": True,
            "retrain_kept": "first",
            "success_without_retrain": False,
        },
        {**base, "id": "d", "activation": "g", "success": True},  # a row older than the retrain
    ]
    s = summarise(rows)
    assert (s["retrained"], s["retrained_kept"]) == (2, 1)
    assert s["success_rate"] == 0.75 and s["success_rate_without_retrain"] == 0.5
    assert "2 problem(s), the retrain kept in 1; without the retrain: 50.0%" in summary_markdown(s)


def test_problem_config_passes_the_retrain_settings():
    suite = Suite("s", {"retrain_factor": 3, "retrain_gap": 20.0}, [])
    problem = Problem("p", "tanh", 4, 3)
    cfg, _ = problem_config(problem, suite.effective_settings())
    assert (cfg.retrain_factor, cfg.retrain_gap, cfg.retrain_above) == (3, 20.0, 1e-6)


def test_generated_deep_problems_draw_a_width_per_layer(tmp_path):
    block = {
        "n": 12,
        "seed": 1,
        "prefix": "deep",
        "choices": {"activation": ["tanh"], "depth": [2, 3], "rho": [None, 4.0]},
        "ranges": {"d_in": [2, 5], "width": [2, 6]},
    }
    shallow = {"n": 5, "seed": 0, "ranges": {"width": [2, 9]}}
    one = load_suite(_write(tmp_path, {"format": SUITE_FORMAT, "generate": shallow})).problems
    both = load_suite(
        _write(tmp_path, {"format": SUITE_FORMAT, "generate": [shallow, block]})
    ).problems
    assert both[:5] == one  # a list of blocks leaves the first block's problems as they were
    deep = both[5:]
    assert {p.depth for p in deep} == {2, 3} and all(p.id.startswith("deep-") for p in deep)
    for p in deep:
        assert len(p.hidden_widths) == p.depth and p.width == p.hidden_widths[0]
        assert all(2 <= w <= 6 for w in p.hidden_widths)
        sizes = [p.d_in, *p.hidden_widths, p.d_out]
        assert p.n_params == sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        cfg, _ = problem_config(p, SUITE_DEFAULTS)
        assert cfg.hidden_layers == p.depth
        assert cfg.width == (None if p.rho is None else 4 * max(p.hidden_widths))
    with pytest.raises(InputError, match="widths"):
        Problem("p", depth=2, widths=(3,))


def _fake_recovery(network, students_mse=1e-20):
    """What run_problem reads of a RecoveryResult, around ``network``."""
    from types import SimpleNamespace

    import numpy as np

    from expand_and_cluster.config import RecoverConfig

    training = SimpleNamespace(relative_mse=np.full(4, students_mse), finish=None)
    return SimpleNamespace(
        config=RecoverConfig(network.activation),
        network=network,
        student_width=8,
        relative_mse={"train": 1e-20, "held_out": 1e-20},
        training=training,
        clustering=SimpleNamespace(dropped=[]),
        timings_s={"total": 1.0},
        retrain=None,
        first_attempt=None,
        repair=None,
        status="ok",
    )


@pytest.mark.parametrize("change", ["none", "layer1", "width"])
def test_deep_problems_are_scored_layer_by_layer(monkeypatch, change):
    import numpy as np

    from expand_and_cluster.network import Network
    from expand_and_cluster.suite import problem as runner
    from expand_and_cluster.teachers import planted_teacher

    problem = Problem("d", "tanh", d_in=3, width=4, depth=2, widths=(4, 3), rho=2.0, seed=5)

    def fake(X, Y, cfg):
        assert cfg.hidden_layers == 2 and cfg.width == 8
        t = planted_teacher(3, [4, 3], 1, "tanh", seed=5, min_angle_degrees=20.0)
        w, b = list(t.weights), list(t.biases)
        if change == "layer1":  # the first layer exact, one neuron of the second off
            w[1] = w[1].copy()
            w[1][0, 0] += 0.5
        if change == "width":  # the second layer one neuron short
            w[1], b[1], w[2] = w[1][:2], b[1][:2], w[2][:, :2]
        return _fake_recovery(Network(w, b, "tanh"))

    monkeypatch.setattr(runner, "recover", fake)
    row = runner.run_problem(problem, dict(SUITE_DEFAULTS))
    assert row["widths"] == (4, 3) or row["widths"] == [4, 3]
    assert len(row["layer_max_distance"]) == (1 if change == "width" else 2)
    assert row["layer_max_distance"][0] < 1e-12
    assert row["success"] == (change == "none")
    if change == "layer1":
        assert row["recovered_widths"] == [4, 3] and row["max_distance"] > 1e-3
        assert row["failure_modes"] == ["imprecise"]
    if change == "width":
        assert row["recovered_widths"] == [4, 2] and not row["degraded"]
        assert row["failure_modes"] == ["upper_layer"]
        assert summarise([row])["failures"]["wrong_width"] == 1
    md = summary_markdown({**summarise([row]), "suite": "d"})
    assert "Per depth" in md and np.isfinite(row["max_distance"])
