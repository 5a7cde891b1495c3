"""The :class:`Network` record: a plain MLP (teacher or recovered) in float64 numpy arrays.

File format (``.npz``, see docs/formats.md): ``weight_0 .. weight_L`` ([out, in]), ``bias_0 ..
bias_L`` ([out]), ``activation`` (string); optional ``linear_weight`` [d_out, d_in] and
``linear_bias`` [d_out] (the linear skip term of a recovered even_linear network), optional
``input_mask`` [d_in] (bool).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .activations import get_activation


@dataclass
class Network:
    """An MLP ``f(x) = W_L s(... s(W_0 x + b_0) ...) + b_L [+ linear_weight x + linear_bias]``.

    Attributes
    ----------
    weights : list of L + 1 float64 arrays ``[out_l, in_l]``.
    biases : list of L + 1 float64 arrays ``[out_l]``.
    activation : name of the hidden activation (see :mod:`expand_and_cluster.activations`).
    linear_weight, linear_bias : optional skip term ``[d_out, d_in]``, ``[d_out]``.
    input_mask : optional ``[d_in]`` bool, inputs that carried signal in the queries.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activation: str
    linear_weight: np.ndarray | None = None
    linear_bias: np.ndarray | None = None
    input_mask: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        get_activation(self.activation)
        self.weights = [np.ascontiguousarray(w, dtype=np.float64) for w in self.weights]
        self.biases = [np.ascontiguousarray(b, dtype=np.float64) for b in self.biases]
        if len(self.weights) < 1 or len(self.weights) != len(self.biases):
            raise ValueError("weights, biases: expected the same number (>= 1) of layers")
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(
                    f"layer {l}: expected weight [out, in] and bias [out], got {w.shape}, {b.shape}"
                )
            if l > 0 and w.shape[1] != self.weights[l - 1].shape[0]:
                raise ValueError(
                    f"weight_{l}: expected {self.weights[l - 1].shape[0]} inputs, got {w.shape[1]}"
                )
        if (self.linear_weight is None) != (self.linear_bias is None):
            raise ValueError("linear_weight and linear_bias: give both or neither")
        if self.linear_weight is not None:
            self.linear_weight = np.ascontiguousarray(self.linear_weight, dtype=np.float64)
            self.linear_bias = np.ascontiguousarray(self.linear_bias, dtype=np.float64)
            if self.linear_weight.shape != (self.d_out, self.d_in) or self.linear_bias.shape != (
                self.d_out,
            ):
                raise ValueError(
                    f"linear_weight/linear_bias: expected [{self.d_out}, {self.d_in}] and "
                    f"[{self.d_out}]"
                )
        if self.input_mask is not None:
            self.input_mask = np.asarray(self.input_mask, dtype=bool)
            if self.input_mask.shape != (self.d_in,):
                raise ValueError(f"input_mask: expected shape [{self.d_in}]")

    @property
    def d_in(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def d_out(self) -> int:
        return int(self.weights[-1].shape[0])

    @property
    def hidden_sizes(self) -> list[int]:
        """Width of each hidden layer."""
        return [int(w.shape[0]) for w in self.weights[:-1]]

    @property
    def n_params(self) -> int:
        n = sum(w.size + b.size for w, b in zip(self.weights, self.biases))
        if self.linear_weight is not None:
            n += self.linear_weight.size + self.linear_bias.size
        return int(n)

    def incoming(self, layer: int) -> np.ndarray:
        """``[out, in + 1]`` incoming vectors [w; b] of the neurons of hidden layer ``layer``."""
        return np.concatenate([self.weights[layer], self.biases[layer][:, None]], axis=1)

    def forward(self, x, dtype: torch.dtype = torch.float64) -> np.ndarray:
        """Outputs ``[P, d_out]`` (numpy, float64) on inputs ``x`` ``[P, d_in]``."""
        act = get_activation(self.activation)
        h = torch.as_tensor(np.asarray(x), dtype=dtype)
        x0 = h
        with torch.no_grad():
            for l, (w, b) in enumerate(zip(self.weights, self.biases)):
                h = h @ torch.as_tensor(w, dtype=dtype).T + torch.as_tensor(b, dtype=dtype)
                if l < len(self.weights) - 1:
                    h = act.fn(h)
            if self.linear_weight is not None:
                h = (
                    h
                    + x0 @ torch.as_tensor(self.linear_weight, dtype=dtype).T
                    + torch.as_tensor(self.linear_bias, dtype=dtype)
                )
        return h.to(torch.float64).numpy()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The ``.npz`` dictionary of this network (docs/formats.md)."""
        out: dict[str, np.ndarray] = {"activation": np.array(self.activation)}
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"weight_{l}"] = w
            out[f"bias_{l}"] = b
        if self.linear_weight is not None:
            out["linear_weight"] = self.linear_weight
            out["linear_bias"] = self.linear_bias
        if self.input_mask is not None:
            out["input_mask"] = self.input_mask
        return out
