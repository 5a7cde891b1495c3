"""Adam with a learning rate per student and the per-student training schedule
(expand_and_cluster.ops.optim) against torch.optim.Adam, torch's ReduceLROnPlateau and their
pure-torch references."""

import numpy as np
import pytest
import torch

from expand_and_cluster import ops
from tests.testing import RTOL, rel


@pytest.mark.parametrize(
    "n,shapes", [(1, [(1, 1)]), (4, [(7, 3), (5,)]), (3, [(65, 1), (2, 2, 2)])]
)
def test_adam_step_matches_reference_and_torch_optim(n, shapes, dtype):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, *s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    ref = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    mr = [torch.zeros_like(p) for p in params]
    vr = [torch.zeros_like(p) for p in params]
    lr = torch.linspace(1e-3, 1e-1, n, dtype=dtype)
    # torch.optim.Adam, one optimiser per student (the per-student learning rate)
    tp = [[p[i].clone().requires_grad_(True) for p in params] for i in range(n)]
    opts = [torch.optim.Adam(tp[i], lr=float(lr[i])) for i in range(n)]
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
        ops.adam_step(params, grads, m, v, step, lr)
        ops.adam_step_reference(ref, grads, mr, vr, step, lr)
        for i in range(n):
            for t, gr in zip(tp[i], grads):
                t.grad = gr[i].clone()
            opts[i].step()
    tol = RTOL[dtype]
    for p, r in zip(params, ref):
        assert rel(p, r) < tol
    for i in range(n):
        for p, t in zip(params, tp[i]):
            assert rel(p[i], t.detach()) < tol


def test_adam_per_student_step_and_frozen_student():
    p = [torch.ones(2, 3, dtype=torch.float64)]
    g = [torch.full((2, 3), 0.5, dtype=torch.float64)]
    m = [torch.zeros(2, 3, dtype=torch.float64)]
    v = [torch.zeros(2, 3, dtype=torch.float64)]
    ops.adam_step(p, g, m, v, torch.tensor([1, 7]), torch.tensor([0.1, 0.0], dtype=torch.float64))
    assert torch.allclose(p[0][0], torch.full((3,), 0.9, dtype=torch.float64))  # first step: lr
    assert torch.equal(p[0][1], torch.ones(3, dtype=torch.float64))  # lr 0: frozen


def test_adam_bad_arguments():
    p = [torch.zeros(2, 3)]
    with pytest.raises(ValueError, match="step: expected step numbers >= 1"):
        ops.adam_step(p, p, p, p, 0, torch.ones(2))
    with pytest.raises(ValueError, match=r"params\[0\]: expected 3 students"):
        ops.adam_step(p, p, p, p, 1, torch.ones(3))
    with pytest.raises(TypeError, match=r"grads\[0\]: expected dtype"):
        ops.adam_step(p, [torch.zeros(2, 3, dtype=torch.float64)], p, p, 1, torch.ones(2))
    with pytest.raises(ValueError, match="lr: expected finite learning rates >= 0"):
        ops.adam_step(p, p, p, p, 1, torch.tensor([1.0, -1.0]))


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
