"""Stage 1, "Expand": find the student width (the expansion search) and train N students of the
teacher's depth on the queries.

Source: Martinelli et al. 2024, Sec. 3 step 1 ("train students of increasing size until they
consistently reach near-zero loss", then N overparameterised students); docs/method.md, step 1.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..config import ExpansionSearchConfig, RecoverConfig, TrainConfig
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..students import StudentEnsemble
from .stages import Expansion, Log, Queries, quiet
from .train import TrainResult, train_students


def expansion_search(
    x: torch.Tensor,
    y: torch.Tensor,
    activation: str,
    n_hidden_layers: int = 1,
    search: ExpansionSearchConfig | None = None,
    train: TrainConfig | None = None,
    device="cpu",
) -> tuple[int, list[dict]]:
    """Find the student width: quick runs at widths growing by ``search.growth`` from
    ``search.start_width`` until at least ``search.fraction`` of the quick students reach
    ``search.target_relative_mse`` (or the next width would pass ``search.max_width``).

    Each quick run trains ``search.n_students`` students for ``search.epochs`` Adam epochs (the
    plateau patience and cooldown of :meth:`TrainConfig.scaled`, at most ``train``'s) and
    ``search.polish_iterations * L^2`` L-BFGS iterations (deeper students need a longer polish
    to show that they can reach the target).

    Parameters
    ----------
    x, y : ``[P, d_in]``, ``[P, d_out]`` training queries.
    activation : hidden activation name. n_hidden_layers : L.
    search, train : the search's and the main training's settings (learning rate, batch size,
        dtype and seed come from ``train``); None: the defaults. device : "cpu" or "cuda".

    Returns
    -------
    (int, list of dict)
        ``max(w, ceil(search.expansion * w))`` for the width w found, and per tried width
        ``{"width", "relative_mse": [per quick student], "fraction_reached"}``.
    """
    search = ExpansionSearchConfig() if search is None else search
    train = TrainConfig() if train is None else train
    tried: list[dict] = []
    width = search.start_width
    schedule = train.scaled(search.epochs)
    while True:
        cfg = TrainConfig(
            n_students=search.n_students,
            lr=train.lr,
            batch_size=train.batch_size,
            max_epochs=search.epochs,
            target_relative_mse=search.target_relative_mse,
            patience=min(train.patience, schedule.patience),
            cooldown=min(train.cooldown, schedule.cooldown),
            factor=train.factor,
            min_lr=train.min_lr,
            dtype=train.dtype,
            seed=train.seed + 1000 + width,
            progress=train.progress,
            polish_iterations=search.polish_iterations * n_hidden_layers**2,
        )
        res = train_students(
            x, y, [width] * n_hidden_layers, activation, cfg, device, desc=f"search width {width}"
        )
        frac = float(np.mean(res.relative_mse <= search.target_relative_mse))
        tried.append(
            {"width": width, "relative_mse": res.relative_mse.tolist(), "fraction_reached": frac}
        )
        nxt = math.ceil(width * search.growth)
        if frac >= search.fraction or nxt > search.max_width:
            break
        width = nxt
    return max(width, math.ceil(search.expansion * width)), tried


def expand(
    queries: Queries,
    config: RecoverConfig,
    *,
    checkpoint: Checkpoint | None = None,
    resume_from: Checkpoint | None = None,
    log: Log = quiet,
) -> Expansion:
    """Stage 1: the expansion search (unless ``config.width`` is set), then ``config.train``'s
    N students of depth ``config.hidden_layers`` trained on the training queries (Adam with a
    plateau schedule per student, then the float64 L-BFGS polish).

    With ``resume_from``, the students of that checkpoint's ``students`` stage are taken instead
    (no search, no training). With ``checkpoint``, the students are written to its ``students``
    stage.

    Returns
    -------
    Expansion

    Raises
    ------
    InputError
        When the resumed students do not match the queries or the depth.
    FloatingPointError
        When a student diverges (the message suggests a lower learning rate or float64).
    """
    cfg = config
    n_layers = int(cfg.hidden_layers)
    if resume_from is not None:
        out = load_students(resume_from, queries, n_layers)
        log(
            f"resumed: {out.training.students.n_students} trained students of width "
            f"{out.width} from {resume_from.path}"
        )
    else:
        xt, yt = torch.as_tensor(queries.x), torch.as_tensor(queries.y)
        search_log = None
        width = cfg.width
        seconds = {"search": 0.0, "train": 0.0}
        if width is None:
            t0 = time.perf_counter()
            width, search_log = expansion_search(
                xt, yt, cfg.activation, n_layers, cfg.search, cfg.train, cfg.device
            )
            seconds["search"] = time.perf_counter() - t0
            tried = ", ".join(
                f"width {s['width']}: {s['fraction_reached']:.0%} reached" for s in search_log
            )
            log(f"expansion search: {tried} -> student width {width}")
        t0 = time.perf_counter()
        tr = train_students(xt, yt, [width] * n_layers, cfg.activation, cfg.train, cfg.device)
        seconds["train"] = time.perf_counter() - t0
        rel = tr.relative_mse
        log(
            f"trained {len(rel)} students of width {width} in {seconds['train']:.1f} s: "
            f"relative MSE best {rel.min():.2e}, median {np.median(rel):.2e}"
        )
        out = Expansion(tr, width, search_log, False, seconds)
    if checkpoint is not None:
        save_students(checkpoint, out)
    return out


def save_students(checkpoint: Checkpoint, expansion: Expansion) -> None:
    """Write the ``students`` stage: the ensemble (``weight_l`` [N, out, in], ``bias_l``), their
    relative MSE, epochs and final learning rates; json: width, search, stop reasons, history."""
    tr = expansion.training
    checkpoint.save_stage(
        "students",
        {
            **tr.students.to_arrays(),
            "relative_mse": tr.relative_mse,
            "epochs": tr.epochs,
            "final_lr": tr.final_lr,
        },
        {
            "student_width": expansion.width,
            "expansion_search": expansion.search,
            "stop_reason": tr.stop_reason,
            "history": tr.history,
            "seconds": tr.seconds,
        },
    )


def load_students(checkpoint: Checkpoint, queries: Queries, n_layers: int) -> Expansion:
    """The ``students`` stage of ``checkpoint`` as a resumed :class:`Expansion` (float64
    students on the CPU).

    Raises
    ------
    InputError
        When the stage is missing or its students do not map d_in to d_out of the queries with
        ``n_layers`` hidden layers.
    """
    arrays, meta = checkpoint.load_stage("students")
    ens = StudentEnsemble.from_arrays(arrays, dtype=torch.float64)
    d_in, d_out = queries.X.shape[1], queries.Y.shape[1]
    if ens.widths[0] != d_in or ens.widths[-1] != d_out:
        raise InputError(
            f"checkpoint {checkpoint.path}: its students map {ens.widths[0]} -> "
            f"{ens.widths[-1]} but the queries are {d_in} -> {d_out}"
        )
    if len(ens.hidden_widths) != n_layers:
        raise InputError(
            f"checkpoint {checkpoint.path}: its students have {len(ens.hidden_widths)} "
            f"hidden layer(s), the run asks for {n_layers}"
        )
    tr = TrainResult(
        ens,
        np.asarray(arrays["relative_mse"]),
        np.asarray(arrays["epochs"]),
        list(meta["stop_reason"]),
        np.asarray(arrays["final_lr"]),
        meta.get("history", {}),
        meta.get("seconds", 0.0),
    )
    return Expansion(tr, int(meta["student_width"]), meta.get("expansion_search"), True)
