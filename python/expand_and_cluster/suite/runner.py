"""Running a suite: every problem planted, probed, recovered and scored, one row per problem in
``results.jsonl`` as it finishes (so an interrupted run resumes where it stopped), then the
summary and its figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics, ops
from ..errors import NoClusterError
from ..io.files import atomic_write, write_json_atomic
from ..io.plots import plot_suite
from ..pipeline.recover import recover
from ..teachers import planted_teacher, probe
from .spec import Problem, Suite, problem_config
from .summary import summarise, summary_markdown

THRESHOLDS = (1e-3, 1e-6)


def run_problem(problem: Problem, settings: dict[str, Any], device: str = "cpu") -> dict:
    """Plant, probe, recover and score one problem (students trained on ``device``, "cpu" or
    "cuda") with the suite's effective ``settings``; returns its result row.

    Success, fixed up front: the exact width of every hidden layer and every teacher neuron of
    every layer within cosine distance 1e-3 (``success``) or 1e-6 (``success_1e-6``) of a
    recovered neuron, a layer l >= 1 measured in the teacher's coordinates
    (:func:`~expand_and_cluster.metrics.deep_alignment`). ``max_distance`` is the largest over
    the layers, ``layer_max_distance`` each layer's."""
    t0 = time.perf_counter()
    teacher = planted_teacher(
        problem.d_in,
        problem.hidden_widths,
        problem.d_out,
        problem.activation,
        seed=problem.seed,
        min_angle_degrees=problem.min_angle_degrees,
    )
    teacher.weights[-1][:, -1] *= problem.weak_outgoing
    X, Y = probe(teacher, problem.n_queries, problem.distribution, seed=problem.seed)
    cfg, epochs = problem_config(problem, settings, device)
    width = cfg.width
    row = {
        **asdict(problem),
        "n_queries": problem.n_queries,
        "n_params": problem.n_params,
        "epochs": epochs,
    }
    try:
        res = recover(X, Y, cfg)
    except NoClusterError as e:
        return {
            **row,
            "status": "no_cluster",
            "message": str(e),
            "recovered_width": 0,
            "recovered_widths": [],
            "layer_max_distance": [],
            "degraded": False,
            "student_width": width,
            "success": False,
            "success_1e-6": False,
            "success_without_repair": False,
            "width_before_repair": 0,
            "max_distance": 1.0,
            "median_distance": 1.0,
            "held_out_relative_mse": None,
            "seconds": time.perf_counter() - t0,
        }

    def score(net) -> tuple[bool, dict]:
        if net.hidden_sizes != teacher.hidden_sizes:
            # Layer 0 can still be scored; the layers above have no common coordinates.
            al = metrics.alignment(
                teacher.incoming(0), net.incoming(0), problem.activation, net.input_mask
            )
            return False, {**al, "layers": [al["max"]]}
        layers = metrics.deep_alignment(teacher, net, net.input_mask)
        worst = max(layers, key=lambda a: a["max"])
        return True, {**worst, "layers": [a["max"] for a in layers]}

    exact, al = score(res.network)
    row.update(
        status="ok",
        student_width=res.student_width,
        recovered_width=res.network.hidden_sizes[0],
        recovered_widths=res.network.hidden_sizes,
        layer_max_distance=al["layers"],
        degraded=res.status == "degraded",
        max_distance=al["max"],
        median_distance=al["median"],
        held_out_relative_mse=res.relative_mse["held_out"],
        student_median_relative_mse=float(np.median(res.training.relative_mse)),
        dropped_clusters=len(res.clustering.dropped),
        seconds=time.perf_counter() - t0,
        # Where the time went (report.json's timings_s, plus the students' float64 finish).
        stage_seconds={
            **{k: float(v) for k, v in res.timings_s.items()},
            "finish": float((res.training.finish or {}).get("seconds", 0.0)),
        },
    )
    row["success"] = bool(exact and al["max"] < THRESHOLDS[0])
    row["success_1e-6"] = bool(exact and al["max"] < THRESHOLDS[1])
    # The first pass (before a retrain), and the paper's procedure alone (the first pass before
    # this package's width repair), for comparison.
    first = res if res.first_attempt is None else res.first_attempt
    if res.retrain is not None:  # the first pass is ``res`` itself when the retrain lost
        ok, al = score(first.network)
        row.update(
            retrained=True,
            retrain_kept=res.retrain["kept"],
            width_before_retrain=first.network.hidden_sizes[0],
            widths_before_retrain=first.network.hidden_sizes,
            success_without_retrain=bool(ok and al["max"] < THRESHOLDS[0]),
        )
    else:
        row.update(retrained=False, success_without_retrain=row["success"])
    rep = first.repair
    before = first.network if rep is None or not rep.changed else rep.before
    ok, al = score(before)
    row.update(
        width_before_repair=before.hidden_sizes[0],
        widths_before_repair=before.hidden_sizes,
        repair_added=0 if rep is None else len(rep.added),
        repair_pruned=0 if rep is None else len(rep.pruned),
        success_without_repair=bool(ok and al["max"] < THRESHOLDS[0]),
    )
    return row


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that problem reruns
                continue
    return rows


def run_suite(suite: Suite, out: Path, jobs: int = 1, log=None, device: str = "cpu") -> list[dict]:
    """Run every problem not yet in ``out/results.jsonl`` (so an interrupted run resumes), append
    one JSON row per problem as it finishes, then write ``summary.json``, ``summary.md`` and the
    figures. ``jobs`` > 1 runs problems in that many processes (started with "spawn" on CUDA,
    which a forked process cannot use); every problem runs with one torch thread and one kernel
    thread, in a worker or (``jobs`` 1) here, so the rows do not depend on ``jobs``.
    ``device``: where the students train, "cpu" or "cuda"."""
    say = log or (lambda s: None)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["id"] for r in _read_rows(results)}
    todo = [p for p in suite.problems if p.id not in done]
    say(f"suite {suite.name}: {len(suite.problems)} problems, {len(done)} done, {len(todo)} to run")
    t0 = time.perf_counter()
    settings = suite.effective_settings()

    def record(row: dict) -> None:
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        teacher = row.get("widths") or [row["width"]]
        got = row.get("recovered_widths") or [row.get("recovered_width")]
        say(
            f"{row['id']}: {row['activation']} d_in {row['d_in']} widths {list(teacher)} -> "
            f"{list(got)} ({'ok' if row['success'] else 'fail'}, "
            f"max distance {row['max_distance']:.1e}, {row['seconds']:.1f} s)"
        )

    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn") if device == "cuda" else None
        with ProcessPoolExecutor(
            max_workers=jobs, initializer=_single_thread, mp_context=ctx
        ) as pool:
            futures = [pool.submit(run_problem, p, settings, device) for p in todo]
            for fut in futures:
                record(fut.result())
    else:
        # One thread here too, as in the workers: torch's thread count changes the order of its
        # float sums, hence the students' trajectories, so the rows would depend on --jobs.
        with ops.threads(torch_threads=1, kernel_threads=1):
            for p in todo:
                record(run_problem(p, settings, device))
    rows = [r for r in _read_rows(results) if r["id"] in {p.id for p in suite.problems}]
    summary = summarise(rows)
    summary.update(suite=suite.name, wall_s_this_run=time.perf_counter() - t0, settings=settings)
    write_json_atomic(out / "summary.json", summary)
    with atomic_write(out / "summary.md", "w") as f:
        f.write(summary_markdown(summary))
    plot_suite(rows, out)
    return rows


def _single_thread() -> None:
    """A worker process's initializer: torch and the kernels on one thread each."""
    torch.set_num_threads(1)
    ops.set_num_threads(1)
