"""The student ensemble: N independent MLPs of one architecture, stored as per-layer tensors
``[N, out, in]`` (torch.nn.Linear layout per student, so each student's weights are contiguous).

Source: Martinelli et al. 2024, Sec. 3, step 1 ("Expand"): N students of the teacher's depth and
activation, each hidden layer wider than the teacher's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .activations import get_activation
from .network import Network


@dataclass
class StudentEnsemble:
    """N students sharing an architecture.

    Attributes
    ----------
    weights : list of L + 1 tensors ``[N, out_l, in_l]``.
    biases : list of L + 1 tensors ``[N, out_l]``.
    activation : hidden activation name.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    activation: str

    @classmethod
    def initialise(
        cls,
        n_students: int,
        widths: list[int],
        activation: str,
        seed: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> StudentEnsemble:
        """Kaiming-normal initialisation per student (fan-in of one student, not of all N, unlike
        the reference code), gain ``Activation.init_gain`` in the hidden layers and 1 in the
        output layer, biases 0.

        Parameters
        ----------
        n_students : N >= 1.
        widths : ``[d_in, h_1, ..., h_L, d_out]``.
        seed : the generator seed (the same seed gives the same students).
        """
        act = get_activation(activation)
        if n_students < 1:
            raise ValueError(f"n_students: expected >= 1, got {n_students}")
        if len(widths) < 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths: expected [d_in, hidden..., d_out] all >= 1, got {widths}")
        gen = torch.Generator().manual_seed(int(seed))
        ws, bs = [], []
        for l in range(len(widths) - 1):
            fan_in = widths[l]
            gain = act.init_gain if l < len(widths) - 2 else 1.0
            w = torch.randn(n_students, widths[l + 1], fan_in, generator=gen, dtype=torch.float64)
            ws.append((w * (gain / math.sqrt(fan_in))).to(dtype=dtype, device=device))
            bs.append(torch.zeros(n_students, widths[l + 1], dtype=dtype, device=device))
        return cls(ws, bs, activation)

    @property
    def n_students(self) -> int:
        return int(self.weights[0].shape[0])

    @property
    def widths(self) -> list[int]:
        return [int(self.weights[0].shape[2])] + [int(w.shape[1]) for w in self.weights]

    @property
    def hidden_widths(self) -> list[int]:
        return self.widths[1:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def params(self) -> list[torch.Tensor]:
        return list(self.weights) + list(self.biases)

    def to(self, dtype: torch.dtype | None = None, device=None) -> StudentEnsemble:
        """A copy in another dtype and/or on another device."""
        return StudentEnsemble(
            [w.to(dtype=dtype, device=device).contiguous().clone() for w in self.weights],
            [b.to(dtype=dtype, device=device).contiguous().clone() for b in self.biases],
            self.activation,
        )

    def select(self, index) -> StudentEnsemble:
        """The sub-ensemble of the students in ``index`` (copies)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return StudentEnsemble(
            [w.index_select(0, idx).contiguous() for w in self.weights],
            [b.index_select(0, idx).contiguous() for b in self.biases],
            self.activation,
        )

    def incoming(self, layer: int = 0) -> torch.Tensor:
        """``[N, out_l, in_l + 1]`` the incoming vectors ``[w; b]`` of every student's neurons in
        hidden layer ``layer`` (the vectors the clustering step compares)."""
        return torch.cat([self.weights[layer], self.biases[layer][:, :, None]], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[N, B, d_out]`` (fused kernel)."""
        return ops.mlp_forward(self.weights, self.biases, x.to(self.dtype), self.activation)

    def student(self, n: int) -> Network:
        """Student ``n`` as a float64 :class:`Network`."""
        return Network(
            [w[n].detach().to(torch.float64).cpu().numpy() for w in self.weights],
            [b[n].detach().to(torch.float64).cpu().numpy() for b in self.biases],
            self.activation,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for an ``.npz`` checkpoint: ``weight_l`` [N, out, in], ``bias_l``, activation."""
        out: dict[str, np.ndarray] = {"activation": np.array(self.activation)}
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"weight_{l}"] = w.detach().cpu().numpy()
            out[f"bias_{l}"] = b.detach().cpu().numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays, dtype=None, device="cpu") -> StudentEnsemble:
        """Inverse of :meth:`to_arrays`."""
        n_layers = sum(1 for k in arrays if str(k).startswith("weight_"))
        ws = [torch.as_tensor(np.asarray(arrays[f"weight_{l}"])) for l in range(n_layers)]
        bs = [torch.as_tensor(np.asarray(arrays[f"bias_{l}"])) for l in range(n_layers)]
        dtype = dtype or ws[0].dtype
        return cls(
            [w.to(dtype=dtype, device=device).contiguous() for w in ws],
            [b.to(dtype=dtype, device=device).contiguous() for b in bs],
            str(np.asarray(arrays["activation"])),
        )
