"""Task data on a CUDA device (``keep_on_device=True``, ``TaskDataset.to``): batches built on the
GPU, equal to the CPU's, with one host-to-device copy per loader epoch (the order) and no
synchronization per batch.

Marked ``gpu`` and skipped without CUDA; run them on a GPU machine with
``python -m pytest -q -m gpu tests/gpu/test_device_data.py``. The CPU tests of the same code are
tests/data/test_keep_on_device.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.profiler import ProfilerActivity, profile

from neurenix.continual import EWC
from neurenix.data import TaskSequenceDataModule, fit_sequence
from neurenix.data.benchmarks import permuted_benchmark, split_benchmark
from neurenix.data.tasks import ConcatTaskDataset
from tests.helpers import lit_classifier, quiet_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda", 0)
REGIMES = ("sequential", "cumulative", "joint")


def host_to_device_copies(run: Any) -> int:
    """How many host-to-device copies the GPU made while ``run()`` ran (from the profiler's trace)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        run()
        torch.cuda.synchronize()
    return sum(1 for event in trace.events() if "Memcpy HtoD" in event.name)


@contextlib.contextmanager
def no_synchronization() -> Iterator[None]:
    """Any operation that makes the host wait for the GPU raises inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def batches_on_cpu(batches: list) -> list:
    return [tuple(item.cpu() for item in batch) for batch in batches]


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("make", [split_benchmark, permuted_benchmark], ids=["split", "permuted"])
def test_a_sequence_moved_to_the_gpu_builds_the_cpu_batches_there(make):
    benchmark = make("digits", num_tasks=5, scenario="task")
    moved = benchmark.to("cuda")
    index = torch.randperm(len(benchmark.train[1]), generator=torch.Generator().manual_seed(0))[:50]
    for task, on_gpu in zip(benchmark.train + benchmark.test, moved.train + moved.test):
        assert on_gpu.inputs.is_cuda and on_gpu.targets.is_cuda and not task.inputs.is_cuda
        local = index[index < len(task)]
        batch = on_gpu[local.to(CUDA)]
        assert all(item.is_cuda for item in batch)
        assert_same_batches(batches_on_cpu([batch]), [task[local]])
    union, union_on_gpu = ConcatTaskDataset(benchmark.train), ConcatTaskDataset(moved.train)
    order = torch.randperm(len(union), generator=torch.Generator().manual_seed(1))[:300]
    assert_same_batches(batches_on_cpu([union_on_gpu.__getitems__(order.to(CUDA)).tensors]), [union[order]])


@pytest.mark.parametrize("make", [split_benchmark, permuted_benchmark], ids=["split", "permuted"])
@pytest.mark.parametrize("training", REGIMES)
def test_every_loader_builds_its_batches_on_the_gpu_with_one_copy_an_epoch_and_no_sync(make, training):
    benchmark = make("digits", num_tasks=5, scenario="task")

    def datamodule(keep: bool) -> TaskSequenceDataModule:
        data = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=32, eval_batch_size=64, seed=4, training=training,
                                                     keep_on_device=keep)
        data.set_task(data.num_tasks - 1)  # cumulative: a union of every task
        return data

    on_host, on_gpu = datamodule(False), datamodule(True)
    on_gpu._move_tasks(CUDA)  # what setup does under a GPU Trainer
    for host_loader, gpu_loader in [(on_host.train_dataloader(), on_gpu.train_dataloader()),
                                    *zip(on_host.test_dataloader(), on_gpu.test_dataloader())]:
        expected = list(host_loader)
        served: list = []
        copies = host_to_device_copies(lambda: served.extend(gpu_loader))
        assert copies == 1  # the epoch's order, once: no copy per batch
        assert all(item.is_cuda for batch in served for item in batch)
        assert_same_batches(batches_on_cpu(served), expected)
        batches = iter(gpu_loader)
        next(batches)  # the order is drawn and copied with the first batch
        with no_synchronization():
            rest = list(batches)
        assert len(rest) == len(expected) - 1


def sequence(keep_on_device: bool, directory: Path, training: str = "sequential", ckpt_path=None) -> tuple[list, Any, int]:
    """Five split-digits tasks with EWC on the GPU: the final weights, the data module, the steps."""
    torch.manual_seed(0)
    benchmark = split_benchmark("digits", num_tasks=5, scenario="class")
    model = lit_classifier(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, benchmark.num_classes)), lr=0.05)
    checkpoints = [] if ckpt_path else [ModelCheckpoint(dirpath=directory, filename="{step}", every_n_train_steps=7, save_top_k=-1)]
    trainer = quiet_trainer(accelerator="gpu", devices=1, deterministic=False, enable_checkpointing=not ckpt_path,
                            callbacks=[EWC(model.net, importance=10.0, fisher_sample_size=32, seed=1), *checkpoints])
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=64, seed=2, training=training,
                                                       keep_on_device=keep_on_device)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=ckpt_path)
    return [p.detach().cpu().clone() for p in model.parameters()], datamodule, trainer.global_step


@pytest.mark.parametrize("training", ["sequential", "cumulative"])
def test_a_sequence_with_data_on_the_gpu_trains_as_with_a_cpu_loader_and_copies_no_batch(tmp_path, training):
    on_host: list = []
    copies_host = host_to_device_copies(lambda: on_host.append(sequence(False, tmp_path / "host", training)))
    on_gpu: list = []
    copies_gpu = host_to_device_copies(lambda: on_gpu.append(sequence(True, tmp_path / "gpu", training)))
    (weights, datamodule, steps), (expected, _, host_steps) = on_gpu[0], on_host[0]
    assert steps == host_steps > 0
    assert datamodule._tasks_device == CUDA and all(task.inputs.is_cuda for task in datamodule.train_tasks)
    for a, b in zip(weights, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the same batches; cuBLAS may sum otherwise
    # The CPU loader's batches are copied at every step (inputs and targets); on the device none is:
    # what copies are left (the data, once; each epoch's order) do not grow with the steps.
    assert copies_host - copies_gpu >= steps, (copies_host, copies_gpu, steps)


def test_a_checkpoint_holds_no_gpu_tensor_of_the_data_and_resumes_exactly_on_the_gpu(tmp_path):
    uninterrupted, _, _ = sequence(True, tmp_path)
    checkpoint = torch.load(tmp_path / "step=14.ckpt", weights_only=True)  # no map_location: tensors where saved
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["batches"] > 0 and loader["sampler"]["generator"].device.type == "cpu"
    assert checkpoint["TaskSequenceDataModule"]["shuffle_generator"].device.type == "cpu"
    resumed, _, _ = sequence(True, tmp_path, ckpt_path=str(tmp_path / "step=14.ckpt"))
    for a, b in zip(resumed, uninterrupted):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
