"""Student training: the per-student plateau schedules and the loss read-back every k epochs.

The schedules run in one kernel per epoch on the students' device (ops.plateau_step), checked
against torch.optim.lr_scheduler.ReduceLROnPlateau and its pure-torch reference; reading the state
back every k epochs must not change a bit of the result.
"""

import numpy as np
import pytest
import torch

from expand_and_cluster.config import TrainConfig
from expand_and_cluster.pipeline.train import train_students


def _queries(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    a = torch.randn(2, 1, generator=g, dtype=torch.float64)
    return x, torch.tanh(x @ w) @ a


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
        runs[k] = train_students(x, y, [4], "tanh", cfg)
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
        train_students(x, y, [5], "relu", cfg)


def test_sync_every_is_validated():
    with pytest.raises(ValueError, match="sync_every: expected None or >= 1, got 0"):
        TrainConfig(sync_every=0)
