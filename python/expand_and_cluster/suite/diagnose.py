"""Why a suite problem failed, read from the data its run already has: the students' losses,
their first-layer weight vectors, the first layer's clustering (kept and dropped clusters) and the
recovered network, all compared with the planted teacher.

Failure modes (:data:`FAILURE_MODES`; a failed row can have several, listed in this order, the
first being its ``failure_mode``):

- ``students``: fewer than ``ceil(gamma * N)`` students reached the loss target (relative MSE at
  most ``retrain_above``), so no cluster can be trusted to hold enough converged members.
- ``not_learned``: a teacher neuron missing from the result matches no cluster of >= 2 student
  neurons (the students did not find it, or found it too rarely to form a cluster).
- ``merged``: at least two student neurons within the threshold of a missing teacher neuron
  belong to a surviving cluster that is not it: two teacher neurons merged into one cluster.
- ``dropped_size`` / ``dropped_angle``: a missing teacher neuron's cluster exists but was dropped
  by the size filter (fewer than ``ceil(gamma * N)`` members) or the angle filter (median angle
  above beta).
- ``extra``: more recovered neurons than teacher neurons in some layer (an extra cluster
  survived, or the repair added one).
- ``lost``: every teacher neuron had a cluster within the threshold, but the final network (after
  the fine-tune and the repair) lost one.
- ``upper_layer``: the first layer is exact, a higher layer's width is not.
- ``imprecise``: every width exact and no teacher neuron missing, but some further than the
  threshold.
- ``other``: none of the above.

A teacher neuron is *missing* when no neuron of the final network's first layer is within
:data:`NEAR` of it (cosine distance, :func:`~expand_and_cluster.metrics.alignment`; between the
threshold and that it is imprecise); a cluster *matches* it when the median distance of its
members to it is within the threshold.
"""

from __future__ import annotations

import math

import numpy as np

from .. import metrics

#: Every failure mode, in order of precedence (see the module docstring).
#: Cosine distance (about 8 degrees) beyond which a teacher neuron counts as missing from the
#: result rather than recovered imprecisely.
NEAR = 1e-2
FAILURE_MODES = (
    "students",
    "not_learned",
    "merged",
    "dropped_size",
    "dropped_angle",
    "extra",
    "lost",
    "upper_layer",
    "imprecise",
    "other",
)


def _student_vectors(res) -> np.ndarray:
    """``[N * width, d_in + 1]`` float64 first-layer ``[w; b]`` of every student, student-major
    (the row order of a clustering's members)."""
    s = res.training.students
    w = s.weights[0].detach().double().cpu().numpy()
    b = s.biases[0].detach().double().cpu().numpy()
    return np.concatenate([w.reshape(-1, w.shape[-1]), b.reshape(-1, 1)], axis=1)


def failure_modes(teacher, res, threshold: float = 1e-3) -> list[str]:
    """The failure modes of one recovery (:data:`FAILURE_MODES`, in order; empty when the
    recovery is a success: every width exact and every teacher neuron of every layer within
    ``threshold``).

    Parameters
    ----------
    teacher : the planted :class:`~expand_and_cluster.network.Network`.
    res : the :class:`~expand_and_cluster.pipeline.recover.RecoveryResult` of its recovery.
    threshold : cosine distance under which a neuron counts as recovered (1e-3, the suites').
    """
    cfg, act = res.config, res.config.activation
    net = res.network
    T = teacher.incoming(0)
    final = metrics.alignment(T, net.incoming(0), act, net.input_mask)["per_teacher_neuron"]
    wrong_widths = net.hidden_sizes != teacher.hidden_sizes
    if max(final) < threshold and not wrong_widths:
        layers = metrics.deep_alignment(teacher, net, net.input_mask)
        if max(a["max"] for a in layers) < threshold:
            return []
    missing = [j for j, d in enumerate(final) if not d < NEAR]
    modes: set[str] = set()
    losses = np.asarray(res.training.relative_mse)
    if np.sum(losses <= cfg.retrain_above) < math.ceil(cfg.cluster.gamma * len(losses)):
        modes.add("students")
    if any(r > t for r, t in zip(net.hidden_sizes, teacher.hidden_sizes)):
        modes.add("extra")
    cl = res.clustering
    if cl is not None and missing:
        if cl.k_hat > teacher.hidden_sizes[0]:
            modes.add("extra")
        kept = metrics.alignment(T, cl.incoming, act, cl.input_mask)
        vectors = _student_vectors(res)
        for j in missing:
            if kept["per_teacher_neuron"][j] < threshold:
                modes.add("lost")
                continue
            near = np.asarray(
                metrics.alignment(vectors, T[j : j + 1], act, cl.input_mask)["per_teacher_neuron"]
            )
            dropped = [dc for dc in cl.dropped if float(np.median(near[dc.members])) < threshold]
            if dropped:
                best = min(dropped, key=lambda dc: float(np.median(near[dc.members])))
                modes.add("dropped_size" if best.reason.startswith("size") else "dropped_angle")
            elif np.sum((np.asarray(cl.labels) >= 0) & (near < threshold)) >= 2:
                modes.add("merged")
            else:
                modes.add("not_learned")
    if not missing and wrong_widths and net.hidden_sizes[0] == teacher.hidden_sizes[0]:
        modes.add("upper_layer")
    if not missing and not wrong_widths:
        modes.add("imprecise")
    if not modes:
        modes.add("other")
    return [m for m in FAILURE_MODES if m in modes]
