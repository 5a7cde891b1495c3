"""Reading and writing: :mod:`.files` (atomic writes, network and query files),
:mod:`.checkpoint` (checkpoint and output folders), :mod:`.report` (``report.json`` and a run's
files), :mod:`.plots` (figures). Nothing here imports the pipeline, the suites or the CLI."""

from .files import load_network, load_queries, save_network, save_queries
from .report import build_report, write_run

__all__ = [
    "build_report",
    "load_network",
    "load_queries",
    "save_network",
    "save_queries",
    "write_run",
]
