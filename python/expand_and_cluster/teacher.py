"""Teachers and queries: network and query files, probing, query augmentation, demo teachers.

File formats (docs/DESIGN.md, "Files"):

- network file ``.npz``: ``weight_0 .. weight_L`` ([out, in]), ``bias_0 .. bias_L`` ([out]),
  ``activation`` (string); optional ``linear_weight`` [d_out, d_in], ``linear_bias`` [d_out],
  ``input_mask`` [d_in] (bool). A torch ``state_dict`` (``.pt``/``.pth``) of an ``nn.Sequential``
  of ``Linear`` layers is accepted too, with the activation given separately.
- query file ``.npz``: ``X`` [P, d_in], ``Y`` [P, d_out] (black-box mode: no teacher weights).

Every problem with a user's file raises :class:`~expand_and_cluster.errors.InputError` with a
one-line message that names the file and what is wrong.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .activations import ACTIVATIONS, get_activation
from .errors import InputError
from .network import Network
from .report import atomic_write

#: Query distributions of :func:`probe`. Both have zero mean and unit variance per input.
PROBE_DISTRIBUTIONS = ("gaussian", "uniform")

_NETWORK_OPTIONAL_KEYS = ("linear_weight", "linear_bias", "input_mask")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _known_activations() -> str:
    return ", ".join(sorted(ACTIVATIONS))


def _check_activation(name: Any, where: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise InputError(
            f"{where}: unknown activation {name!r}; expected one of {_known_activations()}"
        )
    return name


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    return path


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (no pickles), or InputError."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: not an .npz archive ({what} expected)")
        with data:
            return {key: data[key] for key in data.files}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _float_array(a: np.ndarray, name: str, path: Path) -> np.ndarray:
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise InputError(f"{path}: {name} has non-numeric dtype {a.dtype}")
    return np.asarray(a, dtype=np.float64)


def _check_finite_rows(a: np.ndarray, name: str, path: Path | str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        rows = int(bad.reshape(bad.shape[0], -1).any(axis=1).sum()) if a.ndim else 1
        raise InputError(f"{path}: {name} has NaN or Inf values in {rows} of {len(a)} rows")


# ------------------------------------------------------------------------------------------------
# network files
# ------------------------------------------------------------------------------------------------


def _npz_layers(keys: Sequence[str], path: Path) -> list[int]:
    """Layer indices 0..L of the ``weight_<i>`` keys, checked to have no gaps."""
    idx = sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"weight_(\d+)", k)))
    if not idx:
        raise InputError(f"{path}: missing key weight_0 (no layers found)")
    missing = [f"weight_{i}" for i in range(idx[-1] + 1) if i not in idx]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    return idx


def _network_from_layers(
    path: Path,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    names: list[tuple[str, str]],
    activation: str,
    extra: dict[str, np.ndarray],
) -> Network:
    """Validate shapes and values layer by layer (messages naming the keys), build the Network."""
    for l, ((wname, bname), w, b) in enumerate(zip(names, weights, biases)):
        if w.ndim != 2:
            raise InputError(f"{path}: {wname} must be 2-D [out, in], got shape {list(w.shape)}")
        if b.shape != (w.shape[0],):
            raise InputError(
                f"{path}: {bname} must have shape [{w.shape[0]}] to match {wname} "
                f"{list(w.shape)}, got {list(b.shape)}"
            )
        if l > 0 and w.shape[1] != weights[l - 1].shape[0]:
            raise InputError(
                f"{path}: {wname} has {w.shape[1]} inputs but {names[l - 1][0]} has "
                f"{weights[l - 1].shape[0]} outputs"
            )
        for name, a in ((wname, w), (bname, b)):
            if not np.isfinite(a).all():
                raise InputError(
                    f"{path}: {name} has {int((~np.isfinite(a)).sum())} NaN/Inf values"
                )
    d_in, d_out = weights[0].shape[1], weights[-1].shape[0]
    expected = {"linear_weight": (d_out, d_in), "linear_bias": (d_out,), "input_mask": (d_in,)}
    for name, a in extra.items():
        if a.shape != expected[name]:
            raise InputError(
                f"{path}: {name} must have shape {list(expected[name])}, got {list(a.shape)}"
            )
        if name != "input_mask" and not np.isfinite(a).all():
            raise InputError(f"{path}: {name} has {int((~np.isfinite(a)).sum())} NaN/Inf values")
    if ("linear_weight" in extra) != ("linear_bias" in extra):
        have, lack = (
            ("linear_weight", "linear_bias")
            if "linear_weight" in extra
            else ("linear_bias", "linear_weight")
        )
        raise InputError(f"{path}: has {have} but is missing key {lack}")
    try:
        return Network(weights, biases, activation, **extra)
    except ValueError as e:  # all checked above; kept so no ValueError escapes as a traceback
        raise InputError(f"{path}: {e}") from None


def _load_network_npz(path: Path, activation: str | None) -> Network:
    data = _load_npz(path, "network file with weight_0, bias_0, ..., activation")
    layers = _npz_layers(list(data), path)
    missing = [f"bias_{i}" for i in layers if f"bias_{i}" not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    if "activation" in data:
        stored = data["activation"]
        if stored.ndim != 0 or stored.dtype.kind not in "US":
            raise InputError(
                f"{path}: activation must be a string, got {stored.dtype} {stored.shape}"
            )
        stored = str(stored[()].decode() if stored.dtype.kind == "S" else stored[()])
        _check_activation(stored, f"{path}: activation")
        if activation is not None and activation != stored:
            raise InputError(
                f"{path}: the file's activation is {stored!r} but {activation!r} was given"
            )
        activation = stored
    elif activation is None:
        raise InputError(f"{path}: missing key activation (give the activation explicitly)")
    names = [(f"weight_{i}", f"bias_{i}") for i in layers]
    weights = [_float_array(data[w], w, path) for w, _ in names]
    biases = [_float_array(data[b], b, path) for _, b in names]
    extra = {}
    for key in _NETWORK_OPTIONAL_KEYS:
        if key in data:
            a = data[key]
            extra[key] = a.astype(bool) if key == "input_mask" else _float_array(a, key, path)
    return _network_from_layers(path, weights, biases, names, activation, extra)


def _load_network_state_dict(path: Path, activation: str | None) -> Network:
    if activation is None:
        raise InputError(
            f"{path}: a torch state_dict has no activation; give it explicitly (--activation)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise InputError(f"{path}: not a loadable torch state_dict ({_first_line(e)})") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    matches = {k: re.fullmatch(r"(?:(.*)\.)?(\d+)\.(weight|bias)", k) for k in state}
    unexpected = [k for k, m in matches.items() if m is None]
    if unexpected:
        raise InputError(
            f"{path}: unexpected key(s) {', '.join(unexpected[:5])}; expected the Linear layers "
            f"of an nn.Sequential ('0.weight', '0.bias', '2.weight', ...)"
        )
    if not matches:
        raise InputError(f"{path}: empty state_dict (no Linear layers)")
    prefixes = {m.group(1) or "" for m in matches.values()}
    if len(prefixes) > 1:
        raise InputError(f"{path}: keys of several modules ({', '.join(sorted(prefixes))})")
    prefix = prefixes.pop()
    prefix = f"{prefix}." if prefix else ""
    layers = sorted({int(m.group(2)) for m in matches.values()})
    names, weights, biases = [], [], []
    for i in layers:
        wname, bname = f"{prefix}{i}.weight", f"{prefix}{i}.bias"
        if wname not in state:
            raise InputError(f"{path}: missing key {wname}")
        weights.append(state[wname].detach().to(torch.float64).numpy())
        # nn.Linear(bias=False) has no bias entry: its bias is zero.
        biases.append(
            state[bname].detach().to(torch.float64).numpy()
            if bname in state
            else np.zeros(weights[-1].shape[0])
        )
        names.append((wname, bname))
    return _network_from_layers(path, weights, biases, names, activation, {})


def load_network(path: str | os.PathLike, activation: str | None = None) -> Network:
    """Load a network (teacher or recovered) from a ``.npz`` network file or a torch state_dict.

    Parameters
    ----------
    path : ``.npz`` network file (module docstring), or ``.pt``/``.pth`` torch ``state_dict`` of
        an ``nn.Sequential`` of ``nn.Linear`` layers (keys ``"0.weight"``, ``"0.bias"``,
        ``"2.weight"``, ..., optionally all under one prefix such as ``"net."``; the Linear layers
        are taken in order of their index, activation modules have no entries; a Linear layer
        without bias gets a zero bias). The file is read with ``weights_only=True`` (no pickles).
    activation : hidden activation. Required for a state_dict; for an ``.npz`` it may be left out
        and must otherwise agree with the file's.

    Returns
    -------
    :class:`~expand_and_cluster.network.Network` with float64 weights.

    Raises
    ------
    InputError
        Naming the file and the problem: missing file, unknown suffix, not loadable, missing keys
        (named), shapes that do not chain, NaN/Inf values, unknown activation (known ones listed),
        activation missing or disagreeing with the file.
    """
    path = _existing_file(path)
    if activation is not None:
        _check_activation(activation, "activation")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_network_npz(path, activation)
    if suffix in (".pt", ".pth"):
        return _load_network_state_dict(path, activation)
    raise InputError(f"{path}: unknown network file type {suffix!r}; expected .npz, .pt or .pth")


def save_network(net: Network, path: str | os.PathLike) -> Path:
    """Write ``net`` as an ``.npz`` network file, atomically (temporary file + ``os.replace``).

    The file is written at exactly ``path`` (no ``.npz`` is appended); ``load_network`` of it
    returns bit-identical arrays.

    Returns
    -------
    The path written.
    """
    with atomic_write(path, "wb") as f:
        np.savez(f, **net.to_arrays())
    return Path(path)


# ------------------------------------------------------------------------------------------------
# query files
# ------------------------------------------------------------------------------------------------


def load_queries(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a query file (black-box mode).

    Parameters
    ----------
    path : ``.npz`` with ``X`` [P, d_in] and ``Y`` [P, d_out] (a 1-D ``Y`` is read as [P, 1]).

    Returns
    -------
    X : ``[P, d_in]`` float64.
    Y : ``[P, d_out]`` float64.

    Raises
    ------
    InputError
        Missing file, not an ``.npz``, missing ``X`` or ``Y``, ``X`` not 2-D, ``Y`` not 1-D or
        2-D, non-numeric values, different numbers of rows, fewer than 2 queries, NaN/Inf (the
        message names the array and counts the rows).
    """
    path = _existing_file(path)
    data = _load_npz(path, "query file with X and Y")
    missing = [k for k in ("X", "Y") if k not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    x, y = _float_array(data["X"], "X", path), _float_array(data["Y"], "Y", path)
    if x.ndim != 2:
        raise InputError(f"{path}: X must be 2-D [P, d_in], got shape {list(x.shape)}")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise InputError(f"{path}: Y must be 2-D [P, d_out], got shape {list(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{path}: X has {x.shape[0]} rows but Y has {y.shape[0]}")
    if x.shape[0] < 2:
        raise InputError(f"{path}: {x.shape[0]} queries; at least 2 are needed")
    if x.shape[1] < 1 or y.shape[1] < 1:
        raise InputError(f"{path}: X and Y need at least one column, got {x.shape}, {y.shape}")
    _check_finite_rows(x, "X", path)
    _check_finite_rows(y, "Y", path)
    return x, y


def save_queries(path: str | os.PathLike, X: np.ndarray, Y: np.ndarray) -> Path:
    """Write a query file (``X`` [P, d_in], ``Y`` [P, d_out] or [P], as float64), atomically.

    Returns
    -------
    The path written.

    Raises
    ------
    ValueError
        If ``X`` is not 2-D or the numbers of rows differ.
    """
    x = np.asarray(X, dtype=np.float64)
    y = np.asarray(Y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"X, Y: expected [P, d_in] and [P, d_out], got {x.shape} and {y.shape}")
    with atomic_write(path, "wb") as f:
        np.savez(f, X=x, Y=y)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# probing and augmentation
# ------------------------------------------------------------------------------------------------


def sample_inputs(n: int, d_in: int, distribution: str, seed: int) -> np.ndarray:
    """``[n, d_in]`` float64 inputs: ``"gaussian"`` N(0, 1) or ``"uniform"`` U[-sqrt 3, sqrt 3].

    Both distributions have zero mean and unit variance per input; draws use
    ``numpy.random.default_rng(seed)``.

    Raises
    ------
    InputError
        Unknown distribution, or ``n`` < 1.
    """
    if distribution not in PROBE_DISTRIBUTIONS:
        raise InputError(
            f"distribution: unknown {distribution!r}; expected one of "
            f"{', '.join(PROBE_DISTRIBUTIONS)}"
        )
    if int(n) < 1:
        raise InputError(f"number of queries: expected >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if distribution == "gaussian":
        return rng.standard_normal((int(n), d_in))
    return rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), size=(int(n), d_in))


def probe(
    net: Network,
    n: int,
    distribution: str = "gaussian",
    seed: int = 0,
    inputs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Query a teacher: draw inputs (or take the given ones) and evaluate the network on them.

    Parameters
    ----------
    net : the teacher.
    n : number of queries to draw (ignored when ``inputs`` is given).
    distribution : ``"gaussian"`` (N(0, 1)) or ``"uniform"`` (U[-sqrt 3, sqrt 3], unit variance);
        see :func:`sample_inputs`.
    seed : seed of the input draw.
    inputs : ``[P, d_in]`` inputs to use instead of random ones.

    Returns
    -------
    X : ``[P, d_in]`` float64.
    Y : ``[P, d_out]`` float64, ``net.forward(X)`` (raw outputs, no softmax).

    Raises
    ------
    InputError
        Unknown distribution, ``n`` < 1, or ``inputs`` of the wrong shape or with NaN/Inf.
    """
    if inputs is None:
        x = sample_inputs(n, net.d_in, distribution, seed)
    else:
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != net.d_in or x.shape[0] < 1:
            raise InputError(
                f"inputs: expected shape [P, {net.d_in}] with P >= 1, got {list(x.shape)}"
            )
        _check_finite_rows(x, "inputs", "inputs")
    return x, net.forward(x)


def load_probe_inputs(path: str | os.PathLike, d_in: int | None = None) -> np.ndarray:
    """Load query inputs from a ``.npy`` file.

    Parameters
    ----------
    path : ``.npy`` holding a numeric ``[P, d_in]`` array (``[P]`` is read as ``[P, 1]``).
    d_in : expected input dimension (the teacher's), checked when given.

    Returns
    -------
    ``[P, d_in]`` float64.

    Raises
    ------
    InputError
        Missing file, not a ``.npy`` array, non-numeric, not 1-D/2-D, empty, wrong dimension,
        NaN/Inf.
    """
    path = _existing_file(path)
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({_first_line(e)})") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise InputError(f"{path}: expected a .npy array, got an .npz archive")
    x = _float_array(a, "the inputs", path)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] < 1:
        raise InputError(f"{path}: expected inputs [P, d_in] with P >= 1, got {list(a.shape)}")
    if d_in is not None and x.shape[1] != d_in:
        raise InputError(f"{path}: inputs have dimension {x.shape[1]}, the teacher expects {d_in}")
    _check_finite_rows(x, "the inputs", path)
    return x


def biased_noise_augmentation(
    X: np.ndarray, rng: np.random.Generator, scale: float = 1.0
) -> np.ndarray:
    """Biased-noise query augmentation: ``[X; X + scale U[0, 1]; X + scale U[-1, 0]]``.

    Each query input gets two noisy copies, one with independent U[0, 1] noise added to every
    entry (shifted up) and one with U[-1, 0] noise (shifted down). Source: Beiser, Martinelli,
    Gerstner, Brea, "Data Augmentation Techniques to Reverse-Engineer Neural Network Weights from
    Input-Output Queries", arXiv 2410.03972, the biased-noise augmentation, which (unlike
    rotations, flips and zero-mean noise) let teachers with many more parameters than query
    points be recovered.

    Parameters
    ----------
    X : ``[P, d_in]`` inputs.
    rng : numpy random generator.
    scale : noise amplitude (in input units).

    Returns
    -------
    ``[3 P, d_in]`` float64: the original rows, then the up-shifted copies, then the down-shifted.
    """
    x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"X: expected [P, d_in], got shape {x.shape}")
    up = x + scale * rng.uniform(0.0, 1.0, size=x.shape)
    down = x - scale * rng.uniform(0.0, 1.0, size=x.shape)
    return np.concatenate([x, up, down], axis=0)


# ------------------------------------------------------------------------------------------------
# demo and test teachers
# ------------------------------------------------------------------------------------------------


def train_digits_teacher(
    width: int | Sequence[int] = 16,
    activation: str = "tanh",
    seed: int = 0,
    epochs: int = 300,
    lr: float = 1e-2,
    test_fraction: float = 0.2,
) -> tuple[Network, np.ndarray, dict[str, Any]]:
    """Train a 64-width-10 MLP (or 64-k1-k2-...-10) on scikit-learn's digits: the demo teacher.

    The 1797 8x8 digit images (``sklearn.datasets.load_digits``, shipped with scikit-learn, no
    download) are scaled to [0, 1] (pixel / 16). A seeded permutation holds out
    ``test_fraction`` of them; the network is trained on the rest with full-batch Adam on the
    cross-entropy of its raw outputs (logits), in float64. Deterministic for a seed; about a second
    for the defaults on 2 CPU cores (test accuracy ~ 0.95).

    Parameters
    ----------
    width : hidden width, or one width per hidden layer.
    activation : hidden activation (a name from the registry).
    seed : seed of the split and of the initialisation (PyTorch-default uniform
        U[-1/sqrt(fan_in), 1/sqrt(fan_in)] for weights and biases).
    epochs : number of full-batch Adam steps.
    lr : Adam learning rate.
    test_fraction : fraction of the images held out to measure the test accuracy.

    Returns
    -------
    network : the teacher (``activation``, float64 weights, layers [width, 64] and [10, width],
        or one layer per given width).
    X : ``[1797, 64]`` float64, all scaled images (the teacher's training inputs, usable as
        queries).
    info : ``{"train_accuracy", "test_accuracy", "n_train", "n_test", "epochs"}``.

    Raises
    ------
    InputError
        Unknown activation, width < 1, epochs < 1 or test_fraction outside (0, 1).
    """
    from sklearn.datasets import load_digits

    act = get_activation(_check_activation(activation, "activation"))
    widths = [int(width)] if np.ndim(width) == 0 else [int(w) for w in width]
    if not widths or min(widths) < 1 or int(epochs) < 1 or not 0.0 < test_fraction < 1.0:
        raise InputError(
            f"digits teacher: expected width >= 1, epochs >= 1, 0 < test_fraction < 1, got "
            f"{width}, {epochs}, {test_fraction}"
        )
    digits = load_digits()
    x_all = np.asarray(digits.data, dtype=np.float64) / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x_all))
    n_test = int(round(test_fraction * len(x_all)))
    test, train = order[:n_test], order[n_test:]

    gen = torch.Generator().manual_seed(int(seed))

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / np.sqrt(fan_in)
        t = torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
        return t.requires_grad_(True)

    d_in, d_out = x_all.shape[1], 10
    sizes = [d_in, *widths, d_out]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params += [uniform((fan_out, fan_in), fan_in), uniform((fan_out,), fan_in)]
    xt, yt = torch.as_tensor(x_all), torch.as_tensor(labels)

    def logits(x: torch.Tensor) -> torch.Tensor:
        h = x
        for l in range(0, len(params) - 2, 2):
            h = act.fn(h @ params[l].T + params[l + 1])
        return h @ params[-2].T + params[-1]

    opt = torch.optim.Adam(params, lr=lr)
    # The matrices are tiny: one thread is faster than several, by far on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(int(epochs)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits(xt[train]), yt[train])
            loss.backward()
            opt.step()
        with torch.no_grad():
            correct = (logits(xt).argmax(dim=1) == yt).numpy()
    finally:
        torch.set_num_threads(threads)
    net = Network(
        [p.detach().numpy().copy() for p in params[0::2]],
        [p.detach().numpy().copy() for p in params[1::2]],
        activation,
    )
    info = {
        "train_accuracy": float(correct[train].mean()),
        "test_accuracy": float(correct[test].mean()),
        "n_train": int(train.size),
        "n_test": int(test.size),
        "epochs": int(epochs),
    }
    return net, x_all, info


def _pairwise_min_angle_ok(
    candidate: np.ndarray, accepted: list[np.ndarray], min_cos: float, sign_symmetric: bool
) -> bool:
    if not accepted:
        return True
    u = candidate / np.linalg.norm(candidate)
    v = np.stack(accepted)
    cos = v @ u / np.linalg.norm(v, axis=1)
    return bool(np.all((np.abs(cos) if sign_symmetric else cos) <= min_cos))


#: Output weights of a planted teacher have magnitude >= this / sqrt(fan_in).
PLANTED_MIN_OUTPUT_WEIGHT = 0.3
#: Standard deviation of a planted teacher's biases.
PLANTED_BIAS_STD = 0.2
_PLANTED_MAX_DRAWS = 10_000


def planted_teacher(
    d_in: int,
    widths: Sequence[int],
    d_out: int,
    activation: str,
    seed: int,
    min_angle_degrees: float | None = None,
) -> Network:
    """A random teacher whose every neuron matters and whose neurons are well separated.

    - Hidden layer 0: weights N(0, 1 / fan_in), so that a pre-activation has variance ~1 for
      unit-variance inputs; hidden layer l >= 1: weights N(0, 1 / (fan_in m_l)), m_l the mean
      square of layer l - 1's activations on standard Gaussian inputs, so that its
      pre-activations have variance ~1 too; biases N(0, :data:`PLANTED_BIAS_STD`^2).
    - Output layer: weights N(0, 1) / sqrt(fan_in), redrawn while their magnitude is below
      :data:`PLANTED_MIN_OUTPUT_WEIGHT` / sqrt(fan_in), so no neuron is silent; biases as above.
    - With ``min_angle_degrees``, the incoming vectors [w; b] of the neurons of each hidden layer
      are pairwise at least that angle apart (for a sign-symmetric activation the angle between
      lines, i.e. v and -v count as the same direction): a neuron that is too close to an earlier
      one is redrawn.

    Parameters
    ----------
    d_in, d_out : input and output dimensions.
    widths : hidden widths, one per hidden layer (at least one).
    activation : hidden activation name.
    seed : seed of ``numpy.random.default_rng``; the same seed gives the same teacher.
    min_angle_degrees : minimum pairwise angle, in degrees, or None.

    Returns
    -------
    :class:`~expand_and_cluster.network.Network`, float64.

    Raises
    ------
    InputError
        Non-positive sizes, unknown activation, an angle outside [0, 90) (sign-symmetric
        activations) or [0, 180), or a layer whose neurons cannot be placed that far apart
        (10,000 redraws of one neuron failed).
    """
    act = get_activation(_check_activation(activation, "activation"))
    widths = [int(w) for w in widths]
    if int(d_in) < 1 or int(d_out) < 1 or not widths or min(widths) < 1:
        raise InputError(
            f"planted teacher: expected positive sizes, got d_in={d_in}, widths={widths}, "
            f"d_out={d_out}"
        )
    sign_symmetric = act.symmetry.sign_symmetric
    if min_angle_degrees is not None:
        limit = 90.0 if sign_symmetric else 180.0
        if not 0.0 <= min_angle_degrees < limit:
            raise InputError(
                f"min_angle_degrees: expected in [0, {limit:g}), got {min_angle_degrees}"
            )
        min_cos = float(np.cos(np.deg2rad(min_angle_degrees)))
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    fan_in = int(d_in)
    # Unit-variance inputs feed layer 0; deeper layers get their weights rescaled so that their
    # pre-activations have variance ~1 too (measured on a fixed Gaussian sample that does not touch
    # ``rng``): otherwise a tanh layer on tanh outputs works in its nearly linear range and its
    # neurons are barely identifiable.
    sample = np.random.default_rng(12345).standard_normal((4096, int(d_in)))
    gain = 1.0
    for l, width in enumerate(widths):
        accepted: list[np.ndarray] = []
        for _ in range(width):
            for _draw in range(_PLANTED_MAX_DRAWS):
                v = np.concatenate(
                    [
                        gain * rng.standard_normal(fan_in) / np.sqrt(fan_in),
                        PLANTED_BIAS_STD * rng.standard_normal(1),
                    ]
                )
                if min_angle_degrees is None or _pairwise_min_angle_ok(
                    v, accepted, min_cos, sign_symmetric
                ):
                    break
            else:
                raise InputError(
                    f"planted teacher: cannot place {width} neurons of hidden layer {l} "
                    f"({fan_in + 1}-dimensional [w; b]) at least {min_angle_degrees} degrees apart"
                )
            accepted.append(v)
        layer = np.stack(accepted)
        weights.append(layer[:, :-1])
        biases.append(layer[:, -1])
        fan_in = width
        with torch.no_grad():
            sample = act.fn(torch.as_tensor(sample @ layer[:, :-1].T + layer[:, -1])).numpy()
        gain = 1.0 / max(float(np.sqrt(np.mean(sample**2))), 1e-3)
    z = rng.standard_normal((int(d_out), fan_in))
    small = np.abs(z) < PLANTED_MIN_OUTPUT_WEIGHT
    while small.any():
        z[small] = rng.standard_normal(int(small.sum()))
        small = np.abs(z) < PLANTED_MIN_OUTPUT_WEIGHT
    weights.append(z / np.sqrt(fan_in))
    biases.append(PLANTED_BIAS_STD * rng.standard_normal(int(d_out)))
    return Network(weights, biases, activation)
