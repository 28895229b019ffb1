"""ConcatTaskDataset: the union of tasks, each sample under its own task's id and transform."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torch.utils.data import DataLoader

from neurenix.data.tasks import (
    Compose,
    ConcatTaskDataset,
    Flatten,
    PermutePixels,
    TaskDataset,
    ToFloat,
    collate_batch,
)


def permuted_task(task_id: int, samples: int, seed: int, *, with_task_ids: bool = True) -> TaskDataset:
    """A task of 3x3 uint8 images under its own pixel permutation (as permuted MNIST's tasks)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (samples, 3, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (samples,), generator=generator) + 4 * task_id
    permutation = torch.randperm(9, generator=generator)
    return TaskDataset(images, labels, task_id, transform=Compose(PermutePixels(permutation), ToFloat(), Flatten()), with_task_ids=with_task_ids)


def three_tasks(with_task_ids: bool = True) -> list[TaskDataset]:
    # Task ids that are not positions, and a member without a permutation: every sample must be
    # built by its own member.
    tasks = [permuted_task(3, 4, 0, with_task_ids=with_task_ids), permuted_task(1, 6, 1, with_task_ids=with_task_ids)]
    images, labels = torch.randint(0, 256, (5, 3, 3), dtype=torch.uint8), torch.arange(5)
    tasks.append(TaskDataset(images, labels, 7, transform=Compose(ToFloat(), Flatten()), with_task_ids=with_task_ids))
    return tasks


def per_sample_reference(tasks: list[TaskDataset], indices: list[int]) -> tuple[torch.Tensor, ...]:
    """Each index's item from its own task (found by hand), stacked."""
    items = []
    for index in indices:
        for task in tasks:
            if index < len(task):
                items.append(task[index])
                break
            index -= len(task)
    return tuple(torch.stack(column) for column in zip(*items))


@pytest.mark.parametrize("with_task_ids", [True, False])
def test_a_batch_equals_each_member_s_items_stacked_in_the_order_asked(with_task_ids):
    tasks = three_tasks(with_task_ids)
    union = ConcatTaskDataset(tasks)
    assert len(union) == 15
    indices = [14, 0, 9, 4, 3, 10, 5, 1, 12, 9]  # every member, interleaved, one index twice
    expected = per_sample_reference(tasks, indices)
    for got in (union[indices], union[torch.tensor(indices)], union.__getitems__(indices).tensors):
        assert len(got) == (3 if with_task_ids else 2)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if with_task_ids:
        assert union[indices][2].tolist() == [7, 3, 1, 1, 3, 7, 1, 3, 7, 1]


class CountingTransform:
    """``ToFloat`` and ``Flatten``, counting the batches it transforms."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x.float().flatten(1) / 255


def test_members_sharing_a_transform_are_transformed_as_one_batch():
    """A split benchmark's tasks share one transform: a batch over them is one transform call,
    whatever the mix, and members with other transforms between them do not split the group."""
    shared = CountingTransform()
    generator = torch.Generator().manual_seed(3)
    tasks = [
        TaskDataset(torch.randint(0, 256, (n, 3, 3), dtype=torch.uint8, generator=generator), torch.arange(n) + 10 * k, k, transform=shared, with_task_ids=True)
        for k, n in enumerate((4, 5, 3))
    ]
    union = ConcatTaskDataset(tasks)
    indices = [11, 0, 6, 3, 9, 4, 10, 1]
    expected = per_sample_reference(tasks, indices)
    shared.calls = 0
    got = union[indices]
    assert shared.calls == 1
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert got[2].tolist() == [2, 0, 1, 0, 2, 1, 2, 0]
    # another transform in the middle: groups [0, 2], [1'] (members sharing one need not be
    # consecutive); then sharing members before one of its own: groups [0, 1], [2']
    for members, calls in (([tasks[0], permuted_task(5, 5, 4), tasks[2]], 1), ([tasks[0], tasks[1], permuted_task(5, 3, 4)], 1)):
        union, expected = ConcatTaskDataset(members), per_sample_reference(members, indices)
        shared.calls = 0
        assert all(torch.equal(a, b) for a, b in zip(union[indices], expected))
        assert shared.calls == calls


def test_one_sample_slices_and_negative_indices():
    tasks = three_tasks()
    union = ConcatTaskDataset(tasks)
    x, y, t = union[6]
    assert torch.equal(x, tasks[1][2][0]) and int(y) == int(tasks[1].targets[2]) and int(t) == 1
    for got, expected in zip(union[2:12:3], per_sample_reference(tasks, [2, 5, 8, 11])):
        assert torch.equal(got, expected)
    for got, expected in zip(union[[-1, -15]], per_sample_reference(tasks, [14, 0])):
        assert torch.equal(got, expected)
    empty = union[[]]
    assert empty[0].shape == (0, 9) and empty[0].dtype == torch.float32 and empty[1].shape == (0,)
    with pytest.raises(IndexError, match=re.escape("index 15 is out of range for a ConcatTaskDataset of 15 samples")):
        union[[0, 15]]
    with pytest.raises(IndexError, match=re.escape("index -16 is out of range")):
        union[-16]


def test_a_loader_serves_every_sample_once_with_its_own_task_id():
    tasks = three_tasks()
    union = ConcatTaskDataset(tasks)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(0)).tolist()  # a shuffled epoch
    batches = list(DataLoader(union, batch_size=4, sampler=order, collate_fn=collate_batch))
    expected = per_sample_reference(tasks, order)
    for got, want in zip([torch.cat(column) for column in zip(*batches)], expected):
        assert torch.equal(got, want)


def test_classes_task_ids_targets_and_repr():
    tasks = three_tasks()
    union = ConcatTaskDataset(tasks)
    assert union.task_ids == [3, 1, 7]
    assert torch.equal(union.targets, torch.cat([task.targets for task in tasks]))
    assert union.classes == sorted(set(union.targets.tolist()))
    assert union.with_task_ids is True
    assert repr(union) == "ConcatTaskDataset(task_ids=[3, 1, 7], samples=15, with_task_ids=True)"


def test_it_pickles_for_worker_processes():
    union = ConcatTaskDataset(three_tasks())
    copy = pickle.loads(pickle.dumps(union))
    assert all(torch.equal(a, b) for a, b in zip(copy[[13, 2, 7]], union[[13, 2, 7]]))
    in_process = list(DataLoader(union, batch_size=4, collate_fn=collate_batch))
    with_workers = list(DataLoader(union, batch_size=4, collate_fn=collate_batch, num_workers=2))
    assert len(in_process) == len(with_workers) == 4
    for a, b in zip(in_process, with_workers):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_bad_members_are_named():
    tasks = three_tasks()
    with pytest.raises(ValueError, match=re.escape("tasks must hold at least one TaskDataset, got []")):
        ConcatTaskDataset([])
    with pytest.raises(TypeError, match=re.escape("tasks must be a list of TaskDataset, got TaskDataset")):
        ConcatTaskDataset(tasks[0])
    with pytest.raises(TypeError, match=re.escape("tasks[1] must be a TaskDataset, got list")):
        ConcatTaskDataset([tasks[0], [1, 2]])
    mixed = [tasks[0], permuted_task(1, 6, 1, with_task_ids=False)]
    with pytest.raises(ValueError, match=re.escape("tasks must all carry task ids or all not, got with_task_ids=[True, False]")):
        ConcatTaskDataset(mixed)
    unflattened = TaskDataset(torch.zeros(2, 3, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 5, transform=ToFloat(), with_task_ids=True)
    message = (
        "tasks[1] (task_id=5) gives inputs of shape (3, 3) torch.float32 after its transform, but tasks[0] (task_id=3) "
        "gives (9,) torch.float32"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ConcatTaskDataset([tasks[0], unflattened])
    doubles = TaskDataset(torch.zeros(2, 9, dtype=torch.float64), torch.zeros(2, dtype=torch.long), 5, with_task_ids=True)
    with pytest.raises(ValueError, match=re.escape("gives inputs of shape (9,) torch.float64 after its transform")):
        ConcatTaskDataset([tasks[0], doubles])
