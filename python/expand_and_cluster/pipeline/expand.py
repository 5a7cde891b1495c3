"""Stage 1, "Expand": find the student width (the expansion search) and train N students of the
teacher's depth on the queries.

Source: Martinelli et al. 2024, Sec. 3 step 1 ("train students of increasing size until they
consistently reach near-zero loss", then N overparameterised students); docs/method.md, step 1.
"""

from __future__ import annotations

import dataclasses
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
) -> tuple[int, dict]:
    """Find the student width (docs/method.md, step 1, the expansion search).

    Widths grow by ``search.growth`` from ``search.start_width``. At each width
    ``search.n_students`` quick students train (Adam for ``search.epochs`` with the plateau
    schedule of :meth:`TrainConfig.scaled` and ``train``'s hand-over, then the finish of
    ``train.finish`` with ``search.polish_iterations * L^2`` L-BFGS iterations, stopping at
    ``search.target_relative_mse``). Judged by their losses:

    - **qualifies**: at least ``search.fraction`` of them reach the target: the search ends
      with this width;
    - **still falling**: their median relative MSE fell by at least ``search.trend_decades``
      decades over the last third of their Adam epochs: they train another round (at most
      ``search.extensions``) before the width is judged;
    - **no gain**: after ``search.patience`` consecutive widths that lower the best median
      relative MSE by less than ``search.min_gain_decades`` decades, or past
      ``search.max_width``, the search ends with the smallest width whose median is within
      ``search.min_gain_decades`` decades of the best one seen (never the cap by default).

    Returns
    -------
    (int, dict)
        The student width ``max(w, ceil(search.expansion * w))`` for the width w found, and the
        search's record: ``{"found_width", "student_width", "reason", "tried": [per width
        {"width", "relative_mse": [per quick student], "fraction_reached",
        "median_relative_mse", "epochs", "rounds", "decision"}]}``.
    """
    search = ExpansionSearchConfig() if search is None else search
    train = TrainConfig() if train is None else train
    tried: list[dict] = []
    schedule = train.scaled(search.epochs)
    best: tuple[float, int] | None = None  # (score, width): the lowest median log10 rel MSE
    since_best = 0
    width = search.start_width
    reason = ""
    while True:
        cfg = dataclasses.replace(
            train,
            n_students=search.n_students,
            max_epochs=search.epochs,
            patience=min(train.patience, schedule.patience),
            cooldown=min(train.cooldown, schedule.cooldown),
            seed=train.seed + 1000 + width,
            polish_iterations=search.polish_iterations * n_hidden_layers**2,
            finish_target=search.target_relative_mse,
        )
        students, epochs, rounds = None, 0, 0
        while True:
            res = train_students(
                x, y, [width] * n_hidden_layers, activation, cfg, device, students,
                desc=f"search width {width}",
            )  # fmt: skip
            rounds += 1
            epochs += int(res.epochs.max())
            frac = float(np.mean(res.relative_mse <= search.target_relative_mse))
            if frac >= search.fraction or rounds > search.extensions:
                break
            gain = _late_gain(res.history)
            if gain < search.trend_decades:
                break
            students = res.students  # still falling: another round from here
        rel = res.relative_mse
        score = float(np.median(np.log10(np.maximum(rel, search.target_relative_mse))))
        entry = {
            "width": width,
            "relative_mse": rel.tolist(),
            "fraction_reached": frac,
            "median_relative_mse": float(np.median(rel)),
            "epochs": epochs,
            "rounds": rounds,
        }
        tried.append(entry)
        if frac >= search.fraction:
            entry["decision"] = f"qualifies: {frac:.0%} of the quick students reach the target"
            found, reason = width, "qualified"
            break
        if best is None or score < best[0] - search.min_gain_decades:
            since_best = 0
            entry["decision"] = "best so far"
        else:
            since_best += 1
            entry["decision"] = (
                f"no gain of {search.min_gain_decades} decades over the best (width "
                f"{best[1]}, median 10^{best[0]:.1f}) ({since_best}/{search.patience})"
            )
        if best is None or score < best[0]:
            best = (score, width)
        nxt = math.ceil(width * search.growth)
        if since_best >= search.patience or nxt > search.max_width:
            found = _smallest_near_best(tried, search)
            reason = (
                "wider students stopped helping"
                if since_best >= search.patience
                else "max_width reached"
            ) + f": the smallest width within {search.min_gain_decades} decades of the best"
            break
        width = nxt
    student_width = max(found, math.ceil(search.expansion * found))
    return student_width, {
        "found_width": found,
        "student_width": student_width,
        "reason": reason,
        "tried": tried,
    }


def _smallest_near_best(tried: list[dict], search: ExpansionSearchConfig) -> int:
    """The smallest tried width whose median relative MSE (floored at the target) is within
    ``search.min_gain_decades`` decades of the lowest one."""
    scores = [math.log10(max(t["median_relative_mse"], search.target_relative_mse)) for t in tried]
    best = min(scores)
    return min(t["width"] for t, s in zip(tried, scores) if s <= best + search.min_gain_decades)


def _late_gain(history: dict) -> float:
    """Decades the median relative MSE fell over the last third of an Adam run's history."""
    epochs, rel = history.get("epoch", []), history.get("relative_mse", [])
    if len(epochs) < 3:
        return 0.0
    last = epochs[-1]
    k = int(np.searchsorted(epochs, last - last / 3.0))
    a = np.median(np.log10(np.maximum(np.asarray(rel[k], dtype=float), 1e-300)))
    b = np.median(np.log10(np.maximum(np.asarray(rel[-1], dtype=float), 1e-300)))
    return float(a - b) if np.isfinite(a - b) else 0.0


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
                f"width {s['width']}: {s['fraction_reached']:.0%} reached"
                for s in search_log["tried"]
            )
            log(f"expansion search: {tried}; {search_log['reason']} -> student width {width}")
        t0 = time.perf_counter()
        tr = train_students(
            xt, yt, [width] * n_layers, cfg.activation, cfg.student_train, cfg.device
        )
        seconds["train"] = time.perf_counter() - t0
        log(
            f"trained {len(tr.relative_mse)} students of width {width} in "
            f"{seconds['train']:.1f} s: {tr.describe()}"
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
            "finish": tr.finish,
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
        meta.get("finish"),
    )
    search = meta.get("expansion_search")
    if isinstance(search, list):  # checkpoints written before the search had a record
        search = {"tried": search}
    return Expansion(tr, int(meta["student_width"]), search, True)
