"""Split and permuted benchmarks: determinism, class groups, permutations, scenario labels, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neurenix.data.benchmarks import permuted_benchmark, split_benchmark

CLASSES = 6


def labelled_source(samples_per_class: int = 4, side: int = 2) -> tuple[SimpleNamespace, SimpleNamespace]:
    """Train and test data whose every pixel holds the sample's original label (so labels can be traced)."""
    labels = torch.arange(CLASSES).repeat_interleave(samples_per_class)
    images = labels.to(torch.uint8)[:, None, None].expand(-1, side, side).clone()
    part = SimpleNamespace(data=images, targets=labels)
    return part, SimpleNamespace(data=images[::2].clone(), targets=labels[::2].clone())


def ramp_source(samples: int = 5, side: int = 3) -> tuple[SimpleNamespace, SimpleNamespace]:
    """Identical train and test images with distinct pixels, so permutations can be read back."""
    images = (torch.arange(samples * side * side) % 251).to(torch.uint8).reshape(samples, side, side)
    labels = torch.arange(samples) % 3
    return SimpleNamespace(data=images, targets=labels), SimpleNamespace(data=images.clone(), targets=labels.clone())


def original_labels(task) -> torch.Tensor:
    """The original label of each sample of a labelled_source task (every pixel holds it)."""
    return torch.round(task[:][0][:, 0] * 255).long()


# ---------------------------------------------------------------------------- split
def test_split_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b = split_benchmark("digits", 5, seed=7), split_benchmark("digits", 5, seed=7)
    assert a.class_order == b.class_order and a.task_classes == b.task_classes
    for ta, tb in zip(a.train + a.test, b.train + b.test):
        assert torch.equal(ta.inputs, tb.inputs) and torch.equal(ta.targets, tb.targets)
    assert split_benchmark("digits", 5, seed=8).class_order != a.class_order
    assert sorted(a.class_order) == list(range(10))


def test_every_class_in_exactly_one_task():
    benchmark = split_benchmark("digits", 5, seed=1)
    classes = [c for group in benchmark.task_classes for c in group]
    assert sorted(classes) == list(range(10)) and [len(g) for g in benchmark.task_classes] == [2] * 5
    assert sum(len(t) for t in benchmark.train) == 1438 and sum(len(t) for t in benchmark.test) == 359


def test_given_class_order_and_sizes():
    benchmark = split_benchmark(labelled_source(), 3, class_order=[5, 4, 3, 2, 1, 0], classes_per_task=[3, 2, 1])
    assert benchmark.task_classes == [[5, 4, 3], [2, 1], [0]]
    two_each = split_benchmark(labelled_source(), 2, class_order=range(CLASSES), classes_per_task=2)
    assert two_each.task_classes == [[0, 1], [2, 3]] and two_each.class_order == [0, 1, 2, 3]


def test_split_labels_task_incremental():
    benchmark = split_benchmark(labelled_source(), 3, scenario="task", class_order=[4, 1, 0, 5, 3, 2])
    assert benchmark.num_classes == 2
    for task, group in enumerate(benchmark.task_classes):
        for part in (benchmark.train[task], benchmark.test[task]):
            x, y, t = part[:]
            assert y.tolist() == [group.index(c) for c in original_labels(part).tolist()]
            assert torch.equal(t, torch.full_like(y, task))


def test_split_labels_domain_incremental():
    benchmark = split_benchmark(labelled_source(), 3, scenario="domain", class_order=[4, 1, 0, 5, 3, 2])
    assert benchmark.num_classes == 2
    for task, group in enumerate(benchmark.task_classes):
        batch = benchmark.train[task][:]
        assert len(batch) == 2  # no task id
        assert batch[1].tolist() == [group.index(c) for c in original_labels(benchmark.train[task]).tolist()]


def test_split_labels_class_incremental_are_positions_in_class_order():
    order = [4, 1, 0, 5, 3, 2]
    benchmark = split_benchmark(labelled_source(), 3, scenario="class", class_order=order)
    assert benchmark.num_classes == CLASSES
    for task in range(3):
        batch = benchmark.test[task][:]
        assert len(batch) == 2
        assert batch[1].tolist() == [order.index(c) for c in original_labels(benchmark.test[task]).tolist()]
        assert benchmark.train[task].classes == [2 * task, 2 * task + 1]  # a prefix grows task by task


def test_split_inputs_are_floats_in_unit_range():
    benchmark = split_benchmark("digits", 5, flatten=False)
    assert benchmark.train[0].inputs.dtype == torch.uint8
    x = benchmark.train[0][[0, 1]][0]
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert split_benchmark("digits", 5).input_shape == (64,)


# ---------------------------------------------------------------------------- permuted
def test_permuted_is_deterministic_and_differs_across_seeds_and_tasks():
    a, b = permuted_benchmark(ramp_source(), 4, seed=2), permuted_benchmark(ramp_source(), 4, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.permutations, b.permutations))
    assert all(torch.equal(a.train[t][:][0], b.train[t][:][0]) for t in range(4))
    other = permuted_benchmark(ramp_source(), 4, seed=3)
    assert not torch.equal(a.permutations[1], other.permutations[1])
    assert len({tuple(p.tolist()) for p in a.permutations}) == 4


def test_permutation_is_the_same_for_train_and_test_of_a_task():
    benchmark = permuted_benchmark(ramp_source(), 3, seed=0)
    for task in range(3):
        assert torch.equal(benchmark.train[task][:][0], benchmark.test[task][:][0])
        expected = ramp_source()[0].data.flatten(1)[:, benchmark.permutations[task]].float() / 255
        assert torch.allclose(benchmark.train[task][:][0], expected)


def test_first_task_unpermuted_changes_task_zero_only():
    train, _ = ramp_source()
    plain = permuted_benchmark(ramp_source(), 3, seed=5)
    assert torch.equal(plain.permutations[0], torch.arange(9))
    assert torch.allclose(plain.train[0][:][0], train.data.flatten(1).float() / 255)
    permuted = permuted_benchmark(ramp_source(), 3, seed=5, first_unpermuted=False)
    assert not torch.equal(permuted.permutations[0], torch.arange(9))
    assert all(torch.equal(plain.permutations[t], permuted.permutations[t]) for t in (1, 2))


@pytest.mark.parametrize(
    "scenario, num_classes, offset, with_ids", [("task", 3, 0, True), ("domain", 3, 0, False), ("class", 9, 3, False)]
)
def test_permuted_labels_per_scenario(scenario, num_classes, offset, with_ids):
    benchmark = permuted_benchmark(ramp_source(), 3, scenario=scenario)
    assert benchmark.num_classes == num_classes
    labels = ramp_source()[0].targets
    for task in range(3):
        batch = benchmark.train[task][:]
        assert torch.equal(batch[1], labels + task * offset)  # class-IL: task * C + label
        assert len(batch) == (3 if with_ids else 2)
        if with_ids:
            assert torch.equal(batch[2], torch.full_like(labels, task))


def test_permuted_tasks_share_the_stored_images():
    benchmark = permuted_benchmark("digits", 10)
    assert len({task.inputs.data_ptr() for task in benchmark.train}) == 1


# ---------------------------------------------------------------------------- sources
def test_mnist_sources_are_loaded_from_neurenix_data_mnist(monkeypatch):
    if importlib.util.find_spec("neurenix.data.mnist") is None:
        pytest.skip("neurenix.data.mnist is not there yet")
    from neurenix.data import mnist

    calls = []

    def fake(name):
        def build(root, train=True, download=False):
            calls.append((name, root, train, download))
            return labelled_source()[0 if train else 1]

        return build

    monkeypatch.setattr(mnist, "MNIST", fake("MNIST"))
    monkeypatch.setattr(mnist, "FashionMNIST", fake("FashionMNIST"))
    benchmark = split_benchmark("fashion_mnist", 3, root="/data", download=True)
    assert calls == [("FashionMNIST", "/data", True, True), ("FashionMNIST", "/data", False, True)]
    assert benchmark.metadata["source"] == "fashion_mnist" and sum(len(t) for t in benchmark.train) == 24
    permuted_benchmark("mnist", 2, root="/data")
    assert calls[2:] == [("MNIST", "/data", True, False), ("MNIST", "/data", False, False)]
    with pytest.raises(ValueError, match="root must name the folder.*'mnist', got None"):
        split_benchmark("mnist", 5)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(), reason="no local Fashion-MNIST")
def test_real_fashion_mnist_split():
    benchmark = split_benchmark("fashion_mnist", 5, root="/usr/share/datasets/fashion-mnist", scenario="task")
    assert [len(t) for t in benchmark.train] == [12000] * 5 and [len(t) for t in benchmark.test] == [2000] * 5
    assert benchmark.input_shape == (784,) and benchmark.train[0].inputs.dtype == torch.uint8


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("build", [split_benchmark, permuted_benchmark])
def test_bad_scenario_and_num_tasks(build):
    with pytest.raises(ValueError, match=r"scenario must be one of 'task', 'domain', 'class'; got 'online'"):
        build(labelled_source(), 2, scenario="online")
    with pytest.raises(ValueError, match="num_tasks must be >= 1, got 0"):
        build(labelled_source(), 0)
    with pytest.raises(TypeError, match="num_tasks must be an int, got str: '2'"):
        build(labelled_source(), "2")
    with pytest.raises(ValueError, match="source must be one of 'digits', 'mnist', 'fashion_mnist'.*got 'cifar'"):
        build("cifar", 2)


def test_class_in_two_tasks():
    with pytest.raises(ValueError, match=r"class_order lists class 3 twice .*exactly one task"):
        split_benchmark(labelled_source(), 3, class_order=[0, 3, 1, 3, 2, 4])


def test_bad_class_counts():
    with pytest.raises(ValueError, match="num_tasks=4 does not divide the 6 classes"):
        split_benchmark(labelled_source(), 4)
    with pytest.raises(ValueError, match="classes_per_task=4 asks for 8 classes over 2 tasks, but there are 6"):
        split_benchmark(labelled_source(), 2, classes_per_task=4)
    with pytest.raises(ValueError, match=r"classes_per_task must give one size per task \(3\), got \[1, 2\]"):
        split_benchmark(labelled_source(), 3, classes_per_task=[1, 2])
    with pytest.raises(ValueError, match="classes_per_task must be >= 1, got 0"):
        split_benchmark(labelled_source(), 3, classes_per_task=0)
    with pytest.raises(ValueError, match=r"class_order contains 9, which is not a class of the data"):
        split_benchmark(labelled_source(), 1, class_order=[9])
