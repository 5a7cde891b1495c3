"""Time to precision of the float64 finish: the same Adam-trained students finished by each
method, side by side.

Per problem: N students trained with the command line's Adam schedule (300 epochs, batch 512,
float32), then copies of them finished by "lbfgs-fixed" (the fixed-iteration L-BFGS polish),
"lbfgs" (L-BFGS with the per-student stop rule), "lm+lbfgs" and "lm" (batched
Levenberg-Marquardt; students of at most 1,200 parameters times d_out), each
timed from the start of the finish. Prints, per problem and method, the seconds until the median
student's relative MSE is at most 1e-10 and 1e-20 ("-" when never), the total seconds, the
median final relative MSE and the stop reasons; writes OUT.json.

Usage: python benchmarks/bench_finish.py OUT.json [--problems toy,planted_g,digits]
    [--methods lbfgs-fixed,lbfgs,lm] [--students 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys

import numpy as np
import torch

from expand_and_cluster import ops
from expand_and_cluster.config import TrainConfig
from expand_and_cluster.io.files import write_json_atomic
from expand_and_cluster.pipeline.finish import finish, n_params
from expand_and_cluster.pipeline.train import output_variance, train_students
from expand_and_cluster.teachers import (
    biased_noise_augmentation,
    planted_teacher,
    probe,
    train_digits_teacher,
)


def problem(name: str):
    """(x, y, student widths, activation) of a representative problem."""
    if name == "toy":  # planted 4-3-1 tanh, 2,000 Gaussian queries, students of width 6
        t = planted_teacher(4, [3], 1, "tanh", seed=11, min_angle_degrees=20)
        x, y = probe(t, 2000, "gaussian", seed=1)
        return x, y, [4, 6, 1], "tanh"
    if name == "planted_g":  # planted 10-6-1 g, 20,000 Gaussian queries, width 12 (rho 2)
        t = planted_teacher(10, [6], 1, "g", seed=7, min_angle_degrees=20)
        x, y = probe(t, 20000, "gaussian", seed=1)
        return x, y, [10, 12, 1], "g"
    if name == "planted_g_wide":  # the same, width 24 (rho 4)
        x, y, _, act = problem("planted_g")
        return x, y, [10, 24, 1], act
    if name == "digits":  # the demo: 64-16-10 tanh digits teacher, students of width 32
        t, digits, _ = train_digits_teacher(width=16, seed=0)
        x = biased_noise_augmentation(digits, np.random.default_rng(0))
        return x, t.forward(x), [64, 32, 10], "tanh"
    raise SystemExit(f"unknown problem {name!r}")


def first_time(history: dict, threshold: float) -> float | None:
    for s, rel in zip(history["seconds"], history["relative_mse"]):
        if np.median(rel) <= threshold:
            return s
    return None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--problems", default="toy,planted_g,planted_g_wide,digits")
    p.add_argument("--methods", default="lbfgs-fixed,lbfgs,lm+lbfgs,lm")
    p.add_argument("--students", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lbfgs-iterations", type=int, default=1500)
    p.add_argument("--lm-iterations", type=int, default=100)
    a = p.parse_args()
    ops.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    rows = []
    print(f"# {platform.processor() or platform.machine()}, {a.threads} threads")
    print("| problem | params | method | t(1e-10) s | t(1e-20) s | total s | median rel | stops |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.problems.split(","):
        x, y, widths, act = problem(name)
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        cfg = TrainConfig(
            n_students=a.students, max_epochs=300, batch_size=512, progress=False
        ).scaled(300)
        tr = train_students(xt, yt, widths[1:-1], act, cfg)
        var_y = output_variance(yt)
        for method in a.methods.split(","):
            if method.startswith("lm") and n_params(widths) * widths[-1] > 1200:
                continue
            ens = tr.students.to(dtype=torch.float64)
            res = finish(
                ens,
                xt,
                yt,
                method,
                lbfgs_iterations=a.lbfgs_iterations,
                lm_iterations=a.lm_iterations,
                var_y=var_y,
            )
            t10, t20 = first_time(res.history, 1e-10), first_time(res.history, 1e-20)
            rel = res.mse / var_y
            stops = dict(collections.Counter(res.stop_reason))
            row = {
                "problem": name,
                "widths": widths,
                "params": n_params(widths),
                "queries": len(x),
                "method": method,
                "seconds_to_1e-10": t10,
                "seconds_to_1e-20": t20,
                "seconds": res.seconds,
                "median_relative_mse": float(np.median(rel)),
                "iterations": res.iterations.tolist(),
                "stop_reason": res.stop_reason,
                "adam_median_relative_mse": float(np.median(tr.relative_mse)),
            }
            rows.append(row)

            def f(v):
                return "-" if v is None else f"{v:.1f}"

            print(
                f"| {name} {'-'.join(map(str, widths))} | {row['params']} | {method} | {f(t10)} | "
                f"{f(t20)} | {res.seconds:.1f} | {row['median_relative_mse']:.1e} | {stops} |",
                flush=True,
            )
    write_json_atomic(a.out, {"machine": platform.platform(), "threads": a.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
