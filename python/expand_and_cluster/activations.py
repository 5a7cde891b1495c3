"""Activation registry: one record per activation (name, torch function, C++ code, symmetry class).

The symmetry classes follow Martinelli et al., ICML 2024, Sec. 3 ("symmetries of the activation"),
as tabulated in docs/method.md:

========================  ==============================  ====================================
symmetry class            identity                        effect of flipping v -> -v
========================  ==============================  ====================================
none                      --                              not allowed
odd                       s(-z) = -s(z)                   outgoing a -> -a
odd_constant              s(-z) = 1 - s(z)                a -> -a, next layer's bias += a
even_linear               s(z) - s(-z) = z                a unchanged, leaves a linear term a z
even_linear_positive_     relu(cz) = c relu(z), c > 0,    as even_linear (the linear term is
scaling                   and s(z) - s(-z) = (1+alpha) z  (1 + alpha) a z for leaky_relu)
========================  ==============================  ====================================
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class SymmetryClass(str, enum.Enum):
    """Symmetry class of an activation (see the module docstring)."""

    NONE = "none"
    ODD = "odd"
    ODD_CONSTANT = "odd_constant"
    EVEN_LINEAR = "even_linear"
    EVEN_LINEAR_POSITIVE_SCALING = "even_linear_positive_scaling"

    @property
    def sign_symmetric(self) -> bool:
        """True when v and -v describe the same neuron (up to outgoing-weight changes)."""
        return self is not SymmetryClass.NONE

    @property
    def scale_symmetric(self) -> bool:
        """True when only the direction of v is identifiable (positive scaling moves to a)."""
        return self is SymmetryClass.EVEN_LINEAR_POSITIVE_SCALING

    @property
    def has_linear_term(self) -> bool:
        """True when flipped neurons leave a linear map that a skip term must absorb."""
        return self in (SymmetryClass.EVEN_LINEAR, SymmetryClass.EVEN_LINEAR_POSITIVE_SCALING)


def _softplus(z: torch.Tensor) -> torch.Tensor:
    # log(1 + e^z) without torch's threshold at 20, so it matches the C++ kernel to the last digit.
    return torch.logaddexp(z, torch.zeros((), dtype=z.dtype, device=z.device))


def _g(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(4.0 * z) + _softplus(z)


LEAKY_RELU_SLOPE = 0.01
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


# Derivatives s'(z), given z and h = s(z) (the C++ kernels' ActOp::df): the torch path of the
# ops back-propagates with these instead of autograd (one elementwise pass, no graph).
def _d_identity(z, h):
    return torch.ones_like(z)


def _d_relu(z, h):
    return (z > 0).to(z.dtype)


def _d_leaky_relu(z, h):
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, LEAKY_RELU_SLOPE))


def _d_tanh(z, h):
    return 1.0 - h * h


def _d_sigmoid(z, h):
    return h * (1.0 - h)


def _d_softplus(z, h):
    return torch.sigmoid(z)


def _d_gelu(z, h):
    # d/dz z Phi(z) = Phi(z) + z phi(z), erf form
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def _d_silu(z, h):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _d_g(z, h):
    s4 = torch.sigmoid(4.0 * z)
    return 4.0 * s4 * (1.0 - s4) + torch.sigmoid(z)


@dataclass(frozen=True)
class Activation:
    """One activation: ``name``, ``fn`` (torch, differentiable), ``code`` (the C++ ``eac::Act``
    value), ``symmetry`` (its :class:`SymmetryClass`), ``linear_coefficient`` (c in
    s(z) - s(-z) = c z for the even_linear classes, else 0), ``dfn`` (s'(z) from (z, s(z))),
    ``init_gain`` (the Kaiming gain of a student's hidden layers: 5/3 tanh, sqrt 2 relu,
    sqrt(2 / (1 + alpha^2)) leaky_relu, 1 otherwise; torch.nn.init.calculate_gain) and
    ``df_needs_z`` (whether s' reads the pre-activation z, not only s(z); the C++
    ``df_needs_z`` in csrc/common/activations.h)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    code: int
    symmetry: SymmetryClass
    linear_coefficient: float = 0.0
    dfn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    init_gain: float = 1.0
    df_needs_z: bool = True

    def derivative(self, z: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """s'(z), elementwise: a tensor of ``z``'s shape and dtype (``h`` = s(z), same shape,
        when already computed). The closed forms of the C++ kernels' ``ActOp::df``
        (csrc/common/activations.h), checked against torch.autograd in tests/ops/test_mlp.py; used
        by the torch path's backward pass (Martinelli et al. 2024, Eq. 1 gradients). Raises
        TypeError where ``dfn`` is None (an Activation built without a derivative)."""
        if self.dfn is None:
            raise TypeError(f"activation {self.name!r} has no derivative (dfn is None)")
        return self.dfn(z, self.fn(z) if h is None else h)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


_S = SymmetryClass
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", lambda z: z, 0, _S.ODD, dfn=_d_identity, df_needs_z=False),
        Activation(
            "relu", F.relu, 1, _S.EVEN_LINEAR_POSITIVE_SCALING, 1.0, _d_relu, math.sqrt(2.0)
        ),
        Activation(
            "leaky_relu",
            lambda z: F.leaky_relu(z, LEAKY_RELU_SLOPE),
            2,
            _S.EVEN_LINEAR_POSITIVE_SCALING,
            1.0 + LEAKY_RELU_SLOPE,
            _d_leaky_relu,
            math.sqrt(2.0 / (1 + LEAKY_RELU_SLOPE**2)),
        ),
        Activation(
            "tanh", torch.tanh, 3, _S.ODD, dfn=_d_tanh, init_gain=5.0 / 3.0, df_needs_z=False
        ),
        Activation("sigmoid", torch.sigmoid, 4, _S.ODD_CONSTANT, dfn=_d_sigmoid, df_needs_z=False),
        Activation("softplus", _softplus, 5, _S.EVEN_LINEAR, 1.0, _d_softplus),
        Activation("gelu", F.gelu, 6, _S.EVEN_LINEAR, 1.0, _d_gelu),
        Activation("silu", F.silu, 7, _S.EVEN_LINEAR, 1.0, _d_silu),
        Activation("g", _g, 8, _S.NONE, dfn=_d_g),
    )
}


def get_activation(activation: str | Activation) -> Activation:
    """Look up an activation by name.

    Raises
    ------
    ValueError
        If the name is unknown; the message lists the known names.
    """
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: unknown activation {activation!r}; expected one of "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[activation]
