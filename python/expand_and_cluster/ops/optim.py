"""Adam with a learning rate per student, and the per-student training schedule
(ReduceLROnPlateau and the stop rules) as one kernel per epoch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._checks import DTYPE_CODES, check_tensor, device_code, lib, stream


def check_adam_args(
    params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, check_values=True, min_step=1
):
    """Validate :func:`adam_step`'s arguments; return (step tensor ``[N]``, numel per student)."""
    if not all(isinstance(s, (list, tuple)) for s in (params, grads, exp_avg, exp_avg_sq)):
        raise TypeError("params, grads, exp_avg, exp_avg_sq: expected lists of tensors")
    k = len(params)
    if not (len(grads) == len(exp_avg) == len(exp_avg_sq) == k):
        raise ValueError(
            "params, grads, exp_avg, exp_avg_sq: expected lists of the same length, got "
            f"{k}, {len(grads)}, {len(exp_avg)}, {len(exp_avg_sq)}"
        )
    if not (0.0 <= beta1 < 1.0) or not (0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1, beta2: expected values in [0, 1), got {beta1}, {beta2}")
    if not eps > 0.0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    lr = check_tensor(lr, "lr", 1)
    dtype, device, n = lr.dtype, lr.device, lr.shape[0]
    if n < 1:
        raise ValueError("lr: expected shape [N] with N >= 1")
    if check_values and (bool(torch.isnan(lr).any()) or bool((lr < 0).any())):
        raise ValueError("lr: expected finite learning rates >= 0")
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.dim() != 1 or step.shape[0] != n:
            raise TypeError(f"step: expected an int or an int64 tensor of shape [{n}]")
        if step.device != device or not step.is_contiguous():
            raise ValueError(f"step: expected a contiguous tensor on {device}")
        step_t = step
    else:
        step_t = torch.full((n,), int(step), dtype=torch.int64, device=device)
    if check_values and bool((step_t < min_step).any()):
        raise ValueError(f"step: expected step numbers >= {min_step}")
    numels = []
    for i in range(k):
        p = params[i]
        if not isinstance(p, torch.Tensor) or p.dim() < 1:
            raise TypeError(f"params[{i}]: expected a tensor of shape [N, ...]")
        for name, t in (
            ("params", p),
            ("grads", grads[i]),
            ("exp_avg", exp_avg[i]),
            ("exp_avg_sq", exp_avg_sq[i]),
        ):
            check_tensor(t, f"{name}[{i}]", p.dim(), dtype, device)
            if t.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}]: expected shape {tuple(p.shape)} (as params[{i}]), got "
                    f"{tuple(t.shape)}"
                )
        if p.shape[0] != n:
            raise ValueError(f"params[{i}]: expected {n} students (lr has {n}), got {p.shape[0]}")
        numels.append(p[0].numel() if n else 0)
    return step_t, numels


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    step: int | torch.Tensor,
    lr: torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    *,
    check_values: bool = True,
) -> None:
    """One Adam update, in place, with a learning rate (and step count) per student.

    Same arithmetic as ``torch.optim.Adam`` (Kingma & Ba 2015, Alg. 1, with torch's placement of
    eps): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr_n / (1 - b1^t_n) * m / (sqrt(v) / sqrt(1 - b2^t_n) + eps)``.
    A student with ``lr_n = 0`` keeps its parameters (its moments still move).

    Parameters
    ----------
    params, grads, exp_avg, exp_avg_sq : lists of tensors of matching shapes ``[N, ...]``, one
        dtype (float32 or float64), contiguous, on one device. ``params``, ``exp_avg`` and
        ``exp_avg_sq`` are updated in place.
    step : the step number t of this update (>= 1), an int or an int64 tensor ``[N]``.
    lr : ``[N]`` learning rates, the dtype of ``params`` (>= 0).
    beta1, beta2 : in [0, 1). eps : > 0.
    check_values : check the values of ``lr`` (finite, >= 0) and ``step`` (>= 1). On CUDA each
        check reads a flag back to the host, a synchronisation per call: training loops that
        validated their learning rates once pass False. Shapes, dtypes and devices are always
        checked (no synchronisation).

    Raises
    ------
    TypeError, ValueError
        On mismatched lists, shapes, dtypes or devices, step < 1, negative or NaN lr, or betas
        outside [0, 1).
    """
    step_t, numels = check_adam_args(
        params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, check_values
    )
    # Empty tensors have nothing to update (and may have a null data pointer): left out.
    live = [i for i in range(len(params)) if numels[i] > 0]
    if not live:
        return
    lib().adam_step(
        [params[i].data_ptr() for i in live],
        [grads[i].data_ptr() for i in live],
        [exp_avg[i].data_ptr() for i in live],
        [exp_avg_sq[i].data_ptr() for i in live],
        [numels[i] for i in live],
        lr.shape[0],
        lr.data_ptr(),
        step_t.data_ptr(),
        float(beta1),
        float(beta2),
        float(eps),
        DTYPE_CODES[lr.dtype],
        device_code(lr),
        stream(lr),
    )


class PlateauState:
    """State of N students' training schedules on one device, updated by :func:`plateau_step`.

    Attributes (each ``[N]``, contiguous, on ``device``)
    ----------------------------------------------------
    lr : float64 learning rate; best : float64 best epoch loss so far (inf at the start);
    bad, cool : int64 epochs without progress and cooldown epochs left (ReduceLROnPlateau's
    ``num_bad_epochs`` and ``cooldown_counter``); live : bool, still training; rel : float64 last
    relative MSE (loss / var_y; inf before the first epoch); epochs : int64 epochs trained;
    code : int64 why a student stopped (0 not stopped, 1 loss target, 2 lr below min_lr);
    diverged : int64 first epoch with a non-finite loss (0: none).

    Raises ValueError at construction for ``n < 1`` or ``lr <= 0``.
    """

    FIELDS = ("lr", "best", "bad", "cool", "live", "rel", "epochs", "code", "diverged")
    DTYPES = {
        "lr": torch.float64,
        "best": torch.float64,
        "bad": torch.int64,
        "cool": torch.int64,
        "live": torch.bool,
        "rel": torch.float64,
        "epochs": torch.int64,
        "code": torch.int64,
        "diverged": torch.int64,
    }
    _NUMPY = {torch.float64: np.float64, torch.int64: np.int64, torch.bool: np.bool_}

    def __init__(self, n: int, lr: float, device: str | torch.device = "cpu"):
        if n < 1 or not lr > 0:
            raise ValueError(f"PlateauState: expected n >= 1 and lr > 0, got n={n}, lr={lr}")
        self.device = torch.device(device)
        start = {"lr": float(lr), "best": float("inf"), "live": True, "rel": float("inf")}
        for f in self.FIELDS:
            t = torch.full((n,), start.get(f, 0), dtype=self.DTYPES[f], device=self.device)
            setattr(self, f, t)
        self._ptrs = [getattr(self, f).data_ptr() for f in self.FIELDS]

    @property
    def n_students(self) -> int:
        return int(self.lr.shape[0])

    def select(self, idx: torch.Tensor) -> None:
        """Keep the students at positions ``idx`` (int64 ``[K]``, K >= 1), in that order."""
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f).index_select(0, idx).contiguous())
        self._ptrs = [getattr(self, f).data_ptr() for f in self.FIELDS]

    def to_numpy(self, extra: Sequence[torch.Tensor] = ()) -> tuple[dict, list[np.ndarray]]:
        """The state as numpy arrays ({field: array}), and ``extra`` float64 tensors of the same
        device, in one device-to-host transfer."""
        arrays = [getattr(self, f).to(torch.float64) for f in self.FIELDS] + list(extra)
        host = torch.stack(arrays).cpu().numpy()
        out = {f: host[i].astype(self._NUMPY[self.DTYPES[f]]) for i, f in enumerate(self.FIELDS)}
        return out, list(host[len(self.FIELDS) :])


def check_plateau_args(state, loss, step_lr, var_y, patience, cooldown, factor) -> None:
    """Validate :func:`plateau_step`'s arguments (TypeError, ValueError naming the argument)."""
    if not isinstance(state, PlateauState):
        raise TypeError(f"state: expected a PlateauState, got {type(state).__name__}")
    n = state.n_students
    for name, t, dtypes in (
        ("loss", loss, (torch.float64,)),
        ("step_lr", step_lr, (torch.float32, torch.float64)),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            raise TypeError(
                f"{name}: expected a tensor of dtype {' or '.join(map(str, dtypes))}, got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
        if tuple(t.shape) != (n,) or t.device != state.device or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous [{n}] tensor on {state.device}, got "
                f"{tuple(t.shape)} on {t.device}"
            )
    if not var_y > 0:
        raise ValueError(f"var_y: expected > 0, got {var_y}")
    if patience < 0 or cooldown < 0 or not 0 < factor < 1:
        raise ValueError(
            f"patience, cooldown, factor: expected >= 0, >= 0 and in (0, 1), got {patience}, "
            f"{cooldown}, {factor}"
        )


def plateau_step(
    state: PlateauState,
    loss: torch.Tensor,
    epoch: int,
    step_lr: torch.Tensor,
    *,
    var_y: float,
    patience: int,
    cooldown: int,
    factor: float,
    target: float,
    min_lr: float,
) -> None:
    """One epoch of N students' training schedules, in place, in one kernel launch (no host
    synchronisation on a GPU).

    For every live student n: records a non-finite ``loss[n]`` in ``diverged`` (first epoch),
    sets ``rel = loss / var_y`` and ``epochs = epoch``; applies torch's ReduceLROnPlateau rule
    (mode min, threshold 0: a loss below ``best`` is progress; a cooldown epoch counts as
    progress; more than ``patience`` epochs without progress multiply lr by ``factor`` and
    restart the ``cooldown``); then stops the student (``live`` false; ``code`` 1) when
    ``rel <= target``, or (``code`` 2) when ``lr < min_lr``. Students that are not live are left
    unchanged. Finally ``step_lr[n]`` = lr for live students, 0 for those that stopped this epoch
    (Adam with lr 0 leaves their weights exactly as they are).

    Source: Martinelli et al. 2024, App. (training details: lr x 1/sqrt(10) on a plateau, stop
    at a loss target or lr < 1e-7), with one schedule per student.

    Parameters
    ----------
    state : :class:`PlateauState` of N students.
    loss : ``[N]`` float64, the epoch's mean loss per student, on the state's device.
    epoch : the epoch number (>= 1).
    step_lr : ``[N]`` float32 or float64 (the parameters' dtype), written.
    var_y : relative-MSE denominator (> 0); patience, cooldown : epochs (>= 0);
    factor : in (0, 1); target : relative MSE to stop at; min_lr : stop below this lr.

    Raises
    ------
    TypeError, ValueError
        On a wrong state type, dtype, shape or device, or an out-of-range setting.
    """
    check_plateau_args(state, loss, step_lr, var_y, patience, cooldown, factor)
    lib().plateau_step(
        state.n_students,
        int(epoch),
        loss.data_ptr(),
        state._ptrs,
        step_lr.data_ptr(),
        DTYPE_CODES[step_lr.dtype],
        float(var_y),
        int(patience),
        int(cooldown),
        float(factor),
        float(target),
        float(min_lr),
        device_code(loss),
        stream(loss),
    )
