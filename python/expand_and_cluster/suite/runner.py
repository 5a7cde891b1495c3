"""Running a suite: every problem (or one shard of them) run by an executor, one row per problem
appended to ``results.jsonl`` the moment it finishes, then the summary and its figures; merging
the folders of several shards.

An output folder holds ``suite.json`` (the suite's name, settings, their hash, the package
version, the shard and the problem ids), ``results.jsonl`` (one JSON row per finished problem,
each with ``version`` and ``settings_hash``), ``summary.json``, ``summary.md`` and the figures.
A row is flushed and synced to disk when written, so an interrupted run (Ctrl-C, kill -9, power
loss) loses at most the problems that were running; run again with the same ``--out`` and it
resumes with the problems that have no row. It refuses to resume rows made with other settings
or another package version unless ``force_resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError
from ..io.files import atomic_write, write_json_atomic
from ..io.plots import plot_suite
from .executors import LocalExecutor
from .spec import Suite
from .summary import summarise, summary_markdown

#: A suite run's per-problem wall-clock limit unless told otherwise: 6 hours.
DEFAULT_TIMEOUT_S = 6 * 3600.0


def settings_hash(settings: dict[str, Any]) -> str:
    """A short hash (16 hex digits) of a suite's effective settings, stored in every row."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N: the K-th of N disjoint parts of a suite (problems K,
    K + N, K + 2N, ... in suite order, counting from 1). Raises InputError otherwise."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard: {text!r}; expected K/N, e.g. 1/4") from None
    if not 1 <= k <= n:
        raise InputError(f"--shard: {text!r}; expected 1 <= K <= N")
    return k, n


def shard_of(suite: Suite, shard: tuple[int, int] | None) -> Suite:
    """The suite restricted to one shard (:func:`parse_shard`); the suite itself for None."""
    if shard is None:
        return suite
    k, n = shard
    return Suite(suite.name, dict(suite.settings), suite.problems[k - 1 :: n])


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``results.jsonl`` (none if it does not exist); a line cut by an
    interruption is skipped (its problem runs again)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _check_resume(rows: list[dict], digest: str, where: Path, force: bool) -> None:
    """Refuse rows made with other settings or another version, unless ``force``."""
    if force:
        return
    other = {(r.get("settings_hash"), r.get("version")) for r in rows} - {(digest, __version__)}
    if other:
        got = ", ".join(
            f"settings {h or '?'} / version {v or '?'}" for h, v in sorted(other, key=str)
        )
        raise InputError(
            f"--out: {where} holds rows made with {got}; this run has settings {digest} / "
            f"version {__version__}. Use a new --out, or --force-resume to keep those rows."
        )


def _progress(total: int, done: int, ok: int, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=done, unit="problem", disable=not enabled, file=sys.stderr,
        dynamic_ncols=True,
    )  # fmt: skip
    bar.set_postfix_str(f"{ok} ok")
    return bar


def write_summary(rows: list[dict], out: Path, name: str, **extra: Any) -> dict:
    """Write ``summary.json``, ``summary.md`` and the figures of ``rows`` into ``out``."""
    summary = summarise(rows)
    summary.update(suite=name, **extra)
    write_json_atomic(out / "summary.json", summary)
    with atomic_write(out / "summary.md", "w") as f:
        f.write(summary_markdown(summary))
    plot_suite(rows, out)
    return summary


def run_suite(
    suite: Suite,
    out: Path,
    jobs: int = 1,
    log=None,
    device: str = "cpu",
    *,
    executor=None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    shard: tuple[int, int] | None = None,
    force_resume: bool = False,
    progress: bool = False,
) -> list[dict]:
    """Run every problem of ``suite`` (or of its ``shard``) that has no row in
    ``out/results.jsonl``, record each row the moment it finishes, then write the summary and
    figures; returns the rows of the suite's problems.

    ``executor``: a :class:`~expand_and_cluster.suite.executors.LocalExecutor` or
    :class:`~expand_and_cluster.suite.executors.RayExecutor`; default, a local one with ``jobs``
    processes on ``device`` ("cpu" or "cuda") and ``timeout`` seconds per problem (None: none).
    ``progress``: a tqdm bar with the ETA and the running success count.

    Raises InputError when ``out`` holds rows made with other settings or another package
    version (unless ``force_resume``)."""
    say = log or (lambda s: None)
    suite = shard_of(suite, shard)
    settings = suite.effective_settings()
    digest = settings_hash(settings)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    ids = [p.id for p in suite.problems]
    existing = [r for r in read_rows(results) if r.get("id") in set(ids)]
    _check_resume(existing, digest, results, force_resume)
    done = {r["id"] for r in existing}
    todo = [p for p in suite.problems if p.id not in done]
    write_json_atomic(
        out / "suite.json",
        {
            "suite": suite.name,
            "version": __version__,
            "settings": settings,
            "settings_hash": digest,
            "device": device,
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
            "problems": ids,
        },
    )
    where = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    say(f"suite {suite.name}{where}: {len(ids)} problems, {len(done)} done, {len(todo)} to run")
    if executor is None:
        executor = LocalExecutor(jobs, device, timeout)
    t0 = time.perf_counter()
    ok = sum(bool(r.get("success")) for r in existing)
    bar = _progress(len(ids), len(done), ok, progress)
    write = bar.write if progress else say
    try:
        with open(results, "a", encoding="utf-8") as f:
            for row in executor.run(todo, settings):
                row.update(version=__version__, settings_hash=digest, device=device)
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
                ok += bool(row["success"])
                bar.update(1)
                bar.set_postfix_str(f"{ok} ok")
                write(_row_line(row))
    finally:
        bar.close()
    rows = [r for r in read_rows(results) if r.get("id") in set(ids)]
    write_summary(
        rows, out, suite.name, wall_s_this_run=time.perf_counter() - t0, settings=settings
    )
    return rows


def _row_line(row: dict) -> str:
    teacher = row.get("widths") or [row["width"]]
    got = row.get("recovered_widths") or [row.get("recovered_width")]
    if row["success"]:
        verdict = "ok"
    elif row.get("status", "ok") != "ok":
        verdict = f"{row['status']}: {row.get('message', '')[:120]}"
    else:
        verdict = f"fail: {', '.join(row.get('failure_modes') or ['?'])}"
    return (
        f"{row['id']}: {row['activation']} d_in {row['d_in']} widths {list(teacher)} -> "
        f"{list(got)} ({verdict}; max distance {row['max_distance']:.1e}, "
        f"{row['seconds']:.1f} s)"
    )


def merge_results(folders: list[Path], out: Path, force: bool = False) -> list[dict]:
    """Merge the rows of several run folders (e.g. the shards of one suite) into ``out``
    (``results.jsonl``, ``suite.json``, summary and figures); returns the merged rows.

    Raises InputError when a folder has no ``suite.json`` or rows, when the folders come from
    different suites, settings or versions (unless ``force``), or when two folders hold
    different rows for one problem."""
    manifests, rows_by_id = [], {}
    for folder in folders:
        path = folder / "suite.json"
        if not path.exists():
            raise InputError(f"{folder}: not a suite run folder (no suite.json)")
        manifests.append(json.loads(path.read_text()))
        for row in read_rows(folder / "results.jsonl"):
            prev = rows_by_id.get(row["id"])
            if prev is not None and _comparable(prev) != _comparable(row):
                raise InputError(f"{folder}: problem {row['id']!r} has a different row elsewhere")
            rows_by_id.setdefault(row["id"], row)
    keys = {(m["suite"], m["settings_hash"], m["version"]) for m in manifests}
    if len(keys) > 1 and not force:
        raise InputError(
            "the folders come from different suites, settings or versions: "
            + "; ".join(f"{s} / settings {h} / version {v}" for s, h, v in sorted(keys))
            + " (--force to merge anyway)"
        )
    order = list(dict.fromkeys(_suite_order(manifests)))
    order += sorted(set(rows_by_id) - set(order))
    rows = [rows_by_id[i] for i in order if i in rows_by_id]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    first = manifests[0]
    write_json_atomic(
        out / "suite.json",
        {**first, "shard": None, "problems": order, "merged_from": [str(f) for f in folders]},
    )
    missing = [i for i in order if i not in rows_by_id]
    write_summary(rows, out, first["suite"], settings=first["settings"], missing=missing)
    return rows


def _suite_order(manifests: list[dict]) -> list[str]:
    """The problem ids in suite order: the shards K/N of one N interleaved back (shard K holds
    problems K, K + N, ...), else the folders' ids one after the other."""
    shards = [m.get("shard") for m in manifests]
    if all(shards):
        kn = [tuple(int(v) for v in s.split("/")) for s in shards]
        n = kn[0][1]
        if all(b == n for _, b in kn) and len({k for k, _ in kn}) == len(kn):
            by_k = {k: m["problems"] for (k, _), m in zip(kn, manifests)}
            longest = max(len(v) for v in by_k.values())
            return [
                by_k[k][j] for j in range(longest) for k in range(1, n + 1)
                if k in by_k and j < len(by_k[k])
            ]  # fmt: skip
    return [i for m in manifests for i in m["problems"]]


#: Row fields that differ between two runs of the same problem with the same result.
VOLATILE = ("seconds", "stage_seconds", "traceback")


def _comparable(row: dict) -> dict:
    """``row`` without its timings (:data:`VOLATILE`): equal for equal results."""
    return {k: v for k, v in row.items() if k not in VOLATILE}


def compare_results(a: Path, b: Path) -> list[str]:
    """The differences between the rows of two run folders, one line each (empty when every
    problem has the same row in both, timings aside: :data:`VOLATILE`)."""
    rows_a = {r["id"]: _comparable(r) for r in read_rows(a / "results.jsonl")}
    rows_b = {r["id"]: _comparable(r) for r in read_rows(b / "results.jsonl")}
    lines = [f"{i}: only in {a}" for i in rows_a if i not in rows_b]
    lines += [f"{i}: only in {b}" for i in rows_b if i not in rows_a]
    for i in rows_a.keys() & rows_b.keys():
        ra, rb = rows_a[i], rows_b[i]
        for k in sorted(ra.keys() | rb.keys()):
            if ra.get(k) != rb.get(k):
                lines.append(f"{i}: {k} {ra.get(k)!r} != {rb.get(k)!r}")
    return sorted(lines)
