"""The Lightning door: penalties reach the gradient as if they were part of the loss, under
accumulation, clipping and bf16; methods combine; the standalone path gives the same result."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import EWC, MAS, ExperienceReplay, L2Regularization, RWalk, SynapticIntelligence
from tests.helpers import lit_classifier, loader, make_mlp, make_task, quiet_trainer


def _float_task(seed: int, samples: int = 48) -> TensorDataset:
    x, y = make_task(samples=samples, seed=seed).tensors
    return TensorDataset(x.float(), y)


def _fit(module: L.LightningModule, callbacks: list, dataset: TensorDataset, **trainer_kwargs) -> L.Trainer:
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, DataLoader(dataset, batch_size=8, shuffle=False))
    return trainer


def _reference_module(net: nn.Module, penalty_of) -> L.LightningModule:
    """A plain LightningModule whose training_step returns task loss + penalty (autograd)."""

    class Reference(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y) + penalty_of(self.net)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Reference()


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        {},
        {"accumulate_grad_batches": 3},
        {"gradient_clip_val": 0.05},
        {"precision": "bf16-mixed"},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5, "precision": "bf16-mixed"},
    ],
    ids=["plain", "accumulate", "clip", "bf16", "all"],
)
@pytest.mark.parametrize("method_class", [EWC, L2Regularization])
def test_closed_form_penalty_equals_penalty_in_the_loss(method_class, trainer_kwargs):
    task_1, task_2 = _float_task(1), _float_task(2)
    net = make_mlp(seed=3).float()
    method = method_class(net, importance=5.0)
    _fit(lit_classifier(net, lr=0.1), [method], task_1)  # task 0: consolidated at its end
    assert method.finished_tasks == [0] and method.has_penalty

    # Reference: the same consolidated penalty, but added to the loss and back-propagated.
    reference_net = copy.deepcopy(net)
    frozen = copy.deepcopy(method)
    frozen.model = reference_net
    frozen._bind_parameters()

    def penalty_of(_net: nn.Module) -> torch.Tensor:
        return frozen.penalty()

    _fit(_reference_module(reference_net, penalty_of), [], task_2, max_epochs=2, **trainer_kwargs)
    _fit(lit_classifier(net, lr=0.1), [method], task_2, max_epochs=2, **trainer_kwargs)

    tolerance = 1e-3 if "precision" in trainer_kwargs else 1e-6
    for (name, ours), theirs in zip(net.named_parameters(), reference_net.parameters()):
        assert torch.allclose(ours, theirs, atol=tolerance, rtol=0), name
    assert not torch.allclose(net[0].weight, frozen._anchor["0.weight"])  # training did move


def test_ewc_and_replay_on_one_trainer_equal_the_standalone_path():
    tasks = [_float_task(1), _float_task(2)]
    net = make_mlp(seed=4).float()
    standalone_net = copy.deepcopy(net)

    ewc = EWC(net, importance=50.0, fisher_sample_size=20, seed=11)
    replay = ExperienceReplay(net, memory_size=12, replay_ratio=0.5, seed=12)
    for dataset in tasks:
        _fit(lit_classifier(net, lr=0.1), [ewc, replay], dataset)

    # The same run written against the API document's standalone methods.
    s_ewc = EWC(standalone_net, importance=50.0, fisher_sample_size=20, seed=11)
    s_replay = ExperienceReplay(standalone_net, memory_size=12, replay_ratio=0.5, seed=12)
    optimizer = torch.optim.SGD(standalone_net.parameters(), lr=0.1)
    for task_id, dataset in enumerate(tasks):
        loader = DataLoader(dataset, batch_size=8, shuffle=False)
        for x, y in loader:
            optimizer.zero_grad()
            if len(s_replay.memory):
                replayed = s_replay.get_replay_batch(s_replay.replay_count(x.shape[0]))
                x_all, y_all = torch.cat([x, replayed.inputs]), torch.cat([y, replayed.targets])
            else:
                x_all, y_all = x, y
            loss = nn.functional.cross_entropy(standalone_net(x_all), y_all) + s_ewc.get_ewc_loss()
            loss.backward()
            optimizer.step()
            s_replay.add_to_memory(x, y, task_id=task_id)
        s_ewc.register_task(task_id, dataloader=loader)  # after training: consolidates now

    for (name, ours), theirs in zip(net.named_parameters(), standalone_net.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), name
    assert torch.allclose(ewc.get_ewc_loss(), s_ewc.get_ewc_loss(), atol=1e-7)
    assert torch.equal(replay.memory.state_dict()["inputs"], s_replay.memory.state_dict()["inputs"])
    assert ewc.finished_tasks == s_ewc.finished_tasks == [0, 1]


def test_task_ids_come_from_the_datamodule_when_it_has_them():
    class Sequence(L.LightningDataModule):
        def __init__(self, current_task: int) -> None:
            super().__init__()
            self.current_task = current_task

        def train_dataloader(self):
            return DataLoader(_float_task(self.current_task), batch_size=8)

    net = make_mlp().float()
    l2 = L2Regularization(net)
    for task in (3, 7):
        quiet_trainer(callbacks=[l2]).fit(lit_classifier(net), datamodule=Sequence(task))
    assert l2.finished_tasks == [3, 7]


def test_a_model_outside_the_lightning_module_is_rejected():
    l2 = L2Regularization(make_mlp().float())
    with pytest.raises(ValueError, match="not part of the LightningModule"):
        _fit(lit_classifier(make_mlp().float()), [l2], _float_task(1))


def test_penalty_skips_frozen_parameters_and_the_frozen_ones_stay_put():
    net = make_mlp(seed=5).float()
    ewc = EWC(net, importance=100.0)
    _fit(lit_classifier(net), [ewc], _float_task(1))
    net[0].requires_grad_(False)
    frozen_before = net[0].weight.detach().clone()
    _fit(lit_classifier(net), [ewc], _float_task(2))
    assert torch.equal(net[0].weight, frozen_before)
    assert net[0].weight.grad is None


def test_si_reads_the_unregularized_gradient_whatever_the_callback_order():
    """SI after EWC in the callback list must still see the task loss's gradient alone."""
    results = []
    for order in ("si_first", "ewc_first"):
        net = make_mlp(seed=6).float()
        si, ewc = SynapticIntelligence(net, importance=1.0), EWC(net, importance=1e3, seed=1)
        callbacks = [si, ewc] if order == "si_first" else [ewc, si]
        for seed in (1, 2):
            _fit(lit_classifier(net), callbacks, _float_task(seed))
        results.append((si.big_omega, [p.detach().clone() for p in net.parameters()]))
    (omega_a, params_a), (omega_b, params_b) = results
    for name in omega_a:
        assert torch.allclose(omega_a[name], omega_b[name], atol=1e-7, rtol=1e-5), name
    for a, b in zip(params_a, params_b):
        assert torch.allclose(a, b, atol=1e-7)


# ---------------------------------------------------------------------------- mistakes caught at once
class _DictBatches(torch.utils.data.Dataset):
    """Samples as dicts: Lightning collates them into dict batches."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        x, y = self.dataset[index]
        return {"x": x, "y": y}


class _DictModule(L.LightningModule):
    """Trains ``net`` on dict batches ``{"x": ..., "y": ...}``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.heads = nn.Linear(6, 5).double(), nn.ModuleList([nn.Linear(5, 3).double() for _ in range(2)])

    def forward(self, x, task_ids):
        hidden = torch.tanh(self.body(x))
        return torch.stack([self.heads[int(t)](h) for h, t in zip(hidden, task_ids)])


class _StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


def _first_batch_failure(module: L.LightningModule, method, dataset) -> tuple[BaseException, int]:
    counter = _StepCounter()
    with pytest.raises((TypeError, ValueError)) as raised:
        _fit(module, [method, counter], dataset, max_epochs=3)
    return raised.value, counter.steps


def test_ewc_refuses_dict_batches_at_the_first_batch_not_after_the_task():
    net = make_mlp()

    error, steps = _first_batch_failure(_DictModule(net), EWC(net), _DictBatches(make_task()))
    assert steps == 0  # the first batch, before any training
    assert isinstance(error, TypeError)
    assert str(error).startswith("EWC computes task 0's Fisher from the fit's training batches when the task ends, and cannot read them")
    assert "got dict" in str(error) and "ewc.register_task(0, dataloader)" in str(error)


def test_ewc_with_its_own_fisher_data_accepts_batches_it_does_not_read():
    net = make_mlp()
    ewc = EWC(net, fisher_sample_size=8)
    ewc.register_task(0, loader(make_task()))  # the Fisher's data, given: the fit's batches are not read

    _fit(_DictModule(net), [ewc], _DictBatches(make_task()))
    assert ewc.finished_tasks == [0] and ewc._tasks[0]["samples"] == 8


def test_ewc_refuses_pairs_for_a_multi_head_model_at_the_first_batch():
    net = _TwoHeads()

    class FixedHead(L.LightningModule):  # trains head 0 from (x, y) pairs
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x, torch.zeros_like(y)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    error, steps = _first_batch_failure(FixedHead(), EWC(net), make_task())
    assert steps == 0 and isinstance(error, ValueError)
    assert str(error).startswith("EWC's model (_TwoHeads) needs task ids (forward(inputs, task_ids): a multi-head model), "
                                 "but the training batches are (inputs, targets) pairs")


def test_ewc_takes_pairs_for_a_model_whose_task_ids_are_optional():
    net = make_mlp()

    class OptionalIds(nn.Module):  # one head; forward(x, task_ids=None), as the neurenix command's MLP
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, task_ids=None):
            return self.net(x)

    model = OptionalIds()
    ewc = EWC(model, fisher_sample_size=16)
    _fit(lit_classifier(model), [ewc], make_task())
    assert ewc.finished_tasks == [0] and ewc._tasks[0]["samples"] == 16


def test_ewc_refuses_floating_point_targets_of_unknown_likelihood_at_the_first_batch():
    torch.manual_seed(0)
    net = nn.Linear(6, 1).double()

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = make_task().tensors[0]
    data = TensorDataset(x, x.sum(1, keepdim=True))
    error, steps = _first_batch_failure(Regressor(), EWC(net), data)
    assert steps == 0 and isinstance(error, ValueError)
    assert "EWC cannot tell the likelihood of floating-point targets (torch.float64, from the training batches): pass " \
           "EWC(..., likelihood='gaussian')" in str(error)
    ewc = EWC(net, likelihood="gaussian", fisher_sample_size=16)  # told: trains, and the Fisher is not zero
    _fit(Regressor(), [ewc], data)
    assert ewc.finished_tasks == [0] and all(bool((f > 0).any()) for f in ewc._tasks[0]["fisher"].values())


def test_a_trainer_fit_again_after_its_first_fit_is_refused_with_how_to_run_a_sequence():
    net = make_mlp()
    module, methods = lit_classifier(net), [EWC(net)]
    trainer = quiet_trainer(callbacks=[*methods], max_epochs=1)
    trainer.fit(module, loader(make_task(seed=1)))
    with pytest.raises(RuntimeError) as raised:
        trainer.fit(module, loader(make_task(seed=2)))  # max_epochs already reached: Lightning trains nothing
    assert str(raised.value).startswith(
        "EWC: this fit trained no step for task 1 (tasks trained so far: [0]): the Trainer had already reached its "
        "limits (epoch 1 of max_epochs=1, step 5 of max_steps=-1)"
    )
    assert "Train each task with a new Trainer" in str(raised.value) and "fit_sequence(" in str(raised.value)
    assert methods[0].finished_tasks == [0] and methods[0].active_task is None


def test_every_method_shows_its_class_and_hyper_parameters():
    from neurenix.continual import KnowledgeDistillation

    net = make_mlp()
    assert repr(EWC(net, importance=5.0)) == (
        "EWC(Sequential, importance=5.0, fisher_sample_size=1000, online=False, gamma=1.0, fisher='empirical')"
    )
    assert repr(ExperienceReplay(net, memory_size=50)) == "ExperienceReplay(Sequential, memory_size=50, replay_ratio=0.5)"
    assert repr(L2Regularization(net, importance=0.5)) == "L2Regularization(Sequential, importance=0.5)"
    assert repr(SynapticIntelligence(net)) == "SynapticIntelligence(Sequential, importance=1.0, xi=0.1)"
    assert repr(MAS(net)) == "MAS(Sequential, importance=1.0, sample_size=1000)"
    assert repr(RWalk(net)) == "RWalk(Sequential, importance=1.0, alpha=0.9, epsilon=0.001, interval=10)"
    assert repr(KnowledgeDistillation(net)) == "KnowledgeDistillation(Sequential, temperature=2.0, alpha=0.5, units='all')"
