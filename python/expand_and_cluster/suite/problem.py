"""One suite problem: its teacher planted, probed, recovered and scored into a result row
(:func:`run_problem`), and the row of a problem that did not finish (:func:`failed_row`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from .. import metrics
from ..errors import NoClusterError
from ..pipeline.recover import recover
from ..teachers import planted_teacher, probe
from .diagnose import failure_modes
from .spec import Problem, problem_config

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
        return failed_row(problem, "no_cluster", str(e), time.perf_counter() - t0, epochs, width)

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
        dropped_clusters=None if res.clustering is None else len(res.clustering.dropped),
        seconds=time.perf_counter() - t0,
        # Where the time went (report.json's timings_s, plus the students' float64 finish).
        stage_seconds={
            **{k: float(v) for k, v in res.timings_s.items()},
            "finish": float((res.training.finish or {}).get("seconds", 0.0)),
        },
    )
    row["success"] = bool(exact and al["max"] < THRESHOLDS[0])
    row["success_1e-6"] = bool(exact and al["max"] < THRESHOLDS[1])
    modes = [] if row["success"] else failure_modes(teacher, res, THRESHOLDS[0]) or ["other"]
    row.update(failure_modes=modes, failure_mode=modes[0] if modes else None)
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


def failed_row(
    problem: Problem,
    status: str,
    message: str,
    seconds: float,
    epochs: int | None = None,
    student_width: int | None = None,
) -> dict:
    """The row of a problem without a recovered network: ``status`` "no_cluster" (no cluster
    survived), "error" (an exception, or the worker process died; ``message`` says which) or
    "timeout" (stopped at the suite's wall-clock limit); scored as a failure whose
    ``failure_mode`` is the status."""
    return {
        **asdict(problem),
        "n_queries": problem.n_queries,
        "n_params": problem.n_params,
        "epochs": epochs,
        "status": status,
        "message": message,
        "recovered_width": 0,
        "recovered_widths": [],
        "layer_max_distance": [],
        "degraded": False,
        "student_width": student_width,
        "success": False,
        "success_1e-6": False,
        "success_without_repair": False,
        "success_without_retrain": False,
        "retrained": False,
        "width_before_repair": 0,
        "max_distance": 1.0,
        "median_distance": 1.0,
        "held_out_relative_mse": None,
        "failure_modes": [status],
        "failure_mode": status,
        "seconds": seconds,
    }
