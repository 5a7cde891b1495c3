"""Figures: dendrogram, distance matrix, alignment and training curves of a recovery
(:func:`write_figures`), and the success figures of a suite (:func:`plot_suite`).

Figures are drawn with matplotlib's object-oriented API on a :class:`matplotlib.figure.Figure`
rendered by the Agg (PNG) canvas: pyplot's global state is never touched, nothing is shown, and
figures are released when the function returns. matplotlib is imported on the first figure.
Every PNG is written atomically (:func:`~expand_and_cluster.io.files.atomic_write`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import ops
from ..activations import get_activation
from .files import atomic_write

#: Above this many leaves the dendrogram shows only the last merges (``truncate_mode="lastp"``).
DENDROGRAM_MAX_LEAVES = 2000
#: Number of clusters shown by a truncated dendrogram.
DENDROGRAM_LASTP = 200
#: Trees deeper than this are truncated too (scipy's dendrogram recurses once per tree level).
_DENDROGRAM_MAX_DEPTH = 500
#: Smallest value drawn on the logarithmic axes of the alignment figure.
ALIGNMENT_FLOOR = 1e-16


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------


def new_figure(**kwargs: Any):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return Path(path)


def _check_linkage(linkage: np.ndarray) -> np.ndarray:
    z = np.asarray(linkage, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != 4 or z.shape[0] < 1:
        raise ValueError(f"linkage: expected shape [M - 1, 4] with M >= 2, got {z.shape}")
    return z


def _tree_depth(z: np.ndarray) -> int:
    """Number of levels of the tree of linkage ``z`` (a single merge has depth 1)."""
    m = z.shape[0] + 1
    depth = np.zeros(z.shape[0], dtype=np.int64)
    for i, (a, b) in enumerate(z[:, :2].astype(np.int64)):
        da = depth[a - m] if a >= m else 0
        db = depth[b - m] if b >= m else 0
        depth[i] = 1 + max(da, db)
    return int(depth[-1])


def plot_dendrogram(
    linkage: np.ndarray,
    cut_height: float,
    gamma_n: float,
    counts: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Dendrogram of one layer's clustering, with the tree cut, next to the cluster-count curve.

    Left panel: the dendrogram (heights on a log axis, zero heights drawn at half the smallest
    positive height), clusters below the cut coloured, a horizontal line at ``cut_height``. For
    more than :data:`DENDROGRAM_MAX_LEAVES` leaves (or a very deep tree) only the last
    :data:`DENDROGRAM_LASTP` merges are drawn (``truncate_mode="lastp"``), so drawing stays fast
    and never hits Python's recursion limit (the reference code crashes above 15,000 vectors).
    Right panel, sharing the height axis: the number of clusters of size >= gamma * N against
    height.

    Parameters
    ----------
    linkage : ``[M - 1, 4]`` scipy linkage matrix (M clustered neuron vectors).
    cut_height : height at which the tree is cut (distance units of the linkage).
    gamma_n : minimum cluster size gamma * N.
    counts : ``[M - 1]`` number of clusters of size >= gamma * N after each merge (the tree
        cut's, :class:`~expand_and_cluster.pipeline.cut.TreeCut`).
    path : PNG file to write.
    title : figure title.

    Returns
    -------
    The path written.

    Raises
    ------
    ValueError
        If ``linkage`` is not ``[M - 1, 4]`` or ``counts`` does not have M - 1 entries.
    """
    from matplotlib.collections import LineCollection
    from scipy.cluster.hierarchy import dendrogram

    z = _check_linkage(linkage)
    m = z.shape[0] + 1
    truncate = m > DENDROGRAM_MAX_LEAVES or _tree_depth(z) > _DENDROGRAM_MAX_DEPTH
    tree = dendrogram(
        z,
        no_plot=True,
        no_labels=True,
        color_threshold=cut_height,
        above_threshold_color="black",
        **({"truncate_mode": "lastp", "p": DENDROGRAM_LASTP} if truncate else {}),
    )
    counts = np.asarray(counts).reshape(-1)
    if counts.size != m - 1:
        raise ValueError(f"counts: expected {m - 1} entries (one per merge), got {counts.size}")
    # Before any merge every vector is a cluster of size 1.
    heights = np.concatenate([[0.0], z[:, 2]])
    all_counts = np.concatenate([[m if gamma_n <= 1 else 0], counts])
    positive = z[:, 2][z[:, 2] > 0]
    log = positive.size > 0
    floor = positive.min() / 2 if log else 0.0

    fig = new_figure(figsize=(10, 4.5))
    ax, ax_count = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    segments = [
        np.column_stack([xs, np.maximum(ys, floor)])
        for xs, ys in zip(tree["icoord"], tree["dcoord"])
    ]
    ax.add_collection(LineCollection(segments, colors=tree["color_list"], linewidths=0.6))
    n_drawn = len(tree["leaves"])
    ax.set_xlim(0, 10 * n_drawn)
    ax.set_xticks([])
    shown = f" (last {n_drawn} clusters)" if truncate else ""
    ax.set_xlabel(f"{m} vectors{shown}; dashed: cut at {cut_height:.3g}")
    ax.set_ylabel("merge height")
    ax.axhline(max(cut_height, floor), color="red", linestyle="--", linewidth=1)
    ax_count.step(all_counts, np.maximum(heights, floor), where="pre", color="black", linewidth=1)
    ax_count.axhline(max(cut_height, floor), color="red", linestyle="--", linewidth=1)
    ax_count.set_xlabel(f"clusters of size >= {gamma_n:g}")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, max(z[:, 2].max(), cut_height) * 2)
    else:
        ax.set_ylim(-0.05, max(cut_height, 1.0))
    fig.suptitle(title or "dendrogram")
    return save_figure(fig, path)


def _square_block(dist: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``D[idx][:, idx]`` of a square or condensed (scipy ``pdist``) distance matrix."""
    if dist.ndim == 2:
        return dist[np.ix_(idx, idx)]
    m = int(round((1 + math.sqrt(1 + 8 * dist.size)) / 2))
    i, j = np.minimum.outer(idx, idx), np.maximum.outer(idx, idx)
    k = m * i - i * (i + 1) // 2 + (j - i - 1)
    return np.where(i == j, 0.0, dist[np.where(i == j, 0, k)])


def plot_distance_matrix(
    dist: np.ndarray,
    linkage: np.ndarray,
    path: str | os.PathLike,
    max_points: int = 2000,
    title: str = "",
) -> Path:
    """Pairwise distance matrix in the dendrogram's leaf order (clusters show as blocks).

    Parameters
    ----------
    dist : ``[M, M]`` square or ``[M (M - 1) / 2]`` condensed distance matrix (float).
    linkage : ``[M - 1, 4]`` linkage matrix of the same M vectors; its leaf order
        (:func:`scipy.cluster.hierarchy.leaves_list`) orders rows and columns.
    path : PNG file to write.
    max_points : when M is larger, every (M / max_points)-th vector in leaf order is shown
        (deterministic, evenly spaced).
    title : figure title.

    Returns
    -------
    The path written.

    Raises
    ------
    ValueError
        If ``dist`` and ``linkage`` describe different numbers of vectors.
    """
    from scipy.cluster.hierarchy import leaves_list

    z = _check_linkage(linkage)
    m = z.shape[0] + 1
    d = np.asarray(dist, dtype=np.float64)
    if not (d.shape == (m, m) or d.shape == (m * (m - 1) // 2,)):
        raise ValueError(
            f"dist: expected [{m}, {m}] or condensed [{m * (m - 1) // 2}] for a linkage of {m} "
            f"vectors, got {d.shape}"
        )
    order = leaves_list(z)
    if m > max_points:
        order = order[np.linspace(0, m - 1, max_points).round().astype(np.int64)]
    block = _square_block(d, order)

    fig = new_figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(block, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="distance")
    ax.set_xticks([])
    ax.set_yticks([])
    shown = f"{order.size} of {m}" if order.size < m else f"{m}"
    ax.set_xlabel(f"{shown} vectors, dendrogram order")
    ax.set_title(title or "pairwise distances")
    return save_figure(fig, path)


def plot_alignment(
    distances: Sequence[float] | np.ndarray,
    path: str | os.PathLike,
    thresholds: Sequence[float] = (1e-3, 1e-6),
    title: str = "",
) -> Path:
    """Bar chart of each teacher neuron's cosine distance to its closest recovered neuron.

    Parameters
    ----------
    distances : ``[k]`` per-teacher-neuron distances d_j (``alignment()["per_teacher_neuron"]``);
        drawn on a log axis, floored at :data:`ALIGNMENT_FLOOR` (1e-16); NaN or missing values
        (None) are drawn as 1.
    path : PNG file to write.
    thresholds : horizontal reference lines.
    title : figure title.

    Returns
    -------
    The path written.
    """
    d = np.array([np.nan if v is None else v for v in distances], dtype=np.float64)
    d = np.clip(np.nan_to_num(d, nan=1.0), ALIGNMENT_FLOOR, None)
    fig = new_figure(figsize=(max(4.0, min(0.15 * d.size + 2, 16.0)), 4))
    ax = fig.subplots()
    ax.bar(np.arange(d.size), d, width=0.8, color="tab:blue", bottom=0)
    for t, style in zip(thresholds, ("--", ":", "-.")):
        ax.axhline(t, color="red", linestyle=style, linewidth=1, label=f"{t:.0e}")
    ax.set_yscale("log")
    ax.set_ylim(ALIGNMENT_FLOOR / 2, 1e3)  # distances are <= 2: room above for the legend
    ax.set_xlabel("teacher neuron")
    ax.set_ylabel("cosine distance to closest recovered neuron")
    if len(thresholds):
        ax.legend(loc="upper right")
    ax.set_title(title or f"alignment ({d.size} teacher neurons)")
    return save_figure(fig, path)


def plot_training(
    history: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Loss curves of the students (one line each) against the training step, on a log axis.

    Parameters
    ----------
    history : the x values under ``"step"`` or ``"epoch"`` and the losses under ``"losses"`` or
        ``"relative_mse"``, either as one mapping of T x values and T loss rows (for each logged
        step, the loss of every student: ``{"epoch": [T], "relative_mse": [T][N]}``, the form
        :func:`~expand_and_cluster.pipeline.train.train_students` logs), or as a list of T records
        ``{"step": s, "losses": [N]}``. A single curve may be given as T numbers. Non-positive
        losses are drawn at the smallest positive float; NaN and Inf (diverged students) are left
        out.
    path : PNG file to write.
    title : figure title.

    Returns
    -------
    The path written.

    Raises
    ------
    ValueError
        If a key is missing or the numbers of x values and loss rows differ.
    """

    def pick(record: Mapping[str, Any], keys: tuple[str, str]) -> str:
        for key in keys:
            if key in record:
                return key
        raise ValueError(f"history: expected a key {keys[0]!r} or {keys[1]!r}")

    records = [history] if isinstance(history, Mapping) else list(history)
    if not records:
        raise ValueError("history: empty")
    x_key = pick(records[0], ("step", "epoch"))
    y_key = pick(records[0], ("losses", "relative_mse"))
    if isinstance(history, Mapping):
        steps, losses = history[x_key], history[y_key]
    else:
        steps = [record[x_key] for record in records]
        losses = [record[y_key] for record in records]
    steps = np.asarray(steps, dtype=np.float64).reshape(-1)
    losses = np.asarray(losses, dtype=np.float64)
    losses = losses.reshape(losses.shape[0], -1) if losses.size else losses.reshape(0, 0)
    if losses.shape[0] != steps.size:
        raise ValueError(f"history: {steps.size} steps but {losses.shape[0]} rows of losses")
    losses = np.where(np.isfinite(losses), np.maximum(losses, np.finfo(np.float64).tiny), np.nan)
    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    for n in range(losses.shape[1]):
        ax.plot(steps, losses[:, n], linewidth=0.8)
    if np.isfinite(losses).any():
        ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key.replace("_", " ").replace("relative mse", "relative MSE"))
    ax.set_title(title or f"training ({losses.shape[1]} students)")
    return save_figure(fig, path)


def plot_suite(rows: list[dict], out: Path) -> list[Path]:
    """Figures: success rate against rho per activation, against each difficulty axis, and the
    time per problem. Returns the paths written."""
    written = []
    acts = sorted({r["activation"] for r in rows})
    fig = new_figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for a in acts:
        sub = [r for r in rows if r["activation"] == a and r["rho"] is not None]
        rhos = sorted({r["rho"] for r in sub})
        if rhos:
            ax.plot(
                rhos,
                [np.mean([r["success"] for r in sub if r["rho"] == q]) for q in rhos],
                marker="o",
                label=a,
            )
    ax.set_xlabel("expansion factor rho")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.05, 1.05)
    if acts:
        ax.legend(fontsize=8)
    written.append(save_figure(fig, out / "success_vs_rho.png"))

    axes = ["d_in", "width", "queries_per_param", "min_angle_degrees", "weak_outgoing"]
    fig = new_figure(figsize=(3 * len(axes), 3))
    axs = fig.subplots(1, len(axes), sharey=True)
    ok = np.array([r["success"] for r in rows], dtype=float)
    for ax, key in zip(axs, axes):
        vals = np.array([r[key] for r in rows], dtype=float)
        # success rate per bin of the axis (at most 5 bins of roughly equal counts)
        edges = np.unique(np.quantile(vals, np.linspace(0, 1, 6))) if len(vals) else []
        if len(edges) >= 2:
            idx = np.clip(np.searchsorted(edges, vals, side="right") - 1, 0, len(edges) - 2)
            centres = [vals[idx == i].mean() for i in range(len(edges) - 1) if (idx == i).any()]
            rates = [ok[idx == i].mean() for i in range(len(edges) - 1) if (idx == i).any()]
            counts = [int((idx == i).sum()) for i in range(len(edges) - 1) if (idx == i).any()]
        else:
            centres, rates, counts = list(vals[:1]), list(ok[:1]), [len(vals)]
        ax.plot(centres, rates, marker="o")
        for c, r_, n in zip(centres, rates, counts):
            ax.annotate(str(n), (c, r_), textcoords="offset points", xytext=(0, 5), fontsize=7)
        if key in ("queries_per_param", "weak_outgoing") and len(vals) and (vals > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylim(-0.05, 1.1)
    axs[0].set_ylabel("success rate (problems per bin)")
    written.append(save_figure(fig, out / "success_vs_axes.png"))

    fig = new_figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.hist([r["seconds"] for r in rows], bins=20)
    ax.set_xlabel("seconds per problem")
    ax.set_ylabel("problems")
    written.append(save_figure(fig, out / "time_per_problem.png"))
    return written


def write_figures(result, folder: str | os.PathLike, alignment: list | None = None) -> list[Path]:
    """The figures of a recovery into ``folder``: ``dendrogram.png`` (and
    ``dendrogram_layer<l>.png`` for deeper layers), ``distance_matrix.png`` (first layer, when at
    most 6,000 student neurons), ``alignment.png`` / ``alignment_layer<l>.png`` (one per entry
    of ``alignment``, :func:`~expand_and_cluster.metrics.deep_alignment`'s list) and
    ``training.png``.

    Parameters
    ----------
    result : a :class:`~expand_and_cluster.pipeline.recover.RecoveryResult`.
    folder : an existing folder.
    alignment : per-layer alignment with a known teacher, or None.

    Returns
    -------
    The paths written.
    """
    folder = Path(folder)
    cfg, layers = result.config, result.layers
    act = get_activation(cfg.activation)
    written = []
    gamma_n = cfg.cluster.gamma * cfg.train.n_students
    for layer in layers:
        name = "dendrogram.png" if layer.layer == 0 else f"dendrogram_layer{layer.layer}.png"
        title = f"hidden layer {layer.layer}" if len(layers) > 1 else "hidden layer"
        written.append(
            plot_dendrogram(
                layer.linkage, layer.cut_height, gamma_n, layer.counts, folder / name, title
            )
        )
    first, mask = layers[0], result.network.input_mask
    m = first.linkage.shape[0] + 1
    if m <= 6000:
        ens = result.training.students
        v = ens.incoming(0).reshape(m, -1)
        keep = np.append(mask, True) if mask is not None else np.ones(v.shape[1], bool)
        v = v[:, torch.as_tensor(keep)].contiguous().cpu()
        dist = ops.cosine_distances(v, absolute=act.symmetry.sign_symmetric).numpy()
        written.append(plot_distance_matrix(dist, first.linkage, folder / "distance_matrix.png"))
    for al in alignment or []:
        name = "alignment.png" if al["layer"] == 0 else f"alignment_layer{al['layer']}.png"
        written.append(plot_alignment(al["per_teacher_neuron"], folder / name))
    if result.training.history:
        written.append(plot_training(result.training.history, folder / "training.png"))
    return written
