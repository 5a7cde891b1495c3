"""Static instruction counts of a CUDA kernel's loops, from its SASS (no GPU needed).

Compiles a file of csrc/cuda for one architecture, disassembles it with cuobjdump and prints, for
every loop of the kernels whose (mangled) name contains PATTERN, its address range, its
instructions (one pass of the body as compiled, so an unrolled body counts all its copies) and the
commonest opcodes. A loop is a backward branch; loops inside it are counted in it too.

    python benchmarks/sass_loops.py mlp_thin_width_kernelIfLNS_3ActE3ELi12ELi1ELb1
    python benchmarks/sass_loops.py --source csrc/cuda/adam.cu adam

Mangled names of the thin-width kernel: mlp_thin_width_kernelI<f|d>LNS_3ActE<activation>ELi<D>
ELi<DO>ELb<kStaticOut>, with the activation's number from csrc/common/activations.h (3 = tanh),
D the stored inputs per row (4, 8, 12 or 16), DO the output count it is compiled for and
kStaticOut 1 for variant 1 (compiled per output count), 0 for variant 0 (DO = 4). The other MLP
kernels: mlp_generic_kernel and mlp_tiled_kernel (I<f|d>LNS_3ActE<activation>ELb<gradient>).
Needs nvcc and cuobjdump (on the PATH, else the pip package nvidia-cuda-cuobjdump). Counts say
what a thread issues, not how long it takes: time them on a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"0x([0-9a-f]+)")


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import site

    for root in site.getsitepackages():
        hits = glob.glob(os.path.join(root, "nvidia", "*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    sys.exit("sass_loops: no cuobjdump (pip install nvidia-cuda-cuobjdump, or put it on the PATH)")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{mangled name: [(address, instruction text)]} of a cuobjdump -sass listing."""
    out: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in sass.splitlines():
        if "Function :" in line:
            cur = out.setdefault(line.split("Function :", 1)[1].strip(), [])
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return out


def _opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate
    return text.split()[0].split(".")[0]


def loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int, int, collections.Counter]]:
    """(start, end, instructions, opcode counts) of each backward branch's range, in order."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    found = []
    for i, (addr, text) in enumerate(instrs):
        if _opcode(text) != "BRA":
            continue
        m = _TARGET.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= addr and target in index:
            body = instrs[index[target] : i + 1]
            found.append(
                (target, addr, len(body), collections.Counter(_opcode(t) for _, t in body))
            )
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern", help="substring of the kernels' mangled names")
    ap.add_argument(
        "--source", default="csrc/cuda/mlp.cu", help="the .cu file (default: %(default)s)"
    )
    ap.add_argument("--arch", default="sm_90", help="architecture (default: %(default)s)")
    args = ap.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        subprocess.run(
            [
                "nvcc",
                "-std=c++17",
                "-O3",
                f"-arch={args.arch}",
                "-I" + os.path.join(repo, "csrc"),
                "-cubin",
                os.path.join(repo, args.source),
                "-o",
                cubin,
            ],
            check=True,
        )
        sass = subprocess.run(
            [_cuobjdump(), "-sass", cubin], check=True, capture_output=True, text=True
        ).stdout
    matched = {k: v for k, v in functions(sass).items() if args.pattern in k}
    if not matched:
        print(f"sass_loops: no kernel name contains {args.pattern!r}", file=sys.stderr)
        return 1
    for name, instrs in sorted(matched.items()):
        print(f"{name}: {len(instrs)} instructions")
        for start, end, count, ops in loops(instrs):
            top = ", ".join(f"{op} {c}" for op, c in ops.most_common(6))
            print(f"  loop {start:#06x}-{end:#06x}: {count:4d} instructions ({top})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
