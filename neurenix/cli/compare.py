"""One comparison: the checks only a run can make, every method's run, then the reports.

Imports torch and Lightning (through :mod:`neurenix.cli.runs`): :mod:`neurenix.cli.command`
imports this module only for a run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from neurenix.cli.output import remove_run
from neurenix.cli.parser import PROG
from neurenix.cli.report import describe, method_line, results_table, write_reports
from neurenix.cli.runs import (
    MethodRun,
    MLPClassifier,
    cpu_threads,
    load_benchmark,
    make_trainer,
    method_callbacks,
    quiet_lightning,
    run_method,
)

__all__ = ["run_compare"]


def run_compare(settings: Any, config_yaml: str = "") -> list[MethodRun]:
    """Run every method of ``settings``; rank zero prints the table and writes the reports.

    Every option is checked, and the data read, before anything is removed or trained. On a
    terminal each method's progress bar gives way to a line with its result; redirected, the
    output is the description, the table and the paths written.

    Raises:
        UsageError: an option that only a run can check (a method's hyper-parameter, the hardware).
        CompareError: the data is missing or unreadable, or a run stopped early.
    """
    output = Path(settings.output)
    for name in settings.methods:
        method_callbacks(name, MLPClassifier(1, 1), settings, settings.scenario)
    with quiet_lightning():
        make_trainer(settings, logger=False, enable_progress_bar=False)  # refuses before any process starts
    benchmark, data = load_benchmark(settings)
    zero, progress = rank_zero_only.rank == 0, sys.stdout.isatty()
    if zero:
        _replace_earlier_run(output, settings.overwrite)
        for warning in data.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        print(describe(settings, benchmark, data), flush=True)
    runs = []
    with quiet_lightning(), cpu_threads(settings.threads):
        for name in settings.methods:
            run, zero = run_method(name, settings, benchmark, output, progress)
            runs.append(run)
            if zero and progress:  # the line that replaces the method's bars
                print(method_line(run), flush=True)
    if zero:
        print()
        print(results_table(runs))
        print()
        for label, path in write_reports(settings, benchmark, data, runs, output, config_yaml).items():
            print(f"{label:<12} {path}")
    return runs


def _replace_earlier_run(output: Path, overwrite: bool) -> None:
    """With ``--overwrite``, remove the earlier run's files (the command checked that it may)."""
    if overwrite:
        removed = remove_run(output)
        if removed:
            print(f"--overwrite: removed the earlier run's {len(removed)} files from {output}", flush=True)
