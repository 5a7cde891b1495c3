"""``report.json`` and figures (dendrogram, distance matrix, alignment, training curves).

Every file is written atomically: to a temporary file in the destination's directory, then moved
over the destination with :func:`os.replace`, so a reader never sees a half-written file.

Figures are drawn with matplotlib's object-oriented API on a :class:`matplotlib.figure.Figure`
rendered by the Agg (PNG) canvas: pyplot's global state is never touched, nothing is shown, and
figures are released when the function returns. matplotlib is imported lazily, on the first figure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

#: Required top-level keys of ``report.json`` (docs/DESIGN.md), in the order they are written.
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

#: Above this many leaves the dendrogram shows only the last merges (``truncate_mode="lastp"``).
DENDROGRAM_MAX_LEAVES = 2000
#: Number of clusters shown by a truncated dendrogram.
DENDROGRAM_LASTP = 200
#: Trees deeper than this are truncated too (scipy's dendrogram recurses once per tree level).
_DENDROGRAM_MAX_DEPTH = 500
#: Smallest value drawn on the logarithmic axes of the alignment figure.
ALIGNMENT_FLOOR = 1e-16


# ------------------------------------------------------------------------------------------------
# atomic files and JSON
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success move it over ``path``.

    The temporary file lives in the destination's directory (so :func:`os.replace` is an atomic
    rename on the same file system) and is created with the usual permissions (``0o666`` minus the
    umask). If the ``with`` block raises, the temporary file is removed and ``path`` is untouched.

    Parameters
    ----------
    path : destination file; its directory must exist.
    mode : ``"wb"`` (binary) or ``"w"`` (text, UTF-8).

    Yields
    ------
    file object open for writing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays as Python numbers and lists, NaN and Inf as ``None``.

    Mappings become dicts (keys converted with ``str``), tuples and other sequences lists, paths
    strings.

    Raises
    ------
    TypeError
        For an object that has no JSON form.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (Sequence, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot write an object of type {type(obj).__name__} to JSON")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2, :func:`to_jsonable` conversions) atomically.

    Returns
    -------
    The path written.
    """
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")
    return Path(path)


def build_report(**fields: Any) -> dict[str, Any]:
    """The ``report.json`` object of a run (schema in docs/DESIGN.md).

    Parameters
    ----------
    **fields
        Every key of :data:`REPORT_KEYS`: ``version`` (str), ``backend`` (``"cpu"`` or
        ``"cuda"``), ``activation``, ``dtype`` (str), ``students`` (N), ``student_widths`` (per
        hidden layer), ``gamma``, ``beta_degrees``, ``queries`` (``{"train": P, "held_out": P2,
        "source": str}``), ``recovered_sizes``, ``teacher_sizes`` (list or None), ``alignment``
        (None or a list of ``{"layer", "per_teacher_neuron", "median", "max", ...}``),
        ``student_losses`` (relative MSE per student), ``recovered_relative_mse`` (``{"train",
        "held_out"}``), ``timings_s`` (``{"probe", "train", "cluster", "finetune", "total"}``,
        seconds). Further keys (``input_mask``, ``expansion_search``, ``dropped_clusters``,
        ``cut_height``, ...) are kept after the required ones.

    Returns
    -------
    dict with the required keys first, in schema order, then the extra keys in the order given.
    Values are not converted; :func:`write_json_atomic` does that.

    Raises
    ------
    ValueError
        Naming the first missing key (``"timings_s.cluster"`` for a nested one), or a ``backend``
        other than ``"cpu"``/``"cuda"``.
    """
    for key in REPORT_KEYS:
        if key not in fields:
            raise ValueError(f"report: missing key {key!r}")
    for key, nested in REPORT_NESTED_KEYS.items():
        if not isinstance(fields[key], Mapping):
            raise ValueError(f"report: {key!r} must be an object with keys {', '.join(nested)}")
        for sub in nested:
            if sub not in fields[key]:
                raise ValueError(f"report: missing key '{key}.{sub}'")
    if fields["backend"] not in ("cpu", "cuda"):
        raise ValueError(f"report: backend must be 'cpu' or 'cuda', got {fields['backend']!r}")
    if fields["alignment"] is not None:
        for i, entry in enumerate(fields["alignment"]):
            for sub in ALIGNMENT_KEYS:
                if sub not in entry:
                    raise ValueError(f"report: missing key 'alignment[{i}].{sub}'")
    report = {key: fields[key] for key in REPORT_KEYS}
    report.update((k, v) for k, v in fields.items() if k not in report)
    return report


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------


def _new_figure(**kwargs: Any):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
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


def cluster_counts(linkage: np.ndarray, min_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Number of clusters of size >= ``min_size`` after each merge of an agglomerative tree.

    One pass over the merge list: a merge of clusters of sizes s_a and s_b removes the clusters
    that were large enough and adds the merged one if it is (Martinelli et al. 2024, Sec. 3,
    tree cut; the cut is taken where this count first reaches its maximum).

    Parameters
    ----------
    linkage : ``[M - 1, 4]`` scipy linkage matrix.
    min_size : gamma * N.

    Returns
    -------
    heights : ``[M]`` float64, 0 then the merge heights.
    counts : ``[M]`` int64, the count before any merge, then after each merge.
    """
    z = _check_linkage(linkage)
    m = z.shape[0] + 1
    sizes = np.concatenate([np.ones(m), z[:, 3]])
    big = sizes >= min_size
    a, b = z[:, 0].astype(np.int64), z[:, 1].astype(np.int64)
    delta = big[m:].astype(np.int64) - big[a] - big[b]
    counts = np.concatenate([[int(big[:m].sum())], int(big[:m].sum()) + np.cumsum(delta)])
    return np.concatenate([[0.0], z[:, 2]]), counts


def plot_dendrogram(
    linkage: np.ndarray,
    cut_height: float,
    gamma_n: float,
    path: str | os.PathLike,
    title: str = "",
    counts: np.ndarray | None = None,
) -> Path:
    """Dendrogram of one layer's clustering, with the tree cut, next to the cluster-count curve.

    Left panel: the dendrogram (heights on a log axis, zero heights drawn at half the smallest
    positive height), clusters below the cut coloured, a horizontal line at ``cut_height``. For
    more than :data:`DENDROGRAM_MAX_LEAVES` leaves (or a very deep tree) only the last
    :data:`DENDROGRAM_LASTP` merges are drawn (``truncate_mode="lastp"``), so drawing stays fast
    and never hits Python's recursion limit (the reference code crashes above 15,000 vectors).
    Right panel, sharing the height axis: the number of clusters of size >= gamma * N against
    height (:func:`cluster_counts`).

    Parameters
    ----------
    linkage : ``[M - 1, 4]`` scipy linkage matrix (M clustered neuron vectors).
    cut_height : height at which the tree is cut (distance units of the linkage).
    gamma_n : minimum cluster size gamma * N.
    path : PNG file to write.
    title : figure title.
    counts : ``[M - 1]`` number of clusters of size >= gamma * N after each merge, when the
        caller has it (the tree cut computes it); None: computed with :func:`cluster_counts`.

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
    heights, all_counts = cluster_counts(z, gamma_n)
    if counts is not None:
        counts = np.asarray(counts).reshape(-1)
        if counts.size != m - 1:
            raise ValueError(f"counts: expected {m - 1} entries (one per merge), got {counts.size}")
        all_counts = np.concatenate([all_counts[:1], counts])
    positive = z[:, 2][z[:, 2] > 0]
    log = positive.size > 0
    floor = positive.min() / 2 if log else 0.0

    fig = _new_figure(figsize=(10, 4.5))
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
    return _save_figure(fig, path)


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

    fig = _new_figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(block, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="distance")
    ax.set_xticks([])
    ax.set_yticks([])
    shown = f"{order.size} of {m}" if order.size < m else f"{m}"
    ax.set_xlabel(f"{shown} vectors, dendrogram order")
    ax.set_title(title or "pairwise distances")
    return _save_figure(fig, path)


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
    fig = _new_figure(figsize=(max(4.0, min(0.15 * d.size + 2, 16.0)), 4))
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
    return _save_figure(fig, path)


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
        :mod:`expand_and_cluster.training` logs), or as a list of T records
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
    fig = _new_figure(figsize=(6, 4))
    ax = fig.subplots()
    for n in range(losses.shape[1]):
        ax.plot(steps, losses[:, n], linewidth=0.8)
    if np.isfinite(losses).any():
        ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key.replace("_", " ").replace("relative mse", "relative MSE"))
    ax.set_title(title or f"training ({losses.shape[1]} students)")
    return _save_figure(fig, path)
