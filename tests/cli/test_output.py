"""One run per output folder: the check, what --overwrite removes (and what it leaves), the ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.fabric.utilities.rank_zero import _get_rank

from neurenix.cli.output import check_output, is_launching_process, remove_run, run_files_in
from neurenix.cli.settings import UsageError


def write_run(output: Path, *, versions: bool = False, seeds: bool = False) -> list[Path]:
    """The files a run writes (``versions``: the version_N layout of runs before one run per folder;
    ``seeds``: a run with seeds 0 and 1, a folder per seed)."""
    files = [output / "results.json", output / "config.yaml", output / "forgetting_curves.png"]
    for method, below in [(method, below) for method in ("none", "joint", "ewc")
                          for below in (["seed_0", "seed_1"] if seeds else ["version_0" if versions else ""])]:
        folder = output / "tensorboard" / method / below
        files += [folder / "events.out.tfevents.1.host.1.0", folder / "hparams.yaml"]
    if versions:
        files += [output / "tensorboard" / "ewc" / "version_1" / "events.out.tfevents.2.host.2.0"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("written by a run")
    return files


def test_an_empty_or_missing_folder_is_free(tmp_path):
    assert check_output(tmp_path / "new", overwrite=False) == []
    (tmp_path / "other.txt").write_text("not a run")
    assert check_output(tmp_path, overwrite=False) == []


@pytest.mark.parametrize("name", ["results.json", "config.yaml", "forgetting_curves.png", "tensorboard"])
def test_any_file_of_a_run_makes_the_folder_taken(tmp_path, name):
    (tmp_path / name).mkdir() if name == "tensorboard" else (tmp_path / name).write_text("")
    found = [name + "/" if name == "tensorboard" else name]
    with pytest.raises(UsageError) as error:
        check_output(tmp_path, overwrite=False)
    assert str(error.value) == (
        f"--output {str(tmp_path)!r} already holds a run ({found[0]}); choose another folder, "
        "or add --overwrite to replace that run's files"
    )
    assert check_output(tmp_path, overwrite=True) == found and (tmp_path / name).exists()  # checked, not removed


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(UsageError, match=r"--output '.*runs' is a file, not a folder"):
        check_output(tmp_path / "runs", overwrite=True)


@pytest.mark.parametrize(("versions", "seeds"), [(False, False), (True, False), (False, True)])
def test_remove_run_removes_the_run_and_nothing_else(tmp_path, versions, seeds):
    files = write_run(tmp_path, versions=versions, seeds=seeds)
    mine = [tmp_path / "notes.txt", tmp_path / "tensorboard" / "ewc" / "notes.txt", tmp_path / "tensorboard" / "other" / "x"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the command's")
    assert sorted(remove_run(tmp_path)) == sorted(files)
    left = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*"))
    assert left == ["notes.txt", "tensorboard", "tensorboard/ewc", "tensorboard/ewc/notes.txt", "tensorboard/other", "tensorboard/other/x"]
    assert run_files_in(tmp_path) == ["tensorboard/"]  # still taken: someone's files are in it


@pytest.mark.parametrize("layout", [{"versions": True}, {"seeds": True}])
def test_remove_run_leaves_no_empty_folder_behind(tmp_path, layout):
    write_run(tmp_path, **layout)
    remove_run(tmp_path)
    assert list(tmp_path.iterdir()) == [] and run_files_in(tmp_path) == []


@pytest.mark.parametrize(
    "environment",
    [{}, {"LOCAL_RANK": "0"}, {"LOCAL_RANK": "1"}, {"RANK": "3"}, {"RANK": "0", "LOCAL_RANK": "1"},
     {"SLURM_PROCID": "2"}, {"SLURM_PROCID": "0"}, {"JSM_NAMESPACE_RANK": "1"}],
)
def test_the_launching_process_is_the_one_lightning_calls_rank_zero(monkeypatch, environment):
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert is_launching_process() == ((_get_rank() or 0) == 0)
