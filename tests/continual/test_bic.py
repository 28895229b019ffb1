"""BiC: its loss and bias fit against hand-computed values, the held-out split, the task's end,
the corrected predictor, both doors, state, precisions and bad input."""

from __future__ import annotations

import copy
import functools
import math
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import KnowledgeDistillation
from neurenix.continual import functional as CF
from neurenix.continual.bic import BIAS_L2, BiasCorrectedClassifier, BiC, held_out_ranks
from neurenix.continual.memory import ExemplarMemory
from tests.helpers import lit_classifier, loader, quiet_trainer, saved_and_loaded

D = torch.float64


# ------------------------------------------------------------------------- the maths, by hand
def test_bias_fit_recovers_the_saturated_logistic_answer():
    # Old class 0 has logit 0, new class 1 logit z ∈ {+1, −1}: P(new) = σ(α z + β), a logistic
    # regression on two points, whose fit is saturated: σ(α + β) = 3/4 (3 of 4 samples at z = +1
    # are new) and σ(−α + β) = 1/2, so α + β = ln 3 and β − α = 0: α = β = ln(3)/2.
    logits = torch.tensor([[0.0, 1.0]] * 4 + [[0.0, -1.0]] * 4, dtype=D)
    labels = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0])
    alpha, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True]))
    assert alpha == pytest.approx(math.log(3) / 2, abs=1e-12) and beta == pytest.approx(math.log(3) / 2, abs=1e-12)


def test_bias_fit_leaves_old_units_alone_and_corrects_every_new_unit_alike():
    # Classes 0 (old) and 1, 2 (new). With z_1 = z_2 = 0 on every sample the new units only move
    # by β: P(class 0) = 1 / (1 + 2 e^β) at logit 0 for class 0; 2 of 6 samples are class 0, so
    # 1 / (1 + 2 e^β) = 1/3, β = 0 (and α is free: the l2 pull holds it at 1).
    logits = torch.zeros(6, 3, dtype=D)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    alpha, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True, True]), l2=1e-3)
    assert alpha == pytest.approx(1.0, abs=1e-9) and beta == pytest.approx(0.0, abs=1e-9)
    # 4 of 6 class 0: 1 / (1 + 2 e^β) = 2/3, e^β = 1/4.
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    _, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True, True]))
    assert beta == pytest.approx(math.log(0.25), abs=1e-10)


def test_bias_fit_with_l2_is_finite_on_a_separable_set_and_its_gradient_vanishes():
    logits = torch.tensor([[0.0, 2.0], [0.0, -2.0]], dtype=D)  # z > 0 always new: separable
    labels = torch.tensor([1, 0])
    alpha, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True]), l2=BIAS_L2)
    assert math.isfinite(alpha) and alpha > 1
    theta = torch.tensor([alpha, beta], dtype=D, requires_grad=True)
    corrected = torch.stack([logits[:, 0], theta[0] * logits[:, 1] + theta[1]], 1)
    (F.cross_entropy(corrected, labels) + BIAS_L2 / 2 * ((theta[0] - 1) ** 2 + theta[1] ** 2)).backward()
    assert theta.grad.abs().max().item() < 1e-10


def test_bias_fit_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"new_classes a boolean \(C,\) mask, got \(2, 3\), \(2,\) and torch.bool \(2,\)"):
        CF.fit_bias_correction(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="l2 must be >= 0, got -1.0"):
        CF.fit_bias_correction(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool), l2=-1.0)
    assert CF.fit_bias_correction(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.ones(3, dtype=torch.bool)) == (1.0, 0.0)


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_bic_loss_mixes_cross_entropy_and_distillation_by_the_old_classes_share():
    # Classes learned: 0, 1 (old) and 2 (new); unit 3 never learned is outside both terms.
    # λ = 2/3. L_c: cross-entropy over units 0-2. L_d: −Σ softmax(ẑ/2) log softmax(z/2) over units 0, 1.
    logits = torch.tensor([[1.0, 0.0, 2.0, 9.0], [0.5, -1.0, 0.0, -9.0]], dtype=D)
    old = torch.tensor([[2.0, 0.0, 5.0, 5.0], [0.0, 2.0, -5.0, 5.0]], dtype=D)
    targets = torch.tensor([2, 0])
    classes, old_classes = torch.tensor([True, True, True, False]), torch.tensor([True, True, False, False])
    rows = logits.tolist()
    ce = (-math.log(_softmax(rows[0][:3])[2]) - math.log(_softmax(rows[1][:3])[0])) / 2
    kd = 0.0
    for z, zo in zip(rows, old.tolist()):
        p_hat, p = _softmax([zo[0] / 2, zo[1] / 2]), _softmax([z[0] / 2, z[1] / 2])
        kd -= sum(a * math.log(b) for a, b in zip(p_hat, p)) / 2
    hand = 2 / 3 * kd + 1 / 3 * ce
    assert CF.bic_loss(logits, targets, classes, old, old_classes, 2.0).item() == pytest.approx(hand, abs=1e-13)
    assert CF.bic_loss(logits, targets, classes).item() == pytest.approx(ce, abs=1e-13)  # the first task: L_c alone


def test_bic_loss_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"classes a boolean \(C,\) mask, got \(2, 3\), \(3,\)"):
        CF.bic_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"old_logits must be \(N, C\) = \(2, 3\) with old_classes a boolean \(3,\) mask, got \(2, 3\) and None"):
        CF.bic_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool), torch.zeros(2, 3))


def test_held_out_ranks_spread_a_share_over_every_prefix():
    ranks = torch.arange(30)
    assert torch.nonzero(held_out_ranks(ranks, 0.1)).flatten().tolist() == [9, 19, 29]
    assert torch.nonzero(held_out_ranks(ranks[:10], 0.5)).flatten().tolist() == [1, 3, 5, 7, 9]
    assert torch.nonzero(held_out_ranks(ranks[:12], 0.25)).flatten().tolist() == [3, 7, 11]


# ------------------------------------------------------------------------- the method
def make_net(seed: int = 0, inputs: int = 6, hidden: int = 5, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh())
    return nn.Sequential(backbone, nn.Linear(hidden, classes)).double()


def class_task(labels: tuple[int, ...], samples: int = 24, seed: int = 1, inputs: int = 6) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels).repeat(samples // len(labels))
    x = torch.randn(samples, inputs, generator=generator, dtype=D) + y[:, None].double()
    return TensorDataset(x, y)


def test_constructor_defaults_and_hyperparameters():
    net = make_net()
    bic = BiC(net)
    assert bic.hyperparameters() == {"memory_size": 2000, "replay_ratio": 0.5, "selection": "herding", "held_out": 0.1, "temperature": 2.0}
    assert bic._extractor.module is net[0]
    assert isinstance(bic.memory, ExemplarMemory) and isinstance(bic.classifier, BiasCorrectedClassifier)
    assert bic.teacher is None and bic.scale is None and bic.corrections == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(memory_size=-1), ValueError, "memory_size must be >= 0, got -1"),
        (dict(replay_ratio=-0.5), ValueError, "replay_ratio must be >= 0.0, got -0.5"),
        (dict(selection="greedy"), ValueError, "selection must be one of 'herding', 'closest', 'random'; got 'greedy'"),
        (dict(held_out=0.0), ValueError, "held_out must be > 0.0, got 0.0"),
        (dict(held_out=0.75), ValueError, "held_out must be <= 0.5, got 0.75"),
        (dict(held_out="0.1"), TypeError, "held_out must be a real number, got str: '0.1'"),
        (dict(temperature=0), ValueError, "temperature must be > 0.0, got 0.0"),
        (dict(feature_extractor="nowhere"), ValueError, "nowhere"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        BiC(make_net(), **kwargs)


def test_a_model_that_is_not_sequential_must_name_its_features_unless_selection_is_random():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.backbone(x).tanh())

    with pytest.raises(ValueError, match=r"feature_extractor=None with selection='herding' needs an nn.Sequential model .* got Net"):
        BiC(Net())
    assert BiC(Net(), selection="random").selection == "random"


def _two_tasks(bic: BiC, net: nn.Module, samples: int = 24) -> list[TensorDataset]:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    tasks = [class_task((0, 1), samples, seed=3), class_task((2, 3), samples, seed=4)]
    for task_id, data in enumerate(tasks):
        for inputs, targets in loader(data):
            bic.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=task_id)
        bic.register_task(task_id, loader(data))
    return tasks


def test_the_correction_is_fitted_on_the_held_out_exemplars_logits_at_the_tasks_end():
    net = make_net(seed=2)
    bic = BiC(net, memory_size=16, held_out=0.25, seed=0)
    _two_tasks(bic, net)
    assert [c[0] for c in bic.corrections] == [1]  # the first task has no old classes: no correction
    state = bic.memory.state_dict()
    held = held_out_ranks(state["ranks"], 0.25)
    assert sorted(state["targets"][held].tolist()) == [0, 1, 2, 3]  # 4 exemplars a class, rank 3 held out
    with torch.no_grad():
        logits = net(state["inputs"][held])
    alpha, beta = CF.fit_bias_correction(logits, state["targets"][held], torch.tensor([False, False, True, True]), l2=BIAS_L2)
    assert bic.corrections[0][1:] == (pytest.approx(alpha, abs=1e-12), pytest.approx(beta, abs=1e-12))
    assert bic.scale.tolist() == [1.0, 1.0, alpha, alpha] and bic.shift.tolist() == [0.0, 0.0, beta, beta]
    probe = torch.randn(5, 6, dtype=D)
    with torch.no_grad():
        expected = net(probe) * torch.tensor([1, 1, alpha, alpha], dtype=D) + torch.tensor([0, 0, beta, beta], dtype=D)
    torch.testing.assert_close(bic.classifier(probe), expected, rtol=0, atol=1e-12)
    assert bic.teacher is not None and not bic.teacher.training


def test_held_out_exemplars_are_never_replayed():
    net = make_net(seed=2)
    bic = BiC(net, memory_size=16, held_out=0.25, replay_ratio=4.0, seed=0)  # every step replays all it may
    _two_tasks(bic, net)
    state = bic.memory.state_dict()
    held_inputs = state["inputs"][held_out_ranks(state["ranks"], 0.25)]
    for _ in range(5):
        inputs, _, _ = bic.extend_batch(torch.zeros(8, 6, dtype=D), torch.zeros(8, dtype=torch.long), None)
        replayed = inputs[8:]
        assert replayed.shape[0] == 12  # the 12 training exemplars
        assert not bool((replayed[:, None, :] == held_inputs[None, :, :]).all(-1).any())


def test_the_classifier_gives_unlearned_classes_no_chance():
    net = make_net(seed=2, classes=6)
    bic = BiC(net, memory_size=16, held_out=0.25, seed=0)
    _two_tasks(bic, net)
    scores = bic.classifier(torch.randn(3, 6, dtype=D))
    assert torch.isinf(scores[:, 4:]).all() and torch.isfinite(scores[:, :4]).all()
    assert bic.classifier.predict(torch.randn(3, 6, dtype=D)).lt(4).all()


def test_one_step_by_hand_with_teacher_corrections_and_replay():
    net = make_net(seed=5)
    bic = BiC(net, memory_size=8, held_out=0.5, replay_ratio=1.0, seed=0)
    tasks = _two_tasks(bic, net, samples=8)  # corrections on classes 2, 3
    teacher = copy.deepcopy(net)
    scale, shift = bic.scale.clone(), bic.shift.clone()
    state = bic.memory.state_dict()
    train = ~held_out_ranks(state["ranks"], 0.5)  # 4 training exemplars, one per class
    x, y = class_task((0, 1, 2, 3), samples=4, seed=7).tensors
    x, y = x, y + 0  # task 2's new classes: none (all 4 learned), λ = 4/4 → the step is distillation only
    reference = copy.deepcopy(net)
    all_x, all_y = torch.cat([x, state["inputs"][train]]), torch.cat([y, state["targets"][train]])
    z = reference(all_x) * scale + shift
    with torch.no_grad():
        zo = teacher(all_x) * scale + shift
    hand = -(F.softmax(zo / 2, 1) * F.log_softmax(z / 2, 1)).sum(1).mean()
    hand.backward()
    loss = bic.train_step(torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=2)
    assert loss.item() == pytest.approx(hand.item(), abs=1e-12)
    for p, r in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r.detach() - 0.1 * r.grad, rtol=0, atol=1e-12)
    del tasks


# ------------------------------------------------------------------------- Lightning
def fit(module: L.LightningModule, callbacks: list, data: TensorDataset, ckpt_path=None, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=False), ckpt_path=ckpt_path)
    return trainer


TASKS = ((0, 1), (2, 3))


def test_lightning_equals_train_step_over_two_tasks():
    net, twin = make_net(seed=3), make_net(seed=3)
    options = dict(memory_size=12, replay_ratio=0.5, seed=5, held_out=0.34)
    standalone, callback = BiC(net, **options), BiC(twin, **options)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    module = lit_classifier(twin)
    for task_id, labels in enumerate(TASKS):
        data = class_task(labels, samples=36, seed=task_id + 1)
        for inputs, targets in loader(data):
            standalone.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=task_id)
        standalone.register_task(task_id, loader(data))
        fit(module, [callback], data)

    assert callback.finished_tasks == standalone.finished_tasks == [0, 1]
    for (name, ours), theirs in zip(twin.named_parameters(), net.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10, msg=name)
    ours, theirs = callback.memory.state_dict(), standalone.memory.state_dict()
    for field in ("inputs", "targets", "ranks", "generator"):
        torch.testing.assert_close(ours[field], theirs[field], rtol=0, atol=1e-10, msg=field)
    assert len(callback.corrections) == 1
    assert callback.corrections[0][1:] == pytest.approx(standalone.corrections[0][1:], abs=1e-9)
    probe = torch.randn(7, 6, dtype=D)
    torch.testing.assert_close(callback.classifier(probe), standalone.classifier(probe), rtol=0, atol=1e-9)
    assert not twin._forward_hooks


def test_with_distillation_on_one_trainer_is_refused_at_setup():
    net = make_net()
    bic = BiC(net)
    with pytest.raises(ValueError, match="BiC and KnowledgeDistillation are on one Trainer"):
        fit(lit_classifier(net), [bic, KnowledgeDistillation(net)], class_task((0, 1)))
    assert bic.finished_tasks == [] and bic.active_task is None


# ------------------------------------------------------------------------- state and checkpoints
def _trained(seed: int = 0) -> tuple[nn.Sequential, BiC, torch.optim.Optimizer]:
    net = make_net(seed=2)
    bic = BiC(net, memory_size=12, replay_ratio=0.5, seed=seed, held_out=0.34)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for task_id, labels in enumerate(TASKS):
        data = class_task(labels, seed=3 + task_id)
        for inputs, targets in loader(data):
            bic.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=task_id)
        bic.register_task(task_id, loader(data))
    return net, bic, optimizer


def test_state_round_trip_through_weights_only_continues_exactly():
    net, bic, optimizer = _trained()
    twin = copy.deepcopy(net)
    restored = BiC(twin, memory_size=12, replay_ratio=0.5, seed=77, held_out=0.34)
    restored.load_state_dict(saved_and_loaded(bic.state_dict()))
    assert restored.corrections == bic.corrections and torch.equal(restored.scale, bic.scale)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    data = class_task((0, 3), seed=9)
    for inputs, targets in loader(data):
        bic.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=2)
        restored.train_step(twin_optimizer, F.cross_entropy, inputs, targets, task_id=2)
    bic.register_task(2, loader(data))
    restored.register_task(2, loader(data))
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert restored.corrections == bic.corrections
    probe = torch.randn(5, 6, dtype=D)
    assert torch.equal(bic.classifier(probe), restored.classifier(probe))


def float_task(labels: tuple[int, ...], seed: int) -> TensorDataset:
    x, y = class_task(labels, samples=32, seed=seed).tensors
    return TensorDataset(x.float(), y)


def _methods(net: nn.Module, seed: int) -> list:
    return [BiC(net, memory_size=8, replay_ratio=0.5, seed=seed, held_out=0.5)]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize("where", ["mid-task", "task-end"])
def test_a_lightning_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, where):
    from lightning.pytorch.callbacks import ModelCheckpoint

    init = make_net(seed=7).float()
    net = copy.deepcopy(init)
    (bic,) = methods = _methods(net, seed=1)
    fit(lit_classifier(net), methods, float_task((0, 1), 1))
    fit(lit_classifier(net), methods, float_task((2, 3), 2), max_epochs=2)

    stopped = copy.deepcopy(init)
    stopped_methods = _methods(stopped, seed=1)
    fit(lit_classifier(stopped), stopped_methods, float_task((0, 1), 1))
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1)
    epochs = 1 if where == "mid-task" else 2
    fit(lit_classifier(stopped), [*stopped_methods, saver], float_task((2, 3), 2), max_epochs=epochs, enable_checkpointing=True)
    checkpoint = sorted(tmp_path.glob("*.ckpt"))[-1]
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][bic.state_key]
    assert saved["active_task"] == 1 and saved["teacher"] is not None

    resumed_net = make_net(seed=98).float()
    (resumed,) = resumed_methods = _methods(resumed_net, seed=9)
    fit(lit_classifier(resumed_net), resumed_methods, float_task((2, 3), 2), max_epochs=2, ckpt_path=checkpoint)
    for (name, a), b in zip(net.named_parameters(), resumed_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    ours, theirs = resumed.memory.state_dict(), bic.memory.state_dict()
    for field in ("inputs", "targets", "ranks", "generator"):
        torch.testing.assert_close(ours[field], theirs[field], rtol=0, atol=1e-6, msg=field)
    assert len(resumed.corrections) == len(bic.corrections) == 1
    assert resumed.corrections[0][1:] == pytest.approx(bic.corrections[0][1:], abs=1e-5)
    probe = torch.randn(5, 6)
    torch.testing.assert_close(resumed.classifier(probe), bic.classifier(probe), rtol=0, atol=1e-5)
    assert resumed.finished_tasks == [0, 1]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
def test_a_checkpoint_saved_with_other_hyperparameters_is_refused(tmp_path):
    net = make_net(seed=7).float()
    trainer = fit(lit_classifier(net), [BiC(net, memory_size=8, seed=0)], float_task((0, 1), 1))
    trainer.save_checkpoint(tmp_path / "task0.ckpt")
    other = BiC(net, memory_size=8, seed=0, held_out=0.2)
    saved = "BiC{'memory_size': 8, 'replay_ratio': 0.5, 'selection': 'herding', 'held_out': 0.1, 'temperature': 2.0}"
    wanted = "BiC{'memory_size': 8, 'replay_ratio': 0.5, 'selection': 'herding', 'held_out': 0.2, 'temperature': 2.0}"
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint holds state for {saved}, not for {wanted}")):
        fit(lit_classifier(net), [other], float_task((0, 1), 1), max_epochs=2, ckpt_path=tmp_path / "task0.ckpt")
    assert other.finished_tasks == [] and len(other.memory) == 0 and other.teacher is None


# ------------------------------------------------------------------------- precision
def _precision_run(precision: str) -> tuple[nn.Module, BiC]:
    net = make_net(seed=4).float()
    bic = BiC(net, memory_size=8, replay_ratio=0.5, seed=0, held_out=0.5)
    for task_id, labels in enumerate(TASKS):
        fit(lit_classifier(net, lr=0.05), [bic], float_task(labels, task_id + 1), precision=precision, deterministic=False)
    return net, bic


@functools.cache
def _32_bit_run() -> tuple[nn.Module, BiC]:
    return _precision_run("32-true")


# bf16-true's logits carry 8 bits: on a held-out set of 4 exemplars, nearly separated by the
# correction (α ≈ 7), the fit moves by up to a quarter of itself; its predictions agree.
@pytest.mark.parametrize("precision, params_atol, correction_rel", [("bf16-mixed", 2e-3, 1e-2), ("bf16-true", 2e-2, 0.25)])
def test_bf16_precisions_train_and_correct_like_32_bit(precision, params_atol, correction_rel):
    reference, reference_bic = _32_bit_run()
    net, bic = _precision_run(precision)
    for (name, ours), theirs in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=params_atol, msg=name)
    expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert bic.memory.state_dict()["inputs"].dtype == expected_dtype
    assert len(bic.corrections) == 1
    assert bic.corrections[0][1:] == pytest.approx(reference_bic.corrections[0][1:], rel=correction_rel)
    probe = float_task((0, 1, 2, 3), 9).tensors[0]
    agree = (bic.classifier.predict(probe.to(expected_dtype)) == reference_bic.classifier.predict(probe)).double().mean()
    assert agree >= 0.9


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "targets, described",
    [(torch.zeros(8), "dtype torch.float32"), (torch.zeros(8, 2, dtype=torch.long), "shape (8, 2)")],
)
def test_train_step_refuses_targets_that_are_not_labels_before_any_change(targets, described):
    net = make_net()
    bic = BiC(net)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=re.escape(described)):
        bic.train_step(torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, torch.zeros(8, 6, dtype=D), targets, 0)
    assert bic.active_task is None and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_a_trained_task_ending_without_data_is_refused_before_any_change():
    net, bic, optimizer = _trained()
    x, y = class_task((0, 1), seed=5).tensors
    bic.train_step(optimizer, F.cross_entropy, x, y, task_id=2)
    corrections = list(bic.corrections)
    with pytest.raises(ValueError, match=re.escape("BiC chooses task 2's exemplars from its data when the task ends, and got none: pass the task's data to register_task(2, dataloader)")):
        bic.train_step(optimizer, F.cross_entropy, x, y, task_id=3)
    assert bic.active_task == 2 and bic.finished_tasks == [0, 1] and bic.corrections == corrections


def test_a_model_whose_outputs_are_not_logits_per_sample_is_refused():
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Flatten(0)).double()
    bic = BiC(net, feature_extractor=net[1])
    with pytest.raises(ValueError, match=r"BiC reads the model's outputs as one logit per class, \(samples, classes\) for 8 targets: the model \(Sequential\) returned outputs of shape \(32,\)"):
        bic.train_step(torch.optim.SGD(net.parameters(), lr=0.1), lambda o, t: o.sum(), torch.zeros(8, 6, dtype=D), torch.zeros(8, dtype=torch.long), 0)
