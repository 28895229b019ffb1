"""The output folder of ``neurenix compare``: one run per folder.

A second run into a folder used to overwrite ``results.json`` and the plot while TensorBoard
added ``version_1`` beside the first run's logs: the folder then held parts of two runs. Now a
folder that holds a run is refused, and ``--overwrite`` first removes that run's files, the ones
this command writes, and nothing else. No torch, no Lightning: the check answers at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from neurenix.cli.settings import METHODS, UsageError

__all__ = ["RUN_FILES", "TENSORBOARD", "check_output", "is_launching_process", "remove_run", "run_files_in"]

#: The files a run writes at the top of --output.
RUN_FILES = ("results.json", "config.yaml", "forgetting_curves.png")
#: The folder of the TensorBoard logs, one sub-folder per method (with several seeds, one per seed below it).
TENSORBOARD = "tensorboard"
#: What TensorBoard's logger writes in a method's folder: event files and the hyper-parameters.
_LOG_FILE = re.compile(r"events\.out\.tfevents\..*|hparams\.yaml")
#: The folders below a method's: the logger's versions, as runs before one-run-per-folder wrote
#: them, and one per seed (``seed_<s>``) of a run with several seeds.
_RUN_FOLDER = re.compile(r"version_\d+|seed_\d+")


def run_files_in(output: Path) -> list[str]:
    """The names of a run's files and folders that ``output`` holds (``tensorboard/`` with a slash)."""
    found = [name for name in RUN_FILES if (output / name).exists()]
    if (output / TENSORBOARD).exists():
        found.append(TENSORBOARD + "/")
    return found


def check_output(output: Path, overwrite: bool) -> list[str]:
    """The names of the run's files ``output`` holds (see :func:`run_files_in`), if ``overwrite`` allows them.

    Nothing is removed here: :func:`remove_run` does that, once the other options are checked.

    Raises:
        UsageError: ``output`` holds a run and ``overwrite`` is false; or ``output`` is a file.
    """
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} is a file, not a folder")
    found = run_files_in(output)
    if found and not overwrite:
        raise UsageError(
            f"--output {str(output)!r} already holds a run ({', '.join(found)}); choose another folder, "
            "or add --overwrite to replace that run's files"
        )
    return found


def remove_run(output: Path) -> list[Path]:
    """Remove the files a run of this command wrote in ``output``, and the folders they leave empty.

    Files the command does not write stay, and so do the folders that hold them.

    Returns:
        The files removed.
    """
    removed = []
    for name in RUN_FILES:
        path = output / name
        if path.is_file():
            path.unlink()
            removed.append(path)
    logs = output / TENSORBOARD
    for method in METHODS:
        folder = logs / method
        if folder.is_dir():
            runs = [sub for sub in folder.iterdir() if sub.is_dir() and _RUN_FOLDER.fullmatch(sub.name)]
            for log_folder in [*runs, folder]:
                removed += _remove_log_files(log_folder)
    _remove_if_empty(logs)
    return removed


def _remove_log_files(folder: Path) -> list[Path]:
    removed = [path for path in folder.iterdir() if path.is_file() and _LOG_FILE.fullmatch(path.name)]
    for path in removed:
        path.unlink()
    _remove_if_empty(folder)
    return removed


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (files that are not ours), or not there
        pass


def is_launching_process() -> bool:
    """Whether this process is the one the user started, not a rank that a DDP launcher started.

    Lightning's script launcher (``--strategy ddp``), torchrun and SLURM run the whole command
    again in every rank: only rank zero may check and clear the output folder. The rank comes
    from the variables Lightning reads for ``rank_zero_only.rank``, in its order (the first one
    set wins), read here without importing Lightning.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        rank = os.environ.get(key)
        if rank is not None:
            return int(rank) == 0
    return True
