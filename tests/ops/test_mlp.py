"""The ensemble's forward pass, fused gradients and FusedTrainStep (expand_and_cluster.ops.mlp)
against their pure-torch references and torch.autograd (docs/design.md, Tests)."""

import pytest
import torch

from expand_and_cluster import ops
from expand_and_cluster.activations import ACTIVATIONS
from tests.testing import RTOL, SHAPES, ensemble, rel


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("widths,n,b", SHAPES)
def test_mse_grad_matches_autograd(activation, widths, n, b, dtype, device):
    ws, bs = ensemble(n, widths, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, widths[0], generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = torch.randn(b, widths[-1], generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    loss, gw, gb = ops.mlp_mse_grad(ws, bs, x, y, activation)
    # reference in float64 so the float32 comparison measures the kernel's own rounding
    w64 = [w.double() for w in ws]
    b64 = [v.double() for v in bs]
    rloss, rgw, rgb = ops.mlp_mse_grad_reference(w64, b64, x.double(), y.double(), activation)
    tol = RTOL[dtype]
    assert rel(loss.double(), rloss) < tol
    for a, r in zip(gw + gb, rgw + rgb):
        assert rel(a.double(), r) < tol
    out = ops.mlp_forward(ws, bs, x, activation)
    assert out.shape == (n, b, widths[-1])
    assert rel(out.double(), ops.mlp_forward_reference(w64, b64, x.double(), activation)) < tol


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_derivative_matches_autograd(activation):
    act = ACTIVATIONS[activation]
    z = torch.cat([torch.linspace(-40, 40, 2001, dtype=torch.float64), torch.randn(500).double()])
    z = z[z != 0]  # relu-type kinks: autograd's value at 0 is a convention
    zr = z.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(act.fn(zr).sum(), zr)
    torch.testing.assert_close(act.derivative(z), ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(act.derivative(z, act.fn(z)), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("widths,n,b", [([5, 13, 11, 3], 4, 300), ([2, 65, 1], 3, 129)])
def test_torch_path_matches_autograd(activation, widths, n, b, dtype, device, monkeypatch):
    # The torch path (taken above a size threshold) forced at small sizes.
    monkeypatch.setattr(ops.mlp, "TORCH_PATH_MIN_LAYER_SIZE", 0)
    monkeypatch.setattr(ops.mlp, "CUDA_TORCH_PATH_MIN_LAYER_SIZE", 0)
    assert ops.uses_torch_path(widths, device)
    ws, bs = ensemble(n, widths, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, widths[0], generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = torch.randn(b, widths[-1], generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    loss, gw, gb = ops.mlp_mse_grad(ws, bs, x, y, activation)
    w64, b64 = [w.double() for w in ws], [v.double() for v in bs]
    rloss, rgw, rgb = ops.mlp_mse_grad_reference(w64, b64, x.double(), y.double(), activation)
    tol = RTOL[dtype]
    assert rel(loss.double(), rloss) < tol
    for a, r in zip(gw + gb, rgw + rgb):
        assert rel(a.double(), r) < tol


def test_ensemble_equals_single_student_calls(dtype):
    widths, n, b = [6, 19, 3], 5, 700
    ws, bs = ensemble(n, widths, dtype)
    x = torch.randn(b, 6, dtype=dtype)
    y = torch.randn(b, 3, dtype=dtype)
    loss, gw, gb = ops.mlp_mse_grad(ws, bs, x, y, "tanh")
    for i in range(n):
        l1, g1, h1 = ops.mlp_mse_grad(
            [w[i : i + 1].contiguous() for w in ws],
            [v[i : i + 1].contiguous() for v in bs],
            x,
            y,
            "tanh",
        )
        # same chunking, same summation order: bitwise equal
        assert torch.equal(l1[0], loss[i])
        for a, c in zip(g1 + h1, gw + gb):
            assert torch.equal(a[0], c[i])


def test_results_do_not_depend_on_thread_count():
    ws, bs = ensemble(3, [5, 40, 2], torch.float64)
    x = torch.randn(3000, 5, dtype=torch.float64)
    y = torch.randn(3000, 2, dtype=torch.float64)
    n0 = ops.num_threads()
    try:
        ops.set_num_threads(1)
        a = ops.mlp_mse_grad(ws, bs, x, y, "g")
        ops.set_num_threads(max(2, n0))
        b = ops.mlp_mse_grad(ws, bs, x, y, "g")
    finally:
        ops.set_num_threads(n0)
    for u, v in zip([a[0]] + a[1] + a[2], [b[0]] + b[1] + b[2]):
        assert torch.equal(u, v)


def test_softplus_is_stable_for_large_inputs():
    ws = [
        torch.full((1, 1, 1), 800.0, dtype=torch.float64),
        torch.ones(1, 1, 1, dtype=torch.float64),
    ]
    bs = [torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)]
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    out = ops.mlp_forward(ws, bs, x, "softplus")
    assert torch.allclose(out[0, :, 0], torch.tensor([800.0, 0.0], dtype=torch.float64))
    out = ops.mlp_forward(ws, bs, x, "sigmoid")
    assert torch.equal(out[0, :, 0], torch.tensor([1.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# bad arguments: clear errors naming the argument


def _good():
    ws, bs = ensemble(2, [3, 4, 1], torch.float64)
    return ws, bs, torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda ws, bs, x, y: (ws, bs, x.float(), y), TypeError, "x: expected dtype"),
        (lambda ws, bs, x, y: (ws, bs, x[:, :2].contiguous(), y), ValueError, r"x: expected shape"),
        (lambda ws, bs, x, y: (ws, bs, x, y[:3]), ValueError, r"y: expected shape"),
        (
            lambda ws, bs, x, y: (ws, bs, x.T.contiguous().T, y),
            ValueError,
            "x: expected a contiguous",
        ),
        (lambda ws, bs, x, y: (ws, bs[:1], x, y), ValueError, "biases: expected 2"),
        (
            lambda ws, bs, x, y: ([ws[0], ws[1][:1].contiguous()], bs, x, y),
            ValueError,
            r"weights\[1\]: expected shape",
        ),
        (
            lambda ws, bs, x, y: (ws, bs, x.masked_fill(x >= x.max(), float("nan")), y),
            ValueError,
            "x: contains NaN",
        ),
        (
            lambda ws, bs, x, y: (ws, bs, x, y.masked_fill(y >= y.max(), float("inf"))),
            ValueError,
            "y: contains NaN or Inf",
        ),
        (lambda ws, bs, x, y: (ws, bs, x[:0], y[:0]), ValueError, "at least one query"),
        (
            lambda ws, bs, x, y: ([w.numpy() for w in ws], bs, x, y),
            TypeError,
            r"weights\[0\]: expected a torch.Tensor",
        ),
    ],
)
def test_mse_grad_bad_arguments(mutate, exc, match):
    with pytest.raises(exc, match=match):
        ops.mlp_mse_grad(*mutate(*_good()), "tanh")


def test_unknown_activation():
    ws, bs, x, y = _good()
    with pytest.raises(ValueError, match="activation: unknown activation 'swish'"):
        ops.mlp_forward(ws, bs, x, "swish")


def test_compiled_module_reports_backends():
    import expand_and_cluster

    assert "cpu" in expand_and_cluster.backends()
    assert expand_and_cluster.__version__ == ops._checks.lib().__version__


@pytest.mark.parametrize("activation,widths", [("relu", [3, 5, 2]), ("gelu", [3, 5, 2])])
def test_gradcheck_float64(activation, widths):
    """Finite differences as an independent check of the kernel's backward pass."""
    ws, bs = ensemble(2, widths, torch.float64, seed=3)
    x = torch.randn(11, widths[0], dtype=torch.float64)
    y = torch.randn(11, widths[-1], dtype=torch.float64)
    _, gw, _ = ops.mlp_mse_grad(ws, bs, x, y, activation)
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 4, 2), (1, 2, 1)]:
        wp = [w.clone() for w in ws]
        wm = [w.clone() for w in ws]
        wp[0][idx] += eps
        wm[0][idx] -= eps
        lp = ops.mlp_mse_grad(wp, bs, x, y, activation)[0][idx[0]]
        lm = ops.mlp_mse_grad(wm, bs, x, y, activation)[0][idx[0]]
        assert abs(float((lp - lm) / (2 * eps)) - float(gw[0][idx])) < 1e-6


@pytest.mark.parametrize("torch_path", [False, True], ids=["fused", "torch-path"])
def test_fused_train_step_equals_the_two_ops(dtype, device, torch_path, monkeypatch):
    if torch_path:
        monkeypatch.setattr(ops.mlp, "TORCH_PATH_MIN_LAYER_SIZE", 0)
        monkeypatch.setattr(ops.mlp, "CUDA_TORCH_PATH_MIN_LAYER_SIZE", 0)
    widths, n = [5, 13, 11, 3], 4
    ws, bs = ensemble(n, widths, dtype, device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(94, 5, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = torch.randn(94, 3, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    lr = torch.linspace(1e-3, 1e-2, n, dtype=dtype, device=device)
    fused = ops.FusedTrainStep([w.clone() for w in ws], [b.clone() for b in bs], "tanh", lr)
    params = [t.clone() for t in ws + bs]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for k in range(6):  # mini-batches of 64 and the tail of 30, so two workspace sizes
        xb, yb = (x[:64], y[:64]) if k % 2 == 0 else (x[64:], y[64:])
        loss = fused(xb, yb)
        rloss, gw, gb = ops.mlp_mse_grad(params[:3], params[3:], xb, yb, "tanh")
        ops.adam_step(params, gw + gb, m, v, k + 1, lr)
        assert torch.equal(loss, rloss)
    for a, b in zip(fused.params + fused.exp_avg + fused.exp_avg_sq, params + m + v):
        assert torch.equal(a, b)
    assert fused.step.tolist() == [6] * n


def test_fused_train_step_bad_arguments():
    ws, bs = ensemble(2, [3, 4, 1], torch.float64)
    lr = torch.full((2,), 1e-3, dtype=torch.float64)
    fused = ops.FusedTrainStep(ws, bs, "relu", lr)
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="x: expected"):
        fused(x.float(), torch.zeros(8, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="y: expected"):
        fused(x, torch.zeros(8, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same batch"):
        fused(x, torch.zeros(7, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="lr"):
        ops.FusedTrainStep(ws, bs, "relu", -lr)
    with pytest.raises(ValueError, match="step"):
        ops.FusedTrainStep(ws, bs, "relu", lr, step=torch.full((2,), -1, dtype=torch.int64))
