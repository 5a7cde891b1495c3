"""Metrics against a known teacher: neuron alignment, width overhead, function error, bits of
precision (Martinelli et al., ICML 2024, Sec. 4 and docs/method.md, "Metrics").

All computations are in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .activations import Activation, SymmetryClass, get_activation
from .network import Network

#: Keys and thresholds of the alignment counts.
ALIGNMENT_THRESHOLDS = {"count_below_1e-3": 1e-3, "count_below_1e-6": 1e-6}


def _masked(v: np.ndarray, input_mask: np.ndarray | None, name: str) -> np.ndarray:
    """``v`` [k, d + 1] restricted to the masked inputs plus the bias column (kept)."""
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] < 1:
        raise ValueError(f"{name}: expected [k, d + 1], got shape {v.shape}")
    if input_mask is None:
        return v
    mask = np.asarray(input_mask, dtype=bool)
    if mask.shape != (v.shape[1] - 1,):
        raise ValueError(f"input_mask: expected shape [{v.shape[1] - 1}], got {mask.shape}")
    return v[:, np.append(mask, True)]


def unit_rows(v: np.ndarray) -> np.ndarray:
    """``v`` ``[k, d]`` with its rows scaled to unit norm (float64); zero rows stay zero."""
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def cosine_distance_matrix(a: np.ndarray, b: np.ndarray, sign_symmetric: bool) -> np.ndarray:
    """``[k_a, k_b]`` cosine distances 1 - cos (or 1 - |cos|) between the rows of a and b.

    Computed as ||u - v||^2 / 2 (and min(||u - v||, ||u + v||)^2 / 2 with sign symmetry) on the
    unit vectors u, v, which equals 1 - cos exactly but keeps full relative precision for tiny
    distances (1 - u.v loses everything below ~1e-16). A zero row is at distance 1 from
    everything (cos taken as 0).
    """
    u, w = unit_rows(a), unit_rows(b)
    out = np.empty((u.shape[0], w.shape[0]))
    for j, row in enumerate(u):  # one row at a time: memory [k_b, d], exact differences
        d = 0.5 * np.sum((w - row) ** 2, axis=1)
        if sign_symmetric:
            d = np.minimum(d, 0.5 * np.sum((w + row) ** 2, axis=1))
        out[j] = d
    zero = (np.linalg.norm(a, axis=1) == 0)[:, None] | (np.linalg.norm(b, axis=1) == 0)[None, :]
    out[zero] = 1.0
    return out


def alignment(
    teacher_incoming: np.ndarray,
    recovered_incoming: np.ndarray,
    activation: str | Activation,
    input_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """How well each teacher neuron is recovered: its cosine distance to the closest recovered one.

    d_j = min over recovered neurons s of the cosine distance between the teacher's [w_j; b_j] and
    the recovered [w_s; b_s] (docs/method.md, "Metrics"): 1 - cos, or 1 - |cos| for activations
    with a sign symmetry (every class but ``none``). Positive scaling (relu class) does not
    change a cosine. Inputs outside ``input_mask`` (constant over the queries, so their weights
    are unidentifiable) are left out; the bias is kept.

    Parameters
    ----------
    teacher_incoming : ``[k, d + 1]`` teacher incoming vectors (``Network.incoming(layer)``).
    recovered_incoming : ``[k_hat, d + 1]`` recovered incoming vectors (k_hat may be 0).
    activation : activation name or record (for its symmetry class).
    input_mask : ``[d]`` bool, inputs to compare, or None for all.

    Returns
    -------
    dict with
        ``"per_teacher_neuron"``: list of k floats d_j (1.0 when nothing was recovered);
        ``"matched"``: list of k indices of the closest recovered neuron (None when k_hat = 0);
        ``"median"``, ``"max"``: of d_j (NaN when k = 0);
        ``"count_below_1e-3"``, ``"count_below_1e-6"``: number of teacher neurons with d_j below.

    Raises
    ------
    ValueError
        If the vectors' lengths differ or the mask has the wrong length.
    """
    t = _masked(teacher_incoming, input_mask, "teacher_incoming")
    r = np.asarray(recovered_incoming, dtype=np.float64)
    if r.size == 0:
        r = r.reshape(0, np.asarray(teacher_incoming).shape[1])
    r = _masked(r, input_mask, "recovered_incoming")
    if t.shape[1] != r.shape[1]:
        raise ValueError(
            f"teacher_incoming, recovered_incoming: vector lengths differ ({t.shape[1]} and "
            f"{r.shape[1]})"
        )
    if r.shape[0] == 0:
        per = np.ones(t.shape[0])
        matched: list[int | None] = [None] * t.shape[0]
    else:
        sign_symmetric = get_activation(activation).symmetry.sign_symmetric
        dist = cosine_distance_matrix(t, r, sign_symmetric)
        best = dist.argmin(axis=1)
        per = dist[np.arange(t.shape[0]), best]
        matched = [int(s) for s in best]
    out: dict[str, Any] = {
        "per_teacher_neuron": [float(d) for d in per],
        "matched": matched,
        "median": float(np.median(per)) if per.size else float("nan"),
        "max": float(per.max()) if per.size else float("nan"),
    }
    for key, threshold in ALIGNMENT_THRESHOLDS.items():
        out[key] = int(np.sum(per < threshold))
    return out


def overhead(recovered_sizes: Sequence[int], teacher_sizes: Sequence[int]) -> list[float]:
    """Width overhead (k_hat - k) / k per hidden layer, as a fraction (x 100 for a percentage).

    Raises
    ------
    ValueError
        If the numbers of layers differ or a teacher width is not positive.
    """
    if len(recovered_sizes) != len(teacher_sizes):
        raise ValueError(
            f"recovered_sizes, teacher_sizes: {len(recovered_sizes)} and {len(teacher_sizes)} "
            f"layers"
        )
    if any(k <= 0 for k in teacher_sizes):
        raise ValueError(f"teacher_sizes: expected positive widths, got {list(teacher_sizes)}")
    return [(k_hat - k) / k for k_hat, k in zip(recovered_sizes, teacher_sizes)]


def relative_mse(y_pred: np.ndarray, y: np.ndarray) -> float:
    """Relative mean squared error: MSE / mean over outputs of Var(y) (docs/method.md, Step 1).

    MSE is the mean over points and outputs of (y_pred - y)^2; Var is the (population, ddof = 0)
    variance of each output over the points. A predictor that outputs the mean of y scores 1.
    When every output of y is constant (mean variance 0) the plain MSE is returned (denominator
    1.0).

    Parameters
    ----------
    y_pred, y : ``[P, d_out]`` (or ``[P]``) arrays of the same shape.

    Raises
    ------
    ValueError
        If the shapes differ or there are no points.
    """
    p = np.asarray(y_pred, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    p = p[:, None] if p.ndim == 1 else p
    t = t[:, None] if t.ndim == 1 else t
    if p.shape != t.shape or p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(
            f"y_pred, y: expected equal shapes [P >= 1, d_out], got {p.shape}, {t.shape}"
        )
    var = float(t.var(axis=0).mean())
    return float(np.mean((p - t) ** 2) / (var if var > 0 else 1.0))


def bits_of_precision(
    teacher: Network, recovered: Network, input_mask: np.ndarray | None = None
) -> float | None:
    """Bits of precision of a recovered one-hidden-layer network: -log2 max |delta w|.

    The convention of the cryptanalytic extraction literature (Carlini, Jagielski, Mironov,
    "Cryptanalytic Extraction of Neural Network Models", CRYPTO 2020), after matching the
    recovered network to the teacher up to the activation's symmetries:

    1. neurons are paired by a Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on
       the cosine distances of the incoming vectors [w; b] (:func:`alignment`'s distance);
    2. for a sign-symmetric class, a recovered vector pointing away from its teacher neuron is
       flipped; for the ``even_linear_positive_scaling`` class (relu) it is also rescaled to the
       teacher's norm, its outgoing weights scaled inversely;
    3. delta w runs over the matched incoming vectors (inputs outside ``input_mask`` left out, the
       bias kept) and the outgoing weights of the hidden neurons: a flip negates the outgoing
       weights for the ``odd`` and ``odd_constant`` classes and leaves them unchanged for the
       ``even_linear`` classes (docs/method.md, symmetry table);
    4. the output bias is compared only for the ``none`` and ``odd`` classes: a flip of a sigmoid
       (``odd_constant``) neuron shifts it by the outgoing weight, and for the ``even_linear``
       classes the linear skip term makes the split of constant and linear parts between the
       output bias and the skip term ambiguous. The linear skip term is never compared.

    Parameters
    ----------
    teacher, recovered : networks with one hidden layer and the same activation.
    input_mask : ``[d_in]`` bool, inputs to compare, or None for all.

    Returns
    -------
    float bits (``inf`` for an exact copy), or None when the networks are not comparable this way:
    different hidden widths, more than one hidden layer, different activations or shapes.
    """
    if (
        len(teacher.weights) != 2
        or len(recovered.weights) != 2
        or teacher.hidden_sizes != recovered.hidden_sizes
        or teacher.activation != recovered.activation
        or (teacher.d_in, teacher.d_out) != (recovered.d_in, recovered.d_out)
    ):
        return None
    symmetry = get_activation(teacher.activation).symmetry
    t_in = _masked(teacher.incoming(0), input_mask, "teacher")
    r_in = _masked(recovered.incoming(0), input_mask, "recovered")
    rows, cols = linear_sum_assignment(cosine_distance_matrix(t_in, r_in, symmetry.sign_symmetric))
    t_in, r_in = t_in[rows], r_in[cols].copy()
    t_out, r_out = teacher.weights[1][:, rows], recovered.weights[1][:, cols].copy()
    if symmetry.sign_symmetric:
        flip = np.sum(t_in * r_in, axis=1) < 0
        r_in[flip] *= -1.0
        if symmetry in (SymmetryClass.ODD, SymmetryClass.ODD_CONSTANT):
            r_out[:, flip] *= -1.0
    if symmetry.scale_symmetric:
        t_norm, r_norm = np.linalg.norm(t_in, axis=1), np.linalg.norm(r_in, axis=1)
        scale = np.divide(t_norm, r_norm, out=np.ones_like(t_norm), where=r_norm > 0)
        r_in *= scale[:, None]
        r_out /= scale[None, :]
    deltas = [np.abs(t_in - r_in).max(initial=0.0), np.abs(t_out - r_out).max(initial=0.0)]
    if symmetry in (SymmetryClass.NONE, SymmetryClass.ODD):
        deltas.append(np.abs(teacher.biases[1] - recovered.biases[1]).max(initial=0.0))
    worst = float(max(deltas))
    return float("inf") if worst == 0.0 else float(-np.log2(worst))


def deep_alignment(
    teacher: Network, recovered: Network, input_mask: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Per hidden layer :func:`alignment` of a deep teacher and a recovered network.

    Layer 0 is compared directly (on the masked inputs). A layer l >= 1 lives in the space of the
    layer below, whose neurons the recovery found in another order, orientation and (relu class)
    scale; so each teacher neuron t of layer l - 1 is first paired with its closest recovered
    neuron j(t) (the ``matched`` of layer l - 1), and the recovered layer l is re-expressed over
    the teacher's layer l - 1: column t of its weights is recovered column j(t) times
    ``sigma_t * lambda_t`` (sigma_t = the sign of the pair's dot product for the odd classes, +1
    otherwise; lambda_t = norm ratio recovered / teacher for the relu class, 1 otherwise); for
    odd_constant (sigmoid, ``s(-z) = 1 - s(z)``) a flipped pair also moves the recovered column
    into the bias. Recovered neurons of layer l - 1 that no teacher neuron picked are left out.
    For the even_linear classes a flipped pair leaves a linear term that this re-expression
    ignores (the recovery orients deep even_linear networks so that none is left).

    Parameters
    ----------
    teacher, recovered : networks with the same number of hidden layers and activation.
    input_mask : ``[d_in]`` bool, inputs compared in layer 0, or None for all.

    Returns
    -------
    list of ``{"layer": l, **alignment(...)}``, one per hidden layer.

    Raises
    ------
    ValueError
        When the numbers of hidden layers, the activations or the input sizes differ.
    """
    if len(teacher.hidden_sizes) != len(recovered.hidden_sizes):
        raise ValueError(
            f"teacher, recovered: {len(teacher.hidden_sizes)} and "
            f"{len(recovered.hidden_sizes)} hidden layers"
        )
    if teacher.activation != recovered.activation or teacher.d_in != recovered.d_in:
        raise ValueError("teacher, recovered: different activations or input sizes")
    symmetry = get_activation(teacher.activation).symmetry
    out = []
    al = alignment(teacher.incoming(0), recovered.incoming(0), teacher.activation, input_mask)
    out.append({"layer": 0, **al})
    # the recovered layer below, re-expressed in the teacher's coordinates (layer 0: as it is)
    rb = _masked(recovered.incoming(0), input_mask, "recovered")
    for l in range(1, len(teacher.hidden_sizes)):
        t_below = teacher.incoming(l - 1)
        tb = _masked(t_below, input_mask if l == 1 else None, "teacher")
        w_r, b_r = recovered.weights[l], recovered.biases[l].copy()
        cols = np.zeros((w_r.shape[0], t_below.shape[0]))
        for t, j in enumerate(out[-1]["matched"]):
            if j is None:
                continue
            dot = float(tb[t] @ rb[j])
            sigma = -1.0 if (symmetry.sign_symmetric and dot < 0) else 1.0
            lam = 1.0
            if symmetry.scale_symmetric:
                nt = np.linalg.norm(tb[t])
                lam = np.linalg.norm(rb[j]) / nt if nt > 0 else 1.0
            if symmetry in (SymmetryClass.ODD, SymmetryClass.ODD_CONSTANT):
                cols[:, t] = sigma * w_r[:, j]
                if symmetry is SymmetryClass.ODD_CONSTANT and sigma < 0:
                    b_r += w_r[:, j]
            else:
                cols[:, t] = lam * w_r[:, j]
        mapped = np.concatenate([cols, b_r[:, None]], axis=1)
        al = alignment(teacher.incoming(l), mapped, teacher.activation, None)
        out.append({"layer": l, **al})
        rb = mapped
    return out
