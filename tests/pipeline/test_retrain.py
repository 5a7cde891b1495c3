"""The retrain escalation of :func:`expand_and_cluster.pipeline.recover.recover`: when it runs,
with what schedule, and which result it keeps."""

import numpy as np
import pytest

from expand_and_cluster.config import RecoverConfig, TrainConfig
from expand_and_cluster.errors import NoClusterError
from expand_and_cluster.network import Network
from expand_and_cluster.pipeline import recover as rec
from expand_and_cluster.pipeline.recover import RecoveryResult, recover
from expand_and_cluster.pipeline.stages import Expansion, Layers, Queries, Reconstruction
from expand_and_cluster.pipeline.train import TrainResult
from expand_and_cluster.teachers import planted_teacher, probe


def _fake_result(width: int, train_mse: float, student_mse: float, student_width=12, d_in=2):
    """A RecoveryResult of a network of ``width`` hidden neurons (no stage actually ran)."""
    net = Network(
        [np.ones((width, d_in)), np.ones((1, width))], [np.zeros(width), np.zeros(1)], "tanh"
    )
    tr = TrainResult(None, np.full(4, student_mse), np.zeros(4, int), ["budget"] * 4, np.ones(4))
    x, y = np.zeros((10, d_in)), np.zeros((10, 1))
    queries = Queries(x, y, np.arange(10), np.zeros(0, int), x, y, np.ones(d_in, bool))
    return RecoveryResult(
        _config(),
        queries,
        Expansion(tr, student_width),
        Layers([], [], first=None),
        Reconstruction(net, net, []),
        None,
        {"train": train_mse, "held_out": train_mse, "initial_train": train_mse},
        {"search": 0.0, "train": 1.0, "cluster": 0.0, "finetune": 0.0, "repair": 0.0, "total": 2.0},
    )


def _config(**kw):
    train = TrainConfig(max_epochs=300, patience=30, cooldown=15, progress=False)
    return RecoverConfig(activation="tanh", width=None, train=train, **kw)


@pytest.fixture
def calls(monkeypatch):
    """Replace the one-pass recovery by a script of results; record the configs it gets."""
    seen = []

    def install(*results):
        script = list(results)

        def fake(X, Y, cfg, say, checkpoint, resume_from, resume_layers, source):
            seen.append(cfg)
            r = script.pop(0)
            if isinstance(r, Exception):
                raise r
            return r

        monkeypatch.setattr(rec, "_recover_once", fake)
        return seen

    return install


X, Y = np.zeros((10, 2)), np.zeros((10, 1))


def test_retrain_stretches_the_schedule_and_keeps_the_better_result(calls):
    first = _fake_result(3, 5e-4, 3e-7)
    second = _fake_result(4, 1e-30, 1e-8)
    seen = calls(first, second)
    res = recover(X, Y, _config(retrain_factor=4))
    assert len(seen) == 2
    t0, t1 = seen[0].train, seen[1].train
    assert (t1.max_epochs, t1.patience, t1.cooldown) == (1200, 120, 60)
    assert t1.seed == t0.seed and t1.n_students == t0.n_students
    assert seen[1].width == 12  # the first pass's student width: no second expansion search
    assert seen[1].retrain_factor == 1  # one retrain at most
    assert res is second and res.first_attempt is first
    assert res.retrain["kept"] == "retrained" and res.retrain["epochs"] == 1200
    assert res.retrain["first"]["widths"] == [3] and res.retrain["retrained"]["widths"] == [4]
    assert res.timings_s["total"] == pytest.approx(2.0 + res.timings_s["retrain"])


def test_retrain_keeps_the_first_result_when_it_is_better(calls):
    first = _fake_result(3, 5e-4, 3e-7)
    calls(first, _fake_result(2, 1e-2, 1e-8))
    res = recover(X, Y, _config(retrain_factor=2))
    assert res is first and res.retrain["kept"] == "first"
    assert res.retrain["retrained"]["relative_mse"]["train"] == 1e-2


def test_retrain_that_finds_no_cluster_keeps_the_first_result(calls):
    first = _fake_result(3, 5e-4, 3e-7)
    calls(first, NoClusterError("no cluster survived"))
    res = recover(X, Y, _config(retrain_factor=2))
    assert res is first and res.retrain["kept"] == "first"
    assert "no cluster" in res.retrain["retrained"]["error"]


@pytest.mark.parametrize(
    "train_mse, student_mse, factor",
    [
        (1e-30, 1e-8, 4),  # exact: nothing to fix
        (5e-7, 1e-12, 4),  # below retrain_above
        (5e-4, 3e-7, 1),  # retrain off (the library's default)
    ],
)
def test_no_retrain(calls, train_mse, student_mse, factor):
    first = _fake_result(3, train_mse, student_mse)
    seen = calls(first)
    res = recover(X, Y, _config(retrain_factor=factor))
    assert len(seen) == 1 and res is first and res.retrain is None and res.first_attempt is None


def test_students_that_do_not_fit_are_retrained(calls):
    # Only 5 times the students, but the students themselves are far from exact (stuck, or too
    # short a schedule): the longer schedule is tried, and a result that stays there is marked.
    first = _fake_result(3, 5e-4, 1e-4)
    seen = calls(first, _fake_result(3, 4e-4, 1e-4))
    res = recover(X, Y, _config(retrain_factor=4))
    assert len(seen) == 2 and res.retrain["kept"] == "retrained"
    assert res.status == "degraded" and "did not converge" in res.status_reason


@pytest.mark.parametrize(
    "train_mse, student_mse, status, words",
    [
        (1e-30, 1e-8, "ok", None),
        (5e-7, 1e-12, "ok", None),  # below retrain_above
        (5e-8, 1e-7, "ok", None),  # students not exact, but the network is
        (5e-4, 3e-7, "degraded", "times the median student's"),
        (5e-4, 1e-4, "degraded", "did not converge"),
    ],
)
def test_a_result_failing_the_retrain_test_is_marked_degraded(
    calls, train_mse, student_mse, status, words
):
    calls(_fake_result(3, train_mse, student_mse))
    res = recover(X, Y, _config(retrain_factor=1))
    assert res.status == status
    assert (res.status_reason is None) == (words is None)
    if words is not None:
        assert words in res.status_reason
    assert rec.degradation(res) == res.status_reason


@pytest.mark.parametrize(
    "field, value",
    [("retrain_factor", 0), ("retrain_factor", 1.5), ("retrain_above", -1.0), ("retrain_gap", 0.5)],
)
def test_retrain_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        _config(**{field: value})


def test_retrain_end_to_end_recovers_more_and_checkpoints_in_a_subfolder(tmp_path):
    """A real recovery cut short (6 students, 10 Adam epochs, 100 L-BFGS iterations, no repair)
    of a teacher with a weak neuron: the first pass keeps 2 of 4 neurons, far above its
    students; the retrain (10 times the schedule) keeps more and lowers the relative MSE, and
    its stages go to ``checkpoint/retrain``."""
    from expand_and_cluster.config import RepairConfig
    from expand_and_cluster.io.checkpoint import Checkpoint

    teacher = planted_teacher(4, [4], 1, "tanh", seed=3, min_angle_degrees=20)
    teacher.weights[1][:, -1] *= 0.1
    X, Y = probe(teacher, 2000, "gaussian", seed=0)
    train = TrainConfig(
        n_students=6,
        max_epochs=10,
        batch_size=256,
        patience=2,
        cooldown=1,
        polish_iterations=100,
        progress=False,
    )
    cfg = RecoverConfig(
        activation="tanh",
        width=8,
        train=train,
        finetune_iterations=300,
        repair=RepairConfig.off(),
        retrain_factor=10,
    )
    ckpt = Checkpoint(tmp_path / "ckpt")
    res = recover(X, Y, cfg, checkpoint=ckpt)
    assert res.retrain is not None and res.retrain["epochs"] == 100
    first = res.retrain["first"]
    assert first["widths"] == [2] and first["relative_mse"]["train"] > 1e-3
    assert res.retrain["kept"] == "retrained" and res.first_attempt is not res
    assert res.network.hidden_sizes[0] > 2
    assert res.relative_mse["train"] < 1e-2 * first["relative_mse"]["train"]
    assert ckpt.has("students") and Checkpoint(tmp_path / "ckpt" / "retrain").has("students")


def test_bench_row_records_a_retrain_that_kept_the_first_pass(monkeypatch):
    # A retrain that lost keeps the first pass, which is then the result itself: the row must
    # still say that a retrain ran.
    from expand_and_cluster.suite import SUITE_DEFAULTS, Problem
    from expand_and_cluster.suite import problem as runner

    def fake(X, Y, cfg):
        res = _fake_result(2, 5e-4, 3e-7, d_in=4)
        res.retrain = {"kept": "first", "epochs": 1200}
        res.first_attempt = res
        return res

    monkeypatch.setattr(runner, "recover", fake)
    problem = Problem("p", "tanh", d_in=4, width=3, queries_per_param=20)
    row = runner.run_problem(problem, dict(SUITE_DEFAULTS))
    assert row["retrained"] and row["retrain_kept"] == "first"
    assert row["width_before_retrain"] == 2 and row["recovered_width"] == 2
    assert not row["success"] and not row["success_without_retrain"]
