"""Command line: ``expand-and-cluster recover|demo|bench`` (also ``python -m expand_and_cluster``).

User errors (bad files, bad options) print one line on stderr and exit with code 2, without a
traceback, and leave no output folder behind: a run writes into a temporary folder next to
``--out`` and renames it into place only when it has finished.
"""

from __future__ import annotations

import argparse
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


def _add_method_options(p: argparse.ArgumentParser, students_default: int = 20) -> None:
    g = p.add_argument_group("method")
    g.add_argument(
        "--students",
        type=_positive_int("--students"),
        default=students_default,
        help="number of students N (default %(default)s)",
    )
    g.add_argument(
        "--width",
        type=_positive_int("--width"),
        default=None,
        help="student hidden width; default: expansion search",
    )
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
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="output folder (must not exist yet)")
    o.add_argument("--force", action="store_true", help="replace an existing output folder")
    o.add_argument("--no-figures", action="store_true")
    o.add_argument("--quiet", action="store_true", help="no progress bars or messages")


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
    r.add_argument(
        "--activation", required=True, help="hidden activation: " + ", ".join(sorted(ACTIVATIONS))
    )
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
    b.add_argument("--quiet", action="store_true")

    d = sub.add_parser("demo", help="recover a 64-k-10 tanh teacher trained on sklearn's digits")
    d.add_argument("--teacher-width", type=_positive_int("--teacher-width"), default=16)
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

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> None:
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


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


def _configs(args):
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
        width=args.width,
        cluster=ClusterConfig(gamma=args.gamma, beta_degrees=args.beta_degrees, metric=args.metric),
        train=train,
        search=search,
        held_out_fraction=args.held_out_fraction,
        finetune_iterations=max(0, args.finetune_iterations),
        device=args.device,
    )


def _run(args, X, Y, source: str, teacher, out: _Output, log, extra=None, t_probe=0.0) -> dict:
    """Recover, score (when the teacher is known), write report.json, recovered.npz, figures."""
    import torch

    from . import metrics, report
    from .recover import recover
    from .teacher import save_network

    t0 = time.perf_counter()
    cfg = _configs(args)
    res = recover(X, Y, cfg, log=log)
    act = get_activation(args.activation)
    alignment = None
    teacher_sizes = None
    bits = None
    if teacher is not None:
        teacher_sizes = teacher.hidden_sizes
        al = metrics.alignment(
            teacher.incoming(0), res.network.incoming(0), act.name, res.network.input_mask
        )
        alignment = [{"layer": 0, **al}]
        bits = metrics.bits_of_precision(teacher, res.network, res.network.input_mask)
    save_network(res.network, out.path("recovered.npz"))
    # The trained students, so a run can be re-clustered or inspected without retraining.
    with report.atomic_write(out.path("students.npz")) as f:
        np.savez(
            f,
            **res.training.students.to_arrays(),
            relative_mse=res.training.relative_mse,
            held_out_index=res.held_out_index,
        )
    cl = res.clustering
    mask = res.network.input_mask
    rep = report.build_report(
        version=__version__,
        backend="cpu",
        activation=act.name,
        dtype=args.dtype,
        students=args.students,
        student_widths=[res.student_width],
        gamma=args.gamma,
        beta_degrees=args.beta_degrees,
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
            "total": t_probe + (time.perf_counter() - t0),
        },
        expansion_search={"width": res.student_width, "tried": res.expansion_search},
        input_mask={"masked_inputs": np.flatnonzero(~mask).tolist() if mask is not None else []},
        cut_height=cl.cut_height,
        cluster_sizes=cl.sizes.tolist(),
        cluster_median_angle_degrees=cl.median_angle_degrees.tolist(),
        dropped_clusters=[
            {"size": d.size, "median_angle_degrees": d.median_angle_degrees, "reason": d.reason}
            for d in cl.dropped
        ],
        dropped_singletons=int(getattr(cl, "n_dropped_singletons", 0)),
        relative_mse_before_finetune=res.relative_mse["initial_train"],
        bits_of_precision=bits,
        student_stop_reasons=res.training.stop_reason,
        **(extra or {}),
    )
    report.write_json_atomic(out.path("report.json"), rep)
    if not args.no_figures:
        gn = args.gamma * args.students
        report.plot_dendrogram(
            cl.linkage,
            cl.cut_height,
            gn,
            out.path("dendrogram.png"),
            title="hidden layer",
            counts=cl.counts,
        )
        m = cl.linkage.shape[0] + 1
        if m <= 6000:
            from . import ops

            ens = res.training.students
            v = torch.cat([ens.weights[0], ens.biases[0][:, :, None]], dim=2).reshape(m, -1)
            keep = np.append(mask, True) if mask is not None else np.ones(v.shape[1], bool)
            v = v[:, torch.as_tensor(keep)].contiguous()
            dist = ops.cosine_distances(v, absolute=act.symmetry.sign_symmetric).numpy()
            report.plot_distance_matrix(dist, cl.linkage, out.path("distance_matrix.png"))
        if alignment is not None:
            report.plot_alignment(alignment[0]["per_teacher_neuron"], out.path("alignment.png"))
        report.plot_training(res.training.history, out.path("training.png"))
    return rep


def _summary(rep: dict, out: Path) -> str:
    lines = [f"recovered hidden width: {rep['recovered_sizes']}"]
    if rep.get("teacher_sizes") is not None:
        lines[0] += f" (teacher: {rep['teacher_sizes']})"
    if rep.get("alignment"):
        al = rep["alignment"][0]
        k = len(al["per_teacher_neuron"])
        lines.append(
            f"teacher neurons within 1e-3 cosine distance: {al['count_below_1e-3']}/{k}, within "
            f"1e-6: {al['count_below_1e-6']}/{k} (median {al['median']:.2e}, max {al['max']:.2e})"
        )
    r = rep["recovered_relative_mse"]
    lines.append(
        f"relative MSE train {r['train']:.2e}"
        + (f", held out {r['held_out']:.2e}" if r.get("held_out") is not None else "")
    )
    lines.append(f"wall time {rep['timings_s']['total']:.1f} s; results in {out}/")
    return "\n".join(lines)


def cmd_recover(args, log) -> int:
    from .teacher import load_network, load_probe_inputs, load_queries, probe

    get_activation_checked(args.activation)
    teacher = None
    t0 = time.perf_counter()
    if args.queries is not None:
        X, Y = load_queries(args.queries)
        source = f"file:{args.queries}"
    else:
        teacher = load_network(args.teacher, activation=args.activation)
        if len(teacher.hidden_sizes) != 1:
            raise InputError(
                f"--teacher: {args.teacher} has {len(teacher.hidden_sizes)} hidden layers; "
                "recover handles one hidden layer"
            )
        inputs = None
        if args.probe_inputs is not None:
            inputs = load_probe_inputs(args.probe_inputs, teacher.d_in)
            source = f"probe-inputs:{args.probe_inputs}"
        else:
            source = f"{args.probe}:{args.n_queries}"
        X, Y = probe(teacher, args.n_queries, args.probe, args.seed, inputs=inputs)
    t_probe = time.perf_counter() - t0
    with _Output(args.out, args.force) as out:
        rep = _run(args, X, Y, source, teacher, out, log, t_probe=t_probe)
    print(_summary(rep, args.out))
    return 0


def cmd_demo(args, log) -> int:
    from .teacher import biased_noise_augmentation, save_network, save_queries, train_digits_teacher

    args.activation = "tanh"
    with _Output(args.out, args.force) as out:
        t0 = time.perf_counter()
        log(f"training the teacher 64-{args.teacher_width}-10 (tanh) on scikit-learn's digits")
        teacher, digits, info = train_digits_teacher(width=args.teacher_width, seed=args.seed)
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
    from .bench import load_suite, run_suite, summarise, summary_markdown

    suite = load_suite(args.suite)
    rows = run_suite(suite, args.out, jobs=args.jobs, log=log)
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
