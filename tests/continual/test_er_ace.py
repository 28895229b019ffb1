"""ERACE: the asymmetric loss by hand, Lightning against train_step, combinations, checkpoints,
precisions and bad input."""

from __future__ import annotations

import copy
import math
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import (
    EWC,
    ContinualLossMixin,
    ExperienceReplay,
    KnowledgeDistillation,
)
from neurenix.continual.er_ace import ERACE
from tests.helpers import Recorder, lit_classifier, make_mlp, quiet_trainer, saved_and_loaded

LOWEST = torch.finfo(torch.float64).min


def class_task(classes: tuple[int, ...], samples: int = 24, *, seed: int, dtype=torch.float64) -> TensorDataset:
    """Inputs ``(samples, 6)`` and labels drawn from ``classes`` (a class-incremental task)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=generator, dtype=dtype)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (samples,), generator=generator)]
    return TensorDataset(x, y)


TASKS = {0: class_task((0, 1), seed=1), 1: class_task((2, 3), seed=2)}


def batches(dataset: TensorDataset, batch_size: int = 8) -> list:
    return list(DataLoader(dataset, batch_size=batch_size, shuffle=False))


def linear(weight: list, bias: list) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight)).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return layer


def recording_loss(log: list):
    def loss_fn(outputs, targets):
        log.append(outputs.detach().clone())
        return F.cross_entropy(outputs, targets)

    return loss_fn


def params(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_params_close(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q.to(p.dtype), atol=atol, rtol=0), name


def assert_same_state(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.allclose(a.double(), b.double(), atol=1e-6, rtol=0), (a, b)
    else:
        assert a == b


# ------------------------------------------------------------------------------------ the loss by hand


def test_one_step_by_hand_masks_absent_classes_and_replays_over_seen_ones():
    """4 units, zero weights (every logit 0), so each softmax is uniform over the units it keeps.

    Memory: x=[1,1] label 1, x=[2,0] label 0. Incoming: x=[1,0] label 0, x=[0,1] label 2.
    Incoming term over units {0, 2}: p = 1/2 each, CE = ln 2; per-logit gradient (p - onehot)/2:
      sample [1,0] (label 0): dz0 = -1/4, dz2 = +1/4;  sample [0,1] (label 2): dz0 = +1/4, dz2 = -1/4
      -> dW0 = [-1/4, 1/4], dW2 = [1/4, -1/4], dW1 = dW3 = 0, db = 0.
    Replay term over the seen units {0, 1, 2}: p = 1/3 each, CE = ln 3; gradient (p - onehot)/2:
      [1,1] (label 1): dz = [1/6, -1/3, 1/6];  [2,0] (label 0): dz = [-1/3, 1/6, 1/6]
      -> dW0 = [-1/2, 1/6], dW1 = [0, -1/3], dW2 = [1/2, 1/6], db = [-1/6, -1/6, 1/3, 0].
    Loss ln 2 + ln 3 = ln 6; SGD at lr 1 moves every parameter by minus the summed gradient.
    """
    model = linear([[0.0, 0.0]] * 4, [0.0] * 4)
    ace = ERACE(model, memory_size=10, replay_ratio=1.0, seed=0)  # 2 incoming -> 2 replayed: all of memory
    ace.add_to_memory(torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64), torch.tensor([1, 0]), task_id=0)
    seen_by_loss_fn: list = []

    loss = ace.train_step(
        torch.optim.SGD(model.parameters(), lr=1.0), recording_loss(seen_by_loss_fn),
        torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.tensor([0, 2]), task_id=0,
    )  # fmt: skip

    assert loss.item() == pytest.approx(math.log(6), abs=1e-12)
    (masked,) = seen_by_loss_fn  # the user's loss sees the absent classes' units at the lowest value
    assert torch.equal(masked, torch.tensor([[0.0, LOWEST, 0.0, LOWEST]] * 2, dtype=torch.float64))
    expected_weight = [[3 / 4, -5 / 12], [0.0, 1 / 3], [-3 / 4, 1 / 12], [0.0, 0.0]]
    assert torch.allclose(model.weight, torch.tensor(expected_weight, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(model.bias, torch.tensor([1 / 6, 1 / 6, -1 / 3, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    # Unit 1 (absent from the batch) moved by the replay term's -dW1 alone; unit 3 (never seen) not at all.
    assert ace.seen_classes == [0, 1, 2]
    assert (len(ace.memory), ace.memory.num_seen) == (4, 4)  # the step's batch was offered after the replay


def test_one_step_against_softmax_restricted_by_hand_on_random_weights():
    """Cross-entropy restricted to units S written out: -z_y + log Σ_{c∈S} exp z_c, batch mean."""
    torch.manual_seed(0)
    model = nn.Linear(3, 5).double()
    reference = copy.deepcopy(model)
    ace = ERACE(model, memory_size=10, replay_ratio=1.0, seed=0)
    x_old, y_old = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    x_new, y_new = torch.randn(4, 3, dtype=torch.float64), torch.tensor([3, 2, 3, 3])
    ace.add_to_memory(x_old, y_old, task_id=0)
    loss = ace.train_step(torch.optim.SGD(model.parameters(), lr=0.5), F.cross_entropy, x_new, y_new, task_id=1)

    def restricted_ce(z: torch.Tensor, y: torch.Tensor, units: list[int]) -> torch.Tensor:
        return (-z.gather(1, y[:, None]).squeeze(1) + torch.logsumexp(z[:, units], dim=1)).mean()

    # Incoming over {2, 3} (present); replay (all 3 stored samples: 4 wanted) over {0, 1, 2, 3} (seen).
    expected = restricted_ce(reference(x_new), y_new, [2, 3]) + restricted_ce(reference(x_old), y_old, [0, 1, 2, 3])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    grads = torch.autograd.grad(expected, list(reference.parameters()))
    for p, q, g in zip(model.parameters(), reference.parameters(), grads):
        assert torch.allclose(p, q - 0.5 * g, atol=1e-12, rtol=0)
    assert torch.equal(model.weight[4], reference.weight[4])  # unit 4: never seen, never moved


def test_with_an_empty_memory_the_step_is_the_masked_incoming_term_alone():
    recorder = Recorder(make_mlp(classes=4))
    before = copy.deepcopy(recorder.net)
    ace = ERACE(recorder, memory_size=10, seed=0)
    x, y = batches(TASKS[0])[0]
    loss = ace.train_step(torch.optim.SGD(recorder.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=0)
    assert [len(batch) for batch in recorder.inputs] == [8]  # no replay forward
    expected = F.cross_entropy(before(x)[:, [0, 1]], y)  # only labels 0 and 1 present: softmax over them
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)


def test_a_batch_of_one_class_has_zero_incoming_loss_and_gradient():
    model = make_mlp(classes=4)
    before = params(model)
    ace = ERACE(model, memory_size=10, seed=0)
    x = torch.randn(5, 6, dtype=torch.float64)
    loss = ace.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, x, torch.full((5,), 2), task_id=0)
    assert loss.item() == 0.0  # softmax over one unit is 1
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("replay_ratio, replayed", [(0.5, 4), (0.3, 2), (0.0, 0), (3.0, 8)])  # 3.0: 24 wanted, 8 stored
def test_the_replayed_batch_comes_from_memory_before_the_step_inserts_its_own(replay_ratio, replayed):
    recorder = Recorder(make_mlp(classes=4))
    ace = ERACE(recorder, memory_size=20, replay_ratio=replay_ratio, seed=3)
    optimizer = torch.optim.SGD(recorder.parameters(), lr=0.1)
    (x1, y1), (x2, y2) = batches(TASKS[0])[:2]
    ace.train_step(optimizer, F.cross_entropy, x1, y1, task_id=0)
    recorder.inputs.clear()
    ace.train_step(optimizer, F.cross_entropy, x2, y2, task_id=0)

    assert torch.equal(recorder.inputs[0], x2)
    replay_forwards = recorder.inputs[1:]
    assert [len(batch) for batch in replay_forwards] == ([replayed] if replayed else [])
    for batch in replay_forwards:  # distinct samples of the first batch only
        matches = (batch[:, None, :] == x1[None]).all(-1)
        assert bool((matches.sum(1) == 1).all()) and len(set(matches.int().argmax(1).tolist())) == replayed
    assert ace.memory.num_seen == 16


def test_a_multi_head_model_replays_each_sample_with_its_stored_task_id():
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.calls = nn.Linear(6, 4).double(), []

        def forward(self, x, task_ids):
            self.calls.append(task_ids.clone())
            return self.body(x) + task_ids[:, None].double()

    model = Heads()
    ace = ERACE(model, memory_size=8, replay_ratio=1.0, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for task_id, batch in ((4, batches(TASKS[0])[0]), (7, batches(TASKS[1])[0])):
        ace.train_step(optimizer, F.cross_entropy, *batch, task_id=task_id)
    incoming, replayed = model.calls[-2:]
    assert incoming.tolist() == [7] * 8 and replayed.tolist() == [4] * 8  # memory held task 4's batch


# ------------------------------------------------------------------------------------ Lightning


def standalone_run(net: nn.Module, **kwargs) -> ERACE:
    ace = ERACE(net, **kwargs)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for task_id, data in TASKS.items():
        for x, y in batches(data):
            ace.train_step(optimizer, F.cross_entropy, x, y, task_id=task_id)
    return ace


def lightning_run(net: nn.Module, *extra, **kwargs) -> ERACE:
    ace = ERACE(net, **kwargs)
    for data in TASKS.values():
        quiet_trainer(callbacks=[*extra, ace]).fit(lit_classifier(net, lr=0.1), DataLoader(data, batch_size=8))
    return ace


def test_lightning_equals_train_step_over_two_tasks():
    settings = dict(memory_size=10, replay_ratio=0.5, seed=11)
    standalone_net, lightning_net = make_mlp(classes=4, seed=5), make_mlp(classes=4, seed=5)
    ours, theirs = lightning_run(lightning_net, **settings), standalone_run(standalone_net, **settings)
    assert_params_close(lightning_net, standalone_net)
    assert ours.finished_tasks == [0, 1] and theirs.finished_tasks == [0]  # train_step ends a task at the next
    assert_same_state(ours.memory.state_dict(), theirs.memory.state_dict())
    assert ours.seen_classes == theirs.seen_classes == [0, 1, 2, 3]
    assert ours.memory.num_seen == 48 and len(ours.memory) == 10


class MaskedLogitsModule(ContinualLossMixin, L.LightningModule):
    """Records the logits its training_step gets from the model."""

    def __init__(self, calls_model: bool = True) -> None:
        super().__init__()
        self.net, self.calls_model, self.logits = make_mlp(classes=4), calls_model, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if not self.calls_model:
            return (self.net[0].weight ** 2).sum()
        logits = self.net(x)
        self.logits.append((y.clone(), logits.detach().clone()))
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_under_lightning_the_module_loss_sees_the_absent_classes_masked():
    module = MaskedLogitsModule()
    ace = ERACE(module.net, memory_size=10, seed=0)
    data = TensorDataset(torch.randn(16, 6, dtype=torch.float64), torch.tensor([0, 2] * 4 + [1, 3] * 4))
    quiet_trainer(callbacks=[ace]).fit(module, DataLoader(data, batch_size=8))
    (y1, first), (y2, second) = module.logits
    assert set(y1.tolist()) == {0, 2} and set(y2.tolist()) == {1, 3}
    assert bool((first[:, [1, 3]] == LOWEST).all()) and bool((first[:, [0, 2]] > LOWEST).all())
    assert bool((second[:, [0, 2]] == LOWEST).all()) and bool((second[:, [1, 3]] > LOWEST).all())
    with torch.no_grad():  # after training (capture removed) the model's outputs are its own again
        assert bool((module.net(data.tensors[0]) > LOWEST).all())


def test_a_training_step_that_never_calls_the_model_is_refused():
    module = MaskedLogitsModule(calls_model=False)
    with pytest.raises(RuntimeError, match=r"ERACE saw no forward of its model \(Sequential\) in training_step"):
        quiet_trainer(callbacks=[ERACE(module.net, memory_size=10, seed=0)]).fit(module, DataLoader(TASKS[0], batch_size=8))


def test_lightning_without_the_mixin_is_refused_at_setup():
    module = lit_classifier(make_mlp(classes=4), mixin=False)
    with pytest.raises(TypeError, match=r"ERACE changes the training batch or loss.*ContinualLossMixin"):
        quiet_trainer(callbacks=[ERACE(module.net, seed=0)]).fit(module, DataLoader(TASKS[0], batch_size=8))


# ------------------------------------------------------------------------------------ combinations


@pytest.mark.parametrize("order", ["erace_first", "distillation_first"])
def test_knowledge_distillation_on_the_same_trainer_is_refused_in_setup(order):
    net = make_mlp(classes=4)
    before = params(net)
    methods = [ERACE(net, seed=0), KnowledgeDistillation(net)]
    if order == "distillation_first":
        methods.reverse()
    with pytest.raises(ValueError, match=r"^ERACE and KnowledgeDistillation are on one Trainer: ERACE masks the outputs"):
        quiet_trainer(callbacks=methods).fit(lit_classifier(net), DataLoader(TASKS[0], batch_size=8))
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())
    assert len(methods[0 if order == "erace_first" else 1].memory) == 0


def test_another_rehearsal_method_on_the_same_trainer_is_refused_in_setup():
    net = make_mlp(classes=4)
    with pytest.raises(ValueError, match=r"^ERACE and ExperienceReplay are on one Trainer: each keeps its own memory"):
        quiet_trainer(callbacks=[ERACE(net, seed=0), ExperienceReplay(net)]).fit(lit_classifier(net), DataLoader(TASKS[0], batch_size=8))


def test_with_ewc_on_one_trainer_both_act():
    settings = dict(memory_size=10, replay_ratio=0.5, seed=11)
    alone, combined = make_mlp(classes=4, seed=5), make_mlp(classes=4, seed=5)
    lightning_run(alone, **settings)
    ewc = EWC(combined, importance=50.0, fisher_sample_size=16, seed=0)
    ace = lightning_run(combined, ewc, **settings)
    assert ace.finished_tasks == ewc.finished_tasks == [0, 1]
    assert ewc.get_ewc_loss().item() > 0  # task 0's penalty was active during task 1
    # The penalty's gradient changed task 1's steps: the runs part by more than rounding.
    assert max((p - q).abs().max().item() for p, q in zip(alone.parameters(), combined.parameters())) > 1e-3
    # EWC (first on the Trainer) took task 0's Fisher from the model's own outputs, not masked ones:
    # masked, the units of classes 2 and 3 (absent from task 0) would have probability 0 and Fisher 0.
    fisher = ewc.state_dict()["tasks"][0]["fisher"]["2.weight"]
    assert bool((fisher[2:].sum(1) > 0).all())


# ------------------------------------------------------------------------------------ checkpoints


def test_state_round_trip_continues_training_identically():
    model = make_mlp(classes=4, seed=2)
    ace = ERACE(model, memory_size=6, replay_ratio=1.0, seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(TASKS[0], 4) + batches(TASKS[1], 4)
    for x, y in data[:5]:
        ace.train_step(optimizer, F.cross_entropy, x, y, task_id=0)

    twin = copy.deepcopy(model)
    restored = ERACE(twin, memory_size=6, replay_ratio=1.0, seed=77)  # another seed: the state must win
    restored.load_state_dict(saved_and_loaded(ace.state_dict()))
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    assert restored.seen_classes == ace.seen_classes == [0, 1]

    for step, (x, y) in enumerate(data[5:], start=5):
        task_id = 0 if step < 6 else 1  # both tasks: the task boundary is crossed after resuming
        for method, opt in ((ace, optimizer), (restored, twin_optimizer)):
            method.train_step(opt, F.cross_entropy, x, y, task_id=task_id)
    assert_params_close(model, twin, atol=0)
    assert_same_state(restored.state_dict(), ace.state_dict())
    assert torch.equal(restored.memory.draw(6), ace.memory.draw(6))  # the generators go on alike


class _Probe(L.Callback):
    """The method's state at the end of task 1's first epoch."""

    def __init__(self, ace: ERACE) -> None:
        self.ace, self.seen = ace, None

    def on_train_epoch_end(self, trainer, pl_module):
        if self.ace.finished_tasks == [0] and trainer.current_epoch == 0:
            self.seen = copy.deepcopy(self.ace.state_dict())


def test_a_lightning_checkpoint_in_the_middle_of_task_1_resumes_to_the_uninterrupted_run(tmp_path):
    def run(net, ace, *callbacks, max_epochs=2, **kwargs):
        quiet_trainer(callbacks=[ace]).fit(lit_classifier(net), DataLoader(TASKS[0], batch_size=8))
        quiet_trainer(callbacks=[ace, *callbacks], max_epochs=max_epochs, **kwargs).fit(
            lit_classifier(net), DataLoader(TASKS[1], batch_size=8)
        )

    settings = dict(memory_size=10, replay_ratio=0.5)
    net = make_mlp(classes=4, seed=7)
    ace = ERACE(net, seed=100, **settings)
    probe = _Probe(ace)
    run(net, ace, probe)

    stopped = make_mlp(classes=4, seed=7)
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1)
    run(stopped, ERACE(stopped, seed=100, **settings), saver, max_epochs=1, enable_checkpointing=True)
    (checkpoint,) = tmp_path.glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]
    assert_same_state(saved[ace.state_key], probe.seen)

    resumed_net = make_mlp(classes=4, seed=98)  # other weights and seed: the checkpoint must win
    resumed = ERACE(resumed_net, seed=777, **settings)
    quiet_trainer(callbacks=[resumed], max_epochs=2).fit(lit_classifier(resumed_net), DataLoader(TASKS[1], batch_size=8), ckpt_path=checkpoint)
    assert_params_close(resumed_net, net)
    assert resumed.finished_tasks == ace.finished_tasks == [0, 1]
    assert_same_state(resumed.state_dict(), ace.state_dict())


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
def test_a_checkpoint_saved_with_other_hyperparameters_is_refused_before_any_state_loads(tmp_path):
    net = make_mlp(classes=4)
    trainer = quiet_trainer(callbacks=[ERACE(net, memory_size=10, replay_ratio=0.5, seed=0)])
    trainer.fit(lit_classifier(net), DataLoader(TASKS[0], batch_size=8))
    trainer.save_checkpoint(tmp_path / "task0.ckpt")

    other = ERACE(make_mlp(classes=4), memory_size=20, replay_ratio=0.5, seed=0)
    saved, wanted = "ERACE{'memory_size': 10, 'replay_ratio': 0.5}", "ERACE{'memory_size': 20, 'replay_ratio': 0.5}"
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint holds state for {saved}, not for {wanted}: build")):
        quiet_trainer(callbacks=[other], max_epochs=2).fit(lit_classifier(other.model), DataLoader(TASKS[0], batch_size=8), ckpt_path=tmp_path / "task0.ckpt")
    assert (other.finished_tasks, len(other.memory), other.seen_classes) == ([], 0, [])


def test_seen_classes_saved_by_more_processes_than_resume_are_pooled():
    ace = ERACE(make_mlp(classes=4), memory_size=10, seed=0)
    per_rank = [torch.tensor([True, False, True]), torch.tensor([False, True, False, True])]
    ace.load_state_dict({"seen_classes": per_rank[0], "seen_classes_per_rank": per_rank})
    assert ace.seen_classes == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------ precision


class _LossDtype(L.Callback):
    def __init__(self) -> None:
        self.dtypes: list = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.dtypes.append(loss.dtype)


@pytest.mark.parametrize(
    "precision, tolerance",
    # About 4x the largest difference from the float32 run measured over these 6 steps (1.6e-4
    # bf16-mixed, whose parameters stay float32; 2.6e-3 bf16-true, 8 mantissa bits; 5.0e-4 16-true).
    [("bf16-mixed", 1e-3), ("bf16-true", 1e-2), ("16-true", 2e-3)],
)
def test_lightning_precisions_train_close_to_32_bit_and_score_replay_in_float32(precision, tolerance):
    settings = dict(memory_size=10, replay_ratio=0.5, seed=11)
    tasks = {task: TensorDataset(data.tensors[0].float(), data.tensors[1]) for task, data in TASKS.items()}
    results = {}
    for run in ("32-true", precision):
        net = make_mlp(classes=4, seed=5).float()
        ace, dtypes = ERACE(net, **settings), _LossDtype()
        for data in tasks.values():
            quiet_trainer(callbacks=[ace, dtypes], precision=run).fit(lit_classifier(net), DataLoader(data, batch_size=8))
        results[run] = (net, ace, dtypes.dtypes)
    (reference, reference_ace, _), (net, ace, loss_dtypes) = results["32-true"], results[precision]
    assert_params_close(net, reference, atol=tolerance)
    assert ace.seen_classes == reference_ace.seen_classes == [0, 1, 2, 3]
    assert ace.state_dict()["seen_classes"].dtype == torch.bool
    # From the second step on the replay term (float32) joins the loss; the first step has none.
    assert set(loss_dtypes[1:]) == {torch.float32} and len(loss_dtypes) == 6
    stored = ace.memory.state_dict()["inputs"].dtype
    assert stored == (torch.float32 if precision == "bf16-mixed" else next(net.parameters()).dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_16_mixed_on_cuda_trains_close_to_32_bit():
    settings = dict(memory_size=10, replay_ratio=0.5, seed=11)
    tasks = [TensorDataset(data.tensors[0].float(), data.tensors[1]) for data in TASKS.values()]
    nets = {}
    for precision in ("32-true", "16-mixed"):
        net = make_mlp(classes=4, seed=5).float()
        ace = ERACE(net, **settings)
        for data in tasks:
            trainer = quiet_trainer(callbacks=[ace], precision=precision, accelerator="gpu", devices=1, deterministic=False)
            trainer.fit(lit_classifier(net), DataLoader(data, batch_size=8))
        assert ace.memory.device.type == "cuda" and ace.state_dict()["seen_classes"].device.type == "cuda"
        nets[precision] = net
    assert_params_close(nets["16-mixed"], nets["32-true"], atol=0.01)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"memory_size": -1}, ValueError, "memory_size must be >= 0, got -1"),
        ({"memory_size": 10.0}, TypeError, "memory_size must be an int, got float: 10.0"),
        ({"memory_size": True}, TypeError, "memory_size must be an int, got bool"),
        ({"replay_ratio": -0.5}, ValueError, "replay_ratio must be >= 0.0, got -0.5"),
        ({"replay_ratio": float("nan")}, ValueError, "replay_ratio must be finite, got nan"),
        ({"replay_ratio": "1"}, TypeError, "replay_ratio must be a real number, got str"),
        ({"seed": -2}, ValueError, "seed must be >= 0, got -2"),
        ({"device": 3}, TypeError, "device must be a torch.device, a string or None, got int: 3"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ERACE(make_mlp(), **kwargs)


def test_documented_defaults():
    ace = ERACE(make_mlp())
    assert (ace.memory_size, ace.replay_ratio, len(ace.memory), ace.seen_classes) == (1000, 1.0, 0, [])
    assert ace.hyperparameters() == {"memory_size": 1000, "replay_ratio": 1.0}
    assert ERACE.needs_loss_mixin and ERACE.needs_class_labels


NOT_LABELS = [
    (torch.rand(4), ("needs class labels as targets (a 1-D integer tensor: its memory terms are cross-entropies), "
                     "got targets of shape (4,) and dtype torch.float32")),
    (torch.zeros(4, 2, dtype=torch.long), "got targets of shape (4, 2) and dtype torch.int64"),
]  # fmt: skip


@pytest.mark.parametrize("targets, message", NOT_LABELS)
@pytest.mark.parametrize("entry", ["train_step", "add_to_memory"])
def test_targets_that_are_not_class_labels_are_refused_before_any_change(entry, targets, message):
    model = make_mlp(classes=4)
    before = params(model)
    ace = ERACE(model, memory_size=10, seed=0)
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(message)):
        if entry == "train_step":
            ace.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, x, targets, task_id=0)
        else:
            ace.add_to_memory(x, targets, task_id=0)
    assert (ace.active_task, len(ace.memory), ace.memory.num_seen, ace.seen_classes) == (None, 0, 0, [])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_add_to_memory_refuses_negative_labels_before_any_change():
    ace = ERACE(make_mlp(classes=4), memory_size=10, seed=0)
    with pytest.raises(ValueError, match=r"targets must be class labels >= 0, got a label of -1"):
        ace.add_to_memory(torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, -1, 2]), task_id=0)
    assert (len(ace.memory), ace.memory.num_seen, ace.seen_classes) == (0, 0, [])


@pytest.mark.parametrize("first", ["train_step", "add_to_memory"])
def test_a_batch_given_to_both_train_step_and_add_to_memory_is_stored_once_with_a_warning(first):
    """The loop of the continual-learning API's replay tutorial calls add_to_memory, then train_step."""
    model = make_mlp(classes=4)
    ace = ERACE(model, memory_size=10, seed=0)
    x, y = batches(TASKS[0])[0]
    calls = {
        "train_step": lambda: ace.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=0),
        "add_to_memory": lambda: ace.add_to_memory(x, y, task_id=0),
    }
    second = "add_to_memory" if first == "train_step" else "train_step"
    calls[first]()
    message = f"ERACE.{second} got the tensor of inputs that {first} has just stored: it is not stored twice"
    with pytest.warns(UserWarning, match=re.escape(message)) as warned:
        calls[second]()
    assert [w.filename for w in warned] == [__file__]  # pointed at the caller's line
    assert (len(ace.memory), ace.memory.num_seen, ace.seen_classes) == (8, 8, [0, 1])
    calls[first]()  # a later offer of the same tensor is a new one
    assert ace.memory.num_seen == 16


def test_a_lightning_fit_whose_targets_are_not_labels_is_refused_at_its_first_batch():
    net = make_mlp(classes=4)
    before = params(net)
    ace = ERACE(net, memory_size=10, seed=0)
    data = TensorDataset(torch.randn(16, 6, dtype=torch.float64), torch.rand(16, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("ERACE needs class labels as targets")):
        quiet_trainer(callbacks=[ace]).fit(lit_classifier(net), DataLoader(data, batch_size=8))
    assert (len(ace.memory), ace.seen_classes) == (0, [])
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())


def test_with_selection_the_replayed_samples_are_the_herded_exemplars_of_the_finished_task():
    from tests.continual.test_dark_replay import herded_by_hand, rows_of

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    ace = ERACE(net, memory_size=4, selection="herding", feature_extractor="1", seed=0)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=generator, dtype=torch.float64), torch.arange(16) % 2
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    ace.register_task(0, DataLoader(TensorDataset(x, y), batch_size=8))
    for start in (0, 8):
        ace.train_step(optimizer, F.cross_entropy, x[start:start + 8], y[start:start + 8], 0)
    assert len(ace.memory) == 0  # the first task trains without replay
    expected = herded_by_hand(net, x, y, per_class=2)
    new_x, new_y = torch.randn(4, 4, generator=generator, dtype=torch.float64), torch.tensor([2, 3, 2, 3])
    ace.train_step(optimizer, F.cross_entropy, new_x, new_y, 1)  # ends task 0, then replays its exemplars
    assert sorted(rows_of(ace.memory.state_dict()["inputs"], x)) == sorted(expected)
    assert ace.seen_classes == [0, 1, 2, 3] and len(ace.memory) == 4  # task 1's batch is not stored
