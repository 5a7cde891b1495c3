#!/usr/bin/env bash
# GPU check (issue 3): on a GPU machine with nothing but the repo, build the package with the CUDA
# backend, run the CUDA tests, compute-sanitizer (memcheck, racecheck) on one call of each CUDA
# op, and the GPU benchmarks. Prints one table at the end.
#
# Needs: nvcc (CUDA >= 12) on the PATH, compute-sanitizer (ships with the toolkit), and a CUDA
# build of torch: either already installed in the Python you run this with (the venv inherits it
# via --system-site-packages) or set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" bash benchmarks/gpu_check.sh
# Never install the CPU wheel of torch (torch==2.13.0 from PyPI's CPU index) here.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv --system-site-packages "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"

if [ -n "${TORCH_SPEC:-}" ]; then
  # shellcheck disable=SC2086
  pip install --quiet $TORCH_SPEC
fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: torch sees no GPU (install a CUDA build of torch, see the header)" >&2
  exit 1
}

echo "== build (pip install .) =="
t0=$(date +%s)
pip install --quiet ".[test]"
build_s=$(( $(date +%s) - t0 ))
python -c "import expand_and_cluster as e; b = e.backends(); print(b); assert 'cuda' in b"

echo "== CUDA tests =="
tests_status=ok
python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py || tests_status=FAILED

echo "== compute-sanitizer =="
cat > "$work/one_call_each.py" <<'PY'
import torch
from expand_and_cluster import ops
dev = "cuda"
for dtype in (torch.float32, torch.float64):
    g = torch.Generator().manual_seed(0)
    widths = [5, 33, 17, 3]
    ws = [torch.randn(3, widths[l + 1], widths[l], generator=g).to(dev, dtype) for l in range(3)]
    bs = [torch.randn(3, widths[l + 1], generator=g).to(dev, dtype) for l in range(3)]
    x = torch.randn(70, 5, generator=g).to(dev, dtype)
    y = torch.randn(70, 3, generator=g).to(dev, dtype)
    ops.mlp_forward(ws, bs, x, "gelu")
    loss, gw, gb = ops.mlp_mse_grad(ws, bs, x, y, "tanh")
    # the global-memory path (tile buffers too large for shared memory)
    big = [torch.randn(2, 256, 784).to(dev, dtype), torch.randn(2, 10, 256).to(dev, dtype)]
    bigb = [torch.zeros(2, 256).to(dev, dtype), torch.zeros(2, 10).to(dev, dtype)]
    ops.mlp_mse_grad(big, bigb, torch.randn(40, 784).to(dev, dtype),
                     torch.randn(40, 10).to(dev, dtype), "relu")
    params = ws + bs
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ops.adam_step(params, gw + gb, m, v, 1, torch.full((3,), 1e-3, device=dev, dtype=dtype))
    ops.cosine_distances(torch.randn(45, 13, generator=g).to(dev, dtype), absolute=True)
torch.cuda.synchronize()
print("one call each: done")
PY
san_status=ok
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 python "$work/one_call_each.py" \
    || san_status=FAILED
done

echo "== GPU benchmarks =="
python "$repo/benchmarks/bench_gpu.py" "$work/bench_gpu.json" | tee "$work/bench.txt"
cp "$work/bench_gpu.json" "$repo/benchmarks/bench_gpu_last.json" || true

echo
echo "================ gpu_check summary ================"
printf '%-28s %s\n' "GPU" "$(python -c 'import torch; print(torch.cuda.get_device_name())')"
printf '%-28s %s\n' "build (pip install .)" "${build_s} s"
printf '%-28s %s\n' "CUDA tests" "$tests_status"
printf '%-28s %s\n' "compute-sanitizer" "$san_status"
echo "benchmarks (ms per step; see benchmarks/bench_gpu_last.json):"
sed -n '/^GPU:/,/^cosine/p' "$work/bench.txt"
[ "$tests_status" = ok ] && [ "$san_status" = ok ]
