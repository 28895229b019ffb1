"""TaskDataset: batches by one tensor index equal the per-sample reference; transforms; samplers;
TaskDataLoader resuming an epoch where its state_dict says."""

from __future__ import annotations

import collections.abc

import itertools
import pickle
import warnings

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler, TensorDataset

from neurenix.data.tasks import (
    AddChannel,
    Compose,
    Flatten,
    PermutePixels,
    TaskDataLoader,
    TaskDataset,
    TensorBatchSampler,
    ToFloat,
    collate_batch,
)


def make_images(samples: int = 23, side: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (samples, side, side), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 4, (samples,), generator=generator)


def make_task(with_task_ids: bool = True, task_id: int = 2) -> TaskDataset:
    images, labels = make_images()
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    transform = Compose(PermutePixels(permutation), ToFloat(), Flatten())
    return TaskDataset(images, labels, task_id, transform=transform, with_task_ids=with_task_ids)


def test_one_sample_is_the_transformed_image():
    images, labels = make_images()
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    x, y, t = make_task()[5]
    assert torch.equal(x, images[5].flatten()[permutation].float() * (1 / 255))
    assert y.item() == labels[5].item() and t.item() == 2
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and t.dtype == torch.int64


def test_stored_inputs_stay_uint8_and_targets_int64():
    task = make_task()
    assert task.inputs.dtype == torch.uint8 and task.targets.dtype == torch.int64


def test_batch_by_indexing_equals_the_per_sample_reference():
    task = make_task()
    # The reference: one __getitem__ per sample, then default_collate. PyTorch's fetcher prefers
    # __getitems__ when a dataset has one, so the reference hides it behind a wrapper.
    per_sample = list(DataLoader(_PerSample(task), batch_size=5))
    ours = list(DataLoader(task, batch_size=5, collate_fn=collate_batch))
    assert len(per_sample) == len(ours) == 5
    for expected, got in zip(per_sample, ours):
        assert len(got) == 3
        for a, b in zip(expected, got):
            assert torch.equal(a, b)


def test_a_plain_dataloader_with_pytorch_s_default_collate_gives_the_same_batches():
    # A new user's DataLoader(task, batch_size=...) without collate_fn: it raised "stack expects each
    # tensor to be equal size" (default_collate stacked the whole batch's tensors together).
    task = make_task()
    ours = list(DataLoader(task, batch_size=5, collate_fn=collate_batch))
    plain = list(DataLoader(task, batch_size=5))
    assert len(plain) == len(ours) == 5
    for expected, got in zip(ours, plain):
        assert isinstance(got, list) and len(got) == 3  # default_collate's own kind of batch
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert isinstance(task.__getitems__([0, 1]), collections.abc.Sequence)
    assert collate_batch(task.__getitems__([3, 1]))[1].tolist() == task.targets[[3, 1]].tolist()


class _PerSample(torch.utils.data.Dataset):
    def __init__(self, task: TaskDataset) -> None:
        self.task = task

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int):
        return self.task[index]


@pytest.mark.parametrize("index", [[4, 0, 9], torch.tensor([4, 0, 9]), (4, 0, 9)])
def test_list_tensor_and_tuple_indices_give_the_same_batch(index):
    task = make_task()
    x, y, t = task[index]
    for row, i in enumerate([4, 0, 9]):
        assert torch.equal(x[row], task[i][0]) and y[row] == task[i][1]
    assert torch.equal(t, torch.full((3,), 2))


def test_slice_and_getitems():
    task = make_task()
    x, y, _ = task[:]
    assert x.shape == (23, 9) and torch.equal(y, task.targets)
    assert all(torch.equal(a, b) for a, b in zip(task.__getitems__([1, 2]).tensors, task[1:3]))


def test_task_ids_only_when_asked():
    assert len(make_task(with_task_ids=False)[[0, 1]]) == 2
    assert len(make_task(with_task_ids=False)[0]) == 2


def test_float_inputs_without_transform_are_returned_as_stored():
    inputs = torch.randn(6, 4, dtype=torch.float64)
    task = TaskDataset(inputs, torch.arange(6), 0)
    assert torch.equal(task[[2, 3]][0], inputs[[2, 3]])


def test_transforms():
    x = torch.arange(8, dtype=torch.uint8).reshape(2, 2, 2)
    assert torch.equal(ToFloat(scale=0.5)(x), x.float() / 2)
    assert torch.equal(Flatten()(x), x.reshape(2, 4))
    assert AddChannel()(x).shape == (2, 1, 2, 2)
    permuted = PermutePixels(torch.tensor([3, 2, 1, 0]))(x)
    assert permuted.shape == x.shape and torch.equal(permuted.reshape(2, 4), x.reshape(2, 4).flip(1))
    floats = torch.ones(2, 3)
    ToFloat(scale=2.0)(floats)
    assert torch.equal(floats, torch.ones(2, 3))  # the stored data is never scaled in place


def test_dataset_pickles_for_worker_processes():
    task = make_task()
    copy = pickle.loads(pickle.dumps(task))
    assert all(torch.equal(a, b) for a, b in zip(copy[[3, 1]], task[[3, 1]]))


def test_loader_with_workers_gives_the_same_batches():
    task = make_task()
    in_process = list(DataLoader(task, batch_size=4, collate_fn=collate_batch))
    with_workers = list(DataLoader(task, batch_size=4, collate_fn=collate_batch, num_workers=2))
    assert len(in_process) == len(with_workers) == 6
    for a, b in zip(in_process, with_workers):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("options", [{}, {"num_workers": 2}, {"pin_memory": True}], ids=["lean", "workers", "pinned"])
def test_task_data_loader_gives_the_batches_of_a_data_loader(options):
    task = make_task()

    def batches(loader_class):
        sampler = TensorBatchSampler(RandomSampler(task, generator=torch.Generator().manual_seed(5)), 4, False)
        loader = loader_class(task, batch_sampler=sampler, collate_fn=collate_batch, **options)
        return [list(loader) for _ in range(2)]  # two epochs: the sampler's generator goes on

    ours, theirs = batches(TaskDataLoader), batches(DataLoader)
    assert [len(epoch) for epoch in ours] == [6, 6] and len(TaskDataLoader(task, batch_size=4)) == 6
    for our_epoch, their_epoch in zip(ours, theirs):
        for a, b in zip(our_epoch, their_epoch):
            assert len(a) == len(b) == 3 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(*ours))  # each epoch reshuffles


# ---------------------------------------------------------------------------- TensorBatchSampler
def test_tensor_batch_sampler_shuffles_every_index_once_per_epoch():
    task = make_task()
    sampler = TensorBatchSampler(RandomSampler(task, generator=torch.Generator().manual_seed(3)), 5, False)
    epoch_1, epoch_2 = list(sampler), list(sampler)
    assert [len(b) for b in epoch_1] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat(epoch_1).sort().values, torch.arange(23))
    assert not torch.equal(torch.cat(epoch_1), torch.cat(epoch_2))
    again = TensorBatchSampler(RandomSampler(task, generator=torch.Generator().manual_seed(3)), 5, False)
    assert torch.equal(torch.cat(list(again)), torch.cat(epoch_1))  # same seed, same order


def test_tensor_batch_sampler_sequential_and_drop_last():
    batches = list(TensorBatchSampler(SequentialSampler(range(23)), 5, drop_last=True))
    assert len(batches) == 4 == len(TensorBatchSampler(SequentialSampler(range(23)), 5, drop_last=True))
    assert torch.equal(torch.cat(batches), torch.arange(20))


def test_tensor_batch_sampler_batches_other_samplers_like_batch_sampler():
    sampler = DistributedSampler(range(23), num_replicas=2, rank=1, shuffle=True, seed=4)
    assert list(TensorBatchSampler(sampler, 4, False)) == list(BatchSampler(sampler, 4, False))


def test_lightning_injects_a_distributed_sampler():
    from lightning.pytorch.utilities.data import _update_dataloader

    images, _ = make_images()
    task = TaskDataset(images, torch.arange(23), 0)  # labels name the samples
    loader = TaskDataLoader(task, batch_sampler=TensorBatchSampler(RandomSampler(task), 4, False), collate_fn=collate_batch)
    seen = []
    for rank in range(2):
        distributed = DistributedSampler(task, num_replicas=2, rank=rank, shuffle=True, seed=0)
        replaced = _update_dataloader(loader, distributed)
        assert type(replaced) is TaskDataLoader
        assert isinstance(replaced.batch_sampler, TensorBatchSampler) and replaced.batch_sampler.sampler is distributed
        seen += [y for _, labels in replaced for y in labels.tolist()]
    assert len(seen) == 24 and set(seen) == set(range(23))  # DistributedSampler pads 23 to 2 x 12


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    images, labels = make_images()
    with pytest.raises(ValueError, match=r"targets must be 1-D.*\(22,\)"):
        TaskDataset(images, labels[:-1])
    with pytest.raises(TypeError, match="targets must hold integer labels, got dtype torch.float32"):
        TaskDataset(images, labels.float())
    with pytest.raises(ValueError, match="task_id must be an int >= 0, got -1"):
        TaskDataset(images, labels, -1)
    with pytest.raises(TypeError, match="transform must be callable or None, got int"):
        TaskDataset(images, labels, transform=3)
    with pytest.raises(ValueError, match="permutation must be a permutation"):
        PermutePixels(torch.tensor([0, 0, 1]))
    with pytest.raises(IndexError, match="1-D sequence of ints"):
        make_task()[torch.tensor([[0, 1]])]


# ---------------------------------------------------------------------------- resuming an epoch
# Each case iterates two epochs uninterrupted, then stops an equal loader after ``k`` batches,
# moves its ``state_dict`` into a loader built anew (its generator seeded otherwise, as in a new
# process) and checks that the new loader serves the rest of that epoch and then the next epoch.
SAMPLES, BATCH = 23, 4  # six batches, the last one short


class CountingTask(TaskDataset):
    """A TaskDataset that counts the samples it builds (skipped batches must build none)."""

    built = 0

    def __getitems__(self, indices):
        type(self).built += len(indices)
        return super().__getitems__(indices)


def counting_task() -> CountingTask:
    return CountingTask(torch.arange(SAMPLES, dtype=torch.float32).unsqueeze(1), torch.arange(SAMPLES), 0)


def tensor_batches(seed: int) -> TaskDataLoader:
    sampler = RandomSampler(counting_task(), generator=torch.Generator().manual_seed(seed))
    return TaskDataLoader(counting_task(), batch_sampler=TensorBatchSampler(sampler, BATCH, False), collate_fn=collate_batch)


def worker_batches(seed: int) -> TaskDataLoader:
    sampler = RandomSampler(counting_task(), generator=torch.Generator().manual_seed(seed))
    return TaskDataLoader(counting_task(), batch_sampler=BatchSampler(sampler, BATCH, False), collate_fn=collate_batch, num_workers=2)


def persistent_workers(seed: int) -> TaskDataLoader:
    loader = worker_batches(seed)
    return TaskDataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=collate_batch, num_workers=2, persistent_workers=True)


def unshuffled(seed: int) -> TaskDataLoader:
    return TaskDataLoader(counting_task(), batch_sampler=TensorBatchSampler(SequentialSampler(counting_task()), BATCH, False), collate_fn=collate_batch)


def per_sample(seed: int) -> TaskDataLoader:
    """PyTorch's own batching of a per-sample dataset (the loader's generator shuffles)."""
    dataset = TensorDataset(torch.arange(SAMPLES))
    return TaskDataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))


def pinned(seed: int) -> TaskDataLoader:
    sampler = RandomSampler(counting_task(), generator=torch.Generator().manual_seed(seed))
    return TaskDataLoader(counting_task(), batch_sampler=TensorBatchSampler(sampler, BATCH, False), collate_fn=collate_batch, pin_memory=True)


LOADERS = {
    "tensor_batches": tensor_batches,
    "workers": worker_batches,
    "persistent_workers": persistent_workers,
    "unshuffled": unshuffled,
    "per_sample": per_sample,
}


def labels(batches) -> list[list[int]]:
    return [batch[-1].tolist() for batch in batches]


@pytest.mark.parametrize("make", LOADERS.values(), ids=LOADERS.keys())
@pytest.mark.parametrize("served", [1, 3, 5])
def test_a_loader_resumes_its_epoch_from_its_state(make, served):
    reference = make(seed=3)
    first, second = labels(reference), labels(reference)
    interrupted = make(seed=3)
    assert labels(itertools.islice(iter(interrupted), served)) == first[:served]
    state = interrupted.state_dict()
    assert state["batches"] == served

    resumed = make(seed=99)  # another seed: the state must decide the order
    resumed.load_state_dict(state)
    assert resumed.state_dict()["batches"] == served  # loaded, not started: still there
    assert labels(resumed) == first[served:]
    assert labels(resumed) == second  # the next epoch draws what the uninterrupted one drew


@pytest.mark.parametrize("make", [tensor_batches, worker_batches], ids=["tensor_batches", "workers"])
def test_between_epochs_the_state_holds_the_generator_as_it_stands(make):
    reference = make(seed=3)
    labels(reference)
    second = labels(reference)
    done = make(seed=3)
    labels(done)
    state = done.state_dict()
    assert state["batches"] == 0 and set(state["sampler"]) == {"generator"}
    resumed = make(seed=99)
    resumed.load_state_dict(state)
    assert labels(resumed) == second


def test_skipped_batches_build_no_samples():
    interrupted = tensor_batches(seed=3)
    list(itertools.islice(iter(interrupted), 4))
    resumed = tensor_batches(seed=3)
    resumed.load_state_dict(interrupted.state_dict())
    CountingTask.built = 0
    rest = labels(resumed)
    assert [len(batch) for batch in rest] == [4, 3] and CountingTask.built == 7


@pytest.mark.filterwarnings("ignore:.*pin_memory.*no accelerator is found")
def test_pinned_memory_resumes_too():
    reference, interrupted = pinned(seed=3), pinned(seed=3)
    first = labels(reference)
    list(itertools.islice(iter(interrupted), 2))
    resumed = pinned(seed=99)
    resumed.load_state_dict(interrupted.state_dict())
    assert labels(resumed) == first[2:]


def test_the_order_is_drawn_at_the_first_batch_after_set_epoch():
    """Lightning calls iter() before it sets the DistributedSampler's epoch: the order must be the
    epoch's, and a resumed loader restores the epoch it was in."""
    dataset = counting_task()

    def loader(epoch_at_construction: int = 0) -> TaskDataLoader:
        sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5)
        sampler.set_epoch(epoch_at_construction)
        return TaskDataLoader(dataset, batch_sampler=BatchSampler(sampler, BATCH, False), collate_fn=collate_batch)

    expected = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5)
    expected.set_epoch(4)
    order = list(expected)

    early = loader()
    iterator = iter(early)
    early.batch_sampler.sampler.set_epoch(4)
    assert next(iterator)[-1].tolist() == order[:BATCH]
    assert early.state_dict() == {"batches": 1, "sampler": {"epoch": 4}}

    resumed = loader(epoch_at_construction=0)
    resumed.load_state_dict(early.state_dict())
    assert sum(labels(resumed), []) == order[BATCH:]


def test_a_sampler_without_generator_warns_that_the_order_is_new():
    dataset = counting_task()
    loader = TaskDataLoader(dataset, batch_sampler=TensorBatchSampler(RandomSampler(dataset), BATCH, False), collate_fn=collate_batch)
    with pytest.warns(UserWarning, match="RandomSampler has no generator .* the rest of the epoch is a new order"):
        loader.load_state_dict({"batches": 2, "sampler": {}})
    assert len(labels(loader)) == 4  # the right count of batches still
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.load_state_dict({"batches": 0, "sampler": {}})  # nothing to resume: no warning


@pytest.mark.parametrize("state", [{}, {"batches": -1}, {"batches": 1.5}, {"batches": True}, [3]])
def test_a_state_that_is_not_a_loader_state_is_refused(state):
    loader = tensor_batches(seed=0)
    with pytest.raises(ValueError, match=r"state_dict must be a TaskDataLoader.state_dict\(\) with a batch count >= 0"):
        loader.load_state_dict(state)
    assert loader.state_dict()["batches"] == 0  # unchanged
