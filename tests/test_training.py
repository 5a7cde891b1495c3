"""Student training: the per-student plateau schedules and the loss read-back every k epochs.

The schedules run in one kernel per epoch on the students' device (ops.plateau_step), checked
against torch.optim.lr_scheduler.ReduceLROnPlateau and its pure-torch reference; reading the state
back every k epochs must not change a bit of the result.
"""

import numpy as np
import pytest
import torch

from expand_and_cluster import ops
from expand_and_cluster.training import TrainConfig, _train_students


def _queries(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    a = torch.randn(2, 1, generator=g, dtype=torch.float64)
    return x, torch.tanh(x @ w) @ a


RULE = dict(var_y=2.0, patience=3, cooldown=2, factor=0.5, target=0.0, min_lr=0.0)


def test_plateau_step_matches_torch_reduce_lr_on_plateau():
    # Noisy losses with long plateaus: every student reduces its learning rate several times.
    rng = np.random.default_rng(0)
    n, epochs = 5, 120
    losses = np.minimum.accumulate(rng.uniform(0.5, 1.0, (epochs, n)), axis=0)
    losses = np.where(rng.uniform(size=(epochs, n)) < 0.6, losses + 0.1, losses)
    state = ops.PlateauState(n, 1.0)
    step_lr = torch.zeros(n, dtype=torch.float32)
    refs = []
    for _ in range(n):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=0.5, patience=3, threshold=0.0, cooldown=2, eps=0.0
        )
        refs.append((opt, sched))
    for e in range(epochs):
        ops.plateau_step(state, torch.as_tensor(losses[e]), e + 1, step_lr, **RULE)
        for (_, sched), value in zip(refs, losses[e]):
            sched.step(float(value))
        want = np.array([opt.param_groups[0]["lr"] for opt, _ in refs])
        np.testing.assert_array_equal(state.lr.numpy(), want)
        np.testing.assert_array_equal(step_lr.numpy(), want.astype(np.float32))
    assert (want <= 0.5**3).all()  # the schedules did reduce, several times
    np.testing.assert_array_equal(state.rel.numpy(), losses[-1] / 2.0)
    assert (state.epochs == epochs).all() and state.live.all()


def _same(a, b):
    """Bit-equal tensors, NaN equal to NaN."""
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)


def _random_schedule_run(step, step_dtype, seed=0, n=64, epochs=40):
    # Losses with NaN/Inf, targets hit and lr reductions below min_lr: every branch is taken.
    g = torch.Generator().manual_seed(seed)
    state = ops.PlateauState(n, 0.1)
    step_lr = torch.full((n,), 0.1, dtype=step_dtype)
    rule = dict(var_y=0.5, patience=2, cooldown=1, factor=0.5, target=1e-3, min_lr=1e-3)
    for e in range(1, epochs + 1):
        loss = torch.rand(n, generator=g, dtype=torch.float64) * 0.01 ** (e / epochs)
        loss[torch.rand(n, generator=g) < 0.02] = float("nan")
        loss[torch.rand(n, generator=g) < 0.02] = float("inf")
        step(state, loss, e, step_lr, **rule)
    return state, step_lr


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
def test_plateau_step_matches_its_reference(step_dtype):
    got, lr_got = _random_schedule_run(ops.plateau_step, step_dtype)
    want, lr_want = _random_schedule_run(ops.plateau_step_reference, step_dtype)
    for f in ops.PlateauState.FIELDS:
        assert _same(getattr(got, f), getattr(want, f)), f
    assert torch.equal(lr_got, lr_want)
    # Every branch was taken: stops on both rules, divergences, students still live.
    assert set(want.code.tolist()) == {0, 1, 2}
    assert (want.diverged > 0).any() and want.live.any()
    assert (lr_want[~want.live] == 0).all() and (lr_want[want.live] > 0).all()


def test_plateau_step_validates_its_arguments():
    state = ops.PlateauState(3, 0.1)
    lr = torch.zeros(3)
    with pytest.raises(TypeError, match="loss: expected a tensor of dtype torch.float64"):
        ops.plateau_step(state, torch.zeros(3), 1, lr, **RULE)
    with pytest.raises(ValueError, match=r"step_lr: expected a contiguous \[3\] tensor"):
        ops.plateau_step(state, torch.zeros(3, dtype=torch.float64), 1, torch.zeros(4), **RULE)
    with pytest.raises(ValueError, match="var_y: expected > 0"):
        ops.plateau_step(state, torch.zeros(3, dtype=torch.float64), 1, lr, **{**RULE, "var_y": 0})
    with pytest.raises(TypeError, match="state: expected a PlateauState"):
        ops.plateau_step({}, torch.zeros(3, dtype=torch.float64), 1, lr, **RULE)


@pytest.mark.parametrize(
    "kw",
    [
        # full batch; students stop on min_lr at different epochs, one runs out of budget
        dict(max_epochs=300, patience=0, cooldown=0, lr=0.5, min_lr=1e-3),
        # mini-batches; stops on the target and on min_lr
        dict(
            max_epochs=200,
            batch_size=128,
            patience=1,
            cooldown=1,
            lr=0.2,
            target_relative_mse=1e-5,
            min_lr=2e-3,
        ),
    ],
    ids=["full-batch", "mini-batch"],
)
def test_read_back_every_k_epochs_changes_nothing(kw):
    x, y = _queries()
    runs = {}
    for k in (1, 7, 1000):
        cfg = TrainConfig(n_students=6, seed=3, progress=False, sync_every=k, **kw)
        runs[k] = _train_students(x, y, [4], "tanh", cfg)
    ref = runs[1]
    # The case is worth testing: students stop at different epochs, for different reasons.
    assert len(set(ref.epochs.tolist())) >= 3
    assert "min_lr" in ref.stop_reason and "budget" in ref.stop_reason
    assert ref.history["epoch"][-1] == ref.epochs.max()
    for key, r in runs.items():
        for a, b in zip(r.students.params(), ref.students.params()):
            assert torch.equal(a, b), key
        np.testing.assert_array_equal(r.relative_mse, ref.relative_mse)
        np.testing.assert_array_equal(r.epochs, ref.epochs)
        np.testing.assert_array_equal(r.final_lr, ref.final_lr)
        assert r.stop_reason == ref.stop_reason
        assert r.history == ref.history


@pytest.mark.parametrize("k", [1, 4])
def test_divergence_reported_with_its_epoch(k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    y = torch.randn(300, 1, generator=g) * 100
    cfg = TrainConfig(n_students=4, lr=1e30, max_epochs=50, progress=False, sync_every=k)
    with pytest.raises(FloatingPointError, match=r"diverged \(loss NaN/Inf\) at epoch 2;"):
        _train_students(x, y, [5], "relu", cfg)


def test_sync_every_is_validated():
    with pytest.raises(ValueError, match="sync_every: expected None or >= 1, got 0"):
        TrainConfig(sync_every=0)
