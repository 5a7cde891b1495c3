"""Identifiability suites (Martinelli et al. 2024, Sec. 4): :mod:`.spec` (suite files, problems,
settings), :mod:`.problem` (one problem planted, recovered and scored), :mod:`.diagnose` (why a
problem failed), :mod:`.executors` (where problems run: local processes or Ray), :mod:`.runner`
(running, resuming, sharding and merging), :mod:`.summary` (success rates)."""

from .diagnose import FAILURE_MODES, failure_modes
from .executors import LocalExecutor, RayExecutor
from .problem import failed_row, run_problem
from .runner import merge_results, parse_shard, read_rows, run_suite, settings_hash
from .spec import (
    SUITE_DEFAULTS,
    SUITE_FORMAT,
    Problem,
    Suite,
    load_suite,
    override_settings,
    problem_config,
    select_problems,
)
from .summary import summarise, summary_markdown

__all__ = [
    "FAILURE_MODES",
    "SUITE_DEFAULTS",
    "SUITE_FORMAT",
    "LocalExecutor",
    "Problem",
    "RayExecutor",
    "Suite",
    "failed_row",
    "failure_modes",
    "load_suite",
    "merge_results",
    "override_settings",
    "parse_shard",
    "problem_config",
    "read_rows",
    "run_problem",
    "run_suite",
    "select_problems",
    "settings_hash",
    "summarise",
    "summary_markdown",
]
