"""The command's runs: which data it read, how data errors end, which strategies it refuses."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from neurenix.cli import main
from neurenix.cli.runs import DataSource, load_benchmark, make_trainer
from neurenix.cli.settings import CompareError, UsageError
from tests.data.test_idx import write_idx
from tests.data.test_mnist import DEBIAN_FASHION_MNIST, write_dataset

TINY = ["--methods", "none", "--epochs", "1", "--num_tasks", "2", "--accelerator", "cpu"]


def data_settings(dataset: str, root: Path, **changes) -> SimpleNamespace:
    values = dict(dataset=dataset, data_root=str(root), download=False, benchmark="split", num_tasks=2, seed=0, scenario="domain")
    return SimpleNamespace(**{**values, **changes})


def test_the_description_names_mnist_and_the_folder_its_files_were_read_from(tmp_path):
    write_dataset(tmp_path / "MNIST" / "raw")  # ten classes, 30 training and 20 test images
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main([*TINY, "--dataset", "mnist", "--data_root", str(tmp_path), "--output", str(tmp_path / "out")])
    assert status == 0
    first = stdout.getvalue().splitlines()[0]
    assert first.startswith(f"split MNIST from {tmp_path / 'MNIST' / 'raw'}, domain-incremental, tasks 0-1 (classes ")


def test_files_directly_in_the_root_are_named_by_the_root(tmp_path):
    write_dataset(tmp_path)
    benchmark, data = load_benchmark(data_settings("fashion_mnist", tmp_path))
    assert data == DataSource("Fashion-MNIST", tmp_path) and benchmark.num_tasks == 2


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's Fashion-MNIST is not installed")
def test_fashion_mnist_given_as_mnist_is_named_fashion_mnist_with_a_one_line_warning():
    # The output said "split mnist" while the tasks were clothing.
    benchmark, data = load_benchmark(data_settings("mnist", DEBIAN_FASHION_MNIST, num_tasks=5))
    assert (data.name, data.folder, data.requested) == ("Fashion-MNIST", DEBIAN_FASHION_MNIST, "mnist")
    assert data.warnings == [
        f"--data_root {str(DEBIAN_FASHION_MNIST)!r} holds Fashion-MNIST, not MNIST: it is read as given "
        "(--dataset mnist); the results are about Fashion-MNIST"
    ]


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("truncate", "mnist data in --data_root '{root}': "),
        ("count", "mnist data in --data_root '{root}': "),  # images and labels of different counts
        ("remove", "no mnist data: --data_root '{root}' lacks its IDX files"),
    ],
)
def test_a_data_error_ends_with_one_line_naming_data_root_and_status_1(tmp_path, capsys, damage, says):
    root = tmp_path / "data"
    write_dataset(root / "MNIST" / "raw")
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    if damage == "truncate":
        labels.write_bytes(labels.read_bytes()[:-5])
    elif damage == "count":
        write_idx(labels, np.zeros(7, dtype=np.uint8))
    else:
        labels.unlink()
    assert main([*TINY, "--dataset", "mnist", "--data_root", str(root), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neurenix: error: " + says.format(root=root)), err
    assert not (tmp_path / "out").exists()


def test_a_missing_root_is_a_run_failure_naming_data_root(tmp_path):
    with pytest.raises(CompareError, match=r"no mnist data: --data_root '.*nowhere' does not exist; point --data_root"):
        load_benchmark(data_settings("mnist", tmp_path / "nowhere"))


def hardware(strategy: str, devices=2) -> SimpleNamespace:
    return SimpleNamespace(accelerator="cpu", devices=devices, strategy=strategy)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook_find_unused_parameters_false"])
@pytest.mark.parametrize("devices", [1, 2])
def test_make_trainer_refuses_multiprocessing_strategies(strategy, devices):
    with pytest.raises(UsageError) as error:
        make_trainer(hardware(strategy, devices), logger=False, enable_progress_bar=False)
    start = "spawn" if "spawn" in strategy else "fork"
    assert str(error.value) == (
        f"--strategy {strategy}: its processes start from this one (multiprocessing, {start!r}), which the "
        "continual-learning methods cannot run in; use --strategy ddp"
    )


@pytest.mark.parametrize("strategy", ["ddp", "auto", "ddp_find_unused_parameters_true"])
def test_make_trainer_takes_the_strategies_that_run_the_command_once_per_device(strategy):
    trainer = make_trainer(hardware(strategy), logger=False, enable_progress_bar=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2
