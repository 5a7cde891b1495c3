"""The settings of a whole recovery (:class:`RecoverConfig`) and the vocabulary of dotted keys
that names every one of them."""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..activations import get_activation
from ..errors import InputError
from .steps import (
    UPPER_STUDENTS,
    ClusterConfig,
    ExpansionSearchConfig,
    RepairConfig,
    TrainConfig,
    _validate,
)

_NESTED = {
    "train": TrainConfig,
    "search": ExpansionSearchConfig,
    "cluster": ClusterConfig,
    "repair": RepairConfig,
}


@dataclass(frozen=True)
class RecoverConfig:
    """Everything :func:`~expand_and_cluster.recover` needs besides the queries.

    Attributes
    ----------
    activation : the teacher's hidden activation (known, as in the paper).
    hidden_layers : L >= 1, the teacher's number of hidden layers (known; the widths are not).
    width : student hidden width (every layer); None runs the expansion search over a common
        width for all layers.
    train, search, cluster, repair : the nested configs (see their classes).
    held_out_fraction : share of the queries kept aside to score the recovered network.
    finetune_iterations : L-BFGS iterations of the final fine-tune (0: none).
    layer_finetune_epochs : deep networks: Adam epochs of the students' fine-tune after a layer
        has been put into them (then the polish of ``train``); None: ``train.max_epochs // 2``.
    layer_finetune_lr_factor : that fine-tune's Adam learning rate, as a fraction of ``train.lr``.
    layer_refine_iterations : deep networks: L-BFGS iterations that fine-tune the recovered layers
        with the best student's upper layers before a collapsed layer is put into the students
        (0: none; even_linear classes skip it).
    upper_students : deep networks: the students above a recovered layer: "finetune" (the
        trained students with the collapsed layer put in, fine-tuned: the paper's step) or
        "fresh" (new students of the remaining depth trained from scratch on its outputs).
    device : "cpu" or "cuda": student training and the clustering's distance matrices.
    retrain_factor : when the recovered network's training relative MSE is above
        ``retrain_above`` and at least ``retrain_gap`` times the students' median, or the
        students' median is above ``retrain_above`` too, the students are trained once more from
        the same seed at the same width with the schedule ``retrain_factor`` times longer
        (:meth:`TrainConfig.stretched`), and the better result is kept. 1: never (not in the
        paper).
    retrain_above : the relative MSE under which a recovery counts as exact (raise it for a
        teacher the students cannot imitate exactly, such as one trained on real data);
        retrain_gap : see ``retrain_factor``. The same test marks a final result "degraded"
        (:func:`~expand_and_cluster.pipeline.recover.degradation`).
    deep_finish_rounds : networks with several hidden layers: the students that feed a layer to
        be clustered get at least this many more finish budgets while their finish ends at its
        budget, still improving (``train.finish_rounds``); a layer is clustered from converged
        students where the budget allows.
    deep_stall_decades : networks with several hidden layers: the finish's stall rule asks at
        most this gain per 200 iterations (``train.finish_stall_decades``); deep students often
        improve slowly but steadily for thousands of iterations.
    """

    activation: str
    hidden_layers: int = 1
    width: int | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: ExpansionSearchConfig = field(default_factory=ExpansionSearchConfig)
    held_out_fraction: float = 0.1
    finetune_iterations: int = 3000
    layer_finetune_epochs: int | None = None
    layer_finetune_lr_factor: float = 0.1
    layer_refine_iterations: int = 1000
    upper_students: str = "finetune"
    device: str = "cpu"
    repair: RepairConfig = field(default_factory=RepairConfig)
    retrain_factor: int = 1
    retrain_above: float = 1e-6
    retrain_gap: float = 10.0
    deep_finish_rounds: int = 2
    deep_stall_decades: float = 0.02

    def __post_init__(self) -> None:
        try:
            get_activation(self.activation)
        except ValueError as e:
            raise InputError(str(e)) from None
        e = self.layer_finetune_epochs
        _validate(
            self,
            [
                ("hidden_layers", int(self.hidden_layers) >= 1, "an integer >= 1"),
                ("width", self.width is None or self.width >= 1, "None or an integer >= 1"),
                ("held_out_fraction", 0.0 <= self.held_out_fraction < 1.0, "a value in [0, 1)"),
                ("finetune_iterations", self.finetune_iterations >= 0, ">= 0"),
                ("layer_finetune_epochs", e is None or e >= 1, "None or >= 1"),
                ("layer_refine_iterations", self.layer_refine_iterations >= 0, ">= 0"),
                ("layer_finetune_lr_factor", 0.0 < self.layer_finetune_lr_factor <= 1.0,
                 "a value in (0, 1]"),
                ("retrain_factor", int(self.retrain_factor) == self.retrain_factor
                 and self.retrain_factor >= 1, "an integer >= 1"),
                ("retrain_above", self.retrain_above >= 0, ">= 0"),
                ("retrain_gap", self.retrain_gap >= 1, ">= 1"),
                ("deep_finish_rounds", self.deep_finish_rounds >= 0, ">= 0"),
                ("deep_stall_decades", self.deep_stall_decades >= 0, ">= 0"),
                ("upper_students", self.upper_students in UPPER_STUDENTS,
                 f"one of {UPPER_STUDENTS}"),
                ("device", self.device in ("cpu", "cuda"), "'cpu' or 'cuda'"),
            ],
        )  # fmt: skip
        for name, cls in _NESTED.items():
            if not isinstance(getattr(self, name), cls):
                raise InputError(f"{name}: expected a {cls.__name__}")

    @property
    def student_train(self) -> TrainConfig:
        """``train`` as this recovery's students train: with several hidden layers, with at
        least ``deep_finish_rounds`` finish rounds and a stall rule of at most
        ``deep_stall_decades``."""
        t = self.train
        if int(self.hidden_layers) < 2:
            return t
        return dataclasses.replace(
            t,
            finish_rounds=max(t.finish_rounds, self.deep_finish_rounds),
            finish_stall_decades=min(t.finish_stall_decades, self.deep_stall_decades),
        )

    # -- the dotted-key vocabulary --------------------------------------------------------------

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """Every dotted key and its type (e.g. ``{"train.max_epochs": int, ...}``), in field
        order."""
        return dict(_keys())

    def settings(self) -> dict[str, Any]:
        """The config as ``{dotted key: value}`` (every key but ``activation``)."""
        out = {}
        for key in self.keys():
            head, _, sub = key.partition(".")
            out[key] = getattr(getattr(self, head), sub) if sub else getattr(self, head)
        return out

    def updated(self, settings: Mapping[str, Any]) -> RecoverConfig:
        """A copy with the settings ``{dotted key: value}`` replaced (values as the fields' types,
        or strings parsed as by :func:`parse_setting`).

        Setting ``train.max_epochs`` to E applies the schedule-scaling rule: ``train.patience``,
        ``train.cooldown`` (:meth:`TrainConfig.scaled`) and ``search.epochs`` (``max(20, E //
        3)``) follow it, unless they are set in the same call.

        Raises
        ------
        InputError
            On an unknown key (the known ones are listed) or an invalid value (naming the key).
        """
        nested: dict[str, dict] = {name: {} for name in _NESTED}
        top = {}
        for key, value in settings.items():
            if isinstance(value, str) or key not in _keys():
                value = parse_setting(key, value)  # also refuses an unknown key
            head, _, sub = key.partition(".")
            if sub:
                nested[head][sub] = value
            else:
                top[key] = value
        train, search = self.train, self.search
        if "max_epochs" in nested["train"]:
            # The schedule follows the budget; patience, cooldown or search.epochs given in
            # the same call are applied over it below.
            e = int(nested["train"].pop("max_epochs"))
            train = train.scaled(e)
            search = dataclasses.replace(search, epochs=max(20, e // 3))
        base = {"train": train, "search": search, "cluster": self.cluster, "repair": self.repair}
        try:
            parts = {n: dataclasses.replace(base[n], **kw) for n, kw in nested.items()}
            return dataclasses.replace(self, **parts, **top)
        except (TypeError, ValueError) as e:
            raise InputError(str(e)) from None

    def to_dict(self) -> dict:
        """JSON-able form (nested configs as dicts), for checkpoints and reports."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecoverConfig:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        InputError
            When ``d`` has missing, unknown or invalid fields (a checkpoint written by another
            version).
        """
        try:
            d = dict(d)
            for name, sub in _NESTED.items():
                d[name] = sub(**d.get(name, {}))
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"config: not a RecoverConfig of this version ({e}); rerun from the queries"
            ) from None


@functools.cache
def _keys() -> dict[str, Any]:
    """:meth:`RecoverConfig.keys`, computed once (the type hints do not change)."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(RecoverConfig).items():
        if name in _NESTED:
            for sub, sub_hint in typing.get_type_hints(_NESTED[name]).items():
                out[f"{name}.{sub}"] = sub_hint
        elif name != "activation":
            out[name] = hint
    return out


def parse_setting(key: str, text: str) -> Any:
    """The value of setting ``key`` written as ``text``: "true"/"false" (also 1/0) for bools,
    "none" for an optional number left unset, numbers for int and float fields, the text itself
    for strings.

    Raises
    ------
    InputError
        On an unknown key or a text that is not of the setting's type.
    """
    known = _keys()
    if key not in known:
        raise InputError(f"unknown setting {key!r}; known: {', '.join(known)}")
    hint = known[key]
    args = set(typing.get_args(hint)) or {hint}
    t = text.strip()
    if type(None) in args and t.lower() == "none":
        return None
    if bool in args:
        if t.lower() in ("true", "1", "false", "0"):
            return t.lower() in ("true", "1")
    elif int in args:
        try:
            return int(t)
        except ValueError:
            pass
    elif float in args:
        try:
            return float(t)
        except ValueError:
            pass
    elif str in args:
        return t
    names = "/".join(sorted(a.__name__ for a in args))
    raise InputError(f"{key}: expected {names}, got {text!r}")


def parse_assignments(assignments: Iterable[str], where: str = "--set") -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` as ``{dotted key: value}`` (:func:`parse_setting`).

    Raises
    ------
    InputError
        Naming ``where`` on a malformed assignment, an unknown key or an invalid value.
    """
    out = {}
    for a in assignments:
        key, eq, value = (t.strip() for t in a.partition("="))
        if not eq or not value:
            raise InputError(f"{where}: expected KEY=VALUE, got {a!r}")
        try:
            out[key] = parse_setting(key, value)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    return out


#: Settings of the command line and the suites where they set nothing else: a short Adam
#: schedule on mini-batches that hands each student over to the float64 finish when its
#: progress stalls; the finish is what makes the students precise enough to cluster (the
#: library's own defaults are the paper's long schedule), and the retrain on (a recovered
#: network far worse than its students is trained again, 4 times longer).
RUN_DEFAULTS: dict[str, Any] = {
    "train.n_students": 20,
    "train.max_epochs": 300,
    "train.batch_size": 512,
    "train.polish_iterations": 1500,
    "train.handover_window": None,
    "cluster.gamma": 0.5,
    "cluster.beta_degrees": 60.0,
    "finetune_iterations": 3000,
    "held_out_fraction": 0.1,
    "retrain_factor": 4,
}
