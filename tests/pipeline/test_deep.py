"""Deep teachers: sign resolution of even_linear layers, per-layer alignment, layer-by-
layer recovery of planted two-hidden-layer teachers, checkpoints, resume and re-clustering."""

import json

import numpy as np
import pytest
import torch

from expand_and_cluster import metrics
from expand_and_cluster.activations import get_activation
from expand_and_cluster.cli import main
from expand_and_cluster.config import RecoverConfig, RepairConfig, TrainConfig
from expand_and_cluster.io.checkpoint import Checkpoint
from expand_and_cluster.io.files import save_network
from expand_and_cluster.network import Network
from expand_and_cluster.pipeline.fit import hidden_features, resolve_linear_signs
from expand_and_cluster.pipeline.recover import recover
from expand_and_cluster.students import StudentEnsemble
from expand_and_cluster.teachers import planted_teacher, probe


@pytest.mark.parametrize("activation", ["softplus", "relu", "leaky_relu", "gelu"])
def test_resolve_linear_signs_finds_the_skip_free_orientation(activation):
    # A skip-free layer pair seen with some neurons of the lower layer flipped: the least-squares
    # fit of the upper layer over [h; x; 1] needs a skip, and resolve_linear_signs must find the
    # flips that remove it, leaving the same function.
    act = get_activation(activation)
    rng = np.random.default_rng(3)
    q, k, m = 5, 4, 3
    below = rng.standard_normal((k, q + 1))
    w_up, b_up = rng.standard_normal((m, k)), rng.standard_normal(m)
    x = rng.standard_normal((400, q))
    z = hidden_features(x, below, activation) @ w_up.T + b_up
    flips = np.array([True, False, True, True])
    canonical = below * np.where(flips, -1.0, 1.0)[:, None]
    a = np.c_[hidden_features(x, canonical, activation), x, np.ones(len(x))]
    upper = np.linalg.lstsq(a, z, rcond=None)[0].T
    assert np.abs(upper[:, k : k + q]).max() > 0.1  # the canonical form does need a skip
    res = resolve_linear_signs(upper, canonical, act.linear_coefficient)
    np.testing.assert_array_equal(res.flipped, flips)
    assert res.residual < 1e-10  # lstsq round-off relative to O(1) weights
    new = upper @ res.transform.T
    oriented = canonical * np.where(res.flipped, -1.0, 1.0)[:, None]
    z_new = hidden_features(x, oriented, activation) @ new[:, :k].T + new[:, k]
    np.testing.assert_allclose(z_new, z, atol=1e-10)


def test_resolve_linear_signs_checks_shapes():
    with pytest.raises(ValueError, match="upper"):
        resolve_linear_signs(np.zeros((2, 5)), np.zeros((3, 3)), 1.0)


def _symmetric_copy(teacher: Network, rng) -> Network:
    """The teacher with hidden neurons permuted, flipped (odd classes) and rescaled (relu), its
    function unchanged: every layer's alignment must be ~0."""
    act = get_activation(teacher.activation)
    sym = act.symmetry.value
    ws = [w.copy() for w in teacher.weights]
    bs = [b.copy() for b in teacher.biases]
    for l in range(len(ws) - 1):
        k = ws[l].shape[0]
        perm = rng.permutation(k)
        ws[l], bs[l] = ws[l][perm], bs[l][perm]
        ws[l + 1] = ws[l + 1][:, perm]
        if sym in ("odd", "odd_constant"):
            flip = rng.random(k) < 0.5
            s = np.where(flip, -1.0, 1.0)
            ws[l], bs[l] = ws[l] * s[:, None], bs[l] * s
            if sym == "odd_constant":  # sigmoid(-z) = 1 - sigmoid(z)
                bs[l + 1] = bs[l + 1] + ws[l + 1][:, flip].sum(axis=1)
            ws[l + 1] = ws[l + 1] * s[None, :]
        if sym == "even_linear_positive_scaling":
            c = rng.uniform(0.5, 2.0, k)
            ws[l], bs[l] = ws[l] * c[:, None], bs[l] * c
            ws[l + 1] = ws[l + 1] / c[None, :]
    return Network(ws, bs, teacher.activation)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "g"])
def test_deep_alignment_is_invariant_to_the_symmetries(activation):
    rng = np.random.default_rng(0)
    teacher = planted_teacher(5, [4, 3, 3], 2, activation, seed=1)
    copy = _symmetric_copy(teacher, rng)
    x = rng.standard_normal((50, 5))
    np.testing.assert_allclose(copy.forward(x), teacher.forward(x), atol=1e-12)
    for al in metrics.deep_alignment(teacher, copy):
        assert al["max"] < 1e-12, al
    # and it sees a change in an upper layer
    copy.weights[2][0, 0] += 0.3
    als = metrics.deep_alignment(teacher, copy)
    assert als[0]["max"] < 1e-12 and als[1]["max"] < 1e-12 and als[2]["max"] > 1e-4


def test_deep_alignment_rejects_other_depths():
    t2 = planted_teacher(3, [2, 2], 1, "tanh", seed=0)
    t1 = planted_teacher(3, [2], 1, "tanh", seed=0)
    with pytest.raises(ValueError, match="hidden layers"):
        metrics.deep_alignment(t2, t1)


# Budgets measured on 2 cores (about 10-20 s per run): a 4-3-3-1 teacher, 5,000 queries,
# 12 students of width 6, 300 Adam epochs + 2,000 L-BFGS iterations.
def _config(activation, **kw):
    train = TrainConfig(
        n_students=12,
        max_epochs=300,
        batch_size=256,
        polish_iterations=2000,
        progress=False,
        patience=10,
        cooldown=5,
    )
    return RecoverConfig(
        activation=activation,
        hidden_layers=2,
        width=6,
        train=train,
        finetune_iterations=500,
        **kw,
    )


@pytest.fixture(scope="module")
def deep_tanh():
    teacher = planted_teacher(4, [3, 3], 1, "tanh", seed=4, min_angle_degrees=30)
    X, Y = probe(teacher, 5000, "gaussian", seed=0)
    return teacher, X, Y


def test_planted_deep_teacher_recovered(deep_tanh, tmp_path):
    teacher, X, Y = deep_tanh
    ckpt = Checkpoint(tmp_path / "ckpt")
    ckpt.save_run(_config("tanh").to_dict(), X, Y, np.zeros(0, int), "test")
    res = recover(X, Y, _config("tanh"), checkpoint=ckpt)
    assert res.network.hidden_sizes == teacher.hidden_sizes
    for al in metrics.deep_alignment(teacher, res.network):
        assert al["max"] < 1e-3, al
    assert res.relative_mse["held_out"] <= 1e-4
    assert len(res.layers) == 2 and res.layers[0].students_relative_mse is not None
    assert ckpt.has("students") and ckpt.last_layer() == 1
    # The width repair looked at the last hidden layer and had nothing to change.
    assert res.repair is not None and not res.repair.changed
    assert res.repair.to_json()["layer"] == 1 and res.repair.width_before == 3

    # Resume after layer 0: the same network, without training the students again.
    (tmp_path / "ckpt" / "layer_1.npz").unlink()
    again = recover(X, Y, _config("tanh"), resume_from=ckpt)
    assert again.resumed_from == "layer_0"
    assert again.timings_s["train"] == 0.0 and again.timings_s["search"] == 0.0
    np.testing.assert_allclose(again.network.weights[1], res.network.weights[1], atol=1e-8)
    assert again.layers[0].recovered_width == res.layers[0].recovered_width


def test_fresh_upper_students_recover_the_planted_deep_teacher(deep_tanh):
    teacher, X, Y = deep_tanh
    messages: list[str] = []
    res = recover(X, Y, _config("tanh", upper_students="fresh"), log=messages.append)
    assert res.network.hidden_sizes == teacher.hidden_sizes
    for al in metrics.deep_alignment(teacher, res.network):
        assert al["max"] < 1e-3, al
    assert res.relative_mse["held_out"] <= 1e-4
    # Layer 1 was clustered on new students, not on the first training's upper layers.
    assert any(m.startswith("students trained afresh on the recovered layer 0") for m in messages)
    assert not any("fine-tuned on the recovered layer" in m for m in messages)
    with pytest.raises(ValueError, match="upper_students"):
        _config("tanh", upper_students="new")


def test_deep_resume_checks_the_depth(deep_tanh, tmp_path):
    _, X, Y = deep_tanh
    ckpt = Checkpoint(tmp_path / "c")
    # only the saved students matter here: a few epochs, no polish, no clustering budget
    quick = RecoverConfig.from_dict(
        {
            **_config("tanh").to_dict(),
            "train": {**_config("tanh").train.__dict__, "max_epochs": 2, "polish_iterations": 0},
        }
    )
    ckpt.save_run(quick.to_dict(), X, Y, np.zeros(0, int), "test")
    try:
        recover(X[:300], Y[:300], quick, checkpoint=ckpt)
    except Exception:  # noqa: BLE001 (badly trained students may leave no cluster: irrelevant)
        pass
    assert ckpt.has("students")
    one = RecoverConfig.from_dict({**quick.to_dict(), "hidden_layers": 1})
    with pytest.raises(ValueError, match="hidden layer"):
        recover(X[:300], Y[:300], one, resume_from=ckpt)


def test_recover_config_round_trips():
    cfg = _config("sigmoid", held_out_fraction=0.2)
    assert RecoverConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # A checkpoint written before the width repair existed loads with the default repair.
    old = cfg.to_dict()
    del old["repair"]
    assert RecoverConfig.from_dict(old) == cfg


def test_cli_deep_run_resume_and_recluster(deep_tanh, tmp_path, capsys):
    teacher, _, _ = deep_tanh
    tpath = tmp_path / "teacher.npz"
    save_network(teacher, tpath)
    fast = ["--students", "12", "--width", "6", "--epochs", "300", "--batch-size", "256"]
    fast += ["--polish-iterations", "2000", "--finetune-iterations", "300", "--quiet"]
    fast += ["--n-queries", "5000", "--no-figures"]
    out = tmp_path / "run"
    assert (
        main(["recover", "--teacher", str(tpath), "--activation", "tanh", "--out", str(out)] + fast)
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["recovered_sizes"] == [3, 3] and rep["teacher_sizes"] == [3, 3]
    assert [a["layer"] for a in rep["alignment"]] == [0, 1]
    assert max(a["max"] for a in rep["alignment"]) < 1e-3
    assert rep["student_widths"] == [6, 6] and len(rep["layers"]) == 2
    assert (out / "checkpoint" / "layer_1.json").is_file()
    assert not (tmp_path / "run.checkpoint").exists()

    # Re-cluster with another gamma: no training, the new gamma in the report.
    out2 = tmp_path / "re"
    argv = ["cluster", "--students", str(out), "--gamma", "0.75", "--out", str(out2), "--quiet"]
    assert main(argv) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["gamma"] == 0.75 and rep2["timings_s"]["train"] == 0.0
    assert rep2["recovered_sizes"] == [3, 3] and rep2["resumed_from"] == "students"

    # Resume from the checkpoint folder of the first run, as if it had been written on a GPU
    # machine: --device (here cpu) says where the rest trains, not the saved settings.
    cfg_file = out / "checkpoint" / "config.json"
    saved = json.loads(cfg_file.read_text())
    saved["config"]["device"] = "cuda"
    cfg_file.write_text(json.dumps(saved))
    out3 = tmp_path / "resumed"
    argv = ["recover", "--resume", str(out / "checkpoint"), "--out", str(out3), "--quiet"]
    assert main(argv + ["--device", "cpu"]) == 0
    rep3 = json.loads((out3 / "report.json").read_text())
    assert rep3["resumed_from"] == "layer_1" and rep3["recovered_sizes"] == [3, 3]
    capsys.readouterr()

    # User errors: no checkpoint there; depth that contradicts the teacher file.
    assert main(["recover", "--resume", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    argv = ["recover", "--teacher", str(tpath), "--activation", "tanh", "--hidden-layers", "1"]
    assert main(argv + ["--out", str(tmp_path / "y")]) == 2
    assert (
        main(["cluster", "--students", str(out), "--gamma", "0.05", "--out", str(tmp_path / "z")])
        == 2
    )
    err = capsys.readouterr().err
    assert "no checkpoint found" in err and "--hidden-layers" in err and "gamma * N" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _exact_students(teacher: Network, n_students: int, seed: int) -> StudentEnsemble:
    """Students that compute the teacher exactly: every hidden layer holds the teacher's neurons
    plus a duplicate of neuron 0 (outgoing weights split in two), in a random order per student."""
    rng = np.random.default_rng(seed)
    ws = [[] for _ in teacher.weights]
    bs = [[] for _ in teacher.biases]
    for _ in range(n_students):
        w = [x.copy() for x in teacher.weights]
        b = [x.copy() for x in teacher.biases]
        for l in range(len(w) - 1):
            w[l], b[l] = np.vstack([w[l], w[l][:1]]), np.append(b[l], b[l][0])
            col = w[l + 1][:, :1] / 2
            w[l + 1] = np.hstack([w[l + 1], col])
            w[l + 1][:, :1] = col
            perm = rng.permutation(w[l].shape[0])
            w[l], b[l], w[l + 1] = w[l][perm], b[l][perm], w[l + 1][:, perm]
        for l in range(len(w)):
            ws[l].append(w[l])
            bs[l].append(b[l])
    return StudentEnsemble(
        [torch.as_tensor(np.stack(w)) for w in ws],
        [torch.as_tensor(np.stack(b)) for b in bs],
        teacher.activation,
    )


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_even_linear_deep_path_from_exact_students(activation, tmp_path):
    # Students that are exact copies of the teacher isolate the deep even_linear bookkeeping from
    # training: canonical orientations that differ from the teacher's leave linear maps, which the
    # students' skip inputs must carry and the sign resolution must remove again. The teacher is
    # chosen so that some neurons' largest coordinate is negative (their canonical form flips).
    teacher = planted_teacher(4, [3, 3], 2, activation, seed=7, min_angle_degrees=30)
    flipped = [
        int((np.take_along_axis(v, np.abs(v).argmax(1)[:, None], 1) < 0).sum())
        for v in (teacher.incoming(0), teacher.incoming(1))
    ]
    assert min(flipped) >= 1  # the test exercises the resolution in both layers
    X, Y = probe(teacher, 2000, "gaussian", seed=0)
    cfg = RecoverConfig(
        activation=activation,
        hidden_layers=2,
        width=4,
        train=TrainConfig(n_students=4, max_epochs=1, polish_iterations=50, progress=False),
        finetune_iterations=200,
        layer_finetune_epochs=1,
        layer_finetune_lr_factor=1e-6,
        # The bookkeeping alone: one relu neuron of layer 1 never fires on the training
        # queries, and the width repair rightly prunes it.
        repair=RepairConfig.off(),
    )
    ckpt = Checkpoint(tmp_path / "c")
    ckpt.save_run(cfg.to_dict(), X, Y, np.zeros(0, int), "test")
    ens = _exact_students(teacher, 4, seed=1)
    ckpt.save_stage(
        "students",
        {
            **ens.to_arrays(),
            "relative_mse": np.zeros(4),
            "epochs": np.ones(4),
            "final_lr": np.ones(4),
        },
        {"student_width": 4, "stop_reason": ["target"] * 4, "history": {}},
    )
    res = recover(X, Y, cfg, resume_from=ckpt, resume_layers=False)
    assert res.network.hidden_sizes == [3, 3]
    assert res.network.linear_weight is None  # no skip left in a deep network
    for layer in res.layers:
        # the students' short fine-tune (1 epoch, 50 L-BFGS iterations) moves them by ~1e-8
        assert layer.sign_resolution is not None and layer.sign_resolution["residual"] < 1e-6
    for al in metrics.deep_alignment(teacher, res.network):
        assert al["max"] < 1e-10, al
    assert res.relative_mse["train"] < 1e-12
