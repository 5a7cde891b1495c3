"""The suite runner: rows recorded as problems finish, errors, dead workers and timeouts as rows,
resume checks, shards and merges, Ray, kill -9, and the failure modes of a failed row
(expand_and_cluster.suite.runner, .executors, .diagnose)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from expand_and_cluster import ops
from expand_and_cluster.cli import main
from expand_and_cluster.config import RecoverConfig
from expand_and_cluster.errors import InputError
from expand_and_cluster.network import Network
from expand_and_cluster.pipeline.cluster import DroppedCluster
from expand_and_cluster.suite import (
    SUITE_FORMAT,
    LocalExecutor,
    Problem,
    Suite,
    failed_row,
    failure_modes,
    merge_results,
    parse_shard,
    read_rows,
    run_suite,
)
from expand_and_cluster.suite import problem as problem_module
from expand_and_cluster.suite.runner import compare_results
from expand_and_cluster.teachers import planted_teacher

QUICK = {
    "train.n_students": 6,
    "train.max_epochs": 60,
    "train.batch_size": 256,
    "train.polish_iterations": 300,
    "finetune_iterations": 300,
}
REAL = [
    {"id": "tanh", "activation": "tanh", "d_in": 4, "width": 3, "seed": 2},
    {"id": "relu", "activation": "relu", "d_in": 4, "width": 3, "seed": 2},
    {"id": "g", "activation": "g", "d_in": 3, "width": 2, "seed": 1},
]


def _suite(ids, settings=None) -> Suite:
    return Suite("t", dict(settings or {}), [Problem(i, "tanh", d_in=2, width=2) for i in ids])


def _ok_row(problem: Problem) -> dict:
    """A successful row as run_problem would give it (no recovery run)."""
    row = failed_row(problem, "ok", "", 0.01)
    row.update(
        success=True,
        recovered_widths=problem.hidden_widths,
        max_distance=0.0,
        failure_modes=[],
        failure_mode=None,
    )
    return row


def _fake(monkeypatch, behaviour):
    """Replace run_problem (the forked workers inherit it) by ``behaviour[problem.id]``:
    "ok", "raise", "die", a number of seconds to sleep before "ok", or "threads"."""

    def fake(problem, settings, device="cpu"):
        what = behaviour.get(problem.id, "ok")
        if what == "raise":
            raise FloatingPointError("a student diverged")
        if what == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "threads":
            raise RuntimeError(f"threads {torch.get_num_threads()} {ops.num_threads()}")
        if isinstance(what, (int, float)):
            time.sleep(what)
        return _ok_row(problem)

    monkeypatch.setattr(problem_module, "run_problem", fake)


def test_exceptions_and_dead_workers_become_rows_and_the_suite_goes_on(tmp_path, monkeypatch):
    _fake(monkeypatch, {"a": "raise", "b": "die", "d": "threads"})
    torch.set_num_threads(2)
    rows = run_suite(_suite("abcd"), tmp_path, jobs=2)
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["a", "b", "c", "d"]
    assert by_id["a"]["status"] == "error" and "FloatingPointError" in by_id["a"]["message"]
    assert "a student diverged" in by_id["a"]["traceback"]
    assert by_id["b"]["status"] == "error" and "signal 9" in by_id["b"]["message"]
    assert by_id["c"]["success"] and by_id["c"]["status"] == "ok"
    # Each problem runs on one torch thread and one kernel thread; the caller keeps its own.
    assert by_id["d"]["message"] == "RuntimeError: threads 1 1"
    assert torch.get_num_threads() == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"]["error"] == 3 and summary["failures"]["modes"]["error"] == 3


def test_a_problem_past_the_timeout_is_stopped(tmp_path, monkeypatch):
    _fake(monkeypatch, {"slow": 120})
    t0 = time.monotonic()
    rows = run_suite(_suite(["slow", "fast"]), tmp_path, jobs=2, timeout=2.0)
    assert time.monotonic() - t0 < 60
    by_id = {r["id"]: r for r in rows}
    assert by_id["slow"]["status"] == "timeout" and by_id["slow"]["failure_mode"] == "timeout"
    assert by_id["fast"]["success"]


def test_rows_are_recorded_in_the_order_problems_finish(tmp_path, monkeypatch):
    _fake(monkeypatch, {"slow": 3})
    seen = []

    class Spy(LocalExecutor):
        def run(self, problems, settings):
            for row in super().run(problems, settings):
                # The rows before this one are already on disk.
                seen.append([r["id"] for r in read_rows(tmp_path / "results.jsonl")])
                yield row

    run_suite(_suite(["slow", "fast"]), tmp_path, executor=Spy(jobs=2))
    assert [r["id"] for r in read_rows(tmp_path / "results.jsonl")] == ["fast", "slow"]
    assert seen == [[], ["fast"]]


def test_resume_refuses_rows_of_other_settings_or_versions(tmp_path, monkeypatch, capsys):
    _fake(monkeypatch, {})
    out = tmp_path / "run"
    run_suite(_suite("ab"), out)
    rows = read_rows(out / "results.jsonl")
    assert {r["version"] for r in rows} and len({r["settings_hash"] for r in rows}) == 1
    with pytest.raises(InputError, match="--force-resume"):
        run_suite(_suite("abc", {"train.max_epochs": 7}), out)
    # Forced, the old rows are kept and only the new problem runs.
    rows = run_suite(_suite("abc", {"train.max_epochs": 7}), out, force_resume=True)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    # Another version: refused too, from the command line with exit code 2 and one line.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(
        "\n".join(json.dumps({**json.loads(s), "version": "0.0.1"}) for s in lines) + "\n"
    )
    suite_file = tmp_path / "s.json"
    suite_file.write_text(
        json.dumps(
            {
                "format": SUITE_FORMAT,
                "name": "t",
                "problems": [{"id": i, "d_in": 2, "width": 2} for i in "abc"],
            }
        )
    )
    assert main(["suite", "run", str(suite_file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "version 0.0.1" in err and "Traceback" not in err


def test_shards_partition_the_suite_and_merge_into_the_full_run(tmp_path, monkeypatch, capsys):
    _fake(monkeypatch, {"c": "raise"})
    suite = _suite("abcdefg")
    full = tmp_path / "full"
    run_suite(suite, full, jobs=2)
    shards = []
    for k in (1, 2, 3):
        shards.append(tmp_path / f"shard{k}")
        run_suite(suite, shards[-1], shard=(k, 3))
    ids = [[r["id"] for r in read_rows(s / "results.jsonl")] for s in shards]
    assert sorted(sum(ids, [])) == list("abcdefg") and ids[0] == ["a", "d", "g"]
    merged = tmp_path / "merged"
    rows = merge_results(shards[::-1], merged)
    assert [r["id"] for r in rows] == list("abcdefg")  # suite order, whatever the folders' order
    assert compare_results(merged, full) == []
    assert main(["suite", "compare", str(merged), str(full)]) == 0
    assert main(["suite", "compare", str(shards[0]), str(full)]) == 1
    assert "b: only in" in capsys.readouterr().out
    assert json.loads((merged / "summary.json").read_text())["problems"] == 7
    # Folders of other settings are not merged unless forced.
    other = tmp_path / "other"
    run_suite(_suite("h", {"train.max_epochs": 7}), other)
    with pytest.raises(InputError, match="different suites, settings or versions"):
        merge_results([full, other], tmp_path / "m2")
    assert len(merge_results([full, other], tmp_path / "m3", force=True)) == 8
    for bad in ["3", "0/2", "3/2", "a/b"]:
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


def _suite_file(tmp_path, problems) -> Path:
    path = tmp_path / "suite.json"
    suite = {"format": SUITE_FORMAT, "name": "tiny", "settings": QUICK, "problems": problems}
    path.write_text(json.dumps(suite))
    return path


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_kill_9_loses_no_finished_row_and_leaves_no_worker(tmp_path):
    path = _suite_file(tmp_path, REAL)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "expand_and_cluster", "suite", "run", str(path)]
    proc = subprocess.Popen([*cmd, "--out", str(out), "--quiet"])
    deadline = time.monotonic() + 120
    while not read_rows(out / "results.jsonl") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = read_rows(out / "results.jsonl")
    assert len(first) >= 1
    time.sleep(0.5)
    assert _processes_mentioning(str(out)) == []  # the running worker died with the suite
    subprocess.run([*cmd, "--out", str(out), "--quiet"], check=True, capture_output=True)
    rows = read_rows(out / "results.jsonl")
    assert sorted(r["id"] for r in rows) == ["g", "relu", "tanh"]
    assert rows[: len(first)] == first  # the finished rows were kept, not rerun
    # The resumed rows equal those of an uninterrupted run.
    whole = tmp_path / "whole"
    subprocess.run([*cmd, "--out", str(whole), "--quiet", "--jobs", "2"], check=True)
    assert compare_results(out, whole) == []


def test_ray_executor_gives_the_rows_of_the_local_one(tmp_path):
    pytest.importorskip("ray")
    from expand_and_cluster.suite import RayExecutor, load_suite

    suite = load_suite(_suite_file(tmp_path, REAL[:2]))
    run_suite(suite, tmp_path / "local", jobs=2)
    run_suite(suite, tmp_path / "ray", executor=RayExecutor(num_cpus=2, timeout=600))
    assert len(read_rows(tmp_path / "ray" / "results.jsonl")) == 2
    assert compare_results(tmp_path / "local", tmp_path / "ray") == []


# ---------------------------------------------------------------------------------------------
# failure modes, on planted teachers with students and clusterings made by hand


def _diagnosis_case(kind: str):
    """A planted 4-3-1 tanh teacher, 6 students of width 4 holding copies of its neurons (plus
    noise), a clustering and a final network with teacher neuron 2 treated as ``kind`` says."""
    teacher = planted_teacher(4, [3], 1, "tanh", seed=3, min_angle_degrees=30.0)
    rng = np.random.default_rng(0)
    T = teacher.incoming(0)
    n, width = 6, 4
    vectors = rng.normal(size=(n * width, 5))  # junk neurons
    for s in range(n):
        for j in range(3):
            if kind == "not_learned" and j == 2 and s > 0:
                continue  # only one student found neuron 2
            sign = -1 if (s + j) % 2 else 1  # tanh: a sign flip is the same neuron
            vectors[s * width + j] = sign * T[j] * (1 + 1e-6 * rng.normal(size=5))
    labels = np.full(n * width, -1)
    for s in range(n):
        labels[s * width + 0], labels[s * width + 1] = 0, 1
    kept = [0, 1] if kind != "none" else [0, 1, 2]
    dropped = []
    neuron2 = np.array([s * width + 2 for s in range(n)])
    if kind == "none":
        labels[neuron2] = 2
    elif kind in ("dropped_size", "dropped_angle"):
        reason = "size < gamma*N" if kind == "dropped_size" else "median angle > beta"
        dropped.append(DroppedCluster(6, 0.1, reason, neuron2, np.arange(n)))
    elif kind == "merged":
        labels[neuron2] = 1
    incoming = T[kept]
    clustering = SimpleNamespace(
        incoming=incoming,
        k_hat=len(kept),
        input_mask=np.ones(4, bool),
        dropped=dropped,
        labels=labels,
    )
    w = torch.tensor(vectors[:, :4].reshape(n, width, 4))
    b = torch.tensor(vectors[:, 4].reshape(n, width))
    students = SimpleNamespace(weights=[w], biases=[b])
    losses = np.full(n, 1e-20 if kind != "students" else 1e-3)
    out_w = teacher.weights[1][:, kept]
    network = Network([incoming[:, :4], out_w], [incoming[:, 4], teacher.biases[1]], "tanh")
    res = SimpleNamespace(
        config=RecoverConfig("tanh"),
        network=network,
        training=SimpleNamespace(relative_mse=losses, students=students),
        clustering=clustering,
    )
    return teacher, res


@pytest.mark.parametrize(
    "kind", ["none", "dropped_size", "dropped_angle", "merged", "not_learned", "students"]
)
def test_failure_modes_name_the_planted_cause(kind):
    teacher, res = _diagnosis_case(kind)
    modes = failure_modes(teacher, res)
    expected = {
        "none": [],
        "students": ["students", "not_learned"],
    }.get(kind, [kind])
    assert modes == expected


def test_failure_modes_extra_lost_and_imprecise():
    teacher, res = _diagnosis_case("none")
    net = res.network
    # An extra neuron in the final network.
    extra = Network(
        [np.vstack([net.weights[0], np.ones((1, 4))]), np.hstack([net.weights[1], [[0.1]]])],
        [np.append(net.biases[0], 0.0), net.biases[1]],
        "tanh",
    )
    assert failure_modes(teacher, SimpleNamespace(**{**vars(res), "network": extra})) == ["extra"]
    # The clustering had neuron 2; the final network moved it away.
    moved = Network([w.copy() for w in net.weights], [b.copy() for b in net.biases], "tanh")
    moved.weights[0][2] = -moved.weights[0][2][::-1]
    assert failure_modes(teacher, SimpleNamespace(**{**vars(res), "network": moved})) == ["lost"]
    # Every neuron near its teacher neuron, one beyond the threshold.
    off = Network([w.copy() for w in net.weights], [b.copy() for b in net.biases], "tanh")
    off.weights[0][1] += 0.05
    assert failure_modes(teacher, SimpleNamespace(**{**vars(res), "network": off})) == ["imprecise"]
