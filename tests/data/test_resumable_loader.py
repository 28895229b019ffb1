"""TaskDataLoader resumes an epoch where its state_dict says: same order, the batches not yet served.

Each case iterates two epochs uninterrupted, then stops an equal loader after ``k`` batches, moves
its ``state_dict`` into a loader built anew (its generator seeded otherwise, as in a new process)
and checks that the new loader serves the rest of that epoch and then the next epoch exactly.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler, TensorDataset

from neurenix.data.tasks import TaskDataLoader, TaskDataset, TensorBatchSampler, collate_batch

SAMPLES, BATCH = 23, 4  # six batches, the last one short


class CountingTask(TaskDataset):
    """A TaskDataset that counts the samples it builds (skipped batches must build none)."""

    built = 0

    def __getitems__(self, indices):
        type(self).built += len(indices)
        return super().__getitems__(indices)


def task() -> CountingTask:
    return CountingTask(torch.arange(SAMPLES, dtype=torch.float32).unsqueeze(1), torch.arange(SAMPLES), 0)


def tensor_batches(seed: int) -> TaskDataLoader:
    sampler = RandomSampler(task(), generator=torch.Generator().manual_seed(seed))
    return TaskDataLoader(task(), batch_sampler=TensorBatchSampler(sampler, BATCH, False), collate_fn=collate_batch)


def worker_batches(seed: int) -> TaskDataLoader:
    sampler = RandomSampler(task(), generator=torch.Generator().manual_seed(seed))
    return TaskDataLoader(task(), batch_sampler=BatchSampler(sampler, BATCH, False), collate_fn=collate_batch, num_workers=2)


def unshuffled(seed: int) -> TaskDataLoader:
    return TaskDataLoader(task(), batch_sampler=TensorBatchSampler(SequentialSampler(task()), BATCH, False), collate_fn=collate_batch)


def per_sample(seed: int) -> TaskDataLoader:
    """PyTorch's own batching of a per-sample dataset (the loader's generator shuffles)."""
    dataset = TensorDataset(torch.arange(SAMPLES))
    return TaskDataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))


def pinned(seed: int) -> TaskDataLoader:
    sampler = RandomSampler(task(), generator=torch.Generator().manual_seed(seed))
    return TaskDataLoader(task(), batch_sampler=TensorBatchSampler(sampler, BATCH, False), collate_fn=collate_batch, pin_memory=True)


LOADERS = {"tensor_batches": tensor_batches, "workers": worker_batches, "unshuffled": unshuffled, "per_sample": per_sample}


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
    dataset = task()

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
    dataset = task()
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
