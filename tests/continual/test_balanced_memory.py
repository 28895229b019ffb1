"""The class-balanced replay memory: shares of floor/ceil(M/classes), the size bound, each class's
share a uniform reservoir of that class's stream (through re-balancing), state, and the option."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import ExperienceReplay
from neurenix.continual.memory import ClassBalancedMemory, ExemplarMemory, ReservoirMemory
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


# ------------------------------------------------------------------------------------ ExemplarMemory


def ranked(inputs: list[float], label: int, ranks: list[int]):
    """Candidates of class ``label`` whose input is one number, with their selection ranks."""
    count = len(inputs)
    return torch.tensor(inputs, dtype=torch.float32).unsqueeze(1), torch.full((count,), label), 0, torch.tensor(ranks)


def held(memory: ExemplarMemory) -> dict[int, list[tuple[float, int]]]:
    """Per class, its stored (input, rank) pairs, lowest rank first."""
    state = memory.state_dict()
    pairs: dict[int, list[tuple[float, int]]] = {key: [] for key in memory.classes}
    if state["inputs"] is not None:
        for x, y, r in zip(state["inputs"][:, 0].tolist(), state["targets"].tolist(), state["ranks"].tolist()):
            pairs[y].append((x, r))
    return {key: sorted(values, key=lambda pair: pair[1]) for key, values in pairs.items()}


def cat(*parts):
    inputs, targets, _, ranks = zip(*parts)
    return torch.cat(inputs), torch.cat(targets), 0, torch.cat(ranks)


def test_exemplar_memory_keeps_each_classs_lowest_ranks_through_new_classes_by_hand():
    memory = ExemplarMemory(4, CPU, seed=0)
    # Task 1, classes 0 and 1: quotas 4/2 = 2 each; each keeps its ranks 0 and 1.
    memory.add_ranked(*cat(ranked([10, 11, 12], 0, [2, 0, 1]), ranked([20, 21, 22], 1, [0, 2, 1])))
    assert held(memory) == {0: [(11, 0), (12, 1)], 1: [(20, 0), (22, 1)]}
    assert memory.class_seen == {0: 3, 1: 3} and memory.num_seen == 6
    # Task 2, class 2: quotas 2, 1, 1 (the first class to arrive takes the remainder); class 1
    # drops its rank 1 (ReduceExemplarSet), class 2 keeps its rank 0.
    assert memory.quotas_after([2]) == {0: 2, 1: 1, 2: 1}
    memory.add_ranked(*ranked([30, 31], 2, [1, 0]))
    assert held(memory) == {0: [(11, 0), (12, 1)], 1: [(20, 0)], 2: [(31, 0)]}
    assert len(memory) == 4 and memory.class_sizes() == {0: 2, 1: 1, 2: 1}
    # Class 1 given again is selected anew from its new candidates alone.
    memory.add_ranked(*ranked([23, 24], 1, [1, 0]))
    assert held(memory) == {0: [(11, 0), (12, 1)], 1: [(24, 0)], 2: [(31, 0)]}
    assert_bookkeeping_matches_storage(memory)
    # Storage stays compact: a replay draw sees exactly the held samples.
    drawn = memory.sample(10).inputs[:, 0].tolist()
    assert sorted(drawn) == [11, 12, 24, 31]


def test_exemplar_memory_keeps_fewer_than_its_quota_when_offered_fewer_and_nothing_at_capacity_zero():
    memory = ExemplarMemory(6, CPU, seed=0)
    memory.add_ranked(*cat(ranked([1.0], 0, [0]), ranked([2, 3, 4, 5], 1, [3, 2, 1, 0])))
    assert held(memory) == {0: [(1, 0)], 1: [(5, 0), (4, 1), (3, 2)]}
    empty = ExemplarMemory(0, CPU, seed=0)
    empty.add_ranked(*ranked([1, 2], 0, [0, 1]))
    assert len(empty) == 0 and empty.classes == [0] and empty.num_seen == 2


def test_exemplar_memory_refuses_add_and_bad_ranks_with_nothing_changed():
    memory = ExemplarMemory(4, CPU, seed=0)
    memory.add_ranked(*ranked([1, 2], 0, [0, 1]))
    before = memory.state_dict()
    with pytest.raises(TypeError, match=r"offer a task's candidates with their selection ranks through add_ranked"):
        memory.add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"ranks must be a 1-D integer tensor with one rank per candidate \(2\), got ranks of shape \(3,\)"):
        memory.add_ranked(torch.zeros(2, 1), torch.tensor([1, 1]), 0, torch.arange(3))
    with pytest.raises(ValueError, match=r"ranks must be .* got ranks of shape \(2,\) and dtype torch.float32"):
        memory.add_ranked(torch.zeros(2, 1), torch.tensor([1, 1]), 0, torch.zeros(2))
    with pytest.raises(ValueError, match=r"needs class labels as targets"):
        memory.add_ranked(torch.zeros(2, 1), torch.zeros(2), 0, torch.arange(2))
    with pytest.raises(ValueError, match=r"inputs of shape \(2, 3\) and dtype torch.float32 do not match"):
        memory.add_ranked(torch.zeros(2, 3), torch.tensor([1, 1]), 0, torch.arange(2))
    after = memory.state_dict()
    assert memory.classes == [0] and memory.num_seen == 2
    assert all(torch.equal(before[k], after[k]) for k in ("inputs", "targets", "ranks", "classes", "class_seen"))


def test_exemplar_memory_state_round_trip_weights_only(tmp_path):
    memory = ExemplarMemory(5, CPU, seed=3)
    memory.add_ranked(*cat(ranked([10, 11, 12], 0, [2, 0, 1]), ranked([20, 21, 22], 1, [0, 2, 1])))
    torch.save(memory.state_dict(), tmp_path / "memory.pt")
    restored = ExemplarMemory(5, CPU, seed=99)
    restored.load_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
    assert held(restored) == held(memory) == {0: [(11, 0), (12, 1), (10, 2)], 1: [(20, 0), (22, 1)]}
    assert restored.class_seen == memory.class_seen and torch.equal(restored.random_ranks(6), memory.random_ranks(6))
    # The next class shrinks both alike: to their lowest ranks.
    for m in (memory, restored):
        m.add_ranked(*ranked([30, 31, 32], 2, [2, 1, 0]))
    assert held(restored) == held(memory) == {0: [(11, 0), (12, 1)], 1: [(20, 0), (22, 1)], 2: [(32, 0)]}


def test_random_ranks_keep_a_uniform_subset_through_shrinking():
    # With random ranks, the samples a class keeps after shrinking are a uniform subset of its
    # candidates: over many seeds each of 6 candidates survives with probability 1/6 (quota 1).
    survived = torch.zeros(6)
    for seed in range(600):
        memory = ExemplarMemory(6, CPU, seed=seed)
        memory.add_ranked(torch.arange(6.0).unsqueeze(1), torch.zeros(6, dtype=torch.long), 0, memory.random_ranks(6))
        memory.add_ranked(*cat(*(ranked([float(c)], c, [0]) for c in range(1, 6))))
        (kept,) = held(memory)[0]
        survived[int(kept[0])] += 1
    # Binomial(600, 1/6): mean 100, standard deviation 9.1; 4.4 standard deviations either way.
    assert survived.sum() == 600 and ((survived - 100).abs() < 40).all(), survived


# ------------------------------------------------------------------------------------ announced classes


def test_announced_classes_are_stored_without_a_read_once_every_class_holds_its_share():
    memory = ClassBalancedMemory(12, CPU, seed=0)
    memory.announce([1, 0])
    assert memory.classes == [0, 1] and memory.class_sizes() == {0: 0, 1: 0}  # arrived, in ascending order
    offered = {0: 0, 1: 0}
    reads_per_insert = []
    for inputs, labels, task_ids in class_incremental_stream(classes=2, per_class=60):
        with host_reads() as reads:
            memory.add(inputs, labels, task_ids)
        reads_per_insert.append(len(reads))
        for label in labels.tolist():
            offered[label] += 1
        assert_bookkeeping_matches_storage(memory)
        assert memory.class_seen == offered
    full = reads_per_insert.index(0)
    assert full > 0 and reads_per_insert[:full] == [1] * full and not any(reads_per_insert[full:]), reads_per_insert
    assert memory.class_sizes() == {0: 6, 1: 6} and memory.num_seen == 120


def test_each_share_stays_a_uniform_reservoir_of_its_class_when_inserts_run_on_the_device():
    """Classes 0 and 1 announced, 300 items each, interleaved in batches of 30 (a fixed shuffle
    within each batch, so a class's items are not contiguous); quotas 10. Each class-0 item must
    end in memory with probability 10/300. 300 seeds, positions in 15 bins of 20: expected 200
    each; Pearson's statistic, 14 degrees of freedom, 0.999 quantile 36.12."""
    runs, items, quota, bins = 300, 300, 10, 15
    mix = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    batches = []
    for start in range(0, items, 15):
        ids = torch.cat([torch.arange(start, start + 15), torch.arange(1000 + start, 1015 + start)])[mix]
        batches.append(id_batch(ids, (ids >= 1000).long()))
    counts = torch.zeros(items, dtype=torch.long)
    for seed in range(runs):
        memory = ClassBalancedMemory(2 * quota, CPU, seed=seed)
        memory.announce([0, 1])
        for batch in batches:
            memory.add(*batch)
        assert memory._on_device is not None  # the inserts after the first ran on the device
        ids, labels = stored(memory)
        kept = torch.tensor([n for n, label in zip(ids, labels) if label == 0])
        assert kept.numel() == quota and len(set(kept.tolist())) == quota
        counts[kept] += 1
    observed = counts.view(bins, -1).sum(1).double()
    expected = runs * (items // bins) * quota / items
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 36.12, (chi2, observed.tolist())


def test_samples_of_a_class_that_was_not_announced_are_kept_nowhere_and_raised_when_the_host_reads():
    memory = ClassBalancedMemory(4, CPU, seed=0)
    memory.announce([0, 1])
    memory.add(*id_batch(torch.arange(8), torch.tensor([0, 1] * 4)))
    before = stored(memory)
    memory.add(*id_batch(torch.arange(8, 12), torch.tensor([0, 2, 7, 1])))  # classes 2 and 7 were not announced
    inputs, labels, _ = memory.take(torch.arange(len(memory)))
    assert set(labels.tolist()) == {0, 1} and memory.classes == [0, 1] and len(memory) == 4
    assert not set(inputs[:, 0].long().tolist()) & {9, 10}  # the samples of classes 2 and 7
    message = (r"ClassBalancedMemory: 2 samples offered while only the classes \[0, 1\] were announced belonged to other "
               r"classes: they were kept nowhere. Announce all the classes that the batches hold \(or None\)")
    with pytest.raises(ValueError, match=message):
        memory.state_dict()
    # Raised once, and the announcement withdrawn: what is stored is sound (those samples are not in it).
    assert memory.announced is None and memory._on_device is None
    assert memory.state_dict()["class_seen"].tolist() == [5, 5] and before[1].count(0) == 2


def test_a_state_saved_while_inserts_run_on_the_device_resumes_identically_once_announced_again():
    batches = list(class_incremental_stream(classes=2, per_class=80, seed=1))
    whole, first = ClassBalancedMemory(10, CPU, seed=3), ClassBalancedMemory(10, CPU, seed=3)
    for memory in (whole, first):
        memory.announce([0, 1])
    for batch in batches:
        whole.add(*batch)
    for batch in batches[:5]:
        first.add(*batch)
    assert first._on_device is not None
    resumed = ClassBalancedMemory(10, CPU, seed=99)
    resumed.load_state_dict(first.state_dict())
    assert resumed.announced is None  # announcements are the caller's, not the state's
    resumed.announce([0, 1])
    for batch in batches[5:]:
        resumed.add(*batch)
    for key, value in whole.state_dict().items():
        expected = resumed.state_dict()[key]
        assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected, key


@pytest.mark.parametrize("keys", [[0, -1], [0, 1.0], [True]])
def test_announce_takes_keys_as_ints_at_least_zero(keys):
    memory = ClassBalancedMemory(4, CPU, seed=0)
    with pytest.raises(ValueError, match=r"announce takes the groups' keys as ints >= 0, got \["):
        memory.announce(keys)
    assert memory.classes == [] and memory.announced is None
