"""Command line: ``expand-and-cluster recover|cluster|demo|suite|bench`` (also
``python -m expand_and_cluster``). It parses, builds a
:class:`~expand_and_cluster.config.RecoverConfig`, calls the library and writes the run's files.

Each method flag sets one dotted key of the config (``--epochs`` is ``train.max_epochs``,
``--gamma`` is ``cluster.gamma``, ...); ``--set KEY=VALUE`` sets any other. User errors (bad
files, bad options) print one line on stderr and exit with code 2, without a traceback, and
leave no output folder behind: a run writes into a temporary folder next to ``--out`` and
renames it into place only when it has finished. Exit code 3: no cluster survived; 4: a degraded
result, written and marked in report.json (README, "Command line").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from ._version import __version__
from .activations import ACTIVATIONS
from .config import RUN_DEFAULTS, RecoverConfig, RepairConfig, parse_assignments
from .config.steps import FINISHES
from .errors import InputError, NoClusterError
from .io.checkpoint import Checkpoint, RunFolder
from .io.files import (
    check_activation,
    load_network,
    load_probe_inputs,
    load_queries,
    save_network,
    save_queries,
)
from .io.report import summary_text, write_run
from .ops import resolve_device
from .pipeline.recover import recover
from .pipeline.stages import split_queries
from .suite.command import add_parsers as add_suite_parsers
from .suite.command import cmd_suite
from .teachers import biased_noise_augmentation, probe, train_digits_teacher

EXIT_USER_ERROR = 2
EXIT_NO_CLUSTER = 3
EXIT_DEGRADED = 4


def _number(name, kind, lo, hi=float("inf"), lo_open=False):
    """argparse type: a ``kind`` (int or float) in [lo, hi] (or (lo, hi])."""

    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{name}: expected {what}, got {s!r}") from None
        if not (lo < v if lo_open else lo <= v) or not v <= hi or not np.isfinite(v):
            span = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi < float("inf") else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{name}: expected a value in {span}, got {v}")
        return v

    return parse


def _widths(s):
    """argparse type: comma-separated widths >= 1."""
    return tuple(_number("--teacher-widths", int, 1)(p) for p in s.split(","))


# Method flags, each setting one dotted key (its dest): (flag, key, type or choices, help).
# fmt: off
_CLUSTER_FLAGS = [
    ("--gamma", "cluster.gamma", _number("--gamma", float, 0, 1, True),
     "keep clusters shared by >= gamma*N students (default %(default)s)"),
    ("--beta-degrees", "cluster.beta_degrees", _number("--beta-degrees", float, 0, 90, True),
     "drop clusters whose median angle exceeds beta, degrees (default %(default)s)"),
    ("--metric", "cluster.metric", ["cosine", "l2"], "distance of the linkage"),
    ("--finetune-iterations", "finetune_iterations", _number("--finetune-iterations", int, 0),
     "L-BFGS iterations of the final fine-tune (default %(default)s)"),
]
_METHOD_FLAGS = [
    ("--students", "train.n_students", _number("--students", int, 1),
     "number of students N (default %(default)s)"),
    ("--hidden-layers", "hidden_layers", _number("--hidden-layers", int, 1),
     "the teacher's number of hidden layers L (default: the teacher file's, else 1)"),
    ("--width", "width", _number("--width", int, 1),
     "student width of every hidden layer (default: the expansion search)"),
    ("--upper-students", "upper_students", ["finetune", "fresh"],
     "deep teachers: the students above a recovered layer: the trained ones with it put in and "
     "fine-tuned (finetune, the paper's step) or new ones trained on its outputs (fresh)"),
    ("--epochs", "train.max_epochs", _number("--epochs", int, 1),
     "Adam epochs per student; the plateau patience and cooldown and the expansion search's "
     "epochs scale with it (default %(default)s)"),
    ("--batch-size", "train.batch_size", _number("--batch-size", int, 1),
     "Adam mini-batch size (default %(default)s)"),
    ("--lr", "train.lr", _number("--lr", float, 0, 1, True), "Adam learning rate"),
    ("--polish-iterations", "train.polish_iterations", _number("--polish-iterations", int, 0),
     "L-BFGS budget of the float64 finish after Adam, iterations (default %(default)s)"),
    ("--finish", "train.finish", list(FINISHES),
     "the float64 finish: lbfgs, auto (lm+lbfgs for small students, else lbfgs), lm+lbfgs "
     "(Levenberg-Marquardt, then L-BFGS where it stalled), lm (each student stops on its own), "
     "lbfgs-fixed (all --polish-iterations, the previous finish) (default %(default)s)"),
    ("--retrain-factor", "retrain_factor", _number("--retrain-factor", int, 1),
     "when the recovered network's relative MSE is above 1e-6 and 10 times the median student's "
     "(or the students' is too), train them again this many times longer, keep the better "
     "result (default %(default)s; 1: never; not in the paper); still so: exit code 4"),
    ("--held-out-fraction", "held_out_fraction", _number("--held-out-fraction", float, 0, 0.9),
     "share of the queries kept aside to score the result"),
    ("--seed", "train.seed", _number("--seed", int, -(2**63)), "seed of everything random"),
    ("--dtype", "train.dtype", ["float32", "float64"],
     "dtype of the Adam phase (the polish and the fine-tune are float64)"),
]
# fmt: on


def _add_flags(g, flags) -> None:
    """Each flag with RUN_DEFAULTS' default for its key, else the library's (RecoverConfig's);
    none for --hidden-layers, which the teacher file can set."""
    library = RecoverConfig("identity").settings()
    for flag, key, kind, text in flags:
        spec = {"choices": kind} if isinstance(kind, list) else {"type": kind}
        default = None if key == "hidden_layers" else RUN_DEFAULTS.get(key, library[key])
        g.add_argument(flag, dest=key, default=default, help=f"[{key}] {text}", **spec)


# The parser (argparse calls laid out by hand, one option per line or two).
# fmt: off
def _add_cluster_options(g) -> None:
    _add_flags(g, _CLUSTER_FLAGS)
    g.add_argument("--no-repair", action="store_false", dest="repair.enabled",
                   help="[repair.enabled] skip the width repair; the paper's procedure alone")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any setting by its dotted key (repeatable): --set train.patience=50")


def _add_output_options(p: argparse.ArgumentParser, default_out: Path | None = None) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=default_out is None, default=default_out,
                   help="output folder (must not exist yet; default %(default)s)")
    o.add_argument("--force", action="store_true", help="replace an existing output folder")
    o.add_argument("--no-figures", action="store_true")
    o.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _add_method_options(p: argparse.ArgumentParser, default_out: Path | None = None) -> None:
    g = p.add_argument_group("method (each flag sets the setting in brackets)")
    _add_flags(g, _METHOD_FLAGS)
    _add_cluster_options(g)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where students train (auto: cuda if built with it and a GPU is seen)")
    _add_output_options(p, default_out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expand-and-cluster",
        description="Recover the hidden-layer sizes and weights of an MLP from input-output "
        "queries (Expand-and-Cluster, Martinelli et al., ICML 2024).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("recover", help="recover a network from queries or a teacher file")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--queries", type=Path, help="query file .npz with X [P, d_in], Y [P, d_out]")
    src.add_argument("--teacher", type=Path, help="teacher network (.npz, or .pt state_dict)")
    src.add_argument("--resume", type=Path,
                     help="continue an interrupted run from its checkpoint folder (OUT.checkpoint "
                     "or a run's OUT/checkpoint) with its queries, teacher and settings; only "
                     "--device is taken from this command")
    r.add_argument("--activation", help="hidden activation: " + ", ".join(sorted(ACTIVATIONS)))
    r.add_argument("--probe", choices=["gaussian", "uniform"], default="gaussian",
                   help="query distribution when probing --teacher")
    r.add_argument("--probe-inputs", type=Path, help=".npy inputs to probe --teacher with")
    r.add_argument("--n-queries", type=_number("--n-queries", int, 1), default=20000)
    _add_method_options(r)

    add_suite_parsers(sub)

    c = sub.add_parser("cluster", help="re-cluster a run's students with other gamma/beta",
                       description="Cluster, reconstruct and fine-tune again from the trained "
                       "students of an earlier run (its output or checkpoint folder), with new "
                       "clustering options; the rest of its settings are kept.")
    c.add_argument("--students", type=Path, required=True, help="an earlier run's folder")
    _add_cluster_options(c.add_argument_group("clustering"))
    _add_output_options(c)

    d = sub.add_parser("demo", help="recover a 64-k-10 tanh teacher trained on sklearn's digits")
    d.add_argument("--teacher-width", type=_number("--teacher-width", int, 1), default=16)
    d.add_argument("--deep", action="store_true",
                   help="a teacher 64-k1-k2-10 with two hidden layers (--teacher-widths)")
    d.add_argument("--teacher-widths", type=_widths, default=(12, 10),
                   help="hidden widths of the --deep teacher (default 12,10)")
    _add_method_options(d, default_out=Path("runs/demo"))
    return parser
# fmt: on


def _settings(args, run_defaults: bool = True) -> dict:
    """The dotted-key settings: RUN_DEFAULTS (unless ``run_defaults`` is False), then the
    flags' (unset flags omitted; ``--device`` is resolved on its own), then ``--set``'s."""
    keys = RecoverConfig.keys()
    out = dict(RUN_DEFAULTS) if run_defaults else {}
    out.update(
        {k: v for k, v in vars(args).items() if k in keys and k != "device" and v is not None}
    )
    out.update(parse_assignments(args.set))
    out["train.progress"] = not args.quiet
    return out


def _config(args, hidden_layers: int) -> RecoverConfig:
    device = resolve_device(args.device)
    settings = {**_settings(args), "hidden_layers": hidden_layers, "device": device}
    return RecoverConfig(args.activation).updated(settings)


def _run(args, cfg, run: dict, out, log, resume_from=None, resume_layers=True, **report):
    """Recover ``run``'s queries (``{"X", "Y", "source", "teacher"}``) into the output folder
    ``out`` (:class:`~expand_and_cluster.io.checkpoint.RunFolder`), checkpointing in
    ``OUT.checkpoint`` (kept if the run fails, so that ``recover --resume OUT.checkpoint``
    continues it) and write the run's files (``report``: :func:`write_run`'s keywords).
    Returns the summary to print and the exit code (0, or :data:`EXIT_DEGRADED`)."""
    X, Y = run["X"], run["Y"]
    ckpt = Checkpoint(out.checkpoint_path)
    if resume_from is None or Path(resume_from.path).resolve() != ckpt.path.resolve():
        # This run's own checkpoint folder: its inputs and config, then the stages it reuses.
        _, held = split_queries(len(X), cfg.held_out_fraction, cfg.train.seed)
        ckpt.start(cfg.to_dict(), X, Y, held, run["source"], run["teacher"])
        if resume_from is not None:
            ckpt.copy_stages(resume_from, layers=resume_layers)
            resume_from = ckpt
    out.checkpoint = ckpt
    res = recover(X, Y, cfg, log, ckpt, resume_from, resume_layers, run["source"])
    rep = write_run(res, out.tmp, run["teacher"], figures=not args.no_figures, **report)
    code = EXIT_DEGRADED if rep["status"] == "degraded" else 0
    return summary_text(rep, args.out), code


def cmd_recover(args, log) -> int:
    if args.resume is not None:
        ckpt_in = Checkpoint.find(args.resume)
        run = ckpt_in.load_run()
        cfg = RecoverConfig.from_dict(run["config"])
        if args.activation is not None and args.activation != cfg.activation:
            raise InputError(
                f"--activation: the checkpoint used {cfg.activation!r}, not {args.activation!r}"
            )
        # Where the rest trains is this machine's business, not the run's: a checkpoint written
        # on a GPU machine resumes on a CPU one, and vice versa.
        cfg = cfg.updated({"train.progress": not args.quiet, "device": resolve_device(args.device)})
        with RunFolder(args.out, args.force) as out:
            text, code = _run(args, cfg, run, out, log, ckpt_in)
        print(text)
        return code
    if args.activation is None:
        raise InputError("--activation: required with --queries or --teacher")
    check_activation(args.activation, "--activation")
    teacher = None
    t0 = time.perf_counter()
    layers = args.hidden_layers
    if args.queries is not None:
        X, Y = load_queries(args.queries)
        source = f"file:{args.queries}"
    else:
        teacher = load_network(args.teacher, activation=args.activation)
        if layers is not None and layers != len(teacher.hidden_sizes):
            raise InputError(
                f"--hidden-layers: {layers}, but the teacher {args.teacher} has "
                f"{len(teacher.hidden_sizes)} hidden layers"
            )
        layers = len(teacher.hidden_sizes)
        inputs = None
        source = f"{args.probe}:{args.n_queries}"
        if args.probe_inputs is not None:
            inputs = load_probe_inputs(args.probe_inputs, teacher.d_in)
            source = f"probe-inputs:{args.probe_inputs}"
        X, Y = probe(teacher, args.n_queries, args.probe, getattr(args, "train.seed"), inputs)
    t_probe = time.perf_counter() - t0
    cfg = _config(args, layers or 1)
    run = {"X": X, "Y": Y, "source": source, "teacher": teacher}
    with RunFolder(args.out, args.force) as out:
        text, code = _run(args, cfg, run, out, log, probe_seconds=t_probe)
    print(text)
    return code


def cmd_cluster(args, log) -> int:
    ckpt_in = Checkpoint.find(args.students)
    if not ckpt_in.has("students"):
        raise InputError(f"--students: {ckpt_in.path} holds no trained students (students.npz)")
    run = ckpt_in.load_run()
    old = RecoverConfig.from_dict(run["config"])
    new = {k: v for k, v in _settings(args, False).items() if k != "repair.enabled"}
    cfg = dataclasses.replace(
        old.updated({**new, "device": "cpu", "retrain_factor": 1}),  # re-clustering never trains
        repair=RepairConfig() if getattr(args, "repair.enabled") else RepairConfig.off(),
    )
    if cfg.cluster.gamma * cfg.train.n_students < 2:
        raise InputError(
            f"--gamma: gamma * N = {cfg.cluster.gamma} * {cfg.train.n_students} < 2 (N comes "
            "from the saved students)"
        )
    log(
        f"re-clustering the students of {ckpt_in.path} with gamma {cfg.cluster.gamma:g}, beta "
        f"{cfg.cluster.beta_degrees:g} degrees (was {old.cluster.gamma:g}, "
        f"{old.cluster.beta_degrees:g})"
    )
    with RunFolder(args.out, args.force) as out:
        text, code = _run(args, cfg, run, out, log, ckpt_in, resume_layers=False)
    print(text)
    return code


def cmd_demo(args, log) -> int:
    args.activation = "tanh"
    widths = list(args.teacher_widths) if args.deep else [args.teacher_width]
    if args.hidden_layers is not None and args.hidden_layers != len(widths):
        raise InputError(f"--hidden-layers: the demo teacher has {len(widths)} hidden layer(s)")
    cfg = _config(args, len(widths))
    with RunFolder(args.out, args.force) as out:
        t0 = time.perf_counter()
        log(f"training the teacher {'-'.join(map(str, [64, *widths, 10]))} (tanh) on digits")
        teacher, digits, info = train_digits_teacher(width=widths, seed=cfg.train.seed)
        X = biased_noise_augmentation(digits, np.random.default_rng(cfg.train.seed))
        Y = teacher.forward(X)
        t_probe = time.perf_counter() - t0
        log(
            f"teacher test accuracy {info.get('test_accuracy', float('nan')):.3f}; "
            f"{len(X)} queries (digits + biased noise, Beiser et al. 2024)"
        )
        save_network(teacher, out.path("teacher.npz"))
        save_queries(out.path("queries.npz"), X, Y)
        run = {"X": X, "Y": Y, "source": "digits+biased_noise", "teacher": teacher}
        text, code = _run(
            args, cfg, run, out, log, probe_seconds=t_probe, extra={"teacher_info": info}
        )
    print(text)
    return code


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line error
        return int(e.code) if isinstance(e.code, int) else EXIT_USER_ERROR
    quiet = getattr(args, "quiet", False)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    commands = {"recover": cmd_recover, "cluster": cmd_cluster, "bench": cmd_suite}
    commands["suite"] = cmd_suite
    try:
        return commands.get(args.command, cmd_demo)(args, log)
    except InputError as e:
        print(f"expand-and-cluster: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NoClusterError as e:
        print(f"expand-and-cluster: no cluster survived: {e}", file=sys.stderr)
        return EXIT_NO_CLUSTER
    except KeyboardInterrupt:
        print("expand-and-cluster: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
