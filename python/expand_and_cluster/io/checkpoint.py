"""Run folders: the checkpoint folder of a recovery (one file per finished stage, written
atomically) and the output folder (:class:`RunFolder`, renamed into place when the run ends).

Checkpoint layout (docs/formats.md, "Checkpoint folder"):

- ``config.json``: the :class:`~expand_and_cluster.config.RecoverConfig` (as a dict), the query
  source and the package version;
- ``queries.npz``: ``X`` [P, d_in], ``Y`` [P, d_out], ``held_out_index`` [P2];
- ``teacher.npz`` (optional): the teacher, when it is known (network format);
- ``students.npz`` + ``students.json``: the trained students (``weight_l`` [N, out, in],
  ``bias_l``), their relative MSE, the student width and the expansion search;
- ``layer_<l>.npz`` + ``layer_<l>.json``: after hidden layer l was clustered: the recovered
  layers 0..l (``incoming_<i>`` [k_i, fan_in + 1]), the students' upper parts after their
  fine-tune (``weight_l``, ``bias_l``) and their losses, the layer's tree (linkage, counts, mask)
  and summary.

A stage's ``.npz`` is written before its ``.json``; a stage counts as finished when both exist.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import InputError
from .files import atomic_write, load_network, write_json_atomic


class Checkpoint:
    """A checkpoint folder (created on first write).

    Parameters
    ----------
    path : the folder.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _write_json(self, name: str, obj: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / name, obj)

    def _write_npz(self, name: str, arrays: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path / name) as f:
            np.savez(f, **arrays)

    def save_stage(self, stage: str, arrays: dict, meta: dict) -> None:
        """Write ``<stage>.npz`` then ``<stage>.json`` (both atomically)."""
        self._write_npz(f"{stage}.npz", arrays)
        self._write_json(f"{stage}.json", meta)

    def has(self, stage: str) -> bool:
        return (self.path / f"{stage}.npz").is_file() and (self.path / f"{stage}.json").is_file()

    def load_stage(self, stage: str) -> tuple[dict, dict]:
        """``(arrays, meta)`` of a finished stage.

        Raises
        ------
        InputError
            When the stage is missing or unreadable.
        """
        if not self.has(stage):
            raise InputError(f"checkpoint {self.path}: stage {stage!r} is missing")
        try:
            with np.load(self.path / f"{stage}.npz", allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads((self.path / f"{stage}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"checkpoint {self.path}: cannot read stage {stage!r}: {e}") from None
        return arrays, meta

    def start(self, config: dict, X, Y, held_out_index, source: str, teacher=None) -> None:
        """Begin this folder afresh (whatever it held is removed) with the run's inputs:
        :meth:`save_run`."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.save_run(config, X, Y, held_out_index, source, teacher)

    def copy_stages(self, other: Checkpoint, layers: bool = True) -> None:
        """Copy ``other``'s ``students`` stage and, with ``layers``, its finished layers."""
        stages = ["students"]
        if layers:
            stages += [f"layer_{l}" for l in range(other.last_layer() + 1)]
        for stage in stages:
            for ext in (".npz", ".json"):
                shutil.copy2(other.path / f"{stage}{ext}", self.path / f"{stage}{ext}")

    def save_run(self, config: dict, X, Y, held_out_index, source: str, teacher=None) -> None:
        """The run's inputs: config, queries (and the teacher when known)."""
        self._write_npz(
            "queries.npz",
            {"X": np.asarray(X), "Y": np.asarray(Y), "held_out_index": np.asarray(held_out_index)},
        )
        if teacher is not None:
            self._write_npz("teacher.npz", teacher.to_arrays())
        self._write_json(
            "config.json", {"version": __version__, "source": source, "config": config}
        )

    def load_run(self) -> dict:
        """``{"config": dict, "source": str, "X", "Y", "held_out_index", "teacher": Network or
        None}``.

        Raises
        ------
        InputError
            When the folder is not a checkpoint folder.
        """
        if not (self.path / "config.json").is_file() or not (self.path / "queries.npz").is_file():
            raise InputError(
                f"{self.path}: not a checkpoint folder (expected config.json and queries.npz; "
                "give a run's output folder, its checkpoint/ subfolder, or OUT.checkpoint)"
            )
        try:
            meta = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
            with np.load(self.path / "queries.npz", allow_pickle=False) as q:
                X, Y, held = q["X"], q["Y"], q["held_out_index"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{self.path}: cannot read the checkpoint: {e}") from None
        teacher = None
        if (self.path / "teacher.npz").is_file():
            teacher = load_network(self.path / "teacher.npz")
        return {
            "config": meta["config"],
            "source": meta.get("source", "checkpoint"),
            "X": X,
            "Y": Y,
            "held_out_index": held,
            "teacher": teacher,
        }

    def last_layer(self) -> int:
        """Index of the last finished ``layer_<l>`` stage, -1 if none."""
        last = -1
        while self.has(f"layer_{last + 1}"):
            last += 1
        return last

    @staticmethod
    def find(path: str | os.PathLike) -> Checkpoint:
        """The checkpoint in ``path``: the folder itself, or its ``checkpoint/`` subfolder (a
        finished run's output folder).

        Raises
        ------
        InputError
            When neither holds a checkpoint.
        """
        p = Path(path)
        if not p.is_dir():
            raise InputError(f"{p}: no such folder")
        if (p / "config.json").is_file():
            return Checkpoint(p)
        if (p / "checkpoint" / "config.json").is_file():
            return Checkpoint(p / "checkpoint")
        raise InputError(
            f"{p}: no checkpoint found (expected config.json in it or in {p / 'checkpoint'})"
        )


class RunFolder:
    """The output folder ``out`` of a run, written as a temporary folder next to it and renamed
    to ``out`` when the ``with`` block succeeds; removed when it raises (KeyboardInterrupt
    included), so no half-written output folder is ever left.

    A run that writes checkpoints sets :attr:`checkpoint` (a :class:`Checkpoint` at
    :attr:`checkpoint_path`, ``OUT.checkpoint`` next to ``out``); that folder moves into
    ``out/checkpoint`` on success; on failure it is kept when it holds trained students (and a
    line on stderr says how to resume), else removed.

    Raises
    ------
    InputError
        At construction, when ``out`` exists and is not empty and ``force`` is False.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out = Path(out)
        if self.out.exists() and not force and (not self.out.is_dir() or any(self.out.iterdir())):
            raise InputError(f"--out: {out} exists and is not empty (use --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self.checkpoint_path = self.out.with_name(self.out.name + ".checkpoint")
        self.checkpoint: Checkpoint | None = None

    def path(self, name: str) -> Path:
        """Where the file ``name`` is written until the folder is renamed into place."""
        return self.tmp / name

    def commit(self) -> None:
        """Move the checkpoint folder in and rename the temporary folder to ``out``."""
        if self.checkpoint is not None and self.checkpoint.path.is_dir():
            os.replace(self.checkpoint.path, self.tmp / "checkpoint")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        """Remove the temporary folder; keep a checkpoint that holds trained students."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.checkpoint is None or not self.checkpoint.path.is_dir():
            return
        ckpt = self.checkpoint.path
        # Trained students are kept whatever went wrong (the folder may be the one resumed from).
        if not (ckpt / "students.json").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)  # nothing worth resuming
        else:
            print(
                f"expand-and-cluster: checkpoints kept in {ckpt}; continue with: "
                f"expand-and-cluster recover --resume {ckpt} --out {self.out} (or re-cluster "
                f"the trained students: expand-and-cluster cluster --students {ckpt} --gamma ... "
                f"--out ...)",
                file=sys.stderr,
            )

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
