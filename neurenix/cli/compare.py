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
    load_benchmark,
    make_trainer,
    method_callbacks,
    quiet_lightning,
    run_many,
)
from neurenix.cli.settings import UsageError, seeds_of

__all__ = ["run_compare"]


def run_compare(settings: Any, config_yaml: str = "") -> list[MethodRun]:
    """Run every method of ``settings`` with every seed; rank zero prints the table and writes the reports.

    Every option is checked, and the data read, before anything is removed or trained. On a
    terminal (and with ``--jobs`` 1) each run's progress bar gives way to a line with its
    result; redirected, the output is the description, the table and the paths written.

    Returns:
        The runs, method by method, each method's seeds in the order of ``--seeds``.

    Raises:
        UsageError: an option that only a run can check (a method's hyper-parameter, the hardware).
        CompareError: the data is missing or unreadable, or a run stopped early.
    """
    output = Path(settings.output)
    for name in settings.methods:
        method_callbacks(name, MLPClassifier(1, 1), settings, settings.scenario)
    with quiet_lightning():
        trainer = make_trainer(settings, logger=False, enable_progress_bar=False)  # refuses before any process starts
    if settings.jobs > 1 and trainer.world_size > 1:  # "auto" on several devices is DDP too
        raise UsageError(f"--jobs {settings.jobs} runs the methods in processes of its own, which a run on "
                         f"{trainer.world_size} devices (--strategy {settings.strategy}) cannot run in: use --jobs 1")
    benchmarks = {}
    for seed in seeds_of(settings):  # each seed draws its own class order or permutations
        benchmarks[seed], data = load_benchmark(_with_seed(settings, seed))
    zero, progress = rank_zero_only.rank == 0, sys.stdout.isatty() and settings.jobs == 1
    if zero:
        _replace_earlier_run(output, settings.overwrite)
        for warning in data.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        print(describe(settings, benchmarks, data), flush=True)
    calls = [
        (name, _with_seed(settings, seed), benchmark, output) for name in settings.methods for seed, benchmark in benchmarks.items()
    ]
    several = len(benchmarks) > 1
    done = (lambda run: print(method_line(run, several), flush=True)) if zero and progress else None
    runs = run_many(calls, settings.jobs, progress=progress, done=done)
    if rank_zero_only.rank == 0:  # DDP's other ranks (started by the first run) write nothing
        print()
        print(results_table(runs))
        print()
        for label, path in write_reports(settings, benchmarks, data, runs, output, config_yaml).items():
            print(f"{label:<12} {path}")
    return runs


def _with_seed(settings: Any, seed: int) -> Any:
    """``settings`` for the run of one seed: ``seed`` set, ``seeds`` kept (the logs' folders follow it)."""
    one = settings.clone()
    one.seed = seed
    return one


def _replace_earlier_run(output: Path, overwrite: bool) -> None:
    """With ``--overwrite``, remove the earlier run's files (the command checked that it may)."""
    if overwrite:
        removed = remove_run(output)
        if removed:
            print(f"--overwrite: removed the earlier run's {len(removed)} files from {output}", flush=True)
