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
    distillation._capture.install()

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


# ------------------------------------------------------------------------- manual optimization
class _Manual(ContinualLossMixin, L.LightningModule):
    """Manual optimization: the loss is back-propagated inside training_step."""

    def __init__(self, net: nn.Module, extra_backward: bool = False) -> None:
        super().__init__()
        self.net, self.extra_backward = net, extra_backward
        self.automatic_optimization = False

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss, retain_graph=self.extra_backward)
        if self.extra_backward:  # a second backward of the step gets no second term
            self.manual_backward(loss * 0.0)
        optimizer.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("extra_backward", [False, True], ids=["one-backward", "two-backwards"])
def test_manual_optimization_trains_as_automatic_optimization_does(extra_backward):
    # The distillation term used to be added to the loss training_step returned, which manual
    # optimization has already back-propagated: the term never reached the gradient.
    from torch.utils.data import DataLoader

    from neurenix.continual import EWC, ExperienceReplay, L2Regularization, SynapticIntelligence
    from tests.helpers import lit_classifier, make_mlp, make_task, quiet_trainer

    nets = []
    for manual in (False, True):
        net = make_mlp(seed=2)
        methods = [
            EWC(net, importance=20.0, fisher_sample_size=16, seed=0),
            L2Regularization(net, importance=0.5),
            SynapticIntelligence(net, importance=0.5),
            ExperienceReplay(net, memory_size=12, replay_ratio=0.5, seed=3),
            KnowledgeDistillation(net, temperature=2.0, alpha=0.5),
        ]
        for seed in (1, 2, 3):
            module = _Manual(net, extra_backward) if manual else lit_classifier(net, lr=0.1)
            quiet_trainer(callbacks=methods).fit(module, DataLoader(make_task(seed=seed), batch_size=8))
        assert [m.finished_tasks for m in methods] == [[0, 1, 2]] * 5
        nets.append(net)
    for automatic, manual in zip(*(net.parameters() for net in nets)):
        torch.testing.assert_close(manual, automatic, rtol=0, atol=1e-12)
