"""One full training step (loss, gradients, Adam) of N students on the GPU: ours against the
baselines of DESIGN.md (einsum, bmm, vmap, each with autograd and torch.optim.Adam), plus
cosine_distances against a torch matmul of the normalised matrix. Prints one table and writes
JSON (GPU name, torch version, times) to the path given as the first argument (default
bench_gpu.json). Run on a GPU machine: ``python benchmarks/bench_gpu.py out.json``.

Every implementation is checked against the reference gradients before it is timed; timings use
CUDA events after warm-up, with torch.cuda.synchronize around each measurement. float32 throughout,
TF32 off (torch's default for matmul), so all rows do the same float32 arithmetic.
"""

import json
import sys

import torch

# The baselines' loss functions are the CPU benchmark's (same script directory on sys.path).
from bench_training_step import LOSSES
from expand_and_cluster import ops
from expand_and_cluster.ops import _runtime

# name: (d_in, width, d_out, N, B), DESIGN.md sizes
SIZES = {
    "toy-10-80-1-N20-B10000": (10, 80, 1, 20, 10000),
    "toy-2-20-1-N20-B10000": (2, 20, 1, 20, 10000),
    "digits-64-64-10-N20-B512": (64, 64, 10, 20, 512),
    "digits-64-64-10-N20-B5391": (64, 64, 10, 20, 5391),
    "mnist-784-256-10-N20-B512": (784, 256, 10, 20, 512),
}
WARMUP, REPEAT = 10, 50
# torch.compile baselines (slow to compile: opt in with --compile)
COMPILE = "--compile" in sys.argv


def _problem(size, dev):
    d_in, w, d_out, n, b = SIZES[size]
    g = torch.Generator().manual_seed(0)
    widths = [d_in, w, d_out]
    ws = [torch.randn(n, widths[l + 1], widths[l], generator=g) / widths[l] ** 0.5 for l in (0, 1)]
    bs = [torch.zeros(n, widths[l + 1]) for l in (0, 1)]
    x = torch.randn(b, d_in, generator=g)
    y = torch.randn(b, d_out, generator=g)
    return [t.to(dev) for t in ws], [t.to(dev) for t in bs], x.to(dev), y.to(dev)


def _torch_step(loss_fn):
    def make(ws, bs, x, y):
        params = [t.clone().requires_grad_(True) for t in ws + bs]
        opt = torch.optim.Adam(params, lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(params[:2], params[2:], x, y)
            loss.sum().backward()
            opt.step()
            return loss

        return step, params

    return make


def _ours(ws, bs, x, y):
    """ops.FusedTrainStep: the fused gradient kernel + our Adam, validated once (what the
    training loop calls)."""
    n = ws[0].shape[0]
    lr = torch.full((n,), 1e-3, device=x.device)
    fstep = ops.FusedTrainStep([t.clone() for t in ws], [t.clone() for t in bs], "tanh", lr)
    return (lambda: fstep(x, y)), fstep.params


def _state(ws, bs, x):
    """Fresh copies of the parameters and the Adam state, gradient and loss buffers of a step
    driven op by op: (params, m, v, lr, step, gw, gb, loss)."""
    n = ws[0].shape[0]
    params = [t.clone() for t in ws + bs]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    lr = torch.full((n,), 1e-3, device=x.device)
    step_t = torch.zeros(n, dtype=torch.int64, device=x.device)
    gw = [torch.empty_like(w) for w in ws]
    gb = [torch.empty_like(b) for b in bs]
    loss = torch.empty(n, device=x.device)
    return params, m, v, lr, step_t, gw, gb, loss


def _ours_ops(ws, bs, x, y):
    """The two ops called separately (arguments validated at every call)."""
    params, m, v, lr, step_t, gw, gb, loss = _state(ws, bs, x)

    def step():
        step_t.add_(1)
        ops.mlp_mse_grad(
            params[:2],
            params[2:],
            x,
            y,
            "tanh",
            out_grad_weights=gw,
            out_grad_biases=gb,
            out_loss=loss,
            check_finite=False,
        )
        # no host sync per step: step is a device tensor, value checks off
        ops.adam_step(params, gw + gb, m, v, step_t, lr, check_values=False)
        return loss

    return step, params


def _ours_torchpath(ws, bs, x, y):
    """ops' torch path (explicit backward with batched matmuls) + our Adam: the candidate
    dispatch for widths where the fused kernel loses to cuBLAS."""
    from expand_and_cluster.activations import get_activation

    act = get_activation("tanh")
    params, m, v, lr, step_t, gw, gb, loss = _state(ws, bs, x)

    def step():
        step_t.add_(1)
        ops.mlp._mlp_mse_grad_torch(params[:2], params[2:], x, y, act, gw, gb, loss)
        ops.adam_step(params, gw + gb, m, v, step_t, lr, check_values=False)
        return loss

    return step, params


def _graphed(make, steps=10):
    """``make``'s step captured in a CUDA graph (``steps`` steps per replay), timed per step."""

    def wrapped(ws, bs, x, y):
        step, params = make(ws, bs, x, y)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up outside the graph (allocator, lazy init)
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(steps):
                step()
        return graph.replay, params

    return wrapped, steps


def _grad_only(ws, bs, x, y):
    gw = [torch.empty_like(w) for w in ws]
    gb = [torch.empty_like(b) for b in bs]
    loss = torch.empty(ws[0].shape[0], device=x.device)

    def step():
        ops.mlp_mse_grad(
            ws,
            bs,
            x,
            y,
            "tanh",
            out_grad_weights=gw,
            out_grad_biases=gb,
            out_loss=loss,
            check_finite=False,
        )

    return step, None


def _adam_only(ws, bs, x, y):
    n = ws[0].shape[0]
    params = [t.clone() for t in ws + bs]
    g = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    lr = torch.full((n,), 1e-3, device=x.device)
    step_t = torch.ones(n, dtype=torch.int64, device=x.device)

    def step():
        ops.adam_step(params, g, m, v, step_t, lr, check_values=False)

    return step, None


def _cublas_products(ws, bs, x, y):
    """The matrix products of one forward + backward pass (no activation, no Adam) as cuBLAS
    calls through torch: the FLOP-rate yardstick of the MNIST-size target."""
    w0, w1 = ws
    n = w0.shape[0]
    xb = x.expand(n, *x.shape)
    d = torch.randn(n, x.shape[0], w1.shape[1], device=x.device)

    def step():
        h = torch.bmm(xb, w0.transpose(1, 2))
        torch.bmm(h, w1.transpose(1, 2))
        torch.bmm(d.transpose(1, 2), h)  # grad W1
        dh = torch.bmm(d, w1)  # back to the hidden layer
        torch.bmm(dh.transpose(1, 2), xb)  # grad W0

    return step, None


def _flops(size):
    """Multiply-adds x 2 of one forward + backward pass of all students (dX of layer 0 skipped)."""
    d_in, w, d_out, n, b = SIZES[size]
    return 2.0 * n * b * (2 * d_in * w + 3 * w * d_out)


IMPLS = {
    "ours": _ours,
    "einsum": _torch_step(LOSSES["einsum"]),
    "bmm": _torch_step(LOSSES["bmm"]),
    "vmap": _torch_step(LOSSES["vmap"]),
}
EXTRA = {
    "ours_ops": (_ours_ops, 1),
    # timed under the thin-width kernel's variant compiled per output
    # count (differs from "ours" at the toy sizes only)
    "ours_thin1": (_ours, 1),
    "ours_graph": _graphed(_ours),
    "torchpath": (_ours_torchpath, 1),
    "torchpath_graph": _graphed(_ours_torchpath),
    "ours_grad_only": (_grad_only, 1),
    "ours_adam_only": (_adam_only, 1),
    "cublas_products": (_cublas_products, 1),
}


def _time(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPEAT):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPEAT  # ms


def _check(size, dev):
    ws, bs, x, y = _problem(size, dev)
    loss, gw, gb = ops.mlp_mse_grad(ws, bs, x, y, "tanh")
    rloss, rgw, rgb = ops.mlp_mse_grad_reference(ws, bs, x, y, "tanh")
    for a, r in zip([loss] + gw + gb, [rloss] + rgw + rgb):
        err = float((a - r).norm() / r.norm().clamp_min(1e-30))
        assert err < 1e-4, f"{size}: ours disagrees with autograd (rel. error {err:.2e})"


def main(path="bench_gpu.json", *_):
    dev = torch.device("cuda")
    rows, results = [], {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    for size in SIZES:
        _check(size, dev)
        times = {}
        for name, make in IMPLS.items():
            ws, bs, x, y = _problem(size, dev)
            step, _ = make(ws, bs, x, y)
            times[name] = _time(step)
        for name, (make, per) in EXTRA.items():
            ws, bs, x, y = _problem(size, dev)
            variant = _runtime.cuda_thin_kernel_variant()
            try:
                if name == "ours_thin1":
                    _runtime.set_cuda_thin_kernel_variant("compiled_outputs")
                step, _ = make(ws, bs, x, y)
                times[name] = _time(step) / per
            except Exception as e:  # a failed extra row must not lose the table
                print(f"{size} {name}: failed: {e!r}")
            finally:
                _runtime.set_cuda_thin_kernel_variant(variant)
        if COMPILE:
            for name in ("einsum", "bmm"):
                ws, bs, x, y = _problem(size, dev)
                try:
                    loss_fn = torch.compile(LOSSES[name])
                    step, _ = _torch_step(loss_fn)(ws, bs, x, y)
                    times[name + "_compiled"] = _time(step)
                except Exception as e:
                    print(f"{size} {name} compiled: failed: {e!r}")
        times["gflops_ours"] = _flops(size) / times["ours"] / 1e6
        times["gflops_cublas_products"] = _flops(size) / times.get("cublas_products", 1e30) / 1e6
        # the fastest torch baseline (compiled variants included when measured)
        fastest = min(t for k, t in times.items() if k.split("_")[0] in ("einsum", "bmm", "vmap"))
        rows.append((size, times, times["einsum"] / times["ours"], fastest / times["ours"]))
        results[size] = times
    # cosine distances, M = 20,000, D = 785 (float32 input, float64 output)
    v = torch.randn(20000, 785, device=dev)
    ref = ops.cosine_distances_reference(v)
    err = float((ops.cosine_distances(v) - ref).abs().max())
    assert err < 1e-10, f"cosine_distances: max error {err:.2e}"
    u = v.double() / v.double().norm(dim=1, keepdim=True)
    t_ours = _time(lambda: ops.cosine_distances(v))
    t_mm = _time(lambda: u @ u.T)
    u32 = u.float()
    t_mm32 = _time(lambda: u32 @ u32.T)
    results["cosine-M20000-D785"] = {
        "ours": t_ours,
        "matmul_f64": t_mm,
        "matmul_f32": t_mm32,
    }
    print(f"GPU: {results['gpu']}  torch {results['torch']}  (ms per call, float32)")
    print("best/ours: the fastest torch baseline (einsum, bmm, vmap) over ours")
    print(
        f"{'size':32s} {'ours':>8s} {'einsum':>8s} {'bmm':>8s} {'vmap':>8s} "
        f"{'einsum/ours':>12s} {'best/ours':>10s}"
    )
    for size, t, r1, r2 in rows:
        print(
            f"{size:32s} {t['ours']:8.3f} {t['einsum']:8.3f} {t['bmm']:8.3f} {t['vmap']:8.3f} "
            f"{r1:12.1f} {r2:10.1f}"
        )
    extra = [
        k
        for k in (
            "ours_ops",
            "ours_thin1",
            "ours_graph",
            "torchpath",
            "torchpath_graph",
            "ours_grad_only",
            "ours_adam_only",
            "cublas_products",
            "einsum_compiled",
            "bmm_compiled",
        )
    ]
    print("extra rows (ms per step):")
    print(f"{'size':32s} " + " ".join(f"{k[:15]:>15s}" for k in extra) + "  GFLOP/s ours/cuBLAS")
    for size, t, _, _ in rows:
        cells = " ".join(f"{t[k]:15.4f}" if k in t else f"{'-':>15s}" for k in extra)
        print(f"{size:32s} {cells}  {t['gflops_ours']:.0f}/{t['gflops_cublas_products']:.0f}")
    print(
        f"{'cosine M=20000 D=785':32s} {t_ours:8.3f}   torch f64 matmul {t_mm:8.3f}   "
        f"ratio {t_ours / t_mm:.2f}   (f32 matmul {t_mm32:.3f})"
    )
    try:
        results["train-loop-toy-10-80-1-N20-B10000"] = loop = _train_loop()
        print(
            "training loop (train_students, full batch, ms per epoch): losses read back every "
            f"epoch {loop['sync_every_1']:.4f}, every 16 epochs {loop['sync_every_16']:.4f} "
            f"(ratio {loop['sync_every_1'] / loop['sync_every_16']:.2f}); every 16 epochs with "
            f"thin-width kernel variant 1 {loop['sync_every_16_thin1']:.4f}"
        )
    except Exception as e:  # a failed extra row must not lose the table
        print(f"training loop: failed: {e!r}")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results))


def _train_loop(size="toy-10-80-1-N20-B10000", epochs=300):
    """Wall time per epoch of the whole training loop (train_students: fused step, Adam, the
    per-student schedule kernel, read-backs), reading the losses back every epoch against every
    16 epochs. No student stops (target 0, min_lr 0), so both runs do the same steps."""
    import time

    from expand_and_cluster.config import TrainConfig
    from expand_and_cluster.pipeline.train import train_students

    d_in, width, d_out, n, b = SIZES[size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d_in, generator=g)
    y = torch.tanh(x @ torch.randn(d_in, 4, generator=g)) @ torch.randn(4, d_out, generator=g)
    out = {}
    variant = _runtime.cuda_thin_kernel_variant()
    # each twice, the first as warm-up; then every 16 epochs under thin-width kernel variant 1
    try:
        thin1 = "compiled_outputs"
        for k, v in ((1, variant), (16, variant), (1, variant), (16, variant), (16, thin1)):
            _runtime.set_cuda_thin_kernel_variant(v)
            cfg = TrainConfig(
                n_students=n, max_epochs=epochs, target_relative_mse=0.0, min_lr=0.0,
                progress=False, sync_every=k,
            )  # fmt: skip
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_students(x, y, [width], "tanh", cfg, "cuda")
            torch.cuda.synchronize()
            key = f"sync_every_{k}" + ("" if v == variant else "_thin1")
            out[key] = (time.perf_counter() - t0) / epochs * 1e3
    finally:
        _runtime.set_cuda_thin_kernel_variant(variant)
    return out


def compile_only(sizes=("digits-64-64-10-N20-B512", "toy-10-80-1-N20-B10000")):
    """The torch.compile baselines (einsum, bmm with torch.optim.Adam) against ours, same run."""
    dev = torch.device("cuda")
    print(f"torch.compile baselines, GPU: {torch.cuda.get_device_name(dev)} (ms per step)")
    for size in sizes:
        row = {}
        for name, make in (
            ("ours", _ours),
            ("einsum_compiled", _torch_step(torch.compile(LOSSES["einsum"]))),
            ("bmm_compiled", _torch_step(torch.compile(LOSSES["bmm"]))),
        ):
            ws, bs, x, y = _problem(size, dev)
            try:
                step, _ = make(ws, bs, x, y)
                row[name] = _time(step)
            except Exception as e:
                print(f"{size} {name}: failed: {e!r}")
        print(size, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
        sys.exit(0)
    main(*[a for a in sys.argv[1:2] if not a.startswith("--")])
