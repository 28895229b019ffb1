"""DistilledExemplars: what iCaRL and BiC share, each checked with its own messages and values.

Also the helpers (the network, the tasks, a Lightning fit) that ``test_icarl.py`` and
``test_bic.py`` use for their method-specific tests.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import KnowledgeDistillation
from neurenix.continual.bic import BiC
from neurenix.continual.icarl import ICaRL
from tests.helpers import lit_classifier, loader, quiet_trainer

D = torch.float64
TASKS = ((0, 1), (2, 3))


def make_net(seed: int = 0, inputs: int = 6, hidden: int = 5, classes: int = 4) -> nn.Sequential:
    """``nn.Sequential(backbone, head)`` in float64: the methods' features are the backbone's output."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh())
    return nn.Sequential(backbone, nn.Linear(hidden, classes)).double()


def class_task(labels: tuple[int, ...], samples: int = 24, seed: int = 1, inputs: int = 6) -> TensorDataset:
    """``samples`` random inputs labelled in turn with ``labels``, each class shifted apart."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels).repeat(samples // len(labels))
    x = torch.randn(samples, inputs, generator=generator, dtype=D) + y[:, None].double()
    return TensorDataset(x, y)


def float_task(labels: tuple[int, ...], seed: int) -> TensorDataset:
    """A float32 ``class_task`` of 32 samples (Lightning's precisions and checkpoints)."""
    x, y = class_task(labels, samples=32, seed=seed).tensors
    return TensorDataset(x.float(), y)


def fit(module: L.LightningModule, callbacks: list, data: TensorDataset, ckpt_path=None, **kwargs) -> L.Trainer:
    """One ``quiet_trainer`` fit of ``module`` on ``data`` in unshuffled batches of 8."""
    trainer = quiet_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=False), ckpt_path=ckpt_path)
    return trainer


def _same_corrections(ours: Any, theirs: Any, **tolerance: float) -> None:
    """BiC's one correction (after two tasks) agrees; iCaRL has none to compare."""
    if isinstance(ours, BiC):
        assert len(ours.corrections) == len(theirs.corrections) == 1
        assert ours.corrections[0][1:] == pytest.approx(theirs.corrections[0][1:], **tolerance)


# ------------------------------------------------------------------------- the constructor
_SHARED_BAD_ARGUMENTS = [
    (dict(memory_size=-1), ValueError, "memory_size must be >= 0, got -1"),
    (dict(replay_ratio=-0.5), ValueError, "replay_ratio must be >= 0.0, got -0.5"),
    (dict(selection="greedy"), ValueError, "selection must be one of 'herding', 'closest', 'random'; got 'greedy'"),
    (dict(feature_extractor="nowhere"), ValueError, "feature_extractor='nowhere' names no submodule of Sequential"),
    (dict(feature_extractor=nn.Linear(2, 2)), ValueError, "feature_extractor=Linear is not a submodule of Sequential"),
]


@pytest.mark.parametrize("method", [ICaRL, BiC])
@pytest.mark.parametrize("kwargs, error, message", _SHARED_BAD_ARGUMENTS)
def test_constructor_rejects_bad_arguments(method, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        method(make_net(), **kwargs)


class _NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.backbone(x).tanh())


@pytest.mark.parametrize(
    "method, refused, accepted, check",
    [
        (
            ICaRL,
            r"feature_extractor=None needs an nn.Sequential model .* got _NotSequential: name the submodule",
            dict(feature_extractor="backbone"),
            lambda m: m.features.module is not None,
        ),
        (
            BiC,
            r"feature_extractor=None with selection='herding' needs an nn.Sequential model .* got _NotSequential",
            dict(selection="random"),  # random selection reads no features
            lambda m: m.selection == "random",
        ),
    ],
)
def test_a_model_that_is_not_sequential_must_name_its_features(method, refused, accepted, check):
    with pytest.raises(ValueError, match=refused):
        method(_NotSequential())
    assert check(method(_NotSequential(), **accepted))


# ------------------------------------------------------------------------- Lightning
@pytest.mark.parametrize(
    "method, options, classifier_atol",
    [
        (ICaRL, dict(memory_size=10, replay_ratio=0.5, seed=5), 1e-10),
        (BiC, dict(memory_size=12, replay_ratio=0.5, seed=5, held_out=0.34), 1e-9),
    ],
)
def test_lightning_equals_train_step_over_two_tasks(method, options, classifier_atol):
    net, twin = make_net(seed=3), make_net(seed=3)
    standalone, callback = method(net, **options), method(twin, **options)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    module = lit_classifier(twin)
    for task_id, labels in enumerate(TASKS):
        data = class_task(labels, samples=36, seed=task_id + 1)  # 4 batches of 8 and one of 4
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
    _same_corrections(callback, standalone, abs=1e-9)
    probe = torch.randn(7, 6, dtype=D)
    torch.testing.assert_close(callback.classifier(probe), standalone.classifier(probe), rtol=0, atol=classifier_atol)
    assert not twin._forward_hooks  # the capture is removed when training ends


@pytest.mark.parametrize(
    "method, message",
    [(ICaRL, "ICaRL and KnowledgeDistillation are on one Trainer"), (BiC, "BiC and KnowledgeDistillation are on one Trainer")],
)
def test_with_distillation_on_one_trainer_is_refused_at_setup(method, message):
    net = make_net()
    chosen = method(net)
    with pytest.raises(ValueError, match=message):
        fit(lit_classifier(net), [chosen, KnowledgeDistillation(net)], class_task((0, 1)))
    assert chosen.finished_tasks == [] and chosen.active_task is None


# ------------------------------------------------------------------------- checkpoints
_SMALL = {ICaRL: dict(memory_size=8, replay_ratio=0.5), BiC: dict(memory_size=8, replay_ratio=0.5, held_out=0.5)}


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize("where", ["mid-task", "task-end"])
@pytest.mark.parametrize("method, classifier_atol", [(ICaRL, 1e-6), (BiC, 1e-5)])
def test_a_lightning_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, where, method, classifier_atol):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def methods(net: nn.Module, seed: int) -> list:
        return [method(net, seed=seed, **_SMALL[method])]

    init = make_net(seed=7).float()
    net = copy.deepcopy(init)
    (uninterrupted,) = first = methods(net, seed=1)
    fit(lit_classifier(net), first, float_task((0, 1), 1))
    fit(lit_classifier(net), first, float_task((2, 3), 2), max_epochs=2)

    stopped = copy.deepcopy(init)
    stopped_methods = methods(stopped, seed=1)
    fit(lit_classifier(stopped), stopped_methods, float_task((0, 1), 1))
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1)
    epochs = 1 if where == "mid-task" else 2  # epoch 1 of 2, or the task's last epoch end
    fit(lit_classifier(stopped), [*stopped_methods, saver], float_task((2, 3), 2), max_epochs=epochs, enable_checkpointing=True)
    checkpoint = sorted(tmp_path.glob("*.ckpt"))[-1]
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][uninterrupted.state_key]
    assert saved["active_task"] == 1 and saved["teacher"] is not None

    resumed_net = make_net(seed=98).float()  # other weights and seed: the checkpoint's must win
    (resumed,) = resumed_methods = methods(resumed_net, seed=9)
    fit(lit_classifier(resumed_net), resumed_methods, float_task((2, 3), 2), max_epochs=2, ckpt_path=checkpoint)
    for (name, a), b in zip(net.named_parameters(), resumed_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    ours, theirs = resumed.memory.state_dict(), uninterrupted.memory.state_dict()
    for field in ("inputs", "targets", "ranks", "generator"):
        torch.testing.assert_close(ours[field], theirs[field], rtol=0, atol=1e-6, msg=field)
    _same_corrections(resumed, uninterrupted, abs=1e-5)
    probe = torch.randn(5, 6)
    torch.testing.assert_close(resumed.classifier(probe), uninterrupted.classifier(probe), rtol=0, atol=classifier_atol)
    assert resumed.finished_tasks == [0, 1]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize(
    "method, other, saved, wanted",
    [
        (
            ICaRL,
            dict(memory_size=16),
            "ICaRL{'memory_size': 8, 'replay_ratio': 0.5, 'selection': 'herding'}",
            "ICaRL{'memory_size': 16, 'replay_ratio': 0.5, 'selection': 'herding'}",
        ),
        (
            BiC,
            dict(memory_size=8, held_out=0.2),
            "BiC{'memory_size': 8, 'replay_ratio': 0.5, 'selection': 'herding', 'held_out': 0.1, 'temperature': 2.0}",
            "BiC{'memory_size': 8, 'replay_ratio': 0.5, 'selection': 'herding', 'held_out': 0.2, 'temperature': 2.0}",
        ),
    ],
)
def test_a_checkpoint_saved_with_other_hyperparameters_is_refused(tmp_path, method, other, saved, wanted):
    net = make_net(seed=7).float()
    trainer = fit(lit_classifier(net), [method(net, memory_size=8, seed=0)], float_task((0, 1), 1))
    trainer.save_checkpoint(tmp_path / "task0.ckpt")
    refused = method(net, seed=0, **other)
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint holds state for {saved}, not for {wanted}")):
        fit(lit_classifier(net), [refused], float_task((0, 1), 1), max_epochs=2, ckpt_path=tmp_path / "task0.ckpt")
    assert refused.finished_tasks == [] and len(refused.memory) == 0 and refused.teacher is None


# ------------------------------------------------------------------------- precision
@functools.cache
def _precision_run(method: type, precision: str) -> tuple[nn.Module, Any]:
    """Two tasks fitted at ``precision``; cached, as the 32-bit reference serves both bf16 cases."""
    net = make_net(seed=4).float()
    chosen = method(net, seed=0, **_SMALL[method])
    for task_id, labels in enumerate(TASKS):
        fit(lit_classifier(net, lr=0.05), [chosen], float_task(labels, task_id + 1), precision=precision, deterministic=False)
    return net, chosen


# BiC under bf16-true: its logits carry 8 bits: on a held-out set of 4 exemplars, nearly separated
# by the correction (α ≈ 7), the fit moves by up to a quarter of itself; its predictions agree.
@pytest.mark.parametrize(
    "method, precision, params_atol, correction_rel",
    [
        (ICaRL, "bf16-mixed", 2e-3, None),
        (ICaRL, "bf16-true", 2e-2, None),
        (BiC, "bf16-mixed", 2e-3, 1e-2),
        (BiC, "bf16-true", 2e-2, 0.25),
    ],
)
def test_bf16_precisions_train_choose_and_classify_like_32_bit(method, precision, params_atol, correction_rel):
    reference, reference_method = _precision_run(method, "32-true")
    net, chosen = _precision_run(method, precision)
    for (name, ours), theirs in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=params_atol, msg=name)
    expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32  # as the fit's batches
    assert chosen.memory.state_dict()["inputs"].dtype == expected_dtype and sorted(chosen.memory.groups) == [0, 1, 2, 3]
    _same_corrections(chosen, reference_method, rel=correction_rel)
    probe = float_task((0, 1, 2, 3), 9).tensors[0]
    agree = (chosen.classifier.predict(probe.to(expected_dtype)) == reference_method.classifier.predict(probe)).double().mean()
    assert agree >= 0.9


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", [ICaRL, BiC])
@pytest.mark.parametrize(
    "targets, described",
    [(torch.zeros(8), "dtype torch.float32"), (torch.zeros(8, 2, dtype=torch.long), "shape (8, 2)")],
)
def test_train_step_refuses_targets_that_are_not_labels_before_any_change(method, targets, described):
    net = make_net()
    chosen = method(net)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=re.escape(described)):
        chosen.train_step(torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, torch.zeros(8, 6, dtype=D), targets, 0)
    assert chosen.active_task is None and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "method, message",
    [
        (ICaRL, r"ICaRL reads the model's outputs as one logit per class, \(samples, classes\) for 8 targets: the model \(Sequential\) returned outputs of shape \(32,\)"),
        (BiC, r"BiC reads the model's outputs as one logit per class, \(samples, classes\) for 8 targets: the model \(Sequential\) returned outputs of shape \(32,\)"),
    ],
)
def test_a_model_whose_outputs_are_not_logits_per_sample_is_refused(method, message):
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Flatten(0)).double()
    chosen = method(net, feature_extractor=net[1])
    with pytest.raises(ValueError, match=message):
        chosen.train_step(torch.optim.SGD(net.parameters(), lr=0.1), lambda o, t: o.sum(), torch.zeros(8, 6, dtype=D), torch.zeros(8, dtype=torch.long), 0)
