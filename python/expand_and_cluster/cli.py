"""Command line: ``expand-and-cluster recover|cluster|demo|bench`` (also
``python -m expand_and_cluster``).

User errors (bad files, bad options) print one line on stderr and exit with code 2, without a
traceback, and leave no output folder behind: a run writes into a temporary folder next to
``--out`` and renames it into place only when it has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import __version__
from .activations import ACTIVATIONS, get_activation
from .errors import InputError, NoClusterError

EXIT_USER_ERROR = 2
EXIT_NO_CLUSTER = 3


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 1, got {v}")
        return v

    return parse


def _float_in(name, lo, hi, lo_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {s!r}") from None
        if not (lo < v if lo_open else lo <= v) or not v <= hi or not np.isfinite(v):
            bracket = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(
                f"{name}: expected a value in {bracket}{lo}, {hi}], got {v}"
            )
        return v

    return parse


def _widths(s):
    try:
        out = tuple(int(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--teacher-widths: expected comma-separated integers, got {s!r}"
        ) from None
    if len(out) < 1 or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--teacher-widths: expected widths >= 1, got {s!r}")
    return out


def _add_cluster_options(g) -> None:
    g.add_argument(
        "--gamma",
        type=_float_in("--gamma", 0, 1, lo_open=True),
        default=0.5,
        help="keep clusters shared by >= gamma*N students (default %(default)s)",
    )
    g.add_argument(
        "--beta-degrees",
        type=_float_in("--beta-degrees", 0, 90, lo_open=True),
        default=60.0,
        help="drop clusters whose median angle exceeds beta (degrees)",
    )
    g.add_argument("--metric", choices=["cosine", "l2"], default="cosine")
    g.add_argument(
        "--no-repair",
        action="store_true",
        help="skip the width repair after the fine-tune (one hidden layer: prune redundant "
        "neurons, add missing ones from the dropped clusters); the paper's procedure alone",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="output folder (must not exist yet)")
    o.add_argument("--force", action="store_true", help="replace an existing output folder")
    o.add_argument("--no-figures", action="store_true")
    o.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _add_method_options(p: argparse.ArgumentParser, students_default: int = 20) -> None:
    g = p.add_argument_group("method")
    g.add_argument(
        "--students",
        type=_positive_int("--students"),
        default=students_default,
        help="number of students N (default %(default)s)",
    )
    g.add_argument(
        "--hidden-layers",
        type=_positive_int("--hidden-layers"),
        default=None,
        help="the teacher's number of hidden layers L (default: the teacher file's, else 1)",
    )
    g.add_argument(
        "--width",
        type=_positive_int("--width"),
        default=None,
        help="student hidden width (every layer); default: expansion search",
    )
    g.add_argument(
        "--upper-students",
        choices=["finetune", "fresh"],
        default="finetune",
        help="deep teachers: after a layer is recovered, the students above it are the trained "
        "students with the layer put in and fine-tuned (finetune, the paper's step) or new "
        "students trained from scratch on the recovered layer's outputs (fresh) (default "
        "%(default)s)",
    )
    _add_cluster_options(g)
    g.add_argument(
        "--epochs",
        type=_positive_int("--epochs"),
        default=300,
        help="Adam epochs per student (default %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=512,
        help="Adam mini-batch size (default %(default)s)",
    )
    g.add_argument("--lr", type=_float_in("--lr", 0, 1, lo_open=True), default=1e-3)
    g.add_argument(
        "--polish-iterations",
        type=int,
        default=1500,
        help="batched float64 L-BFGS iterations on the students after Adam",
    )
    g.add_argument(
        "--retrain-factor",
        type=_positive_int("--retrain-factor"),
        default=1,
        help="when the recovered network's relative MSE is above 1e-6 and 10 times the median "
        "student's (the students fit, the clusters they share do not), train the students "
        "again with this many times the epochs and keep the better result (default "
        "%(default)s: never; not in the paper)",
    )
    g.add_argument(
        "--finetune-iterations",
        type=int,
        default=3000,
        help="L-BFGS iterations of the final fine-tune",
    )
    g.add_argument(
        "--held-out-fraction", type=_float_in("--held-out-fraction", 0, 0.9), default=0.1
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of the Adam phase (polish and fine-tune are float64)",
    )
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where students train (default auto: cuda when this build has CUDA kernels and "
        "torch sees a GPU, else cpu)",
    )
    _add_output_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expand-and-cluster",
        description="Recover the hidden-layer size and weights of an MLP from input-output "
        "queries (Expand-and-Cluster, Martinelli et al., ICML 2024).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("recover", help="recover a network from queries or a teacher file")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--queries", type=Path, help="query file .npz with X [P, d_in], Y [P, d_out]")
    src.add_argument("--teacher", type=Path, help="teacher network (.npz, or .pt state_dict)")
    src.add_argument(
        "--resume",
        type=Path,
        help="continue an interrupted run from its checkpoint folder (OUT.checkpoint, or a "
        "run's OUT/checkpoint); its queries, teacher and settings are used, except --device "
        "(where the rest of the run trains: default auto, as for a new run)",
    )
    r.add_argument("--activation", help="hidden activation: " + ", ".join(sorted(ACTIVATIONS)))
    r.add_argument(
        "--probe",
        choices=["gaussian", "uniform"],
        default="gaussian",
        help="query distribution when probing --teacher",
    )
    r.add_argument("--probe-inputs", type=Path, help=".npy inputs to probe --teacher with")
    r.add_argument("--n-queries", type=_positive_int("--n-queries"), default=20000)
    _add_method_options(r)

    b = sub.add_parser(
        "bench",
        help="run an identifiability suite of planted teachers (resumable)",
        description="Run every problem of SUITE not yet in OUT/results.jsonl, then write "
        "summary.json, summary.md and figures. Suites: benchmarks/suites/*.json.",
    )
    b.add_argument("suite", type=Path, help="suite file (.json)")
    b.add_argument("--out", type=Path, required=True, help="output folder (reused to resume)")
    b.add_argument(
        "--jobs",
        type=_positive_int("--jobs"),
        default=1,
        help="problems run in parallel processes (default %(default)s)",
    )
    b.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where students train (default auto: cuda when available, else cpu)",
    )
    b.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="KEY=VALUE[,VALUE...]",
        help="run only the problems whose field KEY takes one of the values (repeatable, "
        "e.g. --select rho=4 --select activation=tanh,g)",
    )
    b.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one of the suite's settings (repeatable, e.g. --setting epochs=1000 "
        "--setting repair_trial_queries=2000); use a new --out for changed settings",
    )
    b.add_argument("--quiet", action="store_true")

    c = sub.add_parser(
        "cluster",
        help="re-cluster a run's trained students with other gamma/beta (no retraining)",
        description="Cluster, reconstruct and fine-tune again from the trained students saved "
        "by an earlier run (its output folder or checkpoint folder), with new clustering "
        "options. The queries, activation, depth and training settings come from that run.",
    )
    c.add_argument(
        "--students", type=Path, required=True, help="an earlier run's output or checkpoint folder"
    )
    cg = c.add_argument_group("clustering")
    _add_cluster_options(cg)
    cg.add_argument(
        "--finetune-iterations",
        type=int,
        default=3000,
        help="L-BFGS iterations of the final fine-tune",
    )
    _add_output_options(c)

    d = sub.add_parser("demo", help="recover a 64-k-10 tanh teacher trained on sklearn's digits")
    d.add_argument("--teacher-width", type=_positive_int("--teacher-width"), default=16)
    d.add_argument(
        "--deep",
        action="store_true",
        help="a teacher 64-k1-k2-10 with two hidden layers (widths: --teacher-widths)",
    )
    d.add_argument(
        "--teacher-widths",
        type=_widths,
        default=(12, 10),
        help="hidden widths of the --deep teacher, comma-separated (default 12,10)",
    )
    _add_method_options(d)
    for a in d._actions:
        if a.dest == "out":
            a.required = False
            a.default = Path("runs/demo")
    return parser


class _Output:
    """A temporary folder next to ``out``, renamed to ``out`` when the ``with`` block succeeds,
    removed when it raises (KeyboardInterrupt included)."""

    def __init__(self, out: Path, force: bool):
        self.out = out
        if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
            raise InputError(f"--out: {out} exists and is not empty (use --force to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        self.checkpoint: Path | None = None  # set by a run that writes checkpoints

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> None:
        if self.checkpoint is not None and self.checkpoint.is_dir():
            os.replace(self.checkpoint, self.tmp / "checkpoint")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.is_dir():
            return
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

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when the build has CUDA kernels and torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    from . import backends

    return "cuda" if "cuda" in backends() and torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        from . import backends

        if "cuda" not in backends():
            raise InputError(
                "--device: cuda requested but this build has no CUDA kernels (install with nvcc "
                "on the PATH), use --device cpu"
            )
        if not torch.cuda.is_available():
            raise InputError("--device: cuda requested but torch sees no GPU; use --device cpu")


def _configs(args, hidden_layers: int = 1):
    args.device = _resolve_device(args.device)
    _check_device(args.device)
    from .clustering import ClusterConfig
    from .recover import RecoverConfig
    from .training import ExpansionSearchConfig, TrainConfig

    train = TrainConfig(
        n_students=args.students,
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        polish_iterations=max(0, args.polish_iterations),
        dtype=args.dtype,
        seed=args.seed,
        progress=not args.quiet,
        patience=max(10, args.epochs // 10),
        cooldown=max(5, args.epochs // 20),
    )
    search = ExpansionSearchConfig(epochs=max(20, args.epochs // 3))
    return RecoverConfig(
        activation=args.activation,
        hidden_layers=hidden_layers,
        width=args.width,
        cluster=ClusterConfig(gamma=args.gamma, beta_degrees=args.beta_degrees, metric=args.metric),
        train=train,
        search=search,
        held_out_fraction=args.held_out_fraction,
        finetune_iterations=max(0, args.finetune_iterations),
        upper_students=args.upper_students,
        device=args.device,
        repair=_repair_config(args),
        retrain_factor=getattr(args, "retrain_factor", 1),
    )


def _repair_config(args):
    from .repair import RepairConfig

    return RepairConfig.off() if args.no_repair else RepairConfig()


def _checkpoint_path(out: Path) -> Path:
    """Where a run keeps its checkpoints until it finishes: ``OUT.checkpoint`` next to OUT."""
    return out.with_name(out.name + ".checkpoint")


def _run(
    args,
    cfg,
    X,
    Y,
    source: str,
    teacher,
    out: _Output,
    log,
    extra=None,
    t_probe=0.0,
    resume_from=None,
    resume_layers=True,
) -> dict:
    """Recover, score (when the teacher is known), write report.json, recovered.npz, figures.

    Checkpoints go to ``OUT.checkpoint`` while the run lasts (kept if it fails, so that
    ``recover --resume OUT.checkpoint`` continues it) and move into ``OUT/checkpoint`` at the end.
    """
    import torch

    from . import metrics, report
    from .checkpoint import Checkpoint
    from .recover import recover, split_queries
    from .teacher import save_network

    t0 = time.perf_counter()
    ckpt = Checkpoint(_checkpoint_path(args.out))
    if resume_from is None or Path(resume_from.path).resolve() != ckpt.path.resolve():
        # This run's own checkpoint folder: its inputs and config, then the stages it reuses.
        if ckpt.path.exists():
            shutil.rmtree(ckpt.path)
        _, held = split_queries(len(X), cfg.held_out_fraction, cfg.train.seed)
        ckpt.save_run(cfg.to_dict(), X, Y, held, source, teacher)
        if resume_from is not None:
            stages = ["students"]
            if resume_layers:
                stages += [f"layer_{l}" for l in range(resume_from.last_layer() + 1)]
            for stage in stages:
                for ext in (".npz", ".json"):
                    shutil.copy2(resume_from.path / f"{stage}{ext}", ckpt.path / f"{stage}{ext}")
            resume_from = ckpt
    out.checkpoint = ckpt.path
    res = recover(
        X, Y, cfg, log=log, checkpoint=ckpt, resume_from=resume_from, resume_layers=resume_layers
    )
    act = get_activation(cfg.activation)
    alignment = None
    teacher_sizes = None
    bits = None
    mask = res.network.input_mask
    if teacher is not None:
        teacher_sizes = teacher.hidden_sizes
        if len(teacher_sizes) == len(res.network.hidden_sizes):
            alignment = metrics.deep_alignment(teacher, res.network, mask)
        if len(teacher_sizes) == 1:
            bits = metrics.bits_of_precision(teacher, res.network, mask)
    save_network(res.network, out.path("recovered.npz"))
    # The trained students, so a run can be re-clustered or inspected without retraining.
    with report.atomic_write(out.path("students.npz")) as f:
        np.savez(
            f,
            **res.training.students.to_arrays(),
            relative_mse=res.training.relative_mse,
            held_out_index=res.held_out_index,
        )
    first = res.layers[0]
    n_layers = len(res.layers)
    rep = report.build_report(
        version=__version__,
        backend=cfg.device,
        activation=act.name,
        dtype=cfg.train.dtype,
        students=cfg.train.n_students,
        student_widths=[res.student_width] * n_layers,
        gamma=cfg.cluster.gamma,
        beta_degrees=cfg.cluster.beta_degrees,
        queries={"train": res.n_train, "held_out": res.n_held_out, "source": source},
        recovered_sizes=res.network.hidden_sizes,
        teacher_sizes=teacher_sizes,
        alignment=alignment,
        student_losses=res.training.relative_mse.tolist(),
        recovered_relative_mse={
            "train": res.relative_mse["train"],
            "held_out": res.relative_mse["held_out"],
        },
        timings_s={
            "probe": t_probe,
            "train": res.timings_s["search"] + res.timings_s["train"],
            "cluster": res.timings_s["cluster"],
            "finetune": res.timings_s["finetune"],
            "repair": res.timings_s["repair"],
            "retrain": res.timings_s.get("retrain", 0.0),
            "total": t_probe + (time.perf_counter() - t0),
        },
        hidden_layers=n_layers,
        layers=[layer.to_json() for layer in res.layers],
        resumed_from=res.resumed_from,
        expansion_search={"width": res.student_width, "tried": res.expansion_search},
        input_mask={"masked_inputs": np.flatnonzero(~mask).tolist() if mask is not None else []},
        cut_height=first.cut_height,
        cluster_sizes=first.sizes,
        cluster_median_angle_degrees=first.median_angle_degrees,
        dropped_clusters=first.dropped,
        dropped_singletons=first.n_dropped_singletons,
        relative_mse_before_finetune=res.relative_mse["initial_train"],
        bits_of_precision=bits,
        student_stop_reasons=res.training.stop_reason,
        width_repair=None if res.repair is None else res.repair.to_json(),
        retrain=res.retrain,
        **(extra or {}),
    )
    report.write_json_atomic(out.path("report.json"), rep)
    if not args.no_figures:
        gn = cfg.cluster.gamma * cfg.train.n_students
        for layer in res.layers:
            name = "dendrogram.png" if layer.layer == 0 else f"dendrogram_layer{layer.layer}.png"
            report.plot_dendrogram(
                layer.linkage,
                layer.cut_height,
                gn,
                out.path(name),
                title=f"hidden layer {layer.layer}" if n_layers > 1 else "hidden layer",
                counts=layer.counts,
            )
        m = first.linkage.shape[0] + 1
        if m <= 6000:
            from . import ops

            ens = res.training.students
            v = torch.cat([ens.weights[0], ens.biases[0][:, :, None]], dim=2).reshape(m, -1)
            keep = np.append(mask, True) if mask is not None else np.ones(v.shape[1], bool)
            v = v[:, torch.as_tensor(keep)].contiguous().cpu()
            dist = ops.cosine_distances(v, absolute=act.symmetry.sign_symmetric).numpy()
            report.plot_distance_matrix(dist, first.linkage, out.path("distance_matrix.png"))
        for al in alignment or []:
            name = "alignment.png" if al["layer"] == 0 else f"alignment_layer{al['layer']}.png"
            report.plot_alignment(al["per_teacher_neuron"], out.path(name))
        if res.training.history:
            report.plot_training(res.training.history, out.path("training.png"))
    return rep


def _summary(rep: dict, out: Path) -> str:
    lines = [f"recovered hidden widths: {rep['recovered_sizes']}"]
    if rep.get("teacher_sizes") is not None:
        lines[0] += f" (teacher: {rep['teacher_sizes']})"
    for al in rep.get("alignment") or []:
        k = len(al["per_teacher_neuron"])
        lines.append(
            f"layer {al['layer']}: teacher neurons within 1e-3 cosine distance: "
            f"{al['count_below_1e-3']}/{k}, within 1e-6: {al['count_below_1e-6']}/{k} "
            f"(median {al['median']:.2e}, max {al['max']:.2e})"
        )
    r = rep["recovered_relative_mse"]
    lines.append(
        f"relative MSE train {r['train']:.2e}"
        + (f", held out {r['held_out']:.2e}" if r.get("held_out") is not None else "")
    )
    lines.append(f"wall time {rep['timings_s']['total']:.1f} s; results in {out}/")
    return "\n".join(lines)


def cmd_recover(args, log) -> int:
    from .checkpoint import Checkpoint
    from .recover import RecoverConfig
    from .teacher import load_network, load_probe_inputs, load_queries, probe

    if args.resume is not None:
        ckpt_in = Checkpoint.find(args.resume)
        run = ckpt_in.load_run()
        cfg = RecoverConfig.from_dict(run["config"])
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, progress=not args.quiet)
        )
        if args.activation is not None and args.activation != cfg.activation:
            raise InputError(
                f"--activation: the checkpoint's run used {cfg.activation!r}, not "
                f"{args.activation!r}"
            )
        # Where the rest trains is this machine's business, not the run's: a checkpoint written
        # on a GPU machine resumes on a CPU one (--device, default auto), and vice versa.
        cfg = dataclasses.replace(cfg, device=_resolve_device(args.device))
        _check_device(cfg.device)
        return _run_checkpointed(args, cfg, run, log, ckpt_in, resume_layers=True)
    if args.activation is None:
        raise InputError("--activation: required with --queries or --teacher")
    get_activation_checked(args.activation)
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
        if args.probe_inputs is not None:
            inputs = load_probe_inputs(args.probe_inputs, teacher.d_in)
            source = f"probe-inputs:{args.probe_inputs}"
        else:
            source = f"{args.probe}:{args.n_queries}"
        X, Y = probe(teacher, args.n_queries, args.probe, args.seed, inputs=inputs)
    t_probe = time.perf_counter() - t0
    cfg = _configs(args, layers or 1)
    with _Output(args.out, args.force) as out:
        rep = _run(args, cfg, X, Y, source, teacher, out, log, t_probe=t_probe)
    print(_summary(rep, args.out))
    return 0


def cmd_cluster(args, log) -> int:
    from .checkpoint import Checkpoint
    from .clustering import ClusterConfig
    from .recover import RecoverConfig

    ckpt_in = Checkpoint.find(args.students)
    if not ckpt_in.has("students"):
        raise InputError(f"--students: {ckpt_in.path} holds no trained students (students.npz)")
    run = ckpt_in.load_run()
    old = RecoverConfig.from_dict(run["config"])
    cfg = dataclasses.replace(
        old,
        cluster=ClusterConfig(gamma=args.gamma, beta_degrees=args.beta_degrees, metric=args.metric),
        finetune_iterations=max(0, args.finetune_iterations),
        train=dataclasses.replace(old.train, progress=not args.quiet),
        device="cpu",
        repair=_repair_config(args),
        retrain_factor=1,  # re-clustering never trains
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
    return _run_checkpointed(args, cfg, run, log, ckpt_in, resume_layers=False)


def _run_checkpointed(args, cfg, run: dict, log, resume_from, resume_layers: bool) -> int:
    """:func:`_run` on a checkpoint's queries and teacher (``Checkpoint.load_run``), starting
    from its students and, with ``resume_layers``, its finished layers."""
    with _Output(args.out, args.force) as out:
        rep = _run(
            args,
            cfg,
            run["X"],
            run["Y"],
            run["source"],
            run["teacher"],
            out,
            log,
            resume_from=resume_from,
            resume_layers=resume_layers,
        )
    print(_summary(rep, args.out))
    return 0


def cmd_demo(args, log) -> int:
    from .teacher import biased_noise_augmentation, save_network, save_queries, train_digits_teacher

    args.activation = "tanh"
    widths = list(args.teacher_widths) if args.deep else [args.teacher_width]
    if args.hidden_layers is not None and args.hidden_layers != len(widths):
        raise InputError(f"--hidden-layers: the demo teacher has {len(widths)} hidden layer(s)")
    cfg = _configs(args, len(widths))
    with _Output(args.out, args.force) as out:
        t0 = time.perf_counter()
        arch = "-".join(str(w) for w in [64, *widths, 10])
        log(f"training the teacher {arch} (tanh) on scikit-learn's digits")
        teacher, digits, info = train_digits_teacher(width=widths, seed=args.seed)
        rng = np.random.default_rng(args.seed)
        X = biased_noise_augmentation(digits, rng)
        Y = teacher.forward(X)
        t_probe = time.perf_counter() - t0
        log(
            f"teacher test accuracy {info.get('test_accuracy', float('nan')):.3f}; "
            f"{len(X)} queries (digits + biased noise, Beiser et al. 2024)"
        )
        save_network(teacher, out.path("teacher.npz"))
        save_queries(out.path("queries.npz"), X, Y)
        rep = _run(
            args,
            cfg,
            X,
            Y,
            "digits+biased_noise",
            teacher,
            out,
            log,
            extra={"teacher_info": info},
            t_probe=t_probe,
        )
    print(_summary(rep, args.out))
    return 0


def cmd_bench(args, log) -> int:
    from .bench import (
        load_suite,
        override_settings,
        run_suite,
        select_problems,
        summarise,
        summary_markdown,
    )

    device = _resolve_device(args.device)
    _check_device(device)
    suite = load_suite(args.suite)
    if args.select:
        suite = select_problems(suite, args.select)
    if args.setting:
        suite = override_settings(suite, args.setting)
    log(f"students train on {device}")
    rows = run_suite(suite, args.out, jobs=args.jobs, log=log, device=device)
    summary = summarise(rows)
    summary["suite"] = suite.name
    print(summary_markdown(summary))
    print(f"results in {args.out}/")
    return 0


def get_activation_checked(name: str) -> None:
    try:
        get_activation(name)
    except ValueError as e:
        raise InputError(f"--activation: {e}".replace("activation: ", "", 1)) from None


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

    try:
        if args.command == "recover":
            return cmd_recover(args, log)
        if args.command == "bench":
            return cmd_bench(args, log)
        if args.command == "cluster":
            return cmd_cluster(args, log)
        return cmd_demo(args, log)
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
