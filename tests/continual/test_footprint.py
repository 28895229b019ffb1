"""The bytes of a method's state and of everything it holds, against hand-counted sizes."""

from __future__ import annotations

import torch

from neurenix.continual import EWC, L2Regularization
from neurenix.continual.footprint import held_bytes, state_bytes
from tests.helpers import loader, make_mlp


def test_state_bytes_sums_every_nested_tensor():
    state = {"a": torch.zeros(3), "nested": {"b": torch.zeros(2, dtype=torch.float64), "n": 4}, "list": [torch.zeros(5, dtype=torch.uint8)]}
    assert state_bytes(state) == 3 * 4 + 2 * 8 + 5


def _parameter_bytes(net) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


def test_held_bytes_counts_what_the_method_holds_once_and_not_the_model(task_a):
    net = make_mlp()  # float64, 6-5-3: 53 parameters
    params = _parameter_bytes(net)
    l2 = L2Regularization(net)
    fingerprint = state_bytes(l2.state_dict()["untouched_fingerprint"])  # 2 float64 per parameter tensor
    assert fingerprint == 2 * 4 * 8
    assert held_bytes(l2) == fingerprint  # the model's own storage is not the method's
    l2.enter_task(0)
    l2.finish_task()
    assert held_bytes(l2) == 2 * params + fingerprint  # the anchor and the penalty's workspace

    ewc = EWC(make_mlp(), fisher_sample_size=8)
    ewc.enter_task(0)
    ewc.finish_task(loader(task_a))
    assert state_bytes(ewc.state_dict()["tasks"]) == 2 * params  # the task's Fisher and anchor
    # ...and, outside the state_dict, the folded penalty's anchor and weight and its workspace.
    assert held_bytes(ewc) == 5 * params + fingerprint
