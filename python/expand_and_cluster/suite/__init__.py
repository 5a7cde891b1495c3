"""Identifiability suites (Martinelli et al. 2024, Sec. 4): :mod:`.spec` (suite files, problems,
settings), :mod:`.runner` (running and scoring, resumable), :mod:`.summary` (success rates)."""

from .runner import run_problem, run_suite
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
    "SUITE_DEFAULTS",
    "SUITE_FORMAT",
    "Problem",
    "Suite",
    "load_suite",
    "override_settings",
    "problem_config",
    "run_problem",
    "run_suite",
    "select_problems",
    "summarise",
    "summary_markdown",
]
