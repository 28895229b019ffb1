"""SeenClassMask and mark_seen_classes: the masked values and gradients, the state, cross-entropy
against hand numbers, what EWC's Fisher and the distillation teacher see, datasets, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neurenix.continual import EWC, ExperienceReplay, KnowledgeDistillation
from neurenix.continual.seen_classes import SeenClassMask, mark_seen_classes
from neurenix.data import TaskDataset
from tests.helpers import loader, saved_and_loaded

LOGITS = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, -1.0, 4.0, 2.0]])


def masked(seen: list[int], classes: int = 4) -> SeenClassMask:
    mask = SeenClassMask(classes)
    mask.mark_seen(seen)
    return mask


def masked_mlp(seen: list[int], seed: int = 0) -> nn.Sequential:
    """6 -> 5 -> 4 in float64, ending in a mask over 4 classes with ``seen`` marked."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), masked(seen)).double()


def labelled(samples: int, labels: list[int], seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=generator, dtype=torch.float64)
    y = torch.tensor(labels)[torch.randint(0, len(labels), (samples,), generator=generator)]
    return TensorDataset(x, y)


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_sets_exactly_the_unseen_units_to_the_lowest_finite_value(dtype):
    logits = LOGITS.to(dtype)
    out = masked([0, 2])(logits)
    lowest = torch.finfo(dtype).min
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert torch.equal(out[:, [0, 2]], logits[:, [0, 2]])
    assert bool((out[:, [1, 3]] == lowest).all())
    assert torch.equal(masked([0, 1, 2, 3])(logits), logits)


@pytest.mark.parametrize("training", [True, False])
def test_forward_masks_in_training_and_in_evaluation(training):
    mask = masked([1]).train(training)
    assert mask(LOGITS)[:, [0, 2, 3]].eq(torch.finfo(torch.float32).min).all()


def test_masked_units_get_no_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    F.cross_entropy(masked([0, 2])(logits), torch.tensor([2, 0])).backward()
    assert torch.count_nonzero(logits.grad[:, [1, 3]]) == 0
    assert bool((logits.grad[:, [0, 2]].abs() > 1e-3).all())
    # The head's rows of unseen classes get none either.
    model = masked_mlp([0, 2])
    x, y = labelled(8, [0, 2]).tensors
    F.cross_entropy(model(x), y).backward()
    assert torch.count_nonzero(model[2].weight.grad[[1, 3]]) == 0 and torch.count_nonzero(model[2].bias.grad[[1, 3]]) == 0
    assert torch.count_nonzero(model[2].weight.grad[[0, 2]]) > 0


def test_seen_is_in_the_state_dict_and_loads_back():
    model = masked_mlp([1, 3])
    state = saved_and_loaded(model.state_dict())
    assert state["3.seen"].tolist() == [False, True, False, True]
    fresh = masked_mlp([])
    fresh.load_state_dict(state)
    assert fresh[3].seen_classes == [1, 3]
    assert torch.equal(fresh(torch.ones(2, 6, dtype=torch.float64)), model(torch.ones(2, 6, dtype=torch.float64)))


def test_mark_seen_takes_ints_lists_and_tensors_and_grows():
    mask = SeenClassMask(6)
    assert mask.seen_classes == []
    mask.mark_seen(4)
    mask.mark_seen([1, 1])
    mask.mark_seen(torch.tensor([[5, 1], [5, 5]]))
    assert mask.seen_classes == [1, 4, 5] and mask.seen.dtype == torch.bool
    assert repr(mask) == "SeenClassMask(num_classes=6, seen=[1, 4, 5])"


# ------------------------------------------------------------------------------------ the loss


def test_cross_entropy_with_the_mask_equals_hand_computed_cross_entropy_over_the_seen_classes():
    # Row 0 over classes {0, 2}: logits 1 and 3; row 1: 0 and 4.
    targets = torch.tensor([2, 0])
    loss = F.cross_entropy(masked([0, 2])(LOGITS), targets, reduction="none")
    by_hand = torch.tensor([math.log(1 + math.exp(-2)), math.log(1 + math.exp(4))])
    torch.testing.assert_close(loss, by_hand)
    sliced = F.cross_entropy(LOGITS[:, [0, 2]], torch.tensor([1, 0]), reduction="none")
    torch.testing.assert_close(loss, sliced)


def test_ewc_fisher_of_a_masked_model_equals_that_of_the_model_sliced_to_the_seen_units():
    seen = [0, 2]
    model = masked_mlp(seen)
    sliced = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        sliced[0].load_state_dict(model[0].state_dict())
        sliced[2].weight.copy_(model[2].weight[seen])
        sliced[2].bias.copy_(model[2].bias[seen])
    data = labelled(24, seen)
    x, y = data.tensors
    sliced_data = TensorDataset(x, (y == 2).long())  # class 2 is the sliced head's unit 1
    fishers = []
    for net, task in ((model, data), (sliced, sliced_data)):
        ewc = EWC(net, fisher_sample_size=24, seed=0)
        ewc.register_task(0, loader(task))
        ewc.finish_task()
        fishers.append(ewc.state_dict()["tasks"][0]["fisher"])
    masked_fisher, sliced_fisher = fishers
    assert masked_fisher["0.weight"].abs().sum() > 1e-4
    for name in ("0.weight", "0.bias"):
        torch.testing.assert_close(masked_fisher[name], sliced_fisher[name], rtol=1e-10, atol=1e-14)
    for name in ("2.weight", "2.bias"):
        torch.testing.assert_close(masked_fisher[name][seen], sliced_fisher[name], rtol=1e-10, atol=1e-14)
        assert torch.count_nonzero(masked_fisher[name][[1, 3]]) == 0


def test_the_distillation_teacher_keeps_the_mask_of_its_task_end_while_the_student_s_grows():
    model = masked_mlp([0, 1])
    kd = KnowledgeDistillation(model, temperature=2.0, alpha=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader(labelled(16, [0, 1])):
        kd.train_step(optimizer, F.cross_entropy, x, y, task_id=0)
    kd.register_task(1)  # ends task 0 (the teacher), then task 1's classes are marked
    model[3].mark_seen([2, 3])
    task_1 = labelled(16, [2, 3], seed=2)
    x, y = task_1.tensors
    teacher_reference = copy.deepcopy(model).eval()
    teacher_reference[3].seen[2:] = False  # the mask as it was at task 0's end
    kd.train_step(optimizer, F.cross_entropy, x[:8], y[:8], task_id=1)
    assert kd.teacher[3].seen_classes == [0, 1] and model[3].seen_classes == [0, 1, 2, 3]
    # The KL between the teacher's 2-class and the student's 4-class distributions is finite.
    outputs = model(x)
    term = kd.get_distillation_loss(x, outputs)
    p = F.softmax(teacher_reference(x)[:, :2] / 2.0, dim=-1)
    log_q = F.log_softmax(outputs / 2.0, dim=-1)[:, :2]
    by_hand = 4.0 * (p * (p.log() - log_q)).sum(-1).mean()
    assert bool(torch.isfinite(term)) and term.item() > 0.1
    torch.testing.assert_close(term, by_hand.detach(), rtol=1e-5, atol=1e-6)
    # A resumed method's teacher gets its own mask back, not the student's.
    restored = KnowledgeDistillation(model, temperature=2.0, alpha=0.5)
    restored.load_state_dict(saved_and_loaded(kd.state_dict()))
    assert restored.teacher[3].seen_classes == [0, 1]


def test_replay_s_loss_on_new_and_remembered_samples_is_over_the_seen_classes():
    model = masked_mlp([0, 1, 2])
    replay = ExperienceReplay(model, memory_size=16, replay_ratio=1.0, seed=0)
    replay.add_to_memory(*labelled(16, [0, 1]).tensors, task_id=0)
    x, y = labelled(8, [2], seed=3).tensors
    seen_losses = []

    def loss_fn(outputs, targets):
        # The same loss over the seen classes' logits of a copy of the model's head, sliced.
        inputs = recorded.pop()
        sliced = F.cross_entropy(reference(inputs)[:, [0, 1, 2]], targets)
        seen_losses.append(sliced.detach())
        return F.cross_entropy(outputs, targets)

    reference, recorded = copy.deepcopy(model)[:3], []
    model[0].register_forward_hook(lambda module, args, output: recorded.append(args[0].detach()))
    loss = replay.train_step(torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, x, y, task_id=1)
    assert len(seen_losses) == 1 and loss.item() < 100  # 16 samples, none of them at an unseen class
    torch.testing.assert_close(loss, seen_losses[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ datasets


class WithTargets(torch.utils.data.Dataset):
    """A torchvision-style dataset: class names in ``classes``, labels in ``targets``."""

    classes = ("zero", "one", "two", "three")

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def test_mark_seen_classes_reads_a_task_dataset_s_classes():
    model = nn.Sequential(nn.Linear(3, 4), SeenClassMask(4))
    task = TaskDataset(torch.zeros(5, 3), torch.tensor([3, 1, 3, 3, 1]), task_id=1)
    assert mark_seen_classes(model, task) == [model[1]]
    assert model[1].seen_classes == [1, 3]


@pytest.mark.parametrize("targets", [[2, 0, 2], torch.tensor([2, 0, 2])])
def test_mark_seen_classes_reads_targets_where_classes_are_names(targets):
    model = nn.Sequential(nn.Linear(3, 4), SeenClassMask(4))
    mark_seen_classes(model, WithTargets(targets))
    assert model[1].seen_classes == [0, 2]


def test_mark_seen_classes_marks_every_mask_and_leaves_a_model_without_one_alone():
    first, second = SeenClassMask(4), SeenClassMask(3)
    model = nn.ModuleDict({"a": first, "b": nn.Sequential(nn.Linear(2, 3), second)})
    mark_seen_classes(model, WithTargets([0, 2]))
    assert first.seen_classes == second.seen_classes == [0, 2]
    # No mask: the dataset is not read (a TensorDataset has neither classes nor targets).
    assert mark_seen_classes(nn.Linear(2, 3), TensorDataset(torch.zeros(2, 2))) == []


def test_mark_seen_classes_refuses_a_dataset_without_classes_or_targets():
    model = nn.Sequential(nn.Linear(3, 4), SeenClassMask(4))
    with pytest.raises(TypeError, match=r"TensorDataset has neither: call mask.mark_seen\(classes\)"):
        mark_seen_classes(model, TensorDataset(torch.zeros(2, 3), torch.tensor([0, 1])))
    assert model[1].seen_classes == []


def test_mark_seen_classes_checks_every_mask_before_marking_any():
    small, large = SeenClassMask(3), SeenClassMask(4)
    model = nn.Sequential(large, small)
    with pytest.raises(ValueError, match=r"mark_seen got class 3, outside \[0, 3\) for SeenClassMask\(3\)"):
        mark_seen_classes(model, WithTargets([0, 3]))
    assert large.seen_classes == small.seen_classes == []


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "num_classes, error, message",
    [
        (0, ValueError, "num_classes must be >= 1, got 0"),
        (-2, ValueError, "num_classes must be >= 1, got -2"),
        (10.0, TypeError, "num_classes must be an int, got float: 10.0"),
        (True, TypeError, "num_classes must be an int, got bool: True"),
    ],
)
def test_num_classes_is_checked(num_classes, error, message):
    with pytest.raises(error, match=message):
        SeenClassMask(num_classes)


@pytest.mark.parametrize(
    "classes, error, message",
    [
        (10, ValueError, r"mark_seen got class 10, outside \[0, 10\) for SeenClassMask\(10\)"),
        ([1, -1], ValueError, r"mark_seen got class -1, outside \[0, 10\)"),
        (torch.tensor([3, 12]), ValueError, r"mark_seen got class 12, outside \[0, 10\)"),
        (torch.tensor([1.0, 2.0]), TypeError, "mark_seen needs integer class labels, got a tensor of dtype torch.float32"),
        ([1, 2.0], TypeError, "mark_seen needs integer class labels, got float: 2.0"),
        (torch.tensor([True]), TypeError, "mark_seen needs integer class labels, got a tensor of dtype torch.bool"),
        ("3", TypeError, "mark_seen needs integer class labels, got str: '3'"),
    ],
)
def test_mark_seen_refuses_bad_labels_and_marks_nothing(classes, error, message):
    mask = masked([5], classes=10)
    with pytest.raises(error, match=message):
        mask.mark_seen(classes)
    assert mask.seen_classes == [5]


def test_forward_refuses_logits_of_another_width():
    with pytest.raises(ValueError, match=r"SeenClassMask\(4\) got logits of shape \(2, 3\): their last dimension must be the number of classes, 4"):
        SeenClassMask(4)(torch.zeros(2, 3))
