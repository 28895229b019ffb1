"""The reservoir memory behind ExperienceReplay: size bound, uniformity, Algorithm R, sampling, errors, state."""

from __future__ import annotations

import io

import pytest
import torch

from neurenix.continual import ExperienceReplay, ReplayBatch
from neurenix.continual.memory import ReservoirMemory
from tests.helpers import make_mlp
from tests.host_reads import host_reads

# Batch sizes cycled through by the streams below: single items, odd sizes, and batches larger
# than every memory used here (so one batch can overflow the memory on its own).
VARIED_SIZES = (1, 7, 32, 3, 150, 13, 64, 2, 250, 5)


def stream_batches(total: int, sizes=VARIED_SIZES):
    """``[(start, stop), ...]`` covering ``range(total)`` with batch sizes cycling through ``sizes``."""
    bounds, start, k = [], 0, 0
    while start < total:
        stop = min(total, start + sizes[k % len(sizes)])
        bounds.append((start, stop))
        start, k = stop, k + 1
    return bounds


def id_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples that carry their stream position: input ``[n, -n]`` (float64), target ``n``."""
    ids = torch.arange(start, stop)
    return torch.stack([ids, -ids], 1).double(), ids


def stored_ids(replay: ExperienceReplay) -> torch.Tensor:
    """Stream positions of every stored sample (one draw of the whole memory), sorted."""
    batch = replay.get_replay_batch(max(1, len(replay.memory)))
    return torch.sort(batch.targets).values


def new_replay(memory_size: int, seed: int = 0) -> ExperienceReplay:
    return ExperienceReplay(make_mlp(inputs=2), memory_size=memory_size, seed=seed)


# ------------------------------------------------------------------------------------ size bound


@pytest.mark.parametrize("memory_size", [0, 1, 10, 100])
def test_memory_never_exceeds_its_size(memory_size):
    replay = new_replay(memory_size)
    seen = 0
    for start, stop in stream_batches(1200):
        replay.add_to_memory(*id_batch(start, stop), task_id=1)
        seen += stop - start
        assert len(replay.memory) == min(memory_size, seen)
        if memory_size:
            assert replay.memory.state_dict()["inputs"].shape[0] == len(replay.memory)


def test_batch_larger_than_memory_fills_it_with_distinct_samples_of_that_batch():
    replay = new_replay(10, seed=3)
    replay.add_to_memory(*id_batch(0, 250), task_id=1)
    ids = stored_ids(replay)
    assert len(ids) == 10 and len(torch.unique(ids)) == 10
    assert bool(((ids >= 0) & (ids < 250)).all())


# ------------------------------------------------------------------------------------ uniformity


def test_reservoir_keeps_every_stream_position_with_equal_probability():
    """Each of N stream items ends in a memory of M slots with probability M/N.

    300 independent seeds, N = 2000 items in batches of varied size, M = 100. Positions are
    grouped in 20 bins of 100; each bin's expected count is runs·100·M/N = 1500, and the 20
    counts always sum to runs·M. Pearson's statistic has 19 degrees of freedom; its 0.999
    quantile is 43.82 (chi2.ppf(0.999, 19)). Sampling without replacement inside a run makes the
    counts *less* variable than multinomial ones, so this test is conservative. The seeds are
    fixed, so the outcome is reproducible.
    """
    runs, items, memory_size, bins = 300, 2000, 100, 20
    chi2_critical_19_dof_p001 = 43.82
    batches = [id_batch(start, stop) for start, stop in stream_batches(items)]
    counts = torch.zeros(items, dtype=torch.long)
    for seed in range(runs):
        replay = new_replay(memory_size, seed=seed)
        for inputs, targets in batches:
            replay.add_to_memory(inputs, targets, task_id=0)
        ids = stored_ids(replay)
        assert len(torch.unique(ids)) == memory_size
        counts[ids] += 1

    assert int(counts.sum()) == runs * memory_size
    observed = counts.view(bins, -1).sum(1).double()
    expected = runs * (items // bins) * memory_size / items
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < chi2_critical_19_dof_p001, (chi2, observed.tolist())

    # Early and late halves of the stream: the same inclusion rate M/N = 0.05. The standard
    # deviation of the difference is below 0.001 here, so 0.004 is a > 4σ bound.
    half = items // 2
    early_rate = float(counts[:half].sum()) / (runs * half)
    late_rate = float(counts[half:].sum()) / (runs * half)
    assert abs(early_rate - memory_size / items) < 0.002
    assert abs(early_rate - late_rate) < 0.004


# ------------------------------------------------------------------------------------ Algorithm R


def algorithm_r(batch_sizes, memory_size: int, seed: int) -> list[int]:
    """Vitter's Algorithm R one item at a time, fed the memory's uniforms (one draw per batch).

    Item ``n`` fills slot ``n`` while ``n < M``; after that ``j = floor(u·(n+1))`` and the item
    replaces slot ``j`` when ``j < M``. (The memory draws a batch's uniforms in one call, so
    the reference draws them the same way and then consumes them one by one.)
    """
    generator = torch.Generator().manual_seed(seed)
    slots: list[int] = []
    n = 0
    for size in batch_sizes:
        uniforms = torch.rand(size, generator=generator, dtype=torch.float64).tolist()
        for u in uniforms:
            if n < memory_size:
                slots.append(n)
            else:
                j = int(u * (n + 1))
                if j < memory_size:
                    slots[j] = n
            n += 1
    return slots


@pytest.mark.parametrize("memory_size, seed", [(1, 0), (17, 5), (100, 11)])
def test_vectorized_insert_equals_algorithm_r_one_by_one(memory_size, seed):
    bounds = stream_batches(900)
    replay = new_replay(memory_size, seed=seed)
    for start, stop in bounds:
        replay.add_to_memory(*id_batch(start, stop), task_id=0)
    expected = algorithm_r([stop - start for start, stop in bounds], memory_size, seed)

    state = replay.memory.state_dict()  # slot order: slot k holds state["targets"][k]
    assert state["targets"].tolist() == expected
    assert torch.equal(state["inputs"], id_batch(0, 900)[0][torch.tensor(expected)])


# ------------------------------------------------------------------------------------ sampling


def test_replay_batch_holds_distinct_stored_samples_with_their_task_ids():
    replay = new_replay(50, seed=2)
    for task_id, (start, stop) in enumerate(stream_batches(400)):
        replay.add_to_memory(*id_batch(start, stop), task_id=task_id)
    task_of = {}
    for task_id, (start, stop) in enumerate(stream_batches(400)):
        task_of.update({n: task_id for n in range(start, stop)})
    stored = set(replay.memory.state_dict()["targets"].tolist())

    for batch_size in (1, 13, 50, 80):
        batch = replay.get_replay_batch(batch_size)
        assert isinstance(batch, ReplayBatch)
        inputs, targets, task_ids = batch  # unpacks as a 3-tuple
        ids = targets.tolist()
        assert len(ids) == min(batch_size, 50) == len(set(ids))
        assert set(ids) <= stored
        assert torch.equal(inputs, id_batch(0, 400)[0][targets])
        assert task_ids.dtype == torch.long
        assert task_ids.tolist() == [task_of[n] for n in ids]


def test_replay_batch_is_capped_by_a_partly_filled_memory():
    replay = new_replay(100, seed=1)
    replay.add_to_memory(*id_batch(0, 6), task_id=4)
    batch = replay.get_replay_batch(32)
    assert sorted(batch.targets.tolist()) == list(range(6))
    assert batch.task_ids.tolist() == [4] * 6


# ------------------------------------------------------------------------------------ errors


def test_get_replay_batch_on_empty_memory_raises():
    with pytest.raises(ValueError, match="empty"):
        new_replay(10).get_replay_batch(4)
    with pytest.raises(ValueError, match="empty"):
        new_replay(0).get_replay_batch(4)


@pytest.mark.parametrize(
    "batch_size, error, message",
    [(0, ValueError, "batch_size must be >= 1, got 0"), (-3, ValueError, "batch_size.*-3"),
     (2.0, TypeError, "batch_size.*2.0")],
)
def test_get_replay_batch_checks_batch_size(batch_size, error, message):
    replay = new_replay(10)
    replay.add_to_memory(*id_batch(0, 5), task_id=0)
    with pytest.raises(error, match=message):
        replay.get_replay_batch(batch_size)


def snapshot(replay: ExperienceReplay) -> dict:
    state = replay.memory.state_dict()
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize(
    "inputs, targets, error, message",
    [
        (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long), ValueError, "same number of samples"),
        (torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long), ValueError, r"inputs of shape \(3, 5\)"),
        (torch.zeros(3, 2, dtype=torch.float32), torch.zeros(3, dtype=torch.long), ValueError, "inputs.*torch.float32"),
        (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.long), ValueError, r"targets of shape \(3, 2\)"),
        (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int32), ValueError, "targets.*torch.int32"),
        ([[0.0, 0.0]], torch.zeros(1, dtype=torch.long), TypeError, "inputs must be a torch.Tensor, got list"),
    ],
)
def test_rejected_batches_leave_the_memory_unchanged(inputs, targets, error, message):
    replay = new_replay(8, seed=4)
    replay.add_to_memory(*id_batch(0, 20), task_id=0)
    before = snapshot(replay)
    with pytest.raises(error, match=message):
        replay.add_to_memory(inputs, targets, task_id=0)
    assert_same_state(before, snapshot(replay))


@pytest.mark.parametrize("task_id", ["1", 1.0, True, None])
def test_add_to_memory_needs_an_int_task_id(task_id):
    replay = new_replay(8)
    replay.add_to_memory(*id_batch(0, 3), task_id=0)
    before = snapshot(replay)
    with pytest.raises(TypeError, match=f"task_id must be an int, got {type(task_id).__name__}"):
        replay.add_to_memory(*id_batch(3, 6), task_id=task_id)
    assert_same_state(before, snapshot(replay))


# ------------------------------------------------------------------------------------ state


def test_state_round_trip_restores_samples_and_the_next_draws():
    replay = new_replay(30, seed=9)
    for start, stop in stream_batches(300):
        replay.add_to_memory(*id_batch(start, stop), task_id=start % 3)
    replay.get_replay_batch(5)  # advance the generator past its seeded state

    buffer = io.BytesIO()
    torch.save(replay.state_dict(), buffer)
    buffer.seek(0)
    restored = new_replay(30, seed=12345)  # a different seed: the loaded state must win
    restored.load_state_dict(torch.load(buffer, weights_only=True))

    assert len(restored.memory) == len(replay.memory) == 30
    assert_same_state(snapshot(replay), snapshot(restored))
    for size in (7, 30):
        a, b = replay.get_replay_batch(size), restored.get_replay_batch(size)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # The stream continues identically too (insert decisions come from the same generator).
    replay.add_to_memory(*id_batch(300, 400), task_id=1)
    restored.add_to_memory(*id_batch(300, 400), task_id=1)
    assert_same_state(snapshot(replay), snapshot(restored))


def test_a_generator_state_from_another_device_type_reseeds_from_seed_and_stream_position():
    """A memory's generator lives on its samples' device; a checkpoint written on a GPU holds a
    CUDA generator's state, whose stream cannot go on on the CPU, so it restarts from
    ``seed + num_seen`` (deterministic, documented)."""
    replay = new_replay(30, seed=9)
    for start, stop in stream_batches(100):
        replay.add_to_memory(*id_batch(start, stop), task_id=0)
    state = replay.state_dict()
    assert state["memory"]["generator_device"] == "cpu"
    state["memory"] = {**state["memory"], "generator_device": "cuda", "generator": torch.zeros(16, dtype=torch.uint8)}

    restored = new_replay(30, seed=9)
    restored.load_state_dict(state)
    expected = torch.randperm(30, generator=torch.Generator().manual_seed(9 + 100))[:6]
    assert torch.equal(restored.get_replay_batch(6).inputs, state["memory"]["inputs"][expected])


# ------------------------------------------------------------------------------------ host reads
# On a GPU every read of a tensor's values on the host waits for the queued kernels. Storing a
# batch needs none: the draws decide slots on the device, and storage has a spare row for the
# samples kept nowhere.


def test_storing_a_batch_in_the_reservoir_reads_nothing_from_the_device():
    memory = ReservoirMemory(50, torch.device("cpu"), seed=0)
    for start, stop in stream_batches(400):
        with host_reads() as reads:
            memory.add(*id_batch(start, stop), torch.zeros(stop - start, dtype=torch.long))
        assert not reads, f"reads while storing samples {start}..{stop}:\n{reads}"
    assert len(memory) == 50 and memory.num_seen == 400


def test_the_spare_row_is_storage_only_never_a_stored_sample():
    memory = ReservoirMemory(5, torch.device("cpu"), seed=2)
    for start, stop in stream_batches(300):
        memory.add(*id_batch(start, stop), torch.zeros(stop - start, dtype=torch.long))
    state = memory.state_dict()
    assert state["inputs"].shape == (5, 2) and len(set(state["targets"].tolist())) == 5
    ids = torch.cat([memory.sample(5).targets for _ in range(50)])
    assert set(ids.tolist()) == set(state["targets"].tolist())  # draws only ever reach the stored five
