"""Teachers and their queries: probing a network, query augmentation, the digits teacher of the
demo and planted teachers of the tests and suites.

Every problem with a user's argument raises :class:`~expand_and_cluster.errors.InputError` with a
one-line message that names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .activations import get_activation
from .errors import InputError
from .io.files import check_activation, check_finite_rows
from .network import Network

#: Query distributions of :func:`probe`. Both have zero mean and unit variance per input.
PROBE_DISTRIBUTIONS = ("gaussian", "uniform")


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
        check_finite_rows(x, "inputs", "inputs")
    return x, net.forward(x)


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

    act = get_activation(check_activation(activation, "activation"))
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
    act = get_activation(check_activation(activation, "activation"))
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
