"""`lynx-exit eval`: tasks × exit methods × settings on paired seeds, with a Pareto report
(docs/how-it-works.md §7):
running (`run`), records and statistics (`records`), the report (`report`)."""

from lynx_exit.evaluate.records import (
    RECORD_KEYS,
    TIMING_KEYS,
    load_records,
    load_timing,
    summarize,
    wilson_interval,
)
from lynx_exit.evaluate.report import markdown_table, pareto_plot, write_report
from lynx_exit.evaluate.run import Job, check_settings, eval_jobs, run_eval

__all__ = [
    "RECORD_KEYS",
    "TIMING_KEYS",
    "Job",
    "check_settings",
    "eval_jobs",
    "load_records",
    "load_timing",
    "markdown_table",
    "pareto_plot",
    "run_eval",
    "summarize",
    "wilson_interval",
    "write_report",
]
