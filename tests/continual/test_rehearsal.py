"""What the memory-based methods share: extra stored fields, the task-balanced memory, pooled
per-rank memories, one rehearsal method per Trainer, the output capture, and the order of the
gradient phases."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    GEM,
    DarkExperienceReplay,
    ExperienceReplay,
)
from neurenix.continual.base import ContinualMethod
from neurenix.continual.callback import ContinualCallback
from neurenix.continual.capture import ForwardCapture
from neurenix.continual.distributed import mean_across_ranks_
from neurenix.continual.memory import ReservoirMemory, TaskBalancedMemory
from neurenix.continual.rehearsal import RehearsalMethod, redistributed_memory
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark
from tests.helpers import lit_classifier, lit_multi_head, make_mlp, quiet_trainer, saved_and_loaded
from tests.host_reads import host_reads

CPU = torch.device("cpu")


def numbered(start: int, stop: int, task: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples carrying their number ``n``: input ``[n]``, target ``n % 3``, task ``task``, logits ``[n, -n]``."""
    ids = torch.arange(start, stop)
    return ids.float().unsqueeze(1), ids % 3, torch.full_like(ids, task), torch.stack([ids, -ids], 1).float()


# ---------------------------------------------------------------------------------------------- extra fields
def test_an_extra_field_stays_with_its_sample_through_insertion_draws_and_state():
    memory = ReservoirMemory(capacity=8, device=CPU, seed=3)
    for start in range(0, 40, 5):
        x, y, t, z = numbered(start, start + 5)
        memory.add(x, y, t, logits=z)
    slots = memory.draw(8)
    inputs, targets, _ = memory.take(slots)
    logits = memory.field("logits", slots)
    n = inputs[:, 0]
    assert torch.equal(logits, torch.stack([n, -n], 1)) and torch.equal(targets, n.long() % 3)

    saved = io.BytesIO()
    torch.save(memory.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    assert state["extra_fields"] == ["logits"]
    restored = ReservoirMemory(capacity=8, device=CPU, seed=0)
    restored.load_state_dict(state)
    assert torch.equal(restored.field("logits", torch.arange(8)), memory.field("logits", torch.arange(8)))
    # The same generator: the next draw is the same.
    assert torch.equal(restored.draw(4), memory.draw(4))


def test_a_batch_without_the_stored_extra_field_is_refused():
    memory = ReservoirMemory(capacity=4, device=CPU, seed=0)
    x, y, t, z = numbered(0, 2)
    memory.add(x, y, t, logits=z)
    with pytest.raises(ValueError, match=r"the memory stores the fields \['inputs', 'logits', 'targets', 'task_ids'\], "
                                         r"got a batch with \['inputs', 'targets', 'task_ids'\]"):
        memory.add(x, y, t)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\) and dtype torch.float32 do not match"):
        memory.add(x, y, t, logits=torch.zeros(2, 3))
    assert memory.num_seen == 2


def test_pooled_memories_keep_their_extra_fields():
    per_rank = []
    for rank in range(2):
        memory = ReservoirMemory(capacity=6, device=CPU, seed=rank)
        x, y, t, z = numbered(10 * rank, 10 * rank + 6)
        memory.add(x, y, t, logits=z)
        per_rank.append(memory.state_dict())
    share = redistributed_memory(per_rank, 0, 1, capacity=12)
    n = share["inputs"][:, 0]
    assert sorted(n.tolist()) == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    assert torch.equal(share["logits"], torch.stack([n, -n], 1)) and share["extra_fields"] == ["logits"]


# ---------------------------------------------------------------------------------------------- task-balanced
def test_the_task_balanced_memory_gives_each_task_an_equal_share_of_its_own_stream():
    memory = TaskBalancedMemory(capacity=9, device=CPU, seed=0)
    for task in range(3):
        for start in range(100 * task, 100 * task + 60, 7):
            x, y, t, _ = numbered(start, start + 7, task)
            memory.add(x, y, t)
        sizes = memory.group_sizes()
        assert list(sizes) == list(range(task + 1))
        assert sum(sizes.values()) == 9 and max(sizes.values()) - min(sizes.values()) <= 1
    stored = memory.state_dict()
    assert torch.equal(stored["task_ids"], stored["inputs"][:, 0].long() // 100)  # each sample with its own task
    assert stored["tasks"].tolist() == [0, 1, 2]


def test_slots_of_tasks_are_kept_on_the_host_and_searched_only_when_a_new_task_arrives():
    memory = TaskBalancedMemory(capacity=10, device=CPU, seed=0)
    for task in range(2):
        x, y, t, _ = numbered(10 * task, 10 * task + 8, task)
        memory.add(x, y, t)
    slots = memory.slots_of([0])
    assert torch.equal(memory.take(slots).task_ids, torch.zeros(5, dtype=torch.long))
    for start in range(20, 40, 4):  # task 1 trains on: task 0's slots stay where they are
        x, y, t, _ = numbered(start, start + 4, 1)
        with host_reads() as reads:
            memory.add(x, y, t)
            assert torch.equal(memory.slots_of([0]), slots)
            assert torch.equal(memory.take(memory.slots_of([1])).task_ids, torch.ones(5, dtype=torch.long))
        assert len(reads) == 1 and reads[0].startswith("tolist"), str(reads)  # the batch's task ids only
    x, y, t, _ = numbered(50, 54, 2)  # a new task arrives: the shares shrink, storage is compacted
    memory.add(x, y, t)
    assert torch.equal(memory.take(memory.slots_of([0])).task_ids, torch.zeros(4, dtype=torch.long))
    both = memory.slots_of([0, 1])
    assert torch.equal(both, both.sort().values) and sorted(memory.take(both).task_ids.tolist()) == [0] * 4 + [1] * 3


def test_a_batch_of_one_task_given_as_an_int_is_stored_as_its_ids_would_be_and_reads_nothing():
    by_int, by_ids = TaskBalancedMemory(capacity=12, device=CPU, seed=4), TaskBalancedMemory(capacity=12, device=CPU, seed=4)
    for task in range(3):
        for start in range(100 * task, 100 * task + 50, 9):
            x, y, t, _ = numbered(start, start + 9, task)
            by_ids.add(x, y, t)
            with host_reads() as reads:
                by_int.add(x, y, task)
            if start > 100 * task:  # the task's first batch re-balances the shares: that reads the device
                assert not reads, str(reads)
    for key, value in by_ids.state_dict().items():
        expected = by_int.state_dict()[key]
        assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected, key


def _step_batches(task: int, steps: int = 4):
    generator = torch.Generator().manual_seed(task)
    for _ in range(steps):
        yield torch.randn(8, 6, dtype=torch.float64, generator=generator), torch.randint(0, 3, (8,), generator=generator)


@pytest.mark.parametrize(
    "method_class, options",
    [(DarkExperienceReplay, {"alpha": 0.5}), (DarkExperienceReplay, {"alpha": 0.5, "beta": 0.5}), (ERACE, {}), (AGEM, {})],
    ids=["der", "der++", "er_ace", "agem"],
)
def test_a_training_step_reads_nothing_from_the_device(method_class, options):
    """On a GPU each read would make the host wait for the step's kernels. From the second task
    on, every step draws from the memory, stores its batch and (A-GEM) projects on a reference."""
    model = make_mlp()
    method = method_class(model, memory_size=20, seed=0, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam reads its step count on the CPU
    for task in range(3):
        for step, (x, y) in enumerate(_step_batches(task)):
            with host_reads() as reads:
                method.train_step(optimizer, nn.functional.cross_entropy, x, y, task)
            if step > 0:  # a task's first step ends the task before (consolidation may read)
                assert not reads, f"task {task}, step {step}:\n{reads}"


def test_gem_reads_only_to_solve_its_quadratic_program_on_the_host():
    model = make_mlp()
    method = GEM(model, memory_size=20, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for task in range(3):
        for step, (x, y) in enumerate(_step_batches(task)):
            with host_reads() as reads:
                method.train_step(optimizer, nn.functional.cross_entropy, x, y, task)
            if step > 0:
                assert all("continual/functional.py" in read for read in reads), str(reads)
                assert bool(reads) == (task > 0)  # one constraint per finished task


class TwoHeads(nn.Module):
    """Digits (64 inputs) into one head of 5 classes per task: ``forward(x, task_ids)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.heads = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        logits = self.heads(torch.tanh(self.trunk(x))).view(-1, 2, 5)
        return logits[torch.arange(x.shape[0]), task_ids]


def test_under_a_task_sequence_the_task_balanced_memory_gets_the_fits_task_as_an_int(monkeypatch):
    benchmark = split_benchmark("digits", num_tasks=2, scenario="task", seed=0)
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=64)
    model = lit_multi_head(TwoHeads())
    method = AGEM(model.model, memory_size=40, seed=0)
    given = []
    original = TaskBalancedMemory.add
    monkeypatch.setattr(TaskBalancedMemory, "add", lambda self, x, y, t, **e: given.append(t) or original(self, x, y, t, **e))
    trainer = quiet_trainer(callbacks=[method], max_epochs=1, limit_train_batches=3)
    fit_sequence(trainer, model, datamodule, epochs_per_task=1)
    assert given == [0, 0, 0, 1, 1, 1]
    assert method.memory.group_sizes() == {0: 20, 1: 20}


def test_two_rehearsal_methods_on_one_trainer_are_refused_naming_both():
    module = lit_classifier(make_mlp(8, 5, 3).float())
    first, second = ExperienceReplay(module, memory_size=10), ExperienceReplay(module, memory_size=20)
    trainer = quiet_trainer(callbacks=[first, EWC(module), second], max_epochs=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8), torch.randint(0, 3, (8,))), batch_size=4)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="ExperienceReplay and ExperienceReplay are on one Trainer: each keeps its own memory"):
        trainer.fit(module, loader)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert len(first.memory) == 0 and first.active_task is None


# ---------------------------------------------------------------------------------------------- capture
def test_the_capture_records_the_last_gradient_forward_and_its_transform_replaces_the_output():
    net = nn.Linear(2, 2)
    capture = ForwardCapture(net, transform=lambda arguments, outputs: outputs * 0 + arguments[0].sum())
    x = torch.ones(3, 2)
    assert torch.equal(net(x), x @ net.weight.T + net.bias)  # not installed: untouched
    capture.install()
    capture.install()  # a second call adds no second hook
    with torch.no_grad():
        net(x)
    assert capture.output is None  # no gradient: ignored
    out = net(x)
    assert torch.equal(out, torch.full((3, 2), 6.0)) and capture.output is out and capture.arguments[0] is x
    with capture.paused():
        assert not torch.equal(net(2 * x), torch.full((3, 2), 12.0))
    assert capture.output is out and capture.installed
    capture.remove()
    assert not capture.installed and not torch.equal(net(x), out)


# ---------------------------------------------------------------------------------------------- gradient phases
PHASES: list = []


class _Recorder(ContinualCallback):

    def __init__(self, model, name):
        super().__init__(model)
        self.name = name

    def hyperparameters(self):
        return {"name": self.name}

    def observe_gradients(self):
        PHASES.append(("observe", self.name))

    def add_penalty_gradients(self):
        PHASES.append(("penalty", self.name))

    def project_gradients(self):
        PHASES.append(("project", self.name))


def test_every_method_projects_after_every_penalty_whatever_the_callback_order():
    module = lit_classifier(make_mlp(8, 5, 3).float())
    PHASES.clear()
    methods = [_Recorder(module, "a"), _Recorder(module, "b")]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 8), torch.randint(0, 3, (4,))), batch_size=4)
    quiet_trainer(callbacks=methods, max_epochs=1).fit(module, loader)
    assert PHASES == [("observe", "a"), ("observe", "b"), ("penalty", "a"), ("penalty", "b"), ("project", "a"), ("project", "b")]

    class Standalone(ContinualMethod):
        def project_gradients(self):
            calls.append(self.model.weight.grad.clone())

    calls: list = []
    net = nn.Linear(2, 2)
    Standalone(net).train_step(torch.optim.SGD(net.parameters(), lr=0.1), nn.functional.cross_entropy,
                               torch.ones(1, 2), torch.tensor([1]), task_id=0)
    assert len(calls) == 1 and calls[0].abs().sum() > 0  # after backward, before the step


def test_the_mean_across_ranks_of_one_process_is_the_tensor_itself():
    tensor = torch.tensor([1.5, -2.0])
    assert mean_across_ranks_(tensor) is tensor and tensor.tolist() == [1.5, -2.0]


# ---------------------------------------------------------------------------------------------- who remembers
def test_a_batch_given_to_train_step_and_add_to_memory_is_stored_once_with_a_warning_at_the_callers_line():
    from neurenix.continual.rehearsal import RehearsalMethod

    class Remembers(RehearsalMethod):
        needs_class_labels = True

        def after_optimizer_step(self, arguments, targets):
            if self._claim_step_batch(arguments[0]):
                self._remember(arguments[0], targets, self._task_ids_of(arguments[0], None))

    net = nn.Linear(2, 3)
    method = Remembers(net, memory_size=10, device=None, seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"Remembers needs class labels as targets .* got targets of shape \(4,\) and dtype torch.float32"):
        method.train_step(optimizer, nn.functional.mse_loss, x, y.float(), task_id=0)
    assert method.active_task is None and len(method.memory) == 0

    method.train_step(optimizer, nn.functional.cross_entropy, x, y, task_id=0)
    assert len(method.memory) == 4
    with pytest.warns(UserWarning, match="Remembers.add_to_memory got the tensor of inputs that train_step has just stored") as caught:
        method.add_to_memory(x, y, 0)
    assert len(method.memory) == 4 and caught[0].filename == __file__  # the caller's line, not the library's
    method.add_to_memory(x.clone(), y, 0)  # other samples (here: equal values) are welcome
    assert len(method.memory) == 8

    z = torch.randn(4, 2)  # the other order: add_to_memory first, then train_step on the same tensor
    method.add_to_memory(z, y, 0)
    with pytest.warns(UserWarning, match="Remembers.train_step got the tensor of inputs that add_to_memory has just stored"):
        method.train_step(optimizer, nn.functional.cross_entropy, z, y, task_id=0)
    assert len(method.memory) == 10 and method.memory.num_seen == 12


def test_draw_from_picks_distinct_given_slots_from_the_memorys_generator():
    memory = ReservoirMemory(capacity=10, device=CPU, seed=4)
    slots = torch.tensor([1, 3, 5, 7, 9])
    assert memory.draw_from(slots, 8) is slots  # fewer than asked: all of them
    state = memory.state_dict()["generator"]
    drawn = memory.draw_from(slots, 3)
    assert drawn.shape == (3,) and len(set(drawn.tolist())) == 3 and set(drawn.tolist()) <= set(slots.tolist())
    expected = slots[torch.randperm(5, generator=torch.Generator().manual_seed(0).set_state(state))[:3]]
    assert torch.equal(drawn, expected)


def test_batches_of_other_datasets_give_the_memory_their_own_task_ids(monkeypatch):
    # A loader over a dataset that does not promise one task id per fit: the ids are read per sample.
    x, y = torch.rand(24, 64), torch.randint(0, 5, (24,))
    t = torch.tensor([0, 1] * 12)
    model = lit_multi_head(TwoHeads())
    method = AGEM(model.model, memory_size=40, seed=0)
    given = []
    original = TaskBalancedMemory.add
    monkeypatch.setattr(TaskBalancedMemory, "add", lambda self, x, y, t, **e: given.append(t) or original(self, x, y, t, **e))
    trainer = quiet_trainer(callbacks=[method], max_epochs=1)
    trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, t), batch_size=8))
    assert len(given) == 3 and all(isinstance(ids, torch.Tensor) for ids in given)
    assert method.memory.group_sizes() == {0: 12, 1: 12}


@pytest.mark.parametrize("member_tasks, as_int", [((1, 1), True), ((0, 1), False)], ids=["one-task", "two-tasks"])
def test_a_concatenation_of_one_task_s_datasets_gives_the_memory_that_task_as_an_int(monkeypatch, member_tasks, as_int):
    from neurenix.data import ConcatTaskDataset, TaskDataset

    generator = torch.Generator().manual_seed(0)
    members = [
        TaskDataset(x, y, task_id=task, with_task_ids=True)
        for task, x, y in ((task, torch.rand(12, 64, generator=generator), torch.randint(0, 5, (12,), generator=generator)) for task in member_tasks)
    ]
    model = lit_multi_head(TwoHeads())
    method = AGEM(model.model, memory_size=40, seed=0)
    given = []
    original = TaskBalancedMemory.add
    monkeypatch.setattr(TaskBalancedMemory, "add", lambda self, x, y, t, **e: given.append(t) or original(self, x, y, t, **e))
    trainer = quiet_trainer(callbacks=[method], max_epochs=1)
    trainer.fit(model, torch.utils.data.DataLoader(ConcatTaskDataset(members), batch_size=8))
    assert len(given) == 3
    if as_int:  # no read of the batch's task ids: every sample is of task 1
        assert given == [1, 1, 1] and method.memory.group_sizes() == {1: 24}
    else:  # ids of two tasks: read per batch, each sample grouped by its own
        assert all(isinstance(ids, torch.Tensor) for ids in given)
        assert method.memory.group_sizes() == {0: 12, 1: 12}


def test_a_fit_that_fails_leaves_no_task_id_for_later_batches():
    benchmark = split_benchmark("digits", num_tasks=2, scenario="task", seed=0)
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=64)
    model = lit_multi_head(TwoHeads())
    method = AGEM(model.model, memory_size=40, seed=0)

    def failing_step(batch, batch_idx):
        raise RuntimeError("the user's step failed")

    model.training_step = failing_step
    with pytest.raises(RuntimeError, match="the user's step failed"):
        fit_sequence(quiet_trainer(callbacks=[method], max_epochs=1), model, datamodule, epochs_per_task=1)
    assert method._fit_batches_task is None  # standalone steps after it read their own task ids


class RemembersEachBatch(RehearsalMethod):
    """A rehearsal method that only offers each training batch to its memory, as A-GEM and GEM do."""

    def __init__(self, model: nn.Module, offer: str) -> None:
        super().__init__(model, 100, None, 0, offer=offer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._remember_batch(batch)


@pytest.mark.parametrize("offer, offers", [("once", 1), ("every_epoch", 3)])
def test_the_offer_option_is_the_base_s_for_every_rehearsal_method(offer, offers):
    from torch.utils.data import DataLoader, TensorDataset

    module = lit_classifier(make_mlp())
    method = RemembersEachBatch(module.net, offer)
    x = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    quiet_trainer(max_epochs=3, callbacks=[method]).fit(module, DataLoader(TensorDataset(x, torch.arange(12) % 3), batch_size=4))
    assert method.memory.num_seen == 12 * offers and len(method.memory) == 12 * offers
    with pytest.raises(ValueError, match="offer must be one of 'every_epoch', 'once'; got 'always'"):
        RemembersEachBatch(module.net, "always")


# ---------------------------------------------------------------------------------------------- non-finite samples
@pytest.fixture
def on_an_accelerator(monkeypatch):
    """add_to_memory takes its accelerator path (reads cost a synchronization there) on the CPU."""
    from neurenix.continual import _checks

    monkeypatch.setattr(_checks, "reads_cost_nothing", lambda tensor: False)


def _with_nan(x: torch.Tensor, sample: int) -> torch.Tensor:
    x = x.clone()
    x[sample, 0] = float("nan")
    return x


def test_on_the_cpu_a_non_finite_sample_is_refused_at_once_and_nothing_is_stored():
    method = ExperienceReplay(make_mlp(), memory_size=20, seed=0)
    x, y = next(_step_batches(0))
    with pytest.raises(ValueError, match=r"inputs must hold finite values, got NaN or infinity in 1 of 8 samples \(the first: sample 2\)"):
        method.add_to_memory(_with_nan(x, 2), y, 0)
    assert len(method.memory) == 0 and method.memory.num_seen == 0


def test_on_an_accelerator_non_finite_samples_are_flagged_without_a_read_and_raised_where_the_host_syncs(on_an_accelerator):
    model = make_mlp()
    method = ExperienceReplay(model, memory_size=40, seed=0)
    batches = list(_step_batches(0, steps=5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches[:2]:
        method.train_step(optimizer, nn.functional.cross_entropy, x, y, 0)
        method.add_to_memory(x, y, 0)
    clean = saved_and_loaded(method.state_dict())
    with host_reads() as reads:  # no check reads the device: the bad samples are stored, flagged
        method.add_to_memory(_with_nan(batches[2][0], 5), *batches[2][1:], 0)
        method.add_to_memory(*batches[3], 0)
        method.add_to_memory(batches[4][0].index_fill(0, torch.tensor([7]), float("inf")), batches[4][1], 0)
    assert not reads, str(reads)
    assert len(method.memory) == 40 and not torch.isfinite(method.memory.state_dict()["inputs"]).all()

    message = (r"ExperienceReplay.add_to_memory got NaN or infinite values in 2 calls on cpu, the first being call 3 "
               r"of task 0 \(checked on the device .*\): the memory holds those samples and would replay them\. .*"
               r"resume from the last checkpoint")
    with pytest.raises(ValueError, match=message):
        method.state_dict()  # no state holding them is returned
    with pytest.raises(ValueError, match=message):
        method.register_task(1)  # the task's end: it is not consolidated
    assert method.active_task == 0 and method.finished_tasks == []

    method.load_state_dict(clean)  # resumed from the last clean state: the flag goes with the memory
    assert torch.equal(method.state_dict()["memory"]["inputs"], clean["memory"]["inputs"])
    method.register_task(1)
    assert method.finished_tasks == [0]


def test_under_a_trainer_no_checkpoint_holds_a_memory_with_non_finite_samples(on_an_accelerator, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    module = lit_classifier(make_mlp())
    method = ExperienceReplay(module.net, memory_size=40, seed=0)
    plain_step = module.training_step

    def step_offering_extra_samples(batch, batch_idx):
        x = batch[0] + 1  # samples it does not train on
        method.add_to_memory(_with_nan(x, 0) if batch_idx == 2 else x, batch[1], 0)
        return plain_step(batch, batch_idx)

    module.training_step = step_offering_extra_samples
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(callbacks=[method, checkpoints], max_epochs=1, enable_checkpointing=True)
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="ExperienceReplay.add_to_memory got NaN or infinite values in 1 call on cpu, the first being call 3 of task 0"):
        trainer.fit(module, DataLoader(TensorDataset(x, torch.arange(32) % 3), batch_size=8))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step=1.ckpt", "step=2.ckpt"]  # written before the NaN
    last = torch.load(tmp_path / "step=2.ckpt", weights_only=True)
    memory = last["callbacks"][method.state_key]["memory"]
    assert memory["inputs"].shape[0] == 32 and torch.isfinite(memory["inputs"]).all()


def test_under_ddp_inside_a_fit_every_rank_raises_for_the_rank_that_got_non_finite_samples(on_an_accelerator, monkeypatch):
    """Ranks reach a checkpoint's state_dict together: one rank raising alone would leave the
    others waiting in its collectives. Here this process (rank 0) is clean and rank 1 is not."""
    from neurenix.continual import rehearsal

    method = ExperienceReplay(make_mlp(), memory_size=20, seed=0)
    x, y = next(_step_batches(0))
    method.add_to_memory(x, y, 0)
    gathered = []

    def all_gather(value):
        gathered.append(value)
        return [value, (2, 4, 1, "cuda")]  # rank 1: two bad calls, the first its call 4 of task 1

    monkeypatch.setattr(rehearsal, "rank_and_world_size", lambda: (0, 2))
    monkeypatch.setattr(rehearsal, "all_gather_objects", all_gather)
    method.state_dict()  # outside a fit: each process checks its own record
    assert gathered == []
    method._ranks_check_together = True  # as on_fit_start sets it
    with pytest.raises(ValueError, match=r"add_to_memory got NaN or infinite values in 2 calls on cuda on rank 1, the first being call 4 of task 1"):
        method.state_dict()
    assert gathered == [None]  # this rank's record: clean
