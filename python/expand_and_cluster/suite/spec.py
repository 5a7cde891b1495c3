"""Identifiability suites: many planted teachers of varying difficulty, recovered one by one and
scored against the known answer (Martinelli et al. 2024, Sec. 4, "ease of identifiability").

Suite file (JSON, ``"format": "expand-and-cluster-suite/2"``)::

    {"format": "expand-and-cluster-suite/2", "name": "small",
     "settings": {"train.n_students": 8, ...},  # dotted keys of RecoverConfig, and min_steps
     "problems": [{...}, ...],                   # explicit problems (see Problem), and/or
     "generate": {"n": 150, "seed": 0, "prefix": "full",
                  "choices": {"activation": [...], ...}, "ranges": {"d_in": [2, 16], ...}}}
                                                 # or a list of such blocks

``settings`` take the dotted keys of :class:`~expand_and_cluster.config.RecoverConfig`
(``train.max_epochs``, ``cluster.gamma``, ``repair.trial_queries``, ...); unset keys take
:data:`SUITE_DEFAULTS`. The suite-only key ``min_steps`` raises a problem's epoch budget so that
every student gets at least that many Adam steps (a problem with few queries has few
mini-batches per epoch). Format 1 files, whose settings had flat names (``epochs``,
``students``, ``repair``, ...), are read too.

Difficulty axes of a problem (each makes recovery harder in its own way):

- ``activation``: the symmetry class. Sign and scale symmetries make more student configurations
  equivalent, and even_linear classes leave a linear term to disentangle.
- ``d_in`` (2-16) and ``width`` (2-16): more teacher parameters to pin down with the same budget.
- ``distribution``: "gaussian" or "uniform" inputs; bounded inputs excite the tails less.
- ``queries_per_param``: queries relative to the teacher's parameter count; too few
  under-determine the teacher.
- ``min_angle_degrees``: the smallest angle between two teacher neurons; close neurons merge in
  the students and in the clustering.
- ``weak_outgoing``: the last teacher neuron's outgoing weights are scaled by this factor; a
  neuron that barely affects the output is barely constrained by the queries.
- ``rho``: the expansion factor (student width = rho * teacher width, the widest layer's for a
  deep teacher); null runs the expansion search.
- ``depth``: the number of hidden layers. A deep teacher's hidden widths are ``widths`` (one per
  layer); ``generate`` draws each from the ``width`` range (``width`` is then the first
  layer's). Each layer is recovered in the coordinates of the one below and errors compound.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..activations import get_activation
from ..config import RUN_DEFAULTS, RecoverConfig, parse_setting
from ..errors import InputError

SUITE_FORMAT = "expand-and-cluster-suite/2"
#: Settings of every suite unless its file or ``--setting`` says otherwise: the command line's.
SUITE_DEFAULTS: dict[str, Any] = {**RUN_DEFAULTS, "min_steps": 0}
#: The flat setting names of format 1 and their dotted keys.
FORMAT_1_NAMES = {
    "students": "train.n_students",
    "gamma": "cluster.gamma",
    "beta_degrees": "cluster.beta_degrees",
    "epochs": "train.max_epochs",
    "batch_size": "train.batch_size",
    "polish_iterations": "train.polish_iterations",
    "finetune_iterations": "finetune_iterations",
    "held_out_fraction": "held_out_fraction",
    "min_steps": "min_steps",
    "repair": "repair.enabled",
    "repair_trial_queries": "repair.trial_queries",
    "retrain_factor": "retrain_factor",
    "retrain_above": "retrain_above",
    "retrain_gap": "retrain_gap",
}


@dataclass(frozen=True)
class Problem:
    """One planted teacher and how it is probed. See the module docstring for the axes."""

    id: str
    activation: str = "tanh"
    d_in: int = 4
    width: int = 3
    d_out: int = 1
    distribution: str = "gaussian"
    queries_per_param: float = 100.0
    min_angle_degrees: float = 20.0
    weak_outgoing: float = 1.0
    rho: float | None = 2.0
    seed: int = 0
    depth: int = 1
    widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        get_activation(self.activation)
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        checks = [
            ("d_in", self.d_in >= 1),
            ("width", self.width >= 1),
            ("d_out", self.d_out >= 1),
            ("distribution", self.distribution in ("gaussian", "uniform")),
            ("queries_per_param", self.queries_per_param > 0),
            ("min_angle_degrees", 0 <= self.min_angle_degrees < 90),
            ("weak_outgoing", self.weak_outgoing > 0),
            ("rho", self.rho is None or self.rho >= 1),
            ("depth", self.depth >= 1),
            (
                "widths",
                self.widths is None or (len(self.widths) == self.depth and min(self.widths) >= 1),
            ),
        ]
        for name, ok in checks:
            if not ok:
                raise InputError(f"problem {self.id!r}: invalid {name} = {getattr(self, name)!r}")

    @property
    def hidden_widths(self) -> list[int]:
        """The teacher's hidden widths: ``widths``, else ``width`` in each of ``depth`` layers."""
        return list(self.widths) if self.widths is not None else [self.width] * self.depth

    @property
    def n_params(self) -> int:
        sizes = [self.d_in, *self.hidden_widths, self.d_out]
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))

    @property
    def n_queries(self) -> int:
        return max(20, math.ceil(self.queries_per_param * self.n_params))


@dataclass
class Suite:
    """A suite: its name, its settings (dotted keys given by the file or ``--setting``, on top
    of :data:`SUITE_DEFAULTS`) and its problems."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def effective_settings(self) -> dict[str, Any]:
        """:data:`SUITE_DEFAULTS` updated by :attr:`settings`."""
        return {**SUITE_DEFAULTS, **self.settings}


def _generate(spec: dict) -> list[Problem]:
    """Problems drawn at random from the ``axes`` of a ``generate`` block: a list is a set of
    choices, ``[lo, hi]`` of two numbers under ``ranges`` is an interval (integers for integer
    fields, log-uniform for ``queries_per_param`` and ``weak_outgoing``)."""
    n = int(spec.get("n", 0))
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    choices = spec.get("choices", {})
    ranges = spec.get("ranges", {})
    known = {f.name for f in fields(Problem)}
    for key in list(choices) + list(ranges):
        if key not in known or key == "id":
            raise InputError(f"generate: unknown axis {key!r}; known: {sorted(known - {'id'})}")
    out = []
    for i in range(n):
        kw: dict = {}
        for key, options in choices.items():
            kw[key] = options[int(rng.integers(len(options)))]
        for key, (lo, hi) in ranges.items():
            if key in ("queries_per_param", "weak_outgoing"):
                kw[key] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            elif isinstance(lo, int) and isinstance(hi, int):
                kw[key] = int(rng.integers(lo, hi + 1))
            else:
                kw[key] = float(rng.uniform(lo, hi))
        kw.setdefault("seed", int(rng.integers(2**31)))
        depth = int(kw.get("depth", 1))
        if depth > 1 and "widths" not in kw:
            lo, hi = ranges.get("width", (kw.get("width", 3),) * 2)
            widths = [int(kw.get("width", 3))] + [
                int(rng.integers(lo, hi + 1)) for _ in range(depth - 1)
            ]
            kw.update(widths=widths, width=widths[0])
        out.append(Problem(id=f"{spec.get('prefix', 'gen')}-{i:04d}", **kw))
    return out


def _setting(key: str, value: Any, where: str) -> Any:
    """``value`` (JSON or text) as the type of setting ``key`` (a dotted key of
    :class:`~expand_and_cluster.config.RecoverConfig`, or ``min_steps``).

    Raises
    ------
    InputError
        Naming ``where`` and the setting: an unknown key (the format-1 name's new key when there
        is one) or a value of the wrong type.
    """
    if key == "min_steps":
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        try:
            value = int(value) if ok else value
        except ValueError:
            ok = False
        if not ok or value < 0:
            raise InputError(f"{where}: min_steps expects an integer >= 0, got {value!r}")
        return value
    if key not in RecoverConfig.keys():
        hint = f" (now {FORMAT_1_NAMES[key]!r})" if key in FORMAT_1_NAMES else ""
        raise InputError(
            f"{where}: unknown setting {key!r}{hint}; known: min_steps, "
            + ", ".join(RecoverConfig.keys())
        )
    try:
        return parse_setting(key, value) if isinstance(value, str) else value
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (format 2, or format 1 with flat setting names).

    Raises
    ------
    InputError
        Missing file, invalid JSON, wrong format tag, unknown keys, invalid values, duplicate ids.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"suite: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"suite: {path} is not valid JSON ({e})") from None
    old = SUITE_FORMAT[:-1] + "1"
    if not isinstance(raw, dict) or raw.get("format") not in (SUITE_FORMAT, old):
        raise InputError(f'suite: {path} must be a JSON object with "format": "{SUITE_FORMAT}"')
    settings = raw.get("settings", {})
    if not isinstance(settings, dict):
        raise InputError(f'suite: {path}: "settings" must be a JSON object')
    if raw["format"] == old:
        unknown = sorted(set(settings) - set(FORMAT_1_NAMES))
        if unknown:
            raise InputError(f"suite: unknown settings {unknown}; known: {sorted(FORMAT_1_NAMES)}")
        settings = {FORMAT_1_NAMES[k]: v for k, v in settings.items()}
    where = f"suite: {path}: settings"
    settings = {k: _setting(k, v, where) for k, v in settings.items()}
    known_problem = {f.name for f in fields(Problem)}
    problems = []
    for i, p in enumerate(raw.get("problems", [])):
        bad = set(p) - known_problem
        if bad or "id" not in p:
            raise InputError(f"suite: problem {i}: needs an id; unknown keys {sorted(bad)}")
        problems.append(Problem(**p))
    blocks = raw.get("generate", [])
    for block in blocks if isinstance(blocks, list) else [blocks]:
        problems += _generate(block)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise InputError("suite: problem ids must be unique")
    if not problems:
        raise InputError(f"suite: {path} defines no problems")
    suite = Suite(str(raw.get("name", path.stem)), settings, problems)
    _check_settings(suite, f"suite: {path}")
    return suite


def _check_settings(suite: Suite, where: str) -> None:
    """Build every problem's recover config, so an out-of-range setting (``train.max_epochs:
    0``) is refused before the first problem runs rather than when it does.

    Raises
    ------
    InputError
        Naming ``where``, the problem and the config's message (gamma * N < 2 included).
    """
    from ..pipeline.cluster import min_cluster_size

    s = suite.effective_settings()
    try:
        min_cluster_size(s["cluster.gamma"], s["train.n_students"])
    except (ValueError, InputError) as e:
        raise InputError(f"{where}: {e}") from None
    for problem in suite.problems:
        try:
            problem_config(problem, s)
        except (ValueError, InputError) as e:
            raise InputError(f"{where}: problem {problem.id}: {e}") from None


def override_settings(suite: Suite, assignments: list[str]) -> Suite:
    """The suite with settings replaced by ``KEY=VALUE`` assignments (dotted keys, or
    ``min_steps``).

    Raises
    ------
    InputError
        On a malformed assignment, an unknown key, a value of the wrong type, or a value that
        the recover configs refuse.
    """
    changes: dict = {}
    for a in assignments:
        key, eq, value = (t.strip() for t in a.partition("="))
        if not eq or not value:
            raise InputError(f"--setting: expected KEY=VALUE, got {a!r}")
        changes[key] = _setting(key, value, "--setting")
    out = Suite(suite.name, {**suite.settings, **changes}, suite.problems)
    _check_settings(out, "--setting")
    return out


def select_problems(suite: Suite, selectors: list[str]) -> Suite:
    """The suite restricted to problems matching every selector ``KEY=V1[,V2...]`` (a problem
    field and the values it may take; numbers compare as numbers: ``rho=4`` matches 4.0).

    Raises
    ------
    InputError
        On a malformed selector, an unknown field, or when no problem matches.
    """
    known = {f.name for f in fields(Problem)}
    problems = list(suite.problems)
    for sel in selectors:
        key, eq, values = sel.partition("=")
        key = key.strip()
        if not eq or not values:
            raise InputError(f"--select: expected KEY=VALUE[,VALUE...], got {sel!r}")
        if key not in known:
            raise InputError(f"--select: unknown field {key!r}; known: {sorted(known)}")
        wanted = [v.strip() for v in values.split(",")]

        def match(value, wanted=wanted) -> bool:
            for w in wanted:
                try:
                    if value is not None and float(value) == float(w):
                        return True
                except (TypeError, ValueError):
                    pass
                if str(value) == w:
                    return True
            return False

        problems = [p for p in problems if match(getattr(p, key))]
    if not problems:
        raise InputError(f"--select: no problem of suite {suite.name!r} matches {selectors}")
    return Suite(suite.name, suite.settings, problems)


def problem_config(
    problem: Problem, settings: dict[str, Any], device: str = "cpu"
) -> tuple[RecoverConfig, int]:
    """The :class:`~expand_and_cluster.config.RecoverConfig` that
    :func:`~expand_and_cluster.suite.runner.run_problem` recovers ``problem`` with, and its
    epoch budget: ``train.max_epochs``, raised so that each student gets ``min_steps`` Adam
    steps (the schedule then scales with it, :meth:`RecoverConfig.updated`).

    Parameters
    ----------
    settings : the suite's effective settings (:meth:`Suite.effective_settings`).

    Raises
    ------
    InputError
        From the configs' own checks, when a setting is out of range.
    """
    s = dict(settings)
    min_steps = int(s.pop("min_steps", 0))
    widest = max(problem.hidden_widths)
    width = None if problem.rho is None else max(1, math.ceil(problem.rho * widest))
    n_train = problem.n_queries - int(round(s["held_out_fraction"] * problem.n_queries))
    n_train = max(1, n_train)
    batches = math.ceil(n_train / max(1, min(s["train.batch_size"] or n_train, n_train)))
    epochs = max(s["train.max_epochs"], math.ceil(min_steps / batches))
    s.update({"train.max_epochs": epochs, "train.seed": problem.seed, "train.progress": False})
    cfg = RecoverConfig(
        problem.activation, hidden_layers=problem.depth, width=width, device=device
    ).updated(s)
    return cfg, epochs
