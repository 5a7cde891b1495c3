"""Files: atomic writes, JSON, network files, query files and query inputs
(docs/formats.md), and the output folder of a run.

Every file is written atomically: to a temporary file in the destination's directory, then moved
over the destination with :func:`os.replace`, so a reader never sees a half-written file. Every
problem with a user's file raises :class:`~expand_and_cluster.errors.InputError` with a one-line
message that names the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..activations import ACTIVATIONS
from ..errors import InputError
from ..network import Network

_NETWORK_OPTIONAL_KEYS = ("linear_weight", "linear_bias", "input_mask")


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


def _known_activations() -> str:
    return ", ".join(sorted(ACTIVATIONS))


def check_activation(name: Any, where: str) -> str:
    """``name`` when it is a known activation, else InputError naming ``where`` and listing the
    known ones."""
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


def check_finite_rows(a: np.ndarray, name: str, path: Path | str) -> None:
    """InputError naming ``path``, the array ``name`` and how many of its rows hold NaN/Inf."""
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
        check_activation(stored, f"{path}: activation")
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
        check_activation(activation, "activation")
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
    check_finite_rows(x, "X", path)
    check_finite_rows(y, "Y", path)
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
    check_finite_rows(x, "the inputs", path)
    return x
