"""One full training step (loss, gradients, Adam) of N students: ours against the baselines of
docs/design.md, in one run.
Run: ``pytest benchmarks/bench_training_step.py --benchmark-json out.json``.

Baselines (all with torch.optim.Adam on the stacked parameters):
- ``einsum``: the reference formulation, all students in one tensor, one einsum per layer, autograd;
- ``bmm``: torch.bmm / baddbmm per layer, autograd;
- ``vmap``: torch.func.vmap over a functional one-student MLP, autograd through it.
``ours``: ops.mlp_mse_grad + ops.adam_step (the CPU fused kernel, or the torch path above
ops.TORCH_PATH_MIN_LAYER_SIZE). Every implementation is checked against the reference gradients
before it is timed. Torch runs with its default threads (torch ops are its heavy work here); ours
runs under ops.threads(torch_threads=1) as in training (see that function's docstring).
"""

import platform

import pytest
import torch

from expand_and_cluster import ops

# name: (d_in, width, d_out, N, B)
SIZES = {
    "toy-2-20-1-N20-B1000": (2, 20, 1, 20, 1000),
    "toy-10-80-1-N20-B10000": (10, 80, 1, 20, 10000),
    "digits-64-64-10-N10-B512": (64, 64, 10, 10, 512),
    "digits-64-64-10-N20-B5391": (64, 64, 10, 20, 5391),
    "mnist-784-256-10-N20-B512": (784, 256, 10, 20, 512),
}
IMPLS = ["ours", "einsum", "bmm", "vmap"]


def _problem(size, seed=0):
    d_in, w, d_out, n, b = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    widths = [d_in, w, d_out]
    ws = [torch.randn(n, widths[l + 1], widths[l], generator=g) / widths[l] ** 0.5 for l in (0, 1)]
    bs = [torch.zeros(n, widths[l + 1]) for l in (0, 1)]
    x = torch.randn(b, d_in, generator=g)
    y = torch.randn(b, d_out, generator=g)
    return ws, bs, x, y


def _loss_einsum(ws, bs, x, y):
    h = torch.tanh(torch.einsum("bi,noi->nbo", x, ws[0]) + bs[0][:, None, :])
    out = torch.einsum("nbi,noi->nbo", h, ws[1]) + bs[1][:, None, :]
    return ((out - y) ** 2).mean(dim=(1, 2))


def _loss_bmm(ws, bs, x, y):
    xb = x.expand(ws[0].shape[0], *x.shape)
    h = torch.tanh(torch.baddbmm(bs[0][:, None, :], xb, ws[0].transpose(1, 2)))
    out = torch.baddbmm(bs[1][:, None, :], h, ws[1].transpose(1, 2))
    return ((out - y) ** 2).mean(dim=(1, 2))


def _one(w0, b0, w1, b1, x, y):
    out = torch.tanh(x @ w0.T + b0) @ w1.T + b1
    return ((out - y) ** 2).mean()


_vmapped = torch.func.vmap(_one, in_dims=(0, 0, 0, 0, None, None))


def _loss_vmap(ws, bs, x, y):
    return _vmapped(ws[0], bs[0], ws[1], bs[1], x, y)


LOSSES = {"einsum": _loss_einsum, "bmm": _loss_bmm, "vmap": _loss_vmap}


def _make_step(impl, size):
    ws, bs, x, y = _problem(size)
    n = ws[0].shape[0]
    if impl == "ours":
        params = ws + bs
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        lr = torch.full((n,), 1e-3)
        state = {"t": 0}

        def step():
            loss, gw, gb = ops.mlp_mse_grad(ws, bs, x, y, "tanh", check_finite=False)
            state["t"] += 1
            ops.adam_step(params, gw + gb, m, v, state["t"], lr)
            return loss

        return step, (ws, bs, x, y)
    params = [p.clone().requires_grad_(True) for p in ws + bs]
    opt = torch.optim.Adam(params, lr=1e-3)
    fn = LOSSES[impl]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fn(params[:2], params[2:], x, y)
        loss.sum().backward()
        opt.step()
        return loss.detach()

    return step, (ws, bs, x, y)


def _check_agreement(impl, size):
    ws, bs, x, y = _problem(size)
    ref = ops.mlp_mse_grad_reference(ws, bs, x, y, "tanh")
    if impl == "ours":
        got = ops.mlp_mse_grad(ws, bs, x, y, "tanh")
    else:
        params = [p.clone().requires_grad_(True) for p in ws + bs]
        loss = LOSSES[impl](params[:2], params[2:], x, y)
        grads = torch.autograd.grad(loss.sum(), params)
        got = (loss.detach(), list(grads[:2]), list(grads[2:]))
    for a, b in zip([got[0]] + got[1] + got[2], [ref[0]] + ref[1] + ref[2]):
        assert float((a - b).norm() / b.norm()) < 1e-4


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_training_step(benchmark, impl, size):
    _check_agreement(impl, size)
    step, (ws, bs, x, y) = _make_step(impl, size)
    d_in, w, d_out, n, b = SIZES[size]
    benchmark.extra_info.update(
        machine=platform.processor() or platform.machine(),
        torch_threads=torch.get_num_threads(),
        kernel_threads=ops.num_threads(),
        torch_path=ops.uses_torch_path([d_in, w, d_out]),
        gflop_per_step=6 * n * b * (d_in * w + w * d_out) / 1e9,
    )
    if impl == "ours":
        with ops.threads(torch_threads=None if ops.uses_torch_path([d_in, w, d_out]) else 1):
            benchmark.pedantic(step, warmup_rounds=3, rounds=15, iterations=1)
    else:
        benchmark.pedantic(step, warmup_rounds=3, rounds=15, iterations=1)
