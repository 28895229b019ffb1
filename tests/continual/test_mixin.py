"""ContinualLossMixin: wraps training_step once, wherever it is defined, and only when needed."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from neurenix.continual import ContinualLossMixin, KnowledgeDistillation
from neurenix.continual.mixin import _map_loss


class _Base(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])


class _Inherits(ContinualLossMixin, _Base):
    """training_step comes from a base class that does not know the mixin."""


class _Overrides(_Inherits):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 2


def _batch():
    return torch.randn(4, 3), torch.tensor([0, 1, 0, 1])


def test_inherited_training_step_is_wrapped_once():
    assert getattr(_Inherits.training_step, "_neurenix_wraps_training_step", False)
    assert not getattr(_Base.training_step, "_neurenix_wraps_training_step", False)


def test_without_a_trainer_the_step_runs_untouched():
    module = _Overrides()
    batch = _batch()
    expected = 2 * nn.functional.cross_entropy(module.net(batch[0]), batch[1])
    assert torch.allclose(module.training_step(batch, 0), expected)
    assert module.calls == 1


def test_a_subclass_calling_super_applies_the_distillation_term_once():
    """Under a trainer with distillation, the nested (super) call must not apply it again."""
    module = _Overrides()
    distillation = KnowledgeDistillation(module.net, temperature=1.0, alpha=0.5)
    distillation.teacher = nn.Linear(3, 2).eval().requires_grad_(False)  # a fixed teacher
    trainer = L.Trainer(callbacks=[distillation], logger=False, enable_checkpointing=False)
    module._trainer = trainer
    distillation.before_training_forward()
    distillation._hook = module.net.register_forward_hook(distillation._capture)

    x, y = _batch()
    loss = module.training_step((x, y), 0)

    outputs = module.net(x)
    task = 2 * nn.functional.cross_entropy(outputs, y)
    teacher_p = torch.softmax(distillation.teacher(x), 1)
    kl = (teacher_p * (teacher_p.log() - torch.log_softmax(outputs, 1))).sum(1).mean()
    assert torch.allclose(loss, 0.5 * task + 0.5 * kl, atol=1e-6)


def test_loss_dicts_and_skipped_batches():
    double = lambda loss: loss * 2  # noqa: E731
    assert _map_loss(None, double) is None
    out = _map_loss({"loss": torch.tensor(1.5), "extra": 3}, double)
    assert out["loss"].item() == 3.0 and out["extra"] == 3
    with pytest.raises(TypeError, match="got str"):
        _map_loss("nope", double)
