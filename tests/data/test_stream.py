"""The task-free stream: tasks concatenated in order, shuffled within each task, whole batches per
task, no task ids in the batches, boundaries known to the stream only."""

from __future__ import annotations

import pytest
import torch

from neurenix.data import permuted_benchmark, split_benchmark
from neurenix.data.stream import StreamDataset, TaskStream, task_free_stream


@pytest.fixture(scope="module")
def split_domain():
    return split_benchmark("digits", 5, scenario="domain", seed=0)


def sample_keys(inputs: torch.Tensor) -> list[bytes]:
    """One hashable key per sample (its pixels), to recognise samples wherever they appear."""
    return [row.numpy().tobytes() for row in inputs]


def test_boundaries_and_task_lengths_in_whole_batches(split_domain):
    stream = task_free_stream(split_domain, batch_size=32, passes=4)
    sizes = [len(task) for task in split_domain.train]  # [291, 289, 290, 281, 287]
    assert stream.task_steps == [size * 4 // 32 for size in sizes] == [36, 36, 36, 35, 35]
    assert stream.boundaries == [36, 72, 108, 143]
    assert stream.num_steps == 178 == len(stream.train) // 32
    assert (stream.num_tasks, stream.num_classes, stream.batch_size) == (5, 2, 32)
    assert [stream.task_of_step(step) for step in (0, 35, 36, 143, 177)] == [0, 0, 1, 4, 4]
    with pytest.raises(ValueError, match=r"step must be in \[0, 177\], got 178"):
        stream.task_of_step(178)


def test_every_batch_holds_samples_of_its_own_task_without_task_ids(split_domain):
    stream = task_free_stream(split_domain, batch_size=32, passes=2)
    tasks = [set(sample_keys(task[:][0])) for task in split_domain.train]
    batches = list(stream.train_dataloader())
    assert len(batches) == stream.num_steps
    for step, batch in enumerate(batches):
        assert len(batch) == 2  # (inputs, targets): nothing says which task
        inputs, targets = batch
        assert inputs.shape == (32, 64) and inputs.dtype == torch.float32 and targets.dtype == torch.long
        assert set(sample_keys(inputs)) <= tasks[stream.task_of_step(step)]


def test_each_pass_is_a_shuffled_permutation_of_the_task(split_domain):
    stream = task_free_stream(split_domain, batch_size=1, passes=3, seed=5)
    order = stream.train.order
    size = len(split_domain.train[0])
    passes = order[: 3 * size]
    assert bool((passes[:, 0] == 0).all())
    for k in range(3):
        indices = passes[k * size : (k + 1) * size, 1]
        assert torch.equal(indices.sort().values, torch.arange(size))  # every sample once per pass
        assert not torch.equal(indices, torch.arange(size))  # in a random order
    assert not torch.equal(passes[:size, 1], passes[size : 2 * size, 1])  # each pass its own order


def test_the_order_follows_the_seed(split_domain):
    a, b, c = (task_free_stream(split_domain, seed=s).train.order for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_targets_are_the_benchmarks_labels():
    benchmark = split_benchmark("digits", 5, scenario="class", seed=0)
    stream = task_free_stream(benchmark, batch_size=10)
    for task, start in enumerate([0, *stream.boundaries]):
        _, targets = stream.train.__getitems__(list(range(start * 10, start * 10 + 10))).tensors
        assert set(targets.tolist()) <= set(benchmark.train[task].targets.tolist())
    assert stream.num_classes == 10


def test_a_batch_across_tasks_keeps_each_tasks_own_transform():
    benchmark = permuted_benchmark("digits", 2, scenario="domain", seed=0)
    stream = task_free_stream(benchmark, batch_size=16)
    last_of_task0, first_of_task1 = stream.boundaries[0] * 16 - 1, stream.boundaries[0] * 16
    inputs, targets = stream.train.__getitems__([first_of_task1, last_of_task0]).tensors
    for row, position, task in ((0, first_of_task1, 1), (1, last_of_task0, 0)):
        expected = benchmark.train[task][int(stream.train.order[position, 1])]
        assert torch.equal(inputs[row], expected[0]) and int(targets[row]) == int(expected[1])
    single = stream.train[first_of_task1]
    assert torch.equal(single[0], inputs[0])


def test_each_process_takes_its_share_of_every_global_batch_in_order(split_domain, monkeypatch):
    stream = task_free_stream(split_domain, batch_size=32)
    whole = list(stream.train_dataloader())
    monkeypatch.setattr("neurenix.data.stream.rank_and_world_size", lambda: (1, 2))  # process 1 of 2
    loader = stream.train_dataloader(batch_size=16)
    assert list(loader.sampler)[:3] == [1, 3, 5] and len(loader.sampler) == len(stream.train) // 2
    for global_batch, share in zip(whole, loader):
        assert torch.equal(share[0], global_batch[0][1::2]) and torch.equal(share[1], global_batch[1][1::2])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        stream.train_dataloader(batch_size=0)
    assert len(list(loader)) == stream.num_steps


def test_bad_arguments_are_refused(split_domain):
    with pytest.raises(ValueError, match="scenario='domain' or scenario='class'"):
        task_free_stream(split_benchmark("digits", 5, scenario="task"))
    with pytest.raises(ValueError, match="task 0 has 291 training samples: 1 pass"):
        task_free_stream(split_domain, batch_size=300)
    with pytest.raises(TypeError, match="benchmark must be a TaskSequence"):
        task_free_stream([split_domain.train[0]])
    with pytest.raises(ValueError, match="passes must be >= 1, got 0"):
        task_free_stream(split_domain, passes=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        task_free_stream(split_domain, batch_size=3.0)
    with pytest.raises(ValueError, match=r"order must be an \(N, 2\) integer tensor"):
        StreamDataset(split_domain.train, torch.zeros(4, 3, dtype=torch.long))
    assert isinstance(task_free_stream(split_domain), TaskStream)
