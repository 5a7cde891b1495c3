"""Identifiability benchmark suites: many planted teachers of varying difficulty, recovered one by
one, scored against the known answer (Martinelli et al. 2024, Sec. 4, "ease of identifiability").

Suite file (JSON, ``"format": "expand-and-cluster-suite/1"``)::

    {"format": "expand-and-cluster-suite/1", "name": "small",
     "settings": {...},            # recover settings shared by all problems (see SuiteSettings)
     "problems": [{...}, ...],     # explicit problems (see Problem), and/or
     "generate": {"n": 150, "seed": 0, "axes": {"activation": [...], "d_in": [2, 16], ...}}}

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
- ``rho``: the expansion factor (student width = rho * teacher width); null runs the expansion
  search.

Success criterion, fixed up front: the exact width and every teacher neuron within cosine distance
1e-3 (``success``) or 1e-6 (``success_1e-6``) of a recovered neuron.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .activations import get_activation
from .errors import InputError, NoClusterError

SUITE_FORMAT = "expand-and-cluster-suite/1"
THRESHOLDS = (1e-3, 1e-6)


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

    def __post_init__(self) -> None:
        get_activation(self.activation)
        checks = [
            ("d_in", self.d_in >= 1),
            ("width", self.width >= 1),
            ("d_out", self.d_out >= 1),
            ("distribution", self.distribution in ("gaussian", "uniform")),
            ("queries_per_param", self.queries_per_param > 0),
            ("min_angle_degrees", 0 <= self.min_angle_degrees < 90),
            ("weak_outgoing", self.weak_outgoing > 0),
            ("rho", self.rho is None or self.rho >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise InputError(f"problem {self.id!r}: invalid {name} = {getattr(self, name)!r}")

    @property
    def n_params(self) -> int:
        return self.width * (self.d_in + 1) + self.d_out * (self.width + 1)

    @property
    def n_queries(self) -> int:
        return max(20, math.ceil(self.queries_per_param * self.n_params))


@dataclass(frozen=True)
class SuiteSettings:
    """Recover settings shared by a suite's problems (the CLI's defaults where not given).

    ``min_steps``: the epoch budget of a problem is raised so that each student gets at least
    this many Adam steps (a problem with few queries has few mini-batches per epoch); the plateau
    patience and cooldown scale with the raised budget. ``repair``: run the width repair after
    the fine-tune (:mod:`expand_and_cluster.repair`); rows also score the network before it.
    ``repair_trial_queries``: the repair's trials see this many training queries (its
    ``RepairConfig.trial_queries``; 0, the default, all). ``retrain_factor``,
    ``retrain_above``, ``retrain_gap``: the retrain of a recovery whose network is far worse
    than its students (:class:`~expand_and_cluster.recover.RecoverConfig`; 1: never); rows also
    score the first pass.
    """

    students: int = 20
    gamma: float = 0.5
    beta_degrees: float = 60.0
    epochs: int = 300
    batch_size: int = 512
    polish_iterations: int = 1500
    finetune_iterations: int = 3000
    held_out_fraction: float = 0.1
    min_steps: int = 0
    repair: bool = True
    repair_trial_queries: int = 0
    retrain_factor: int = 4
    retrain_above: float = 1e-6
    retrain_gap: float = 10.0


@dataclass
class Suite:
    name: str
    settings: SuiteSettings
    problems: list[Problem] = field(default_factory=list)


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
        out.append(Problem(id=f"{spec.get('prefix', 'gen')}-{i:04d}", **kw))
    return out


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file.

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
    if not isinstance(raw, dict) or raw.get("format") != SUITE_FORMAT:
        raise InputError(f'suite: {path} must be a JSON object with "format": "{SUITE_FORMAT}"')
    known_settings = {f.name for f in fields(SuiteSettings)}
    settings = raw.get("settings", {})
    if not isinstance(settings, dict):
        raise InputError(f'suite: {path}: "settings" must be a JSON object')
    unknown = set(settings) - known_settings
    if unknown:
        raise InputError(
            f"suite: unknown settings {sorted(unknown)}; known: {sorted(known_settings)}"
        )
    known_problem = {f.name for f in fields(Problem)}
    problems = []
    for i, p in enumerate(raw.get("problems", [])):
        bad = set(p) - known_problem
        if bad or "id" not in p:
            raise InputError(f"suite: problem {i}: needs an id; unknown keys {sorted(bad)}")
        problems.append(Problem(**p))
    if "generate" in raw:
        problems += _generate(raw["generate"])
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise InputError("suite: problem ids must be unique")
    if not problems:
        raise InputError(f"suite: {path} defines no problems")
    settings = {k: _setting_value(k, v, f"suite: {path}: settings") for k, v in settings.items()}
    suite = Suite(str(raw.get("name", path.stem)), SuiteSettings(**settings), problems)
    _check_settings(suite, f"suite: {path}")
    return suite


_KIND_NAMES = {int: "an integer >= 0", float: "a number >= 0", bool: "true or false"}


def _setting_types() -> dict[str, type]:
    """Each setting's type, from :class:`SuiteSettings`' defaults (a suite file may write 1 for
    1.0)."""
    defaults = SuiteSettings()
    return {f.name: type(getattr(defaults, f.name)) for f in fields(SuiteSettings)}


def _setting_value(key: str, value, where: str):
    """``value`` (a JSON value, or the text of a ``KEY=VALUE`` assignment) as setting ``key``'s
    type: bools from true/false (text also 1/0), integers and numbers >= 0.

    Raises
    ------
    InputError
        Naming ``where``, the setting and the expectation.
    """
    kind = _setting_types()[key]
    ok = True
    if isinstance(value, str):
        text = value.strip().lower()
        if kind is bool:
            ok = text in ("true", "false", "1", "0")
            value = text in ("true", "1")
        else:
            try:
                value = kind(text)
            except ValueError:
                ok = False
    elif kind is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif kind is int:
        ok = float(value).is_integer()
        value = int(value) if ok else value
    else:
        value = float(value)
    if ok and kind is not bool:
        ok = value >= 0
    if not ok:
        raise InputError(f"{where}: {key} expects {_KIND_NAMES[kind]}, got {value!r}")
    return value


def _check_settings(suite: Suite, where: str) -> None:
    """Build every problem's recover config, so an out-of-range setting (``epochs: 0``) is
    refused before the first problem runs rather than when it does.

    Raises
    ------
    InputError
        Naming ``where``, the problem and the config's message (gamma * N < 2 included).
    """
    from .clustering import min_cluster_size

    try:
        min_cluster_size(suite.settings.gamma, suite.settings.students)
    except (ValueError, InputError) as e:
        raise InputError(f"{where}: {e}") from None
    for problem in suite.problems:
        try:
            problem_config(problem, suite.settings)
        except (ValueError, InputError) as e:
            raise InputError(f"{where}: problem {problem.id}: {e}") from None


def override_settings(suite: Suite, assignments: list[str]) -> Suite:
    """The suite with settings replaced by ``KEY=VALUE`` assignments (a :class:`SuiteSettings`
    field; ints and floats parsed as such and >= 0, bools from true/false/1/0).

    Raises
    ------
    InputError
        On a malformed assignment, an unknown field, a value of the wrong type, or a value that
        the recover configs refuse.
    """
    types = _setting_types()
    changes: dict = {}
    for a in assignments:
        key, eq, value = (t.strip() for t in a.partition("="))
        if not eq or not value:
            raise InputError(f"--setting: expected KEY=VALUE, got {a!r}")
        if key not in types:
            raise InputError(f"--setting: unknown setting {key!r}; known: {sorted(types)}")
        changes[key] = _setting_value(key, value, "--setting")
    out = Suite(suite.name, replace(suite.settings, **changes), suite.problems)
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


def problem_config(problem: Problem, settings: SuiteSettings, device: str = "cpu"):
    """The :class:`~expand_and_cluster.recover.RecoverConfig` that :func:`run_problem` recovers
    ``problem`` with, and the epoch budget in it (``settings.epochs``, raised to give each student
    ``settings.min_steps`` Adam steps).

    Raises
    ------
    ValueError, InputError
        From the configs' own checks, when a setting is out of range (``epochs: 0``).
    """
    from .clustering import ClusterConfig
    from .recover import RecoverConfig
    from .repair import RepairConfig
    from .training import TrainConfig

    width = None if problem.rho is None else max(1, math.ceil(problem.rho * problem.width))
    n_train = problem.n_queries - int(round(settings.held_out_fraction * problem.n_queries))
    n_train = max(1, n_train)
    batches = math.ceil(n_train / max(1, min(settings.batch_size, n_train)))
    epochs = max(settings.epochs, math.ceil(settings.min_steps / batches))
    cfg = RecoverConfig(
        activation=problem.activation,
        width=width,
        cluster=ClusterConfig(gamma=settings.gamma, beta_degrees=settings.beta_degrees),
        train=TrainConfig(
            n_students=settings.students,
            batch_size=settings.batch_size,
            max_epochs=epochs,
            polish_iterations=settings.polish_iterations,
            patience=max(10, epochs // 10),
            cooldown=max(5, epochs // 20),
            seed=problem.seed,
            progress=False,
        ),
        held_out_fraction=settings.held_out_fraction,
        finetune_iterations=settings.finetune_iterations,
        device=device,
        repair=(
            RepairConfig(trial_queries=settings.repair_trial_queries)
            if settings.repair
            else RepairConfig.off()
        ),
        retrain_factor=settings.retrain_factor,
        retrain_above=settings.retrain_above,
        retrain_gap=settings.retrain_gap,
    )
    return cfg, epochs


def run_problem(problem: Problem, settings: SuiteSettings, device: str = "cpu") -> dict:
    """Plant, probe, recover and score one problem (students trained on ``device``, "cpu" or
    "cuda"); returns its result row."""
    from . import metrics
    from .recover import recover
    from .teacher import planted_teacher, probe

    t0 = time.perf_counter()
    teacher = planted_teacher(
        problem.d_in,
        [problem.width],
        problem.d_out,
        problem.activation,
        seed=problem.seed,
        min_angle_degrees=problem.min_angle_degrees,
    )
    teacher.weights[1][:, -1] *= problem.weak_outgoing
    X, Y = probe(teacher, problem.n_queries, problem.distribution, seed=problem.seed)
    cfg, epochs = problem_config(problem, settings, device)
    width = cfg.width
    row = {
        **asdict(problem),
        "n_queries": problem.n_queries,
        "n_params": problem.n_params,
        "epochs": epochs,
    }
    try:
        res = recover(X, Y, cfg)
    except NoClusterError as e:
        return {
            **row,
            "status": "no_cluster",
            "message": str(e),
            "recovered_width": 0,
            "student_width": width,
            "success": False,
            "success_1e-6": False,
            "success_without_repair": False,
            "width_before_repair": 0,
            "max_distance": 1.0,
            "median_distance": 1.0,
            "held_out_relative_mse": None,
            "seconds": time.perf_counter() - t0,
        }

    def score(net) -> tuple[bool, dict]:
        al = metrics.alignment(
            teacher.incoming(0), net.incoming(0), problem.activation, net.input_mask
        )
        return net.hidden_sizes == [problem.width], al

    exact, al = score(res.network)
    row.update(
        status="ok",
        student_width=res.student_width,
        recovered_width=res.network.hidden_sizes[0],
        max_distance=al["max"],
        median_distance=al["median"],
        held_out_relative_mse=res.relative_mse["held_out"],
        student_median_relative_mse=float(np.median(res.training.relative_mse)),
        dropped_clusters=len(res.clustering.dropped),
        seconds=time.perf_counter() - t0,
    )
    row["success"] = bool(exact and al["max"] < THRESHOLDS[0])
    row["success_1e-6"] = bool(exact and al["max"] < THRESHOLDS[1])
    # The first pass (before a retrain), and the paper's procedure alone (the first pass before
    # this package's width repair), for comparison.
    first = res if res.first_attempt is None else res.first_attempt
    if res.retrain is not None:  # the first pass is ``res`` itself when the retrain lost
        ok, al = score(first.network)
        row.update(
            retrained=True,
            retrain_kept=res.retrain["kept"],
            width_before_retrain=first.network.hidden_sizes[0],
            success_without_retrain=bool(ok and al["max"] < THRESHOLDS[0]),
        )
    else:
        row.update(retrained=False, success_without_retrain=row["success"])
    rep = first.repair
    before = first.network if rep is None or not rep.changed else rep.before
    ok, al = score(before)
    row.update(
        width_before_repair=before.hidden_sizes[0],
        repair_added=0 if rep is None else len(rep.added),
        repair_pruned=0 if rep is None else len(rep.pruned),
        success_without_repair=bool(ok and al["max"] < THRESHOLDS[0]),
    )
    return row


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that problem reruns
                continue
    return rows


def run_suite(suite: Suite, out: Path, jobs: int = 1, log=None, device: str = "cpu") -> list[dict]:
    """Run every problem not yet in ``out/results.jsonl`` (so an interrupted run resumes), append
    one JSON row per problem as it finishes, then write ``summary.json``, ``summary.md`` and the
    figures. ``jobs`` > 1 runs problems in that many processes (started with "spawn" on CUDA,
    which a forked process cannot use); every problem runs with one torch thread and one kernel
    thread, in a worker or (``jobs`` 1) here, so the rows do not depend on ``jobs``.
    ``device``: where the students train, "cpu" or "cuda"."""
    from .report import write_json_atomic

    say = log or (lambda s: None)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["id"] for r in _read_rows(results)}
    todo = [p for p in suite.problems if p.id not in done]
    say(f"suite {suite.name}: {len(suite.problems)} problems, {len(done)} done, {len(todo)} to run")
    t0 = time.perf_counter()

    def record(row: dict) -> None:
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        say(
            f"{row['id']}: {row['activation']} d_in {row['d_in']} width {row['width']} -> "
            f"{row.get('recovered_width')} ({'ok' if row['success'] else 'fail'}, "
            f"max distance {row['max_distance']:.1e}, {row['seconds']:.1f} s)"
        )

    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn") if device == "cuda" else None
        with ProcessPoolExecutor(
            max_workers=jobs, initializer=_single_thread, mp_context=ctx
        ) as pool:
            futures = [pool.submit(run_problem, p, suite.settings, device) for p in todo]
            for fut in futures:
                record(fut.result())
    else:
        # One thread here too, as in the workers: torch's thread count changes the order of its
        # float sums, hence the students' trajectories, so the rows would depend on --jobs.
        import torch

        from . import ops

        threads = torch.get_num_threads(), ops.num_threads()
        _single_thread()
        try:
            for p in todo:
                record(run_problem(p, suite.settings, device))
        finally:
            torch.set_num_threads(threads[0])
            ops.set_num_threads(threads[1])
    rows = [r for r in _read_rows(results) if r["id"] in {p.id for p in suite.problems}]
    summary = summarise(rows)
    summary.update(
        suite=suite.name, wall_s_this_run=time.perf_counter() - t0, settings=asdict(suite.settings)
    )
    write_json_atomic(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary))
    plot_suite(rows, out)
    return rows


def _single_thread() -> None:
    import torch

    from . import ops

    torch.set_num_threads(1)
    ops.set_num_threads(1)


def summarise(rows: list[dict]) -> dict:
    """Success rates overall, per activation and per rho; median and total time."""

    def rate(sub, key="success"):
        # Rows written before the width repair (the retrain) existed count as without it.
        return float(np.mean([r.get(key, r["success"]) for r in sub])) if sub else None

    def rates(sub):
        return {
            "problems": len(sub),
            "success_rate": rate(sub),
            "success_rate_1e-6": rate(sub, "success_1e-6"),
            "success_rate_without_repair": rate(sub, "success_without_repair"),
        }

    by_act: dict = {}
    for r in rows:
        by_act.setdefault(r["activation"], []).append(r)
    by_rho: dict = {}
    for r in rows:
        by_rho.setdefault(str(r["rho"]), []).append(r)
    return {
        "problems": len(rows),
        "success_rate": rate(rows),
        "success_rate_1e-6": rate(rows, "success_1e-6"),
        "success_rate_without_repair": rate(rows, "success_without_repair"),
        "success_rate_without_retrain": rate(rows, "success_without_retrain"),
        "retrained": sum(1 for r in rows if r.get("retrained")),
        "retrained_kept": sum(1 for r in rows if r.get("retrain_kept") == "retrained"),
        "per_activation": {a: rates(s) for a, s in sorted(by_act.items())},
        "per_rho": {
            k: {
                **rates(s),
                "per_activation": {
                    a: rates([r for r in s if r["activation"] == a])
                    for a in sorted({r["activation"] for r in s})
                },
            }
            for k, s in sorted(by_rho.items(), key=lambda kv: float(kv[0]))
        },
        "failures": {
            "wrong_width": sum(1 for r in rows if r.get("recovered_width") != r["width"]),
            "no_cluster": sum(1 for r in rows if r.get("status") == "no_cluster"),
            "imprecise": sum(
                1 for r in rows if r.get("recovered_width") == r["width"] and not r["success"]
            ),
        },
        "median_seconds": float(np.median([r["seconds"] for r in rows])) if rows else None,
        "total_seconds": float(sum(r["seconds"] for r in rows)),
    }


def summary_markdown(summary: dict) -> str:
    lines = [
        f"# Suite {summary.get('suite', '')}: {summary['problems']} problems",
        "",
        f"Success (exact width, every teacher neuron within 1e-3): "
        f"{summary['success_rate']:.1%}; within 1e-6: {summary['success_rate_1e-6']:.1%}. "
        f"Median time per problem {summary['median_seconds']:.1f} s, total "
        f"{summary['total_seconds']:.0f} s. Without the width repair (the paper's procedure "
        f"alone): {summary['success_rate_without_repair']:.1%}. Retrained (the network far "
        f"worse than its students): {summary.get('retrained', 0)} problem(s), the retrain kept "
        f"in {summary.get('retrained_kept', 0)}; without the retrain: "
        f"{summary.get('success_rate_without_retrain', summary['success_rate']):.1%}.",
        "",
        "| activation | problems | success (1e-3) | success (1e-6) | without repair (1e-3) |",
        "|---|---|---|---|---|",
    ]
    for a, s in summary["per_activation"].items():
        lines.append(
            f"| {a} | {s['problems']} | {s['success_rate']:.0%} | {s['success_rate_1e-6']:.0%} "
            f"| {s['success_rate_without_repair']:.0%} |"
        )
    lines += [
        "",
        "Per expansion factor rho and activation (successes at 1e-3 / problems; without repair "
        "in brackets):",
        "",
        "| rho | all | " + " | ".join(summary["per_activation"]) + " |",
        "|---|---|" + "---|" * len(summary["per_activation"]),
    ]

    def cell(s):
        if not s or not s["problems"]:
            return "-"
        n = s["problems"]
        ok = round(s["success_rate"] * n)
        raw = round(s["success_rate_without_repair"] * n)
        return f"{ok}/{n} ({raw})"

    for k, s in summary["per_rho"].items():
        per = s.get("per_activation", {})
        lines.append(
            f"| {k} | {cell(s)} | "
            + " | ".join(cell(per.get(a)) for a in summary["per_activation"])
            + " |"
        )
    f = summary["failures"]
    lines += [
        "",
        f"Failures: wrong width {f['wrong_width']} (of which no cluster "
        f"{f['no_cluster']}), exact width but a neuron further than 1e-3 "
        f"{f['imprecise']}.",
        "",
    ]
    return "\n".join(lines)


def plot_suite(rows: list[dict], out: Path) -> list[Path]:
    """Figures: success rate against rho per activation, against each difficulty axis, and the
    time per problem. Returns the paths written."""
    from .report import _new_figure, _save_figure

    written = []
    acts = sorted({r["activation"] for r in rows})
    fig = _new_figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for a in acts:
        sub = [r for r in rows if r["activation"] == a and r["rho"] is not None]
        rhos = sorted({r["rho"] for r in sub})
        if rhos:
            ax.plot(
                rhos,
                [np.mean([r["success"] for r in sub if r["rho"] == q]) for q in rhos],
                marker="o",
                label=a,
            )
    ax.set_xlabel("expansion factor rho")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.05, 1.05)
    if acts:
        ax.legend(fontsize=8)
    written.append(_save_figure(fig, out / "success_vs_rho.png"))

    axes = ["d_in", "width", "queries_per_param", "min_angle_degrees", "weak_outgoing"]
    fig = _new_figure(figsize=(3 * len(axes), 3))
    axs = fig.subplots(1, len(axes), sharey=True)
    ok = np.array([r["success"] for r in rows], dtype=float)
    for ax, key in zip(axs, axes):
        vals = np.array([r[key] for r in rows], dtype=float)
        # success rate per bin of the axis (at most 5 bins of roughly equal counts)
        edges = np.unique(np.quantile(vals, np.linspace(0, 1, 6))) if len(vals) else []
        if len(edges) >= 2:
            idx = np.clip(np.searchsorted(edges, vals, side="right") - 1, 0, len(edges) - 2)
            centres = [vals[idx == i].mean() for i in range(len(edges) - 1) if (idx == i).any()]
            rates = [ok[idx == i].mean() for i in range(len(edges) - 1) if (idx == i).any()]
            counts = [int((idx == i).sum()) for i in range(len(edges) - 1) if (idx == i).any()]
        else:
            centres, rates, counts = list(vals[:1]), list(ok[:1]), [len(vals)]
        ax.plot(centres, rates, marker="o")
        for c, r_, n in zip(centres, rates, counts):
            ax.annotate(str(n), (c, r_), textcoords="offset points", xytext=(0, 5), fontsize=7)
        if key in ("queries_per_param", "weak_outgoing") and len(vals) and (vals > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylim(-0.05, 1.1)
    axs[0].set_ylabel("success rate (problems per bin)")
    written.append(_save_figure(fig, out / "success_vs_axes.png"))

    fig = _new_figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.hist([r["seconds"] for r in rows], bins=20)
    ax.set_xlabel("seconds per problem")
    ax.set_ylabel("problems")
    written.append(_save_figure(fig, out / "time_per_problem.png"))
    return written
