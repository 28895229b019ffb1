"""The class-balanced replay memory: shares of floor/ceil(M/classes), the size bound, each class's
share a uniform reservoir of that class's stream (through re-balancing), state, and the option."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import ExperienceReplay
from neurenix.continual.memory import ClassBalancedMemory, ReservoirMemory
from tests.helpers import lit_classifier, make_mlp, quiet_trainer
from tests.host_reads import host_reads

CPU = torch.device("cpu")
SIZES = (1, 7, 32, 3, 50, 13, 64, 2)  # batch sizes cycled through


def id_batch(ids: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples that carry their stream position: input ``[n, -n]``; ``label`` their classes."""
    return torch.stack([ids, -ids], 1).double(), label, torch.zeros_like(ids)


def class_incremental_stream(classes: int, per_class: int, seed: int = 0):
    """Classes arriving two at a time (a split benchmark's order), batches of varied sizes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(t, t + 2).repeat(per_class)[torch.randperm(2 * per_class, generator=generator)]
                        for t in range(0, classes, 2)])
    start, k = 0, 0
    while start < labels.shape[0]:
        stop = min(labels.shape[0], start + SIZES[k % len(SIZES)])
        yield id_batch(torch.arange(start, stop), labels[start:stop])
        start, k = stop, k + 1


def stored(memory: ClassBalancedMemory) -> tuple[list[int], list[int]]:
    state = memory.state_dict()
    if state["inputs"] is None:
        return [], []
    return state["inputs"][:, 0].long().tolist(), state["targets"].tolist()


# ------------------------------------------------------------------------------------ balance and bound


@pytest.mark.parametrize("capacity", [0, 1, 7, 100])
def test_each_class_holds_floor_or_ceil_of_its_share_and_the_memory_never_exceeds_its_size(capacity):
    memory = ClassBalancedMemory(capacity, CPU, seed=1)
    seen: dict[int, int] = {}
    for inputs, labels, task_ids in class_incremental_stream(classes=12, per_class=40):
        memory.add(inputs, labels, task_ids)
        for label in labels.tolist():
            seen[label] = seen.get(label, 0) + 1
        arrival = list(dict.fromkeys(memory.classes))
        share, extra = divmod(capacity, len(arrival))
        sizes = memory.class_sizes()
        for k, label in enumerate(arrival):
            quota = share + (k < extra)  # floor, or ceil for the first (M mod C) classes to arrive
            assert sizes[label] == min(seen[label], quota), (label, sizes, seen)
        assert len(memory) == sum(sizes.values()) <= capacity
        assert memory.num_seen == sum(seen.values())
    assert memory.classes == list(range(12)) and memory.class_seen == seen


def test_a_rare_class_keeps_its_share_where_a_reservoir_loses_it():
    rare, common = id_batch(torch.arange(20), torch.zeros(20, dtype=torch.long)), None
    balanced, reservoir = ClassBalancedMemory(40, CPU, seed=0), ReservoirMemory(40, CPU, seed=0)
    for memory in (balanced, reservoir):
        memory.add(*rare)
        for start in range(20, 2020, 50):
            common = id_batch(torch.arange(start, start + 50), torch.ones(50, dtype=torch.long))
            memory.add(*common)
    assert balanced.class_sizes() == {0: 20, 1: 20}
    assert int((reservoir.state_dict()["targets"] == 0).sum()) < 5  # expected 40·20/2020 ≈ 0.4


# ------------------------------------------------------------------------------------ uniformity


def test_each_share_is_a_uniform_reservoir_of_its_class_through_rebalancing():
    """Class 0's 600 items reach the memory over the whole run; after its first 300, classes 1-3
    arrive and class 0's share shrinks from 40 to 10. Each of its items must end in memory with
    probability 10/600 whatever its position. 300 seeds; positions in 20 bins of 30, expected
    300·30·10/600 = 150 each; Pearson's statistic, 19 degrees of freedom, 0.999 quantile 43.82.
    Draws without replacement make the counts less variable than multinomial: conservative."""
    runs, items, quota, bins = 300, 600, 10, 20
    counts = torch.zeros(items, dtype=torch.long)
    first = [id_batch(torch.arange(s, s + 30), torch.zeros(30, dtype=torch.long)) for s in range(0, 300, 30)]
    later = []
    for s in range(300, 600, 30):  # class 0 interleaved with the new classes
        labels = torch.cat([torch.zeros(30, dtype=torch.long), torch.arange(1, 4).repeat(10)])
        ids = torch.cat([torch.arange(s, s + 30), torch.arange(10_000 + s, 10_030 + s)])
        later.append(id_batch(ids, labels))
    for seed in range(runs):
        memory = ClassBalancedMemory(40, CPU, seed=seed)
        for batch in first + later:
            memory.add(*batch)
        ids, labels = stored(memory)
        kept = torch.tensor([n for n, label in zip(ids, labels) if label == 0])
        assert kept.numel() == quota and len(set(kept.tolist())) == quota
        counts[kept] += 1
    observed = counts.view(bins, -1).sum(1).double()
    expected = runs * (items // bins) * quota / items
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 43.82, (chi2, observed.tolist())
    assert abs(float(counts[:300].sum()) - float(counts[300:].sum())) < 0.1 * runs * quota  # early ≈ late


# ------------------------------------------------------------------------------------ state


def test_state_round_trip_continues_identically():
    batches = list(class_incremental_stream(classes=6, per_class=30, seed=3))
    whole, first = ClassBalancedMemory(20, CPU, seed=4), ClassBalancedMemory(20, CPU, seed=4)
    for batch in batches:
        whole.add(*batch)
    for batch in batches[:12]:
        first.add(*batch)
    resumed = ClassBalancedMemory(20, CPU, seed=99)
    resumed.load_state_dict(first.state_dict())
    for batch in batches[12:]:
        resumed.add(*batch)
    for key, value in whole.state_dict().items():
        expected = resumed.state_dict()[key]
        assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected, key


def test_a_plain_reservoirs_state_loads_rebalanced():
    reservoir = ReservoirMemory(30, CPU, seed=0)
    reservoir.add(*id_batch(torch.arange(60), torch.tensor([0] * 50 + [1] * 10)))
    balanced = ClassBalancedMemory(30, CPU, seed=0)
    balanced.load_state_dict(reservoir.state_dict())  # no class counts: rebuilt from what is stored
    sizes = balanced.class_sizes()
    assert balanced.classes == list(dict.fromkeys(reservoir.state_dict()["targets"].tolist()))
    assert sizes[1] == min(15, int((reservoir.state_dict()["targets"] == 1).sum())) and sizes[0] <= 15
    assert balanced.num_seen == 60


# ------------------------------------------------------------------------------------ the option


def test_experience_replay_balance_option():
    plain = ExperienceReplay(make_mlp(), memory_size=10)
    balanced = ExperienceReplay(make_mlp(), memory_size=10, balance="classes")
    assert plain.balance is None and type(plain.memory) is ReservoirMemory
    assert plain.hyperparameters() == {"memory_size": 10, "replay_ratio": 0.5}  # state key as before
    assert isinstance(balanced.memory, ClassBalancedMemory) and balanced.hyperparameters()["balance"] == "classes"
    assert plain.state_key != balanced.state_key
    with pytest.raises(ValueError, match="balance must be one of 'classes'; got 'tasks'"):
        ExperienceReplay(make_mlp(), balance="tasks")
    with pytest.raises(ValueError, match="needs class labels as targets"):
        balanced.add_to_memory(torch.randn(4, 6).double(), torch.randn(4), task_id=0)
    inputs, labels, _ = id_batch(torch.arange(30), torch.arange(30) % 3)
    balanced.add_to_memory(torch.cat([inputs] * 3, 1), labels, task_id=2)
    assert balanced.memory.class_sizes() == {0: 4, 1: 3, 2: 3}
    batch = balanced.get_replay_batch(10)
    assert sorted(batch.targets.tolist()) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2] and set(batch.task_ids.tolist()) == {2}


def test_balanced_replay_under_a_trainer():
    net = make_mlp(inputs=6, classes=3).float()
    replay = ExperienceReplay(net, memory_size=12, replay_ratio=0.5, seed=0, balance="classes")
    x = torch.randn(90, 6)
    y = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(20, dtype=torch.long), torch.full((10,), 2)])
    quiet_trainer(callbacks=[replay]).fit(lit_classifier(net), DataLoader(TensorDataset(x, y), batch_size=10))
    assert replay.memory.class_sizes() == {0: 4, 1: 4, 2: 4} and replay.memory.num_seen == 90


# ------------------------------------------------------------------------------------ bookkeeping


def assert_bookkeeping_matches_storage(memory: ClassBalancedMemory) -> None:
    """The counts kept on the host and the cached slots per class are what storage holds."""
    _, labels = stored(memory)
    assert memory.class_sizes() == {label: labels.count(label) for label in memory.classes}
    assert len(memory) == len(labels)
    for label in memory.classes:
        expected = [slot for slot, held in enumerate(labels) if held == label]
        assert memory.slots_of([label]).tolist() == expected, label


@pytest.mark.parametrize("capacity", [1, 9, 40])
def test_the_counts_and_slots_kept_on_the_host_match_storage_after_every_insert(capacity):
    memory = ClassBalancedMemory(capacity, CPU, seed=5)
    for inputs, labels, task_ids in class_incremental_stream(classes=8, per_class=25, seed=2):
        memory.slots_of(memory.classes)  # fill the cache, so later inserts must keep it right
        memory.add(inputs, labels, task_ids)
        assert_bookkeeping_matches_storage(memory)


def test_an_insert_reads_the_batchs_classes_once_and_nothing_else():
    memory = ClassBalancedMemory(30, CPU, seed=0)
    batches = list(class_incremental_stream(classes=4, per_class=200))
    for batch in batches[:6]:
        memory.add(*batch)
    assert memory.classes == [0, 1]
    for batch in batches[6:12]:  # classes 0 and 1 only: no new class, no re-balancing
        assert set(batch[1].tolist()) <= {0, 1}
        with host_reads() as reads:
            memory.add(*batch)
        assert len(reads) == 1 and reads[0].startswith("tolist"), str(reads)


def test_a_pooled_state_whose_classes_were_under_their_quota_keeps_storage_compact():
    # A reservoir's state carries no per-class counts: they are estimated from the stream's length.
    # Class 1 holds 3 samples, under its quota of 10, while its estimate says it was offered 6:
    # it counts as offered what it holds, so its next samples fill the next free slots.
    reservoir = ReservoirMemory(20, CPU, seed=0)
    reservoir.add(*id_batch(torch.arange(13), torch.tensor([0] * 10 + [1] * 3)))
    reservoir.num_seen = 26
    balanced = ClassBalancedMemory(20, CPU, seed=0)
    balanced.load_state_dict(reservoir.state_dict())
    assert balanced.class_sizes() == {0: 10, 1: 3} and balanced.class_seen == {0: 20, 1: 3}
    balanced.add(*id_batch(torch.arange(100, 105), torch.ones(5, dtype=torch.long)))
    assert balanced.class_sizes() == {0: 10, 1: 8}
    assert_bookkeeping_matches_storage(balanced)
    assert sorted(stored(balanced)[0])[-5:] == [100, 101, 102, 103, 104]
