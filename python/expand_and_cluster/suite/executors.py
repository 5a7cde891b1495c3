"""Where a suite's problems run: each problem in its own process, on this machine
(:class:`LocalExecutor`) or as a Ray task on a cluster or a local Ray instance
(:class:`RayExecutor`). Both yield one result row per problem as soon as it finishes, whatever
happens in the problem: an exception, a dead process or a wall-clock limit become a row with
``status`` "error" or "timeout" (:func:`~expand_and_cluster.suite.problem.failed_row`).

A problem runs with one torch thread and one kernel thread wherever it runs, so its row does not
depend on the executor or on how many problems run at once.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import signal
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import InputError
from . import problem as _problem
from .spec import Problem

#: How many lines of a worker's traceback an error row keeps.
TRACEBACK_LINES = 12


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (a killed suite leaves no
    orphan problem running); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _solve(problem: Problem, settings: dict[str, Any], device: str) -> dict:
    """Run one problem on one thread, turning any exception into an "error" row."""
    import torch

    from .. import ops

    torch.set_num_threads(1)
    ops.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        return _problem.run_problem(problem, settings, device)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row, the suite goes on
        tb = traceback.format_exc().strip().splitlines()[-TRACEBACK_LINES:]
        row = _problem.failed_row(
            problem, "error", f"{type(e).__name__}: {e}", time.perf_counter() - t0
        )
        row["traceback"] = "\n".join(tb)
        return row


def _child(conn, problem: Problem, settings: dict[str, Any], device: str) -> None:
    """A worker process's body: solve the problem and send its row back."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(_solve(problem, settings, device))
    conn.close()


class _Worker:
    """One problem running in its own process; its row arrives on ``conn``."""

    def __init__(self, ctx, problem: Problem, settings: dict, device: str) -> None:
        self.problem = problem
        self.conn, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_child, args=(send, problem, settings, device), daemon=True
        )
        self.started = time.monotonic()
        self.process.start()
        send.close()

    def result(self) -> dict:
        """The row (call when ``conn`` is ready); an "error" row if the process died first."""
        try:
            row = self.conn.recv()
        except (EOFError, OSError):
            self.process.join()
            code = self.process.exitcode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            row = _problem.failed_row(
                self.problem,
                "error",
                f"the worker process died ({how}) before returning a result",
                time.monotonic() - self.started,
            )
        self.stop()
        return row

    def timeout_row(self, limit: float) -> dict:
        self.stop()
        return _problem.failed_row(
            self.problem,
            "timeout",
            f"stopped at the wall-clock limit of {limit:g} s",
            time.monotonic() - self.started,
        )

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _context(device: str):
    # CUDA cannot be used in a forked process; on the CPU a fork starts at once.
    return multiprocessing.get_context("spawn" if device == "cuda" else "fork")


def run_isolated(
    problem: Problem, settings: dict[str, Any], device: str, timeout: float | None
) -> dict:
    """Run one problem in a process of its own and return its row, stopping it after
    ``timeout`` seconds (None: no limit). Used by the Ray tasks; started with "spawn" (a fork of
    a Ray worker, with its threads, is not safe)."""
    worker = _Worker(multiprocessing.get_context("spawn"), problem, settings, device)
    try:
        if worker.conn.poll(timeout):
            return worker.result()
        return worker.timeout_row(timeout)
    finally:
        worker.stop()


class LocalExecutor:
    """Up to ``jobs`` problems at once on this machine, each in a new process (forked on the
    CPU, spawned for CUDA), stopped at ``timeout`` seconds (None: no limit)."""

    def __init__(self, jobs: int = 1, device: str = "cpu", timeout: float | None = None):
        self.jobs, self.device, self.timeout = jobs, device, timeout

    def run(self, problems: Iterable[Problem], settings: dict[str, Any]) -> Iterator[dict]:
        """Yield each problem's row as it finishes (in finishing order). Closing the generator
        (or an exception in the caller, such as Ctrl-C) kills the running problems."""
        ctx = _context(self.device)
        pending = list(problems)
        running: dict[Any, _Worker] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    w = _Worker(ctx, pending.pop(0), settings, self.device)
                    running[w.conn] = w
                wait = None
                if self.timeout is not None:
                    now = time.monotonic()
                    wait = max(0.0, min(w.started + self.timeout - now for w in running.values()))
                for conn in multiprocessing.connection.wait(list(running), timeout=wait):
                    yield running.pop(conn).result()
                if self.timeout is not None:
                    now = time.monotonic()
                    for conn, w in list(running.items()):
                        if now - w.started >= self.timeout:
                            del running[conn]
                            yield w.timeout_row(self.timeout)
        finally:
            for w in running.values():
                w.stop()


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError(
            "--executor ray: Ray is not installed; pip install 'expand-and-cluster[ray]'"
        ) from None
    return ray


class RayExecutor:
    """Every problem as a Ray task (one CPU each, or ``gpus_per_problem`` of a GPU with
    ``device`` "cuda", so that several small problems share a GPU) on the cluster at ``address``
    ("auto": the running cluster this machine belongs to; an address "host:port" or
    "ray://host:port"; None: a new local instance with ``num_cpus`` CPUs, all when None). Each
    task runs its problem in a process of its own, stopped at ``timeout`` seconds."""

    def __init__(
        self,
        address: str | None = None,
        device: str = "cpu",
        timeout: float | None = None,
        gpus_per_problem: float = 0.1,
        num_cpus: int | None = None,
    ):
        if not 0 < gpus_per_problem <= 1:
            raise InputError(f"--gpus-per-problem: {gpus_per_problem}; expected in (0, 1]")
        self.address, self.device, self.timeout = address, device, timeout
        self.gpus_per_problem, self.num_cpus = gpus_per_problem, num_cpus

    def run(self, problems: Iterable[Problem], settings: dict[str, Any]) -> Iterator[dict]:
        """Yield each problem's row as its task finishes. A task that Ray itself loses (its
        worker or node died) gives an "error" row; closing the generator cancels the rest."""
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:  # a new instance on this machine, on loopback only
                kwargs.update(num_cpus=self.num_cpus, _node_ip_address="127.0.0.1")
            ray.init(address=self.address, **kwargs)
        gpus = self.gpus_per_problem if self.device == "cuda" else 0
        task = ray.remote(run_isolated).options(num_cpus=1, num_gpus=gpus, max_retries=0)
        refs = {task.remote(p, settings, self.device, self.timeout): p for p in problems}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    problem = refs.pop(ref)
                    try:
                        yield ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a lost task is a row too
                        yield _problem.failed_row(
                            problem, "error", f"the Ray task failed: {type(e).__name__}: {e}", 0.0
                        )
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
