"""Properties only a GPU has: the CUDA kernels against the CPU kernels and the pure-torch
references, the thin-width kernel's variants, streams and CUDA graphs. (Properties that hold on
every device are in the other tests, parametrized by ``device``.)

The GPU tests skip where torch sees no GPU or the extension was built without CUDA; the backend
tests at the end run everywhere.
"""

import pytest
import torch

from expand_and_cluster import ops
from expand_and_cluster.activations import ACTIVATIONS
from expand_and_cluster.ops import _runtime
from tests.testing import DTYPES, HAS_CUDA, RTOL, ensemble, rel

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and a GPU")

# Depth 1-3, N = 1, B = 1, widths 7, 65, 129 (not multiples of the 32-row tiles or the warp) and
# a batch that spans several chunks of tiles.
SHAPES = [
    ([3, 7, 2], 1, 1),
    ([5, 65, 11, 3], 4, 300),
    ([2, 129, 1], 3, 129),
    ([4, 7, 65, 5, 2], 2, 70),
    # B = 3, not 2: with 2 rows the softplus gradient of this draw cancels to 1e-7 of its terms
    # (condition number 4e5), beyond any float32 tolerance; B = 3 is conditioned below 11.
    ([1, 1, 1], 1, 3),
    ([7, 33, 4], 5, 4097),
    # the benchmarks' toy shape (thin-width kernel).
    ([10, 80, 1], 2, 100),
    # the float32 tiled kernel's gradient needs 48,276 bytes of dynamic shared memory: under
    # 48 KB, but over it with the static 2 KB (must opt in).
    ([10, 78, 5], 2, 100),
    # the thin-width (one-hidden-layer) kernel at its limits: d_in 16, width 256, d_out 4,
    # and d_in 12 (padded to 16 inputs), a width that is not a whole number of warps, many tiles.
    ([16, 256, 4], 2, 333),
    ([12, 40, 2], 3, 1000),
    # the thin-width kernel with 12 stored inputs (d_in 9), a one-warp block with more output
    # units (3 x 32) than threads (several passes of the output sums), a partial last tile.
    ([9, 20, 3], 2, 77),
    # one output: 16 stored inputs for 13, a width that is not whole warps, a last tile of one
    # row.
    ([13, 50, 1], 2, 97),
]


def _data(widths, n, b, dtype, seed=1):
    ws, bs = ensemble(n, widths, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, widths[0], generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(b, widths[-1], generator=g, dtype=torch.float64).to(dtype)
    return ws, bs, x, y


def _cuda(ts):
    return [t.cuda() for t in ts]


@pytest.fixture(params=_runtime.THIN_KERNEL_VARIANTS)
def thin_variant(request):
    """Runs the test under each variant of the thin-width kernel (a private setting)."""
    before = _runtime.cuda_thin_kernel_variant()
    _runtime.set_cuda_thin_kernel_variant(request.param)
    yield request.param
    _runtime.set_cuda_thin_kernel_variant(before)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("widths,n,b", SHAPES)
def test_mlp_cuda_matches_cpu_and_reference(activation, widths, n, b, dtype, thin_variant):
    ws, bs, x, y = _data(widths, n, b, dtype)
    loss_c, gw_c, gb_c = ops.mlp_mse_grad(ws, bs, x, y, activation)
    out_c = ops.mlp_forward(ws, bs, x, activation)
    loss, gw, gb = ops.mlp_mse_grad(_cuda(ws), _cuda(bs), x.cuda(), y.cuda(), activation)
    out = ops.mlp_forward(_cuda(ws), _cuda(bs), x.cuda(), activation)
    # reference in float64 on the GPU, so the float32 comparison measures the kernel's rounding
    w64, b64 = [w.double().cuda() for w in ws], [v.double().cuda() for v in bs]
    rloss, rgw, rgb = ops.mlp_mse_grad_reference(
        w64, b64, x.double().cuda(), y.double().cuda(), activation
    )
    rout = ops.mlp_forward_reference(w64, b64, x.double().cuda(), activation)
    # Same tolerances as tests/ops/test_mlp.py (testing.RTOL): against the float64 reference, and
    # CPU vs CUDA (two roundings of the same sums, so twice the budget).
    tol = RTOL[dtype]
    assert rel(loss.double(), rloss) < tol
    assert rel(out.double(), rout) < tol
    for a, r in zip(gw + gb, rgw + rgb):
        assert rel(a.double(), r) < tol
    assert rel(loss.cpu().double(), loss_c.double()) < 2 * tol
    assert rel(out.cpu().double(), out_c.double()) < 2 * tol
    for a, r in zip(gw + gb, gw_c + gb_c):
        assert rel(a.cpu().double(), r.double()) < 2 * tol


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("widths,n,b", [s for s in SHAPES if len(s[0]) == 3])
def test_mlp_cuda_thin_variant_1_equals_variant_0(activation, widths, n, b, dtype):
    # Variant 1 compiles the thin-width kernel for each output count: other instructions, the
    # same terms in the same order, so the loss and gradients must be bitwise those of variant 0.
    ws, bs, x, y = _data(widths, n, b, dtype)
    args = (_cuda(ws), _cuda(bs), x.cuda(), y.cuda(), activation)
    before = _runtime.cuda_thin_kernel_variant()
    try:
        _runtime.set_cuda_thin_kernel_variant("runtime_outputs")
        r0 = ops.mlp_mse_grad(*args)
        _runtime.set_cuda_thin_kernel_variant("compiled_outputs")
        r1 = ops.mlp_mse_grad(*args)
    finally:
        _runtime.set_cuda_thin_kernel_variant(before)
    assert torch.equal(r0[0], r1[0])
    for a, b0 in zip(r1[1] + r1[2], r0[1] + r0[2]):
        assert torch.equal(a, b0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("widths", [[6, 65, 40, 3], [10, 80, 1]], ids=["deep", "thin"])
def test_mlp_cuda_deterministic_and_on_current_stream(widths, dtype, thin_variant):
    ws, bs, x, y = _data(widths, 5, 2000, dtype)
    ws, bs, x, y = _cuda(ws), _cuda(bs), x.cuda(), y.cuda()
    first = ops.mlp_mse_grad(ws, bs, x, y, "tanh")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        second = ops.mlp_mse_grad(ws, bs, x, y, "tanh")
    stream.synchronize()
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1] + first[2], second[1] + second[2]):
        assert torch.equal(a, b)
    assert torch.equal(ops.mlp_forward(ws, bs, x, "gelu"), ops.mlp_forward(ws, bs, x, "gelu"))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_mlp_cuda_wide_layers_use_the_global_memory_path(dtype, monkeypatch):
    # 784-256-10 tile buffers exceed any GPU's shared memory per block: the generic path (the ops
    # dispatch such sizes to cuBLAS; the threshold is lifted to reach the kernel).
    monkeypatch.setattr(ops.mlp, "CUDA_TORCH_PATH_MIN_LAYER_SIZE", 10**9)
    ws, bs, x, y = _data([784, 256, 10], 2, 77, dtype)
    loss, gw, gb = ops.mlp_mse_grad(_cuda(ws), _cuda(bs), x.cuda(), y.cuda(), "relu")
    rloss, rgw, rgb = ops.mlp_mse_grad_reference(
        [w.double() for w in ws], [v.double() for v in bs], x.double(), y.double(), "relu"
    )
    tol = RTOL[dtype]
    assert rel(loss.cpu().double(), rloss) < tol
    for a, r in zip(gw + gb, rgw + rgb):
        assert rel(a.cpu().double(), r) < tol


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "n,shapes",
    [
        (1, [(1, 1)]),
        (4, [(7, 3), (5,)]),
        (3, [(65, 1), (0,)]),
        (2, [(5000,)]),  # several blocks along a student's row
        (1, [(1100, 1000)]),  # more than the 1,024 blocks of a row: the grid-stride loop
    ],
)
def test_adam_cuda_matches_cpu(n, shapes, dtype):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, *s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    pd, md, vd = _cuda(params), _cuda(m), _cuda(v)
    lr = torch.linspace(1e-3, 1e-1, n, dtype=dtype)
    steps = torch.arange(1, n + 1, dtype=torch.int64)
    for k in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
        ops.adam_step(params, grads, m, v, steps + k, lr)
        ops.adam_step(pd, _cuda(grads), md, vd, (steps + k).cuda(), lr.cuda())
    tol = RTOL[dtype]  # as tests/ops/test_mlp.py
    for a, b in zip(pd + md + vd, params + m + v):
        if b.numel():
            assert rel(a.cpu(), b) < tol


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("m,d", [(1, 1), (2, 3), (65, 7), (129, 785), (33, 1)])
def test_cosine_distances_cuda_matches_cpu(m, d, absolute, dtype):
    g = torch.Generator().manual_seed(m * 1000 + d)
    v = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    if m > 2:
        v[1] = 0.0  # a zero row
        v[2] = -v[0] * 3  # an antiparallel row
    out = ops.cosine_distances(v.cuda(), absolute)
    assert out.device.type == "cuda" and out.dtype == torch.float64
    assert torch.equal(out, out.T)
    assert torch.equal(out.diagonal(), torch.zeros(m, dtype=torch.float64, device="cuda"))
    assert bool((out >= 0).all())
    # float64 throughout; sums in a different order than the CPU: agreement to ~1e-15 * D.
    torch.testing.assert_close(out.cpu(), ops.cosine_distances(v, absolute), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        out, ops.cosine_distances_reference(v.cuda(), absolute), rtol=0, atol=1e-12
    )
    assert torch.equal(out, ops.cosine_distances(v.cuda(), absolute))  # deterministic


@gpu
@pytest.mark.parametrize("name", ["tanh", "relu", "softplus"])
def test_cluster_layer_on_cuda_matches_cpu(name):
    # Distances on the GPU (float64, another summation order): the same tree and clusters.
    from expand_and_cluster.pipeline.cluster import cluster_layer
    from tests.pipeline.test_cluster import Planted

    p = Planted(name)
    cpu = cluster_layer(p.incoming, p.outgoing, p.losses, name)
    gpu_ = cluster_layer(p.incoming, p.outgoing, p.losses, name, device="cuda")
    assert gpu_.k_hat == cpu.k_hat
    assert (gpu_.labels == cpu.labels).all() and (gpu_.sizes == cpu.sizes).all()
    torch.testing.assert_close(
        torch.from_numpy(gpu_.incoming), torch.from_numpy(cpu.incoming), rtol=0, atol=1e-12
    )


@gpu
def test_training_on_cuda_follows_the_cpu():
    # Same students, same mini-batches: Adam on the GPU (float64) tracks the CPU run to rounding.
    from expand_and_cluster.config import TrainConfig
    from expand_and_cluster.pipeline.train import train_students
    from expand_and_cluster.teachers import planted_teacher, probe

    teacher = planted_teacher(3, [4], 1, "tanh", seed=0, min_angle_degrees=20)
    X, Y = probe(teacher, 600, "gaussian", seed=1)
    cfg = TrainConfig(n_students=3, max_epochs=20, batch_size=128, dtype="float64", progress=False)
    widths = [6]
    cpu = train_students(torch.as_tensor(X), torch.as_tensor(Y), widths, "tanh", cfg, "cpu")
    gpu_ = train_students(torch.as_tensor(X), torch.as_tensor(Y), widths, "tanh", cfg, "cuda")
    assert gpu_.students.weights[0].device.type == "cuda"
    for a, b in zip(gpu_.students.params(), cpu.students.params()):
        assert rel(a.cpu(), b) < 1e-6
    assert abs(gpu_.relative_mse - cpu.relative_mse).max() < 1e-6 * cpu.relative_mse.max()


@gpu
@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
def test_plateau_step_cuda_matches_cpu(step_dtype):
    # Same random epochs (NaN/Inf losses, both stop rules) on both devices: bit-identical state.
    g = torch.Generator().manual_seed(0)
    n = 300  # more than one block
    states = {d: ops.PlateauState(n, 0.1, d) for d in ("cpu", "cuda")}
    lrs = {d: torch.full((n,), 0.1, dtype=step_dtype, device=d) for d in ("cpu", "cuda")}
    rule = dict(var_y=0.5, patience=2, cooldown=1, factor=0.5, target=1e-3, min_lr=1e-3)
    for e in range(1, 41):
        loss = torch.rand(n, generator=g, dtype=torch.float64) * 0.01 ** (e / 40)
        loss[torch.rand(n, generator=g) < 0.02] = float("nan")
        for d in ("cpu", "cuda"):
            ops.plateau_step(states[d], loss.to(d), e, lrs[d], **rule)
    for f in ops.PlateauState.FIELDS:
        a, b = getattr(states["cuda"], f).cpu(), getattr(states["cpu"], f)
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), f
    assert torch.equal(lrs["cuda"].cpu(), lrs["cpu"])
    assert set(states["cpu"].code.tolist()) == {0, 1, 2}


@gpu
def test_training_on_cuda_reads_back_every_k_epochs_without_changing_the_result():
    # The schedules run on the GPU (torch backend); reading the losses back every 16 epochs (the
    # GPU default) gives the bit-identical students of reading back every epoch.
    from expand_and_cluster.config import TrainConfig
    from expand_and_cluster.pipeline.train import train_students

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(3, 2, generator=g, dtype=torch.float64)).sum(1, keepdim=True)
    runs = []
    for k in (1, None):
        cfg = TrainConfig(
            n_students=6, max_epochs=300, patience=0, cooldown=0, lr=0.5, min_lr=1e-3,
            seed=3, progress=False, sync_every=k,
        )  # fmt: skip
        runs.append(train_students(x, y, [4], "tanh", cfg, "cuda"))
    a, b = runs
    assert len(set(a.epochs.tolist())) >= 3  # students stop at different epochs
    for p, q in zip(a.students.params(), b.students.params()):
        assert torch.equal(p, q)
    assert a.stop_reason == b.stop_reason and (a.epochs == b.epochs).all()
    assert a.history == b.history


@gpu
@pytest.mark.parametrize("deep", [False, True], ids=["one-layer", "deep"])
def test_recover_on_cuda_recovers_a_planted_teacher(deep):
    # The CPU tests' problems and budgets (tests/pipeline/test_recover.py, test_deep.py), students
    # trained on the GPU.
    import dataclasses

    from expand_and_cluster import metrics
    from expand_and_cluster.pipeline.recover import recover
    from expand_and_cluster.teachers import planted_teacher, probe
    from tests.pipeline import test_deep, test_recover

    if deep:
        teacher = planted_teacher(4, [3, 3], 1, "tanh", seed=4, min_angle_degrees=30)
        X, Y = probe(teacher, 5000, "gaussian", seed=0)
        cfg = test_deep._config("tanh")
    else:
        teacher = planted_teacher(4, [3], 1, "tanh", seed=2, min_angle_degrees=30)
        X, Y = probe(teacher, 3000, "gaussian", seed=0)
        cfg = test_recover._config("tanh")
    res = recover(X, Y, dataclasses.replace(cfg, device="cuda"))
    assert res.network.hidden_sizes == teacher.hidden_sizes
    for al in metrics.deep_alignment(teacher, res.network):
        assert al["max"] < 1e-3, al
    assert res.relative_mse["held_out"] <= 1e-4


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_mlp_cuda_large_layers_dispatch_to_the_torch_path(dtype):
    widths = [300, 120, 3]  # 36,000 weights in the first layer: above the CUDA threshold
    assert ops.uses_torch_path(widths, "cuda") and not ops.uses_torch_path([64, 64, 10], "cuda")
    ws, bs, x, y = _data(widths, 2, 50, dtype)
    loss, gw, gb = ops.mlp_mse_grad(_cuda(ws), _cuda(bs), x.cuda(), y.cuda(), "gelu")
    rloss, rgw, rgb = ops.mlp_mse_grad_reference(
        [w.double() for w in ws], [v.double() for v in bs], x.double(), y.double(), "gelu"
    )
    tol = RTOL[dtype]
    assert rel(loss.cpu().double(), rloss) < tol
    for a, r in zip(gw + gb, rgw + rgb):
        assert rel(a.cpu().double(), r) < tol


@gpu
def test_fused_train_step_replays_in_a_cuda_graph():
    ws, bs, x, y = _data([6, 20, 2], 3, 100, torch.float32)
    ws, bs, x, y = _cuda(ws), _cuda(bs), x.cuda(), y.cuda()
    lr = torch.full((3,), 1e-2, device="cuda")
    eager = ops.FusedTrainStep([w.clone() for w in ws], [b.clone() for b in bs], "tanh", lr)
    graphed = ops.FusedTrainStep([w.clone() for w in ws], [b.clone() for b in bs], "tanh", lr)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: allocates the workspace
        graphed(x, y)
    torch.cuda.current_stream().wait_stream(side)
    eager(x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed(x, y)
    for _ in range(5):
        graph.replay()
        eager(x, y)
    torch.cuda.synchronize()
    for a, b in zip(graphed.params + graphed.exp_avg_sq, eager.params + eager.exp_avg_sq):
        assert torch.equal(a, b)
    assert graphed.step.tolist() == [6, 6, 6]


def test_backends_report_cuda_iff_compiled():
    from expand_and_cluster import _C

    compiled = "cuda" in ops.backends()
    if not compiled:
        # Without CUDA support a CUDA device index is refused with a clear message.
        with pytest.raises(ValueError, match="CUDA"):
            _C.cosine_distances(1, 2, 2, 0, False, 1, 0)
        return
    # A CUDA build imports and runs the CPU kernels everywhere; a CUDA call on a machine without a
    # GPU or driver raises RuntimeError (never crashes).
    try:
        nbytes = _C.mlp_workspace_bytes([2, 3, 1], 1, 4, 0, 0, 0, True)
    except RuntimeError as e:
        assert not torch.cuda.is_available()
        assert "CUDA" in str(e)
    else:
        assert nbytes > 0


def test_cuda_thin_kernel_variant_is_validated_and_restored():
    from expand_and_cluster import _C

    before = _runtime.cuda_thin_kernel_variant()
    assert before in _runtime.THIN_KERNEL_VARIANTS
    with pytest.raises(ValueError, match="variant: expected one of"):
        _runtime.set_cuda_thin_kernel_variant("fastest")
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="variant must be 0 .* or 1"):
            _C.set_cuda_thin_kernel_variant(bad)
    assert _runtime.cuda_thin_kernel_variant() == before
    other = next(v for v in _runtime.THIN_KERNEL_VARIANTS if v != before)
    _runtime.set_cuda_thin_kernel_variant(other)
    try:
        assert _runtime.cuda_thin_kernel_variant() == other
    finally:
        _runtime.set_cuda_thin_kernel_variant(before)
    assert _runtime.cuda_thin_kernel_variant() == before
