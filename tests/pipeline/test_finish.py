"""The float64 finish: the Levenberg-Marquardt normal equations against torch.func, the stop
rule, and both methods on planted teachers with known answers."""

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from expand_and_cluster.activations import get_activation
from expand_and_cluster.config import TrainConfig
from expand_and_cluster.pipeline.finish import (
    choose_finish,
    finish,
    n_params,
    normal_equations,
    stalled,
)
from expand_and_cluster.pipeline.train import output_variance, train_students
from expand_and_cluster.students import StudentEnsemble
from expand_and_cluster.teachers import planted_teacher, probe

from ..testing import SHAPES, ensemble


class _Student(torch.nn.Module):
    """One student as a torch module (the autograd reference)."""

    def __init__(self, ws, bs, activation):
        super().__init__()
        self.ws = torch.nn.ParameterList(ws)
        self.bs = torch.nn.ParameterList(bs)
        self.act = get_activation(activation)

    def forward(self, x):
        h = x
        for l, (w, b) in enumerate(zip(self.ws, self.bs)):
            h = h @ w.T + b
            if l < len(self.ws) - 1:
                h = self.act(h)
        return h


@pytest.mark.parametrize("widths,n,batch", SHAPES)
@pytest.mark.parametrize("activation", ["g", "tanh", "softplus", "relu"])
def test_normal_equations_match_autograd(widths, n, batch, activation):
    ws, bs = ensemble(n, widths, torch.float64, seed=3)
    ens = StudentEnsemble(ws, bs, activation)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64)
    y = torch.randn(batch, widths[-1], generator=g, dtype=torch.float64)
    # A small block size, so that the accumulation over query blocks is exercised.
    jtj, jtr, sse = normal_equations(ens, x, y, block_bytes=8 * n * widths[-1] * 500)
    for i in range(n):
        model = _Student([w[i] for w in ws], [b[i] for b in bs], activation)
        names = [k for k, _ in model.named_parameters()]
        # StudentEnsemble.params() order: every weight, then every bias.
        order = [k for k in names if k.startswith("ws")] + [k for k in names if k.startswith("bs")]
        params = dict(model.named_parameters())
        theta = torch.cat([params[k].detach().reshape(-1) for k in order])
        sizes = [params[k].numel() for k in order]

        def residual(t, order=order, sizes=sizes, params=params, model=model):
            split = torch.split(t, sizes)
            p = {k: s.view(params[k].shape) for k, s in zip(order, split)}
            return (functional_call(model, p, (x,)) - y).reshape(-1)

        jac = jacrev(residual)(theta)
        r = residual(theta).detach()
        scale = float((jac.T @ jac).abs().max()) + 1.0
        assert float((jac.T @ jac - jtj[i]).abs().max()) <= 1e-12 * scale
        assert float((jac.T @ r - jtr[i]).abs().max()) <= 1e-12 * scale
        assert float(sse[i]) == pytest.approx(float(r @ r), rel=1e-12, abs=1e-300)


def test_stall_rule():
    logs = [np.array([-2.0, -2.0, -2.0]), np.array([-3.0, -2.05, -2.5])]
    # window 1: a gain under min_decades stalls.
    assert stalled(logs, 1, 0.1).tolist() == [False, True, False]
    assert stalled(logs, 1, 0.6).tolist() == [False, True, True]
    # Too few checks for the window: nothing stalls.
    assert not stalled(logs, 2, 0.1).any()


def test_auto_starts_with_levenberg_marquardt_for_small_students():
    small, large, many_outputs = [10, 12, 1], [64, 42, 10], [10, 12, 3]
    assert n_params(small) == 10 * 12 + 12 + 12 + 1
    assert choose_finish("auto", small, 400) == "lm+lbfgs"
    assert choose_finish("auto", large, 400) == "lbfgs"
    # The crossover counts Jacobian entries per query: parameters times d_out.
    assert n_params(many_outputs) * 3 > 400 and choose_finish("auto", many_outputs, 400) == "lbfgs"
    assert choose_finish("lbfgs-fixed", small, 400) == "lbfgs-fixed"
    with pytest.raises(ValueError, match="finish"):
        choose_finish("newton", small, 400)


def _planted(activation="tanh", seed=5):
    t = planted_teacher(4, [3], 2, activation, seed=seed, min_angle_degrees=20)
    x, y = probe(t, 600, "gaussian", seed=seed)
    return t, torch.as_tensor(x), torch.as_tensor(y)


def _near_teacher(t, n, noise, seed=0):
    """n students of the teacher's widths: the teacher's weights plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.as_tensor(w)[None].repeat(n, 1, 1) for w in t.weights]
    bs = [torch.as_tensor(b)[None].repeat(n, 1) for b in t.biases]
    ws = [w + noise * torch.randn(w.shape, generator=g, dtype=w.dtype) for w in ws]
    bs = [b + noise * torch.randn(b.shape, generator=g, dtype=b.dtype) for b in bs]
    return StudentEnsemble(ws, bs, t.activation)


@pytest.mark.parametrize("method", ["lm", "lbfgs", "lm+lbfgs"])
def test_finish_reaches_the_planted_teacher(method):
    t, x, y = _planted()
    ens = _near_teacher(t, 4, 0.05)
    var = output_variance(y)
    res = finish(ens, x, y, method, target=1e-24, var_y=var)
    rel = res.mse / var
    assert res.method == method
    assert (rel <= 1e-24).all() and res.stop_reason == ["target"] * 4
    # The weights are the teacher's (the teacher's widths admit only its permutations and,
    # for tanh, sign flips; the noise is too small for either).
    for w, tw in zip(ens.weights, t.weights):
        assert torch.allclose(w, torch.as_tensor(tw)[None].expand_as(w), atol=1e-8)
    if method == "lm":
        assert res.iterations.max() <= 30  # quadratic convergence near the solution


def test_finished_students_leave_the_batch_unchanged():
    t, x, y = _planted("g", seed=2)
    ens = _near_teacher(t, 3, 0.05)
    exact = _near_teacher(t, 1, 0.0)
    for w, e in zip(ens.params(), exact.params()):
        w[1] = e[0]  # student 1 is the teacher: at the target before any iteration
    before = [p[1].clone() for p in ens.params()]
    res = finish(ens, x, y, "lm", target=1e-26, var_y=output_variance(y))
    assert res.iterations[1] == 0 and res.stop_reason[1] == "target"
    assert all(torch.equal(p[1], b) for p, b in zip(ens.params(), before))
    assert res.iterations[0] > 0 and res.iterations[2] > 0


def test_fixed_lbfgs_runs_its_whole_budget():
    t, x, y = _planted()
    ens = _near_teacher(t, 3, 0.05)
    res = finish(ens, x, y, "lbfgs-fixed", lbfgs_iterations=40, var_y=output_variance(y))
    assert res.iterations.tolist() == [40, 40, 40] and res.stop_reason == ["budget"] * 3


def test_stalled_students_stop_before_the_budget():
    # Students of width 1 cannot fit a 3-neuron teacher: they stall well above the target.
    t, x, y = _planted(seed=8)
    cfg = TrainConfig(n_students=3, max_epochs=50, progress=False, seed=1)
    tr = train_students(x, y, [1], t.activation, cfg)
    ens = tr.students.to(dtype=torch.float64)
    var = output_variance(y)
    for method, budget in (("lm", 200), ("lbfgs", 3000)):
        e = ens.to(dtype=torch.float64)
        res = finish(e, x, y, method, lbfgs_iterations=budget, lm_iterations=budget, var_y=var)
        assert res.stop_reason == ["stalled"] * 3
        assert (res.iterations < budget).all()
        assert (res.mse / var > 1e-4).all()


def test_train_students_records_the_finish():
    t, x, y = _planted()
    cfg = TrainConfig(
        n_students=3, max_epochs=100, polish_iterations=200, progress=False, finish="lm"
    )
    tr = train_students(x, y, [5], t.activation, cfg)
    assert tr.finish["method"] == "lm"
    assert len(tr.finish["iterations"]) == 3 and len(tr.finish["stop_reason"]) == 3
    np.testing.assert_allclose(tr.finish["relative_mse"], tr.relative_mse)
