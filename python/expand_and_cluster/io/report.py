"""``report.json`` of a recovery (schema in docs/formats.md), and the files a run writes:
:func:`build_report` turns a :class:`~expand_and_cluster.pipeline.recover.RecoveryResult` into
the report (scored against the teacher when it is known); :func:`write_run` writes the report,
the recovered network, the students and the figures into a folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from .._version import __version__
from ..network import Network
from .files import atomic_write, save_network, write_json_atomic
from .plots import write_figures

#: Required top-level keys of ``report.json``, in the order they are written.
REPORT_KEYS = (
    "version",
    "backend",
    "activation",
    "dtype",
    "students",
    "student_widths",
    "gamma",
    "beta_degrees",
    "queries",
    "recovered_sizes",
    "teacher_sizes",
    "alignment",
    "student_losses",
    "recovered_relative_mse",
    "timings_s",
)
#: Required keys of the nested objects of ``report.json``.
REPORT_NESTED_KEYS = {
    "queries": ("train", "held_out", "source"),
    "recovered_relative_mse": ("train", "held_out"),
    "timings_s": ("probe", "train", "cluster", "finetune", "total"),
}
#: Required keys of each entry of ``report["alignment"]`` (when it is not null).
ALIGNMENT_KEYS = ("layer", "per_teacher_neuron", "median", "max")


def check_report(report: Mapping[str, Any]) -> None:
    """Check that ``report`` has the schema's required keys (docs/formats.md).

    Raises
    ------
    ValueError
        Naming the first missing key (``"timings_s.cluster"`` for a nested one), or a
        ``backend`` other than ``"cpu"``/``"cuda"``.
    """
    for key in REPORT_KEYS:
        if key not in report:
            raise ValueError(f"report: missing key {key!r}")
    for key, nested in REPORT_NESTED_KEYS.items():
        if not isinstance(report[key], Mapping):
            raise ValueError(f"report: {key!r} must be an object with keys {', '.join(nested)}")
        for sub in nested:
            if sub not in report[key]:
                raise ValueError(f"report: missing key '{key}.{sub}'")
    if report["backend"] not in ("cpu", "cuda"):
        raise ValueError(f"report: backend must be 'cpu' or 'cuda', got {report['backend']!r}")
    for i, entry in enumerate(report["alignment"] or []):
        for sub in ALIGNMENT_KEYS:
            if sub not in entry:
                raise ValueError(f"report: missing key 'alignment[{i}].{sub}'")


def build_report(
    result,
    teacher: Network | None = None,
    *,
    probe_seconds: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` object of a recovery (docs/formats.md).

    With the ``teacher``, the report scores the recovered network against it: per-layer
    alignment (:func:`~expand_and_cluster.metrics.deep_alignment`, when the depths agree) and
    bits of precision (one hidden layer, :func:`~expand_and_cluster.metrics.bits_of_precision`).

    Parameters
    ----------
    result : a :class:`~expand_and_cluster.pipeline.recover.RecoveryResult`.
    teacher : the teacher, when known.
    probe_seconds : time spent querying the teacher (``timings_s.probe``; added to the total).
    extra : further keys appended after the schema's (e.g. the demo's ``teacher_info``).

    Returns
    -------
    dict with the schema's required keys first, in order, then the extra keys; values are
    numpy-free only after :func:`~expand_and_cluster.io.files.write_json_atomic`'s conversion.
    """
    cfg, net, layers = result.config, result.network, result.layers
    mask = net.input_mask
    alignment = teacher_sizes = bits = None
    if teacher is not None:
        teacher_sizes = teacher.hidden_sizes
        if len(teacher_sizes) == len(net.hidden_sizes):
            alignment = metrics.deep_alignment(teacher, net, mask)
        if len(teacher_sizes) == 1:
            bits = metrics.bits_of_precision(teacher, net, mask)
    t, rel, first = result.timings_s, result.relative_mse, layers[0]
    report = {
        "version": __version__,
        "backend": cfg.device,
        "activation": cfg.activation,
        "dtype": cfg.train.dtype,
        "students": cfg.train.n_students,
        "student_widths": [result.student_width] * len(layers),
        "gamma": cfg.cluster.gamma,
        "beta_degrees": cfg.cluster.beta_degrees,
        "queries": {
            "train": result.n_train,
            "held_out": result.n_held_out,
            "source": result.queries.source,
        },
        "recovered_sizes": net.hidden_sizes,
        "teacher_sizes": teacher_sizes,
        "alignment": alignment,
        "student_losses": result.training.relative_mse.tolist(),
        "recovered_relative_mse": {"train": rel["train"], "held_out": rel["held_out"]},
        "timings_s": {
            "probe": probe_seconds,
            "train": t["search"] + t["train"],
            "cluster": t["cluster"],
            "finetune": t["finetune"],
            "repair": t["repair"],
            "retrain": t.get("retrain", 0.0),
            "total": probe_seconds + t["total"],
        },
        "hidden_layers": len(layers),
        "layers": [layer.to_json() for layer in layers],
        "resumed_from": result.resumed_from,
        "expansion_search": {
            "width": result.student_width,
            **(result.expansion_search or {"tried": None}),
        },
        "input_mask": {"masked_inputs": np.flatnonzero(~mask).tolist() if mask is not None else []},
        "cut_height": first.cut_height,
        "cluster_sizes": first.sizes,
        "cluster_median_angle_degrees": first.median_angle_degrees,
        "dropped_clusters": first.dropped,
        "dropped_singletons": first.n_dropped_singletons,
        "relative_mse_before_finetune": rel["initial_train"],
        "bits_of_precision": bits,
        "student_stop_reasons": result.training.stop_reason,
        "student_finish": result.training.finish,
        "width_repair": None if result.repair is None else result.repair.to_json(),
        "retrain": result.retrain,
        "status": result.status,
        "status_reason": result.status_reason,
        **(extra or {}),
    }
    check_report(report)
    return report


def write_run(
    result,
    folder: str | os.PathLike,
    teacher: Network | None = None,
    *,
    figures: bool = True,
    probe_seconds: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a recovery's files into ``folder`` (created if missing; docs/formats.md):
    ``report.json`` (:func:`build_report`), ``recovered.npz`` (network file), ``students.npz``
    (the trained students, their relative MSE and the held-out query rows) and, with
    ``figures``, the figures (:func:`~expand_and_cluster.io.plots.write_figures`).

    Returns
    -------
    The report (as :func:`build_report` returns it).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(result, teacher, probe_seconds=probe_seconds, extra=extra)
    save_network(result.network, folder / "recovered.npz")
    with atomic_write(folder / "students.npz") as f:
        np.savez(
            f,
            **result.training.students.to_arrays(),
            relative_mse=result.training.relative_mse,
            held_out_index=result.held_out_index,
        )
    write_json_atomic(folder / "report.json", report)
    if figures:
        write_figures(result, folder, report["alignment"])
    return report


def summary_text(rep: Mapping[str, Any], out: str | os.PathLike) -> str:
    """A few lines on a report for a terminal: a degraded result's reason first, then widths,
    alignment per layer, relative MSE, wall time and where the results are."""
    lines = []
    if rep.get("status") == "degraded":
        lines.append(f"DEGRADED: {rep['status_reason']}")
    lines.append(f"recovered hidden widths: {rep['recovered_sizes']}")
    if rep.get("teacher_sizes") is not None:
        lines[-1] += f" (teacher: {rep['teacher_sizes']})"
    for al in rep.get("alignment") or []:
        k = len(al["per_teacher_neuron"])
        lines.append(
            f"layer {al['layer']}: teacher neurons within 1e-3 cosine distance: "
            f"{al['count_below_1e-3']}/{k}, within 1e-6: {al['count_below_1e-6']}/{k} "
            f"(median {al['median']:.2e}, max {al['max']:.2e})"
        )
    r = rep["recovered_relative_mse"]
    held = f", held out {r['held_out']:.2e}" if r.get("held_out") is not None else ""
    lines.append(f"relative MSE train {r['train']:.2e}{held}")
    lines.append(f"wall time {rep['timings_s']['total']:.1f} s; results in {out}/")
    return "\n".join(lines)
