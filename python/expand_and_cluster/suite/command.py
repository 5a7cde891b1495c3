"""The suite commands of the command line: ``expand-and-cluster suite run SUITE`` (alias
``bench SUITE``), ``suite merge DIR... --out DIR`` and ``suite compare DIR DIR``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import InputError
from ..ops import resolve_device
from .executors import LocalExecutor, RayExecutor
from .runner import DEFAULT_TIMEOUT_S, compare_results, merge_results, parse_shard, run_suite
from .spec import load_suite, override_settings, select_problems
from .summary import summarise, summary_markdown


def _positive(name: str, kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {s!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name}: expected a value > 0, got {s}")
        return v

    return parse


def _add_run_options(p: argparse.ArgumentParser) -> None:
    # fmt: off
    p.add_argument("suite", type=Path, help="suite file (.json)")
    p.add_argument("--out", type=Path, required=True, help="output folder (reused to resume)")
    p.add_argument("--jobs", type=_positive("--jobs", int), default=1,
                   help="problems run at once on this machine (local executor, or the CPUs of "
                   "a new local Ray instance; default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--select", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                   help="run only the problems whose field KEY takes one of the values "
                   "(repeatable, e.g. --select rho=4 --select activation=tanh,g)")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite setting by its dotted key (repeatable, e.g. --setting "
                   "train.max_epochs=1000); use a new --out for changed settings")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: processes on this machine; ray: Ray tasks (extra [ray])")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="with --executor ray: 'auto' (the running cluster), host:port or "
                   "ray://host:port; default: a new local Ray instance with --jobs CPUs")
    p.add_argument("--gpus-per-problem", type=_positive("--gpus-per-problem", float),
                   default=0.1, help="with --executor ray --device cuda: the share of a GPU "
                   "each problem asks for (default %(default)s)")
    p.add_argument("--shard", type=parse_shard_arg, metavar="K/N",
                   help="run only the K-th of N disjoint parts of the suite (K from 1), e.g. "
                   "from a Slurm array index; merge the folders with 'suite merge'")
    p.add_argument("--timeout", type=_positive("--timeout", float), default=DEFAULT_TIMEOUT_S,
                   help="wall-clock limit per problem, seconds (default %(default)g); a problem "
                   "stopped at it gets a row with status 'timeout'")
    p.add_argument("--force-resume", action="store_true",
                   help="resume into --out even if its rows were made with other settings or "
                   "another package version (they are kept as they are)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log")
    # fmt: on


def parse_shard_arg(text: str):
    try:
        return parse_shard(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parsers(sub) -> None:
    """Add ``suite run|merge`` and the ``bench`` alias of ``suite run`` to ``sub`` (the
    command line's subparsers)."""
    description = (
        "Run every problem of SUITE (benchmarks/suites/*.json) not yet in OUT/results.jsonl, "
        "recording each row as it finishes, then write summary.json, summary.md and figures."
    )
    b = sub.add_parser("bench", help="run an identifiability suite (alias of 'suite run')",
                       description=description)  # fmt: skip
    _add_run_options(b)
    s = sub.add_parser("suite", help="run or merge identifiability suites of planted teachers")
    ss = s.add_subparsers(dest="suite_command", required=True)
    _add_run_options(ss.add_parser("run", help="run a suite", description=description))
    m = ss.add_parser("merge", help="merge run folders (e.g. shards) into one",
                      description="Merge the rows of several suite run folders (the shards of "
                      "one suite) into OUT and write its summary and figures.")  # fmt: skip
    m.add_argument("folders", type=Path, nargs="+", metavar="DIR")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--force", action="store_true",
                   help="merge folders made with other settings or versions")  # fmt: skip
    m.add_argument("--quiet", action="store_true")
    c = ss.add_parser("compare", help="compare the rows of two run folders",
                      description="Exit 0 when both folders hold the same rows (timings aside), "
                      "else print the differences and exit 1.")  # fmt: skip
    c.add_argument("folders", type=Path, nargs=2, metavar="DIR")
    c.add_argument("--quiet", action="store_true")


def cmd_suite(args, log) -> int:
    """``suite run``, ``suite merge``, ``bench`` (print the summary, return 0) and ``suite
    compare`` (return 1 when the rows differ)."""
    command = getattr(args, "suite_command", "run")
    if command == "compare":
        for folder in args.folders:
            if not (folder / "results.jsonl").exists():
                raise InputError(f"{folder}: no results.jsonl")
        diff = compare_results(*args.folders)
        for line in diff:
            print(line)
        print(f"{len(diff)} difference(s)" if diff else "the rows are equal")
        return 1 if diff else 0
    if command == "merge":
        if args.out.resolve() in {f.resolve() for f in args.folders}:
            raise InputError("--out: must differ from the folders merged")
        rows = merge_results(args.folders, args.out, force=args.force)
        log(f"merged {len(rows)} rows from {len(args.folders)} folders")
        name = json.loads((args.out / "suite.json").read_text())["suite"]
    else:
        device = resolve_device(args.device)
        suite = load_suite(args.suite)
        if args.select:
            suite = select_problems(suite, args.select)
        if args.setting:
            suite = override_settings(suite, args.setting)
        if args.executor == "ray":
            executor = RayExecutor(
                args.ray_address, device, args.timeout, args.gpus_per_problem, args.jobs
            )
        else:
            if args.ray_address is not None:
                raise InputError("--ray-address: only with --executor ray")
            executor = LocalExecutor(args.jobs, device, args.timeout)
        log(f"students train on {device}; executor {args.executor}")
        rows = run_suite(
            suite,
            args.out,
            log=log,
            device=device,
            executor=executor,
            shard=args.shard,
            force_resume=args.force_resume,
            progress=not args.quiet,
        )
        name = suite.name
    summary = summarise(rows)
    summary["suite"] = name
    print(summary_markdown(summary))
    print(f"results in {args.out}/")
    return 0
