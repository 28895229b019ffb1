"""Task data on the training device: ``TaskDataset.to``, ``TaskSequence.to``,
``TensorBatchSampler(device=...)``, a union's batch built without host reads, and
``TaskSequenceDataModule(keep_on_device=True)``.

No GPU here: on the CPU "the device" is the CPU, so these tests check by value (the batches and
the trained weights equal ``keep_on_device=False``'s, bit for bit), count host reads with
``tests/host_reads.py`` (on a GPU each would be a synchronization) and count the copies of the
epoch's order to the device. Moves that change a tensor's device are checked on PyTorch's
``meta`` device. The CUDA checks are tests/gpu/test_device_data.py.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, TensorDataset

import neurenix.data.tasks as tasks_module
from neurenix.continual import EWC, ExperienceReplay
from neurenix.data.benchmarks import permuted_benchmark, split_benchmark
from neurenix.data.datamodule import TaskSequenceDataModule
from neurenix.data.sequence import fit_sequence
from neurenix.data.tasks import (
    Compose,
    ConcatTaskDataset,
    Flatten,
    PermutePixels,
    TaskDataLoader,
    TaskDataset,
    TensorBatchSampler,
    ToFloat,
    collate_batch,
)
from tests.data.test_datamodule_resume import assert_equal, run
from tests.data.test_tasks_concat import per_sample_reference, three_tasks
from tests.helpers import lit_classifier, quiet_trainer
from tests.host_reads import host_reads

META = torch.device("meta")


@contextlib.contextmanager
def as_on_an_accelerator() -> Iterator[None]:
    """Unions build their batches on the CPU as they do on an accelerator: without host reads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks_module, "_reads_are_free", lambda device: False)
        yield


class DeviceCopies(TorchFunctionMode):
    """Counts ``Tensor.to`` calls that name a device (copies to a device, or no-ops where it is there)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and (
            "device" in kwargs or any(isinstance(arg, (str, torch.device)) for arg in args[1:])
        ):
            self.count += 1
        return func(*args, **kwargs)


def equal_batches(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


# ---------------------------------------------------------------------------- moving tasks
def permuted(task_id: int, seed: int) -> TaskDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (10, 3, 3), dtype=torch.uint8, generator=generator)
    transform = Compose(PermutePixels(torch.randperm(9, generator=generator)), ToFloat(), Flatten())
    return TaskDataset(images, torch.arange(10), task_id, transform=transform, with_task_ids=True)


def test_to_moves_the_tensors_and_the_transform_state_and_leaves_the_task_as_it_was():
    task = permuted(2, 0)
    moved = task.to(META)
    assert moved is not task and type(moved) is TaskDataset
    assert moved.device == META and moved.inputs.device == moved.targets.device == META
    assert moved.transform.transforms[0].permutation.device == META  # no copy of it per batch
    assert task.device == torch.device("cpu") and task.transform.transforms[0].permutation.device.type == "cpu"
    assert (moved.task_id, moved.with_task_ids, len(moved)) == (2, True, 10)
    x, y, ids = moved[torch.tensor([3, 1], device=META)]  # built where the data is
    assert x.device == y.device == ids.device == META and x.shape == (2, 9) and x.dtype == torch.float32
    same = task.to("cpu")  # already there: the tensors are shared, the batches the same
    assert same.inputs is task.inputs and equal_batches(same[[4, 0, 9]], task[[4, 0, 9]])


def test_a_module_transform_is_copied_then_moved_and_a_function_kept():
    scale = nn.Linear(9, 9)
    task = TaskDataset(torch.randn(4, 9), torch.arange(4), transform=scale)
    moved = task.to(META)
    assert moved.transform is not scale and moved.transform.weight.device == META
    assert scale.weight.device.type == "cpu"  # nn.Module.to would have moved the original in place

    def double(x):
        return 2 * x

    assert TaskDataset(torch.randn(4, 9), torch.arange(4), transform=double).to(META).transform is double


def test_a_sequence_moves_every_task_and_tasks_sharing_a_transform_still_share_it():
    split = split_benchmark("digits", num_tasks=5)
    moved = split.to(META)
    assert all(task.device == META for task in moved.train + moved.test)
    assert len({id(task.transform) for task in moved.train + moved.test}) == 1  # still one transform: one batch
    assert all(task.device.type == "cpu" for task in split.train)
    permuted_tasks = permuted_benchmark("digits", num_tasks=3).to(META)
    assert all(p.device == META for p in permuted_tasks.permutations)
    assert all(task.transform.transforms[0].permutation.device == META for task in permuted_tasks.train)
    union = ConcatTaskDataset(three_tasks()).to(META)
    assert union.device == META and all(task.device == META for task in union.tasks)


@pytest.mark.parametrize(
    ("device", "error", "says"),
    [
        ("gpu0", ValueError, "device must name a device such as 'cpu' or 'cuda:0', got 'gpu0'"),
        (1.5, TypeError, "device must be a torch.device, a device string such as 'cuda:0', or an index, got float: 1.5"),
        (True, TypeError, "device must be a torch.device, a device string such as 'cuda:0', or an index, got bool: True"),
    ],
)
def test_a_bad_device_is_refused_naming_it(device, error, says):
    task = permuted(0, 0)
    for call in (task.to, ConcatTaskDataset([task]).to, split_benchmark("digits", num_tasks=2).to, PermutePixels(torch.arange(3)).to):
        with pytest.raises(error, match=re.escape(says)):
            call(device)
    with pytest.raises(error, match=re.escape(says)):
        TensorBatchSampler(RandomSampler(task), 4, False, device=device)


def test_members_of_a_union_on_two_devices_are_refused():
    with pytest.raises(ValueError, match=r"tasks\[1\] \(task_id=1\) holds tensors on meta and meta, but tasks\[0\] "
                                         r"\(task_id=0\) on cpu: the tasks of one batch must be on one device"):
        ConcatTaskDataset([permuted(0, 0), permuted(1, 1).to(META)])


# ---------------------------------------------------------------------------- a union's batch without reads
class DoubledTask(TaskDataset):
    """A TaskDataset of its own batching (a union must ask it for its own batch)."""

    def _batch(self, index):
        x, *rest = super()._batch(index)
        return (2 * x, *rest)


def mixed_tasks() -> list[TaskDataset]:
    """Members of three kinds: two sharing a transform (not next to each other), one with a
    permutation of its own, a float one without a transform, one of its own batching."""
    generator = torch.Generator().manual_seed(7)
    shared = Compose(ToFloat(), Flatten())

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 3), dtype=torch.uint8, generator=generator)

    return [
        TaskDataset(images(4), torch.arange(4), 5, transform=shared, with_task_ids=True),
        permuted(3, 1),
        TaskDataset(images(6), torch.arange(6) + 10, 0, transform=shared, with_task_ids=True),
        TaskDataset(torch.rand(3, 9), torch.arange(3) + 20, 8, with_task_ids=True),
        DoubledTask(torch.rand(5, 9), torch.arange(5) + 30, 4, with_task_ids=True),
    ]


@pytest.mark.parametrize("members", [mixed_tasks, three_tasks], ids=["mixed", "permuted"])
def test_a_union_builds_a_batch_without_reading_the_indices_and_equals_the_per_sample_items(members):
    tasks = members()
    union = ConcatTaskDataset(tasks)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(-len(union), len(union), (n,), generator=generator) for n in (1, 7, 16, 16, 40)]
    batches += [torch.arange(len(union)), torch.tensor([], dtype=torch.long)]
    for index in batches:
        expected = union[index]  # on the CPU: the counts per member read on the host
        with as_on_an_accelerator(), host_reads() as reads:
            got = union.__getitems__(index).tensors
        assert not reads, str(reads)
        assert equal_batches(got, expected)
        wrapped = (index % len(union)).tolist()
        if wrapped:
            assert equal_batches(got, per_sample_reference(tasks, wrapped))


def test_an_index_out_of_range_is_named_or_fails_as_tensor_indexing_does_without_reads():
    union = ConcatTaskDataset(three_tasks())
    for bad in (15, -16, 100, -100):
        with pytest.raises(IndexError, match=re.escape(f"index {bad} is out of range for a ConcatTaskDataset of 15 samples")):
            union.__getitems__(torch.tensor([0, bad]))  # on the CPU the check costs nothing
        with as_on_an_accelerator(), pytest.raises(IndexError, match="out of bounds"):
            union.__getitems__(torch.tensor([0, bad]))  # no read to check it: never a wrong sample
    with as_on_an_accelerator():
        with pytest.raises(IndexError, match=re.escape("index 15 is out of range for a ConcatTaskDataset of 15 samples")):
            union[[0, 15]]  # dataset[...] checks, and names the index


# ---------------------------------------------------------------------------- the sampler
def test_the_order_on_a_device_is_the_cpu_order_copied_once_per_epoch():
    task = permuted(0, 0)
    plain = TensorBatchSampler(RandomSampler(task, generator=torch.Generator().manual_seed(3)), 3, False)
    on_device = TensorBatchSampler(RandomSampler(task, generator=torch.Generator().manual_seed(3)), 3, False, device="cpu")
    for _ in range(2):
        with DeviceCopies() as copies:
            ours = list(on_device)
        assert copies.count == 1 and len(ours) == 4  # one copy of the epoch's order, not one per batch
        assert [b.tolist() for b in ours] == [b.tolist() for b in plain]
    distributed = DistributedSampler(range(23), num_replicas=2, rank=1, shuffle=True, seed=4)
    batches = list(TensorBatchSampler(distributed, 4, False, device="cpu"))
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert [b.tolist() for b in batches] == list(BatchSampler(distributed, 4, False))


def test_lightning_keeps_the_device_when_it_injects_its_distributed_sampler():
    from lightning.fabric.utilities.data import _replace_dunder_methods

    task = permuted(0, 0)
    with _replace_dunder_methods(BatchSampler):  # as Lightning calls a datamodule's *_dataloader hooks
        sampler = TensorBatchSampler(RandomSampler(task), 4, False, device="cpu")
    loader = TaskDataLoader(task, batch_sampler=sampler, collate_fn=collate_batch)
    replaced = _update_dataloader(loader, DistributedSampler(task, num_replicas=2, rank=0, shuffle=True, seed=0))
    assert isinstance(replaced.batch_sampler, TensorBatchSampler) and replaced.batch_sampler.device == torch.device("cpu")
    assert isinstance(replaced.batch_sampler.sampler, DistributedSampler)


# ---------------------------------------------------------------------------- the data module
SIZES = (9, 7, 11)


def numbered(offset: int) -> list[TaskDataset]:
    """Three tasks of one shared transform, and a permuted variant: samples numbered across them."""
    out, start = [], offset
    shared = Compose(ToFloat(), Flatten())
    for task, size in enumerate(SIZES):
        numbers = torch.arange(start, start + size)
        images = (numbers.view(-1, 1, 1) + torch.arange(4).view(1, 2, 2)).to(torch.uint8)
        out.append(TaskDataset(images, numbers, task, transform=shared, with_task_ids=True))
        start += size
    return out


def epochs(datamodule: TaskSequenceDataModule, count: int = 2) -> list:
    """Every loader's batches, task by task: ``count`` training epochs, validation and test."""
    served = []
    for task in range(datamodule.current_task, datamodule.num_tasks):
        datamodule.set_task(task)
        for _ in range(count):
            served.append(list(datamodule.train_dataloader()))
        served.append(list(datamodule.val_dataloader()))
        served.append([batch for loader in datamodule.test_dataloader() for batch in loader])
    return served


@pytest.mark.parametrize("training", ["sequential", "cumulative", "joint"])
def test_the_data_module_serves_the_same_batches_on_the_device_without_host_reads(training):
    def datamodule(keep: bool) -> TaskSequenceDataModule:
        return TaskSequenceDataModule(numbered(0), numbered(100), numbered(200), batch_size=4, eval_batch_size=5, seed=3,
                                      training=training, keep_on_device=keep)

    expected = epochs(datamodule(False))
    on_device = datamodule(True)
    on_device._move_tasks(torch.device("cpu"))  # what setup does under a Trainer
    with as_on_an_accelerator(), host_reads() as reads, DeviceCopies() as copies:
        got = epochs(on_device)
    assert len(got) == len(expected) and all(
        len(a) == len(b) and all(equal_batches(u, v) for u, v in zip(a, b)) for a, b in zip(got, expected)
    )
    assert not reads, str(reads)
    # one copy of the order per loader epoch: 2 training epochs, 1 validation, 1 per test task
    per_task = 2 + 1 + len(SIZES)
    assert copies.count == per_task * (1 if training == "joint" else len(SIZES))


def test_under_a_trainer_setup_moves_every_task_to_the_root_device():
    datamodule = TaskSequenceDataModule(numbered(0), numbered(100), numbered(200), batch_size=4, keep_on_device=True)
    originals = list(datamodule.train_tasks)
    model = lit_classifier(nn.Linear(4, 40))
    fit_sequence(quiet_trainer(), model, datamodule, epochs_per_task=1)
    assert datamodule._tasks_device == torch.device("cpu")
    assert all(moved is not original for moved, original in zip(datamodule.train_tasks, originals))
    assert all(isinstance(loader.batch_sampler, TensorBatchSampler) and loader.batch_sampler.device == torch.device("cpu")
               for loader in [datamodule.train_dataloader(), datamodule.val_dataloader(), *datamodule.test_dataloader()])
    # Tasks sharing a transform with state share its moved copy: a union of them stays one transform a batch.
    shared = Compose(PermutePixels(torch.randperm(4)), ToFloat())
    datamodule = TaskSequenceDataModule(numbered(0), numbered(100), keep_on_device=True)
    for task in datamodule.train_tasks:
        task.transform = shared
    datamodule._move_tasks(META)
    moved = {id(task.transform) for task in datamodule.train_tasks}
    assert len(moved) == 1 and datamodule.train_tasks[0].transform.transforms[0].permutation.device == META
    assert all(task.device == META for task in datamodule.train_tasks + datamodule.test_tasks)


def sequence(training: str, keep_on_device: bool, method: str) -> list[torch.Tensor]:
    """Three tasks with EWC or replay under fit_sequence; the final weights."""
    torch.manual_seed(0)
    model = lit_classifier(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 40)))
    methods = {
        "ewc": lambda: EWC(model.net, importance=10.0, fisher_sample_size=8, seed=1),
        "replay": lambda: ExperienceReplay(model.net, memory_size=6, seed=1),
    }
    datamodule = TaskSequenceDataModule(numbered(0), numbered(100), batch_size=4, seed=2, training=training,
                                        keep_on_device=keep_on_device)
    fit_sequence(quiet_trainer(callbacks=[methods[method]()]), model, datamodule, epochs_per_task=2)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("training", "method"), [("sequential", "ewc"), ("cumulative", "replay"), ("joint", "ewc")])
def test_a_sequence_trained_on_the_device_ends_with_the_weights_of_one_on_the_host(training, method):
    expected = sequence(training, False, method)
    with as_on_an_accelerator():
        got = sequence(training, True, method)
    assert_equal(got, expected)


@pytest.mark.parametrize("training", ["sequential", "cumulative"])
def test_a_checkpoint_written_inside_an_epoch_resumes_exactly_on_the_device(tmp_path, training):
    """The loader's state holds the CPU generator and a batch count, no device tensor: the resumed
    run (from a checkpoint inside task 1's second epoch), with the data on the device or on the
    host, equals the uninterrupted one and the uninterrupted run on the host, bit for bit."""
    on_host = run(tmp_path / "host", training=training)
    with as_on_an_accelerator():
        uninterrupted = run(tmp_path, training=training, keep_on_device=True)
        checkpoint = torch.load(tmp_path / "step=10.ckpt", weights_only=True)
        resumed = run(tmp_path, ckpt_path=str(tmp_path / "step=10.ckpt"), training=training, keep_on_device=True)
    resumed_on_host = run(tmp_path, ckpt_path=str(tmp_path / "step=10.ckpt"), training=training)  # the option is not state
    assert_equal(uninterrupted, on_host)
    assert_equal(resumed, uninterrupted)
    assert_equal(resumed_on_host, uninterrupted)
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["batches"] == 2 and loader["sampler"]["generator"].device.type == "cpu"


# ---------------------------------------------------------------------------- bad input
def test_what_keep_on_device_cannot_work_with_is_refused_naming_it():
    tasks = numbered(0)
    with pytest.raises(TypeError, match=re.escape("keep_on_device must be a bool, got str: 'yes'")):
        TaskSequenceDataModule(tasks, tasks, keep_on_device="yes")
    with pytest.raises(ValueError, match=re.escape("keep_on_device=True builds every batch on the device, in this process, "
                                                   "but num_workers=2 would build them in worker processes")):
        TaskSequenceDataModule(tasks, tasks, num_workers=2, keep_on_device=True)
    with pytest.raises(ValueError, match=re.escape("but pin_memory=True pins batches in host memory for a copy to the "
                                                   "device: use pin_memory=False with keep_on_device=True")):
        TaskSequenceDataModule(tasks, tasks, pin_memory=True, keep_on_device=True)
    per_sample = TensorDataset(torch.randn(4, 4), torch.arange(4))
    for where, arguments in (("train_tasks[1]", ([tasks[0], per_sample], tasks[:2])),
                             ("test_tasks[0]", (tasks[:2], [per_sample, tasks[1]])),
                             ("val_tasks[1]", (tasks[:2], tasks[:2], [tasks[0], per_sample]))):
        with pytest.raises(TypeError, match=re.escape(f"keep_on_device=True needs every task to be a TaskDataset (or "
                                                      f"ConcatTaskDataset), tensors it can move to the device, got "
                                                      f"{where}: TensorDataset; build it as TaskDataset(")):
            TaskSequenceDataModule(*arguments, keep_on_device=True)
    TaskSequenceDataModule([tasks[0], per_sample], tasks[:2], num_workers=2, pin_memory=True)  # all fine without it
