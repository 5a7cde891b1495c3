#!/usr/bin/env bash
# GPU check: on a GPU machine with nothing but the repo, build the package with the CUDA
# backend, run the CUDA tests, the GPU benchmarks, the demo on the GPU and compute-sanitizer
# (memcheck, racecheck) on one call of each CUDA op. Prints one table at the end.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      (OUTDIR default: $OUT, else a temporary folder)
#
# Needs, in the python3 this runs (or $PYTHON): a CUDA build of torch, numpy, scipy,
# scikit-learn, matplotlib, tqdm, pytest, and the build tools scikit-build-core, pybind11, cmake
# and ninja; nvcc (CUDA >= 12) and compute-sanitizer on the PATH. Nothing is downloaded: the
# package is built without build isolation and installed with --no-deps into a temporary
# --target folder, so the machine's own Python is left as it was (and machines with no network
# work). Never install the CPU wheel of torch here.
#
# Every step runs under a time limit (seconds, override with the variables below) and logs to
# OUTDIR; a failed or timed-out step is reported in the table and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=${1:-${OUT:-$work/out}}
mkdir -p "$out"
T_BUILD=${T_BUILD:-300} T_TESTS=${T_TESTS:-240} T_BENCH=${T_BENCH:-240} T_DEMO=${T_DEMO:-240}
T_SAN=${T_SAN:-180}

# STEPS: which steps run after the build (default below; also bench_compile, suite and ncu),
# e.g. STEPS="tests bench".
STEPS=${STEPS:-tests bench demo sanitizer_memcheck sanitizer_racecheck}

declare -A status secs
run_step() {  # name limit command...: runs with a time limit, logs to $out/<name>.log
  local name=$1 limit=$2
  shift 2
  if [ "$name" != build ] && [[ " $STEPS " != *" $name "* ]]; then
    return 0
  fi
  echo "== $name (limit ${limit} s) =="
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  secs[$name]=$((SECONDS - t0))
  case $rc in
    0) status[$name]=ok ;;
    124 | 137) status[$name]="TIMEOUT" ;;
    *) status[$name]="FAILED (exit $rc)" ;;
  esac
  tail -n 25 "$out/$name.log"
}

"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: torch in $py sees no GPU (needs a CUDA build of torch, see the header)" >&2
  exit 1
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv || true
  nvcc --version | tail -n 2
  "$py" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
}

site=$work/site
run_step build "$T_BUILD" "$py" -m pip install --no-build-isolation --no-deps --no-compile \
  --target "$site" -v "$repo"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import expand_and_cluster as e; b = e.backends(); print(b); assert 'cuda' in b" || {
  echo "gpu_check: the build has no CUDA backend (see $out/build.log)" >&2
  exit 1
}

# -W default: a new torch's deprecation warnings must not fail the kernel checks here (the
# project's CI keeps warnings as errors).
# PYTEST_ARGS: extra pytest arguments, e.g. "-n 4" where pytest-xdist is installed.
run_step tests "$T_TESTS" "$py" -m pytest -q -p no:cacheprovider -W default ${PYTEST_ARGS:-} \
  tests/ops

run_step bench "$T_BENCH" "$py" benchmarks/bench_gpu.py "$out/bench_gpu.json"

# torch.compile baselines (slow to compile; last in the default steps' order of value)
run_step bench_compile "${T_COMPILE:-120}" "$py" benchmarks/bench_gpu.py --compile-only

# The demo on the GPU (the CPU result is in benchmarks/RESULTS.md): same recovery expected.
run_step demo "$T_DEMO" "$site/bin/expand-and-cluster" demo --device cuda --quiet --no-figures \
  --out "$work/demo"
cp "$work/demo/report.json" "$out/demo_report.json" 2>/dev/null || true

# The small identifiability suite with students on the GPU (its GPU wall time; not in the
# default steps): STEPS="... suite", SUITE (default benchmarks/suites/small.json), SUITE_JOBS,
# SUITE_ARGS (more bench arguments, e.g. "--select rho=4").
run_step suite "${T_SUITE:-300}" "$site/bin/expand-and-cluster" bench \
  "${SUITE:-benchmarks/suites/small.json}" --device cuda --jobs "${SUITE_JOBS:-4}" \
  --out "$work/suite" ${SUITE_ARGS:-}
cp "$work/suite/summary.md" "$out/suite_summary.md" 2>/dev/null || true
cp "$work/suite/results.jsonl" "$out/suite_results.jsonl" 2>/dev/null || true

cat >"$work/one_call_each.py" <<'PY'
import torch
from expand_and_cluster import ops
from expand_and_cluster.ops import _runtime
ops.mlp.CUDA_TORCH_PATH_MIN_LAYER_SIZE = 10**9  # the fused kernel at every size below
dev = "cuda"
for variant, dtype in [(v, t) for v in _runtime.THIN_KERNEL_VARIANTS for t in (torch.float32, torch.float64)]:
    _runtime.set_cuda_thin_kernel_variant(variant)
    g = torch.Generator().manual_seed(0)
    widths = [5, 33, 17, 3]
    ws = [torch.randn(3, widths[l + 1], widths[l], generator=g).to(dev, dtype) for l in range(3)]
    bs = [torch.randn(3, widths[l + 1], generator=g).to(dev, dtype) for l in range(3)]
    x = torch.randn(70, 5, generator=g).to(dev, dtype)
    y = torch.randn(70, 3, generator=g).to(dev, dtype)
    ops.mlp_forward(ws, bs, x, "gelu")
    loss, gw, gb = ops.mlp_mse_grad(ws, bs, x, y, "tanh")
    # one hidden layer, toy size (the thin-width kernel), a partial last tile
    thin = [torch.randn(3, 40, 10, generator=g).to(dev, dtype),
            torch.randn(3, 1, 40, generator=g).to(dev, dtype)]
    thinb = [torch.randn(3, 40, generator=g).to(dev, dtype),
             torch.randn(3, 1, generator=g).to(dev, dtype)]
    ops.mlp_mse_grad(thin, thinb, torch.randn(70, 10, generator=g).to(dev, dtype),
                     torch.randn(70, 1, generator=g).to(dev, dtype), "softplus")
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
    state = ops.PlateauState(300, 1e-3, dev)
    loss = torch.rand(300, dtype=torch.float64).to(dev)
    ops.plateau_step(state, loss, 1, torch.zeros(300, device=dev, dtype=dtype), var_y=1.0,
                     patience=0, cooldown=0, factor=0.5, target=0.5, min_lr=1e-7)
torch.cuda.synchronize()
print("one call each: done")
PY
for tool in memcheck racecheck; do
  run_step "sanitizer_$tool" "$T_SAN" compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$py" "$work/one_call_each.py"
done

# Nsight Compute on the thin-width gradient kernel, variants 0 and 1 (not in the default steps:
# STEPS="... ncu"): instructions executed, issue-slot use, occupancy and warp stalls of one
# 10-80-1 call (N 20, B 10,000, float32, tanh) each, to check the static counts of
# benchmarks/sass_loops.py. --clock-control none leaves the GPU's clocks as they are.
cat >"$work/thin_variants.py" <<'PY'
import torch
from expand_and_cluster import ops
from expand_and_cluster.ops import _runtime
g = torch.Generator().manual_seed(0)
ws = [torch.randn(20, 80, 10, generator=g).cuda(), torch.randn(20, 1, 80, generator=g).cuda()]
bs = [torch.randn(20, 80, generator=g).cuda(), torch.randn(20, 1, generator=g).cuda()]
x = torch.randn(10000, 10, generator=g).cuda()
y = torch.randn(10000, 1, generator=g).cuda()
for variant in _runtime.THIN_KERNEL_VARIANTS:
    _runtime.set_cuda_thin_kernel_variant(variant)
    ops.mlp_mse_grad(ws, bs, x, y, "tanh")
torch.cuda.synchronize()
PY
run_step ncu "${T_NCU:-120}" ncu --clock-control none -k regex:mlp_thin_width_kernel -c 2 \
  --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
  --section Occupancy --section InstructionStats --metrics smsp__inst_executed.sum \
  "$py" "$work/thin_variants.py"

echo
echo "================ gpu_check summary ================"
printf '%-28s %s\n' "GPU" "$("$py" -c 'import torch; print(torch.cuda.get_device_name())')"
for s in build $STEPS; do
  printf '%-28s %-18s %5s s\n' "$s" "${status[$s]:-not run}" "${secs[$s]:-}"
done
grep -sE "passed|failed" "$out/tests.log" | tail -n 1
[ -f "$out/suite_summary.md" ] && head -n 30 "$out/suite_summary.md"
[ -f "$out/demo_report.json" ] && "$py" - "$out/demo_report.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
print("demo: recovered", r["recovered_sizes"], "teacher", r["teacher_sizes"],
      "alignment max", [a["max"] for a in r["alignment"] or []],
      "held out", r["recovered_relative_mse"]["held_out"],
      "timings_s", {k: round(v, 1) for k, v in r["timings_s"].items()})
PY
echo "benchmarks (ms per step; full numbers in bench_gpu.json):"
[ -f "$out/bench.log" ] && sed -n '/^GPU:/,/^cosine/p' "$out/bench.log"
failed=0
for s in build $STEPS; do
  [ "${status[$s]:-}" = ok ] || failed=1
done
exit $failed
