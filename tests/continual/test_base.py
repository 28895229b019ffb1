"""Task bookkeeping shared by every method: order-tolerant registration, train_step, device, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurenix.continual import (
    EWC,
    MAS,
    ExperienceReplay,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)
from neurenix.continual.base import evaluation_mode, trainable_parameters
from tests.helpers import loader, make_mlp, make_task

CONSOLIDATING = [EWC, L2Regularization, SynapticIntelligence, KnowledgeDistillation, MAS, RWalk]
ALL = CONSOLIDATING + [ExperienceReplay]


def make(cls, model, **kwargs):
    if cls is EWC:
        return EWC(model, importance=10.0, fisher_sample_size=100, seed=0, **kwargs)
    if cls is ExperienceReplay:
        return ExperienceReplay(model, memory_size=16, seed=0, **kwargs)
    if cls is MAS:
        return MAS(model, importance=10.0, sample_size=100, seed=0, **kwargs)
    return cls(model, **kwargs)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def consolidated(method, task_id: int = 1) -> dict[str, torch.Tensor]:
    """The parameters a method stored when it consolidated a task."""
    if isinstance(method, EWC):
        return method._tasks[task_id]["anchor"]
    if isinstance(method, KnowledgeDistillation):
        return method.teacher.state_dict()
    return method._anchor


def protection(method, x: torch.Tensor) -> torch.Tensor:
    if isinstance(method, EWC):
        return method.get_ewc_loss()
    if isinstance(method, KnowledgeDistillation):
        return method.get_distillation_loss(x, method.model(x))
    return method.get_regularization_loss()


def assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def assert_equal_state(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_equal_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def nudge(model: nn.Module, by: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def run_task(method, optimizer, data, task_id: int) -> None:
    for x, y in loader(data):
        method.train_step(optimizer, F.cross_entropy, x, y, task_id=task_id)


def plain_task(model, optimizer, data) -> None:
    for x, y in loader(data):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def sgd(model, lr: float = 0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


# ---------------------------------------------------------------------------- order-tolerant registration
@pytest.mark.parametrize("cls", CONSOLIDATING)
def test_register_before_training_consolidates_at_end_of_task(cls, task_a, task_b):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    method.register_task(1, loader(task_a))
    assert (method.active_task, method.finished_tasks) == (1, [])
    run_task(method, optimizer, task_a, 1)
    end_of_task_1 = params_of(model)
    method.register_task(2, loader(task_b))
    assert (method.active_task, method.finished_tasks) == (2, [1])
    assert_same(consolidated(method), end_of_task_1)
    run_task(method, optimizer, task_b, 2)
    assert not torch.equal(model[0].weight, end_of_task_1["0.weight"])
    assert_same(consolidated(method), end_of_task_1)  # a copy, not the live parameters
    assert protection(method, task_b.tensors[0]) > 0


def test_si_document_flow_with_update_importance(task_a, task_b):
    model = make_mlp()
    si, optimizer = SynapticIntelligence(model), sgd(model)
    si.register_task(task_id=1)
    for x, y in loader(task_a):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        si.update_importance(loss)
        optimizer.step()
    end_of_task_1 = params_of(model)
    si.register_task(task_id=2)
    assert si.finished_tasks == [1]
    assert_same(si._anchor, end_of_task_1)
    omega = torch.cat([o.flatten() for o in si.big_omega.values()])
    assert bool((omega >= 0).all()) and bool((omega > 0).any())


@pytest.mark.parametrize("cls", [EWC, L2Regularization, KnowledgeDistillation])
def test_register_after_plain_loop_consolidates_immediately(cls, task_a, task_b):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    plain_task(model, optimizer, task_a)
    end_of_task_1 = params_of(model)
    method.register_task(1, loader(task_a))
    assert (method.active_task, method.finished_tasks) == (None, [1])
    assert_same(consolidated(method), end_of_task_1)
    x = task_b.tensors[0]
    assert protection(method, x) == 0
    nudge(model)
    assert protection(method, x) > 0
    run_task(method, optimizer, task_b, 2)
    assert (method.active_task, method.finished_tasks) == (2, [1])
    assert_same(consolidated(method), end_of_task_1)


@pytest.mark.parametrize("cls", CONSOLIDATING)
def test_train_step_then_register_same_task_consolidates(cls, task_a):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    run_task(method, optimizer, task_a, 1)
    end_of_task_1 = params_of(model)
    method.register_task(1, loader(task_a))
    assert (method.active_task, method.finished_tasks) == (None, [1])
    assert_same(consolidated(method), end_of_task_1)
    nudge(model)
    assert protection(method, task_a.tensors[0]) > 0


@pytest.mark.parametrize("cls", CONSOLIDATING)
def test_register_twice_then_new_task_id_in_train_step(cls, task_a, task_b):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    method.register_task(1, loader(task_a))
    method.register_task(1, loader(task_a))  # not trained yet: nothing to consolidate
    assert (method.active_task, method.finished_tasks) == (1, [])
    run_task(method, optimizer, task_a, 1)
    before_task_2 = params_of(model)
    method.train_step(optimizer, F.cross_entropy, *task_b[:8], task_id=2)  # no register_task(2)
    assert (method.active_task, method.finished_tasks) == (2, [1])
    assert_same(consolidated(method), before_task_2)


@pytest.mark.parametrize("flow", ["before", "after"])
def test_ewc_fisher_is_taken_at_end_of_task_parameters(flow, task_a, task_b):
    model = make_mlp()
    ewc, optimizer = make(EWC, model), sgd(model)
    if flow == "before":
        ewc.register_task(1, loader(task_a))
        run_task(ewc, optimizer, task_a, 1)
        end = params_of(model)
        ewc.register_task(2, loader(task_b))
    else:
        plain_task(model, optimizer, task_a)
        end = params_of(model)
        ewc.register_task(1, loader(task_a))
    reference = copy.deepcopy(model)
    reference.load_state_dict(end)
    expected = {name: torch.zeros_like(p) for name, p in end.items()}
    for x, y in zip(*task_a.tensors):  # fisher_sample_size (100) > 40 samples: all of them
        reference.zero_grad()
        F.cross_entropy(reference(x[None]), y[None]).backward()
        for name, p in reference.named_parameters():
            expected[name] += p.grad.square() / len(task_a)
    for name in expected:
        torch.testing.assert_close(ewc._tasks[1]["fisher"][name], expected[name])
    assert ewc._tasks[1]["samples"] == len(task_a)


# ---------------------------------------------------------------------------- task ids
@pytest.mark.parametrize("cls", ALL)
def test_reused_task_id_is_rejected(cls, task_a):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    run_task(method, optimizer, task_a, 1)
    method.register_task(1, loader(task_a))
    with pytest.raises(ValueError, match=r"task_id=1 .*already"):
        method.register_task(1)
    with pytest.raises(ValueError, match=r"task_id=1 "):
        method.train_step(optimizer, F.cross_entropy, *task_a[:4], task_id=1)


@pytest.mark.parametrize("bad", ["1", 1.0, True])
@pytest.mark.parametrize("cls", ALL)
def test_non_int_task_id_is_rejected(cls, bad, task_a):
    model = make_mlp()
    method = make(cls, model)
    with pytest.raises(TypeError, match=rf"task_id must be an int, got {type(bad).__name__}: {bad!r}"):
        method.register_task(bad)
    with pytest.raises(TypeError, match="task_id must be an int"):
        method.train_step(sgd(model), F.cross_entropy, *task_a[:4], task_id=bad)
    assert (method.active_task, method.finished_tasks) == (None, [])


# ---------------------------------------------------------------------------- train_step
x8, y8 = make_task(seed=3).tensors[0][:8], make_task(seed=3).tensors[1][:8]
BAD_CALLS = {
    "sizes": (lambda opt: (opt, x8, y8[:7]), ValueError, r"inputs with 8 .*targets with 7"),
    "empty": (lambda opt: (opt, x8[:0], y8[:0]), ValueError, "empty batch"),
    "scalar": (lambda opt: (opt, x8[0, 0], y8[0]), ValueError, "inputs must have a batch dimension"),
    "inputs": (lambda opt: (opt, x8.tolist(), y8), TypeError, "inputs must be a torch.Tensor, got list"),
    "targets": (lambda opt: (opt, x8, y8.tolist()), TypeError, "targets must be a torch.Tensor, got list"),
    "optimizer": (lambda opt: ("sgd", x8, y8), TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("cls", ALL)
def test_bad_train_step_changes_nothing(cls, case, task_a):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    if cls is ExperienceReplay:
        method.add_to_memory(*task_a[:8], task_id=1)
    method.train_step(optimizer, F.cross_entropy, *task_a[:8], task_id=1)
    params, state = params_of(model), copy.deepcopy(method.state_dict())
    build, error, message = BAD_CALLS[case]
    optimizer_arg, inputs, targets = build(optimizer)
    with pytest.raises(error, match=message):
        method.train_step(optimizer_arg, F.cross_entropy, inputs, targets, task_id=2)  # a new task!
    assert_same(params_of(model), params)
    assert_equal_state(method.state_dict(), state)
    assert (method.active_task, method.finished_tasks) == (1, [])


def test_train_step_returns_the_detached_task_loss(task_a):
    model = make_mlp()
    l2 = L2Regularization(model)
    x, y = task_a[:8]
    expected = F.cross_entropy(model(x), y).detach()
    loss = l2.train_step(sgd(model), F.cross_entropy, x, y, task_id=1)
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_train_step_returns_the_mixed_distillation_loss(task_a, task_b):
    model = make_mlp()
    kd, optimizer = KnowledgeDistillation(model, temperature=2.0, alpha=0.3), sgd(model)
    run_task(kd, optimizer, task_a, 1)
    kd.register_task(1)
    nudge(model, 0.05)
    x, y = task_b[:8]
    outputs = model(x)
    expected = 0.7 * F.cross_entropy(outputs, y) + 0.3 * kd.get_distillation_loss(x, outputs)
    assert kd.get_distillation_loss(x, outputs) > 0
    torch.testing.assert_close(kd.train_step(optimizer, F.cross_entropy, x, y, task_id=2), expected.detach())


def test_train_step_zeroes_stale_gradients_and_keeps_mode(task_a):
    model = make_mlp()
    reference = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 123.0)
    model.eval()
    x, y = task_a[:8]
    L2Regularization(model).train_step(sgd(model), F.cross_entropy, x, y, task_id=1)
    assert not model.training
    reference_optimizer = sgd(reference)
    reference_optimizer.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    reference_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)


# ---------------------------------------------------------------------------- device
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_device_trains_like_no_device(device, task_a):
    trained = {}
    for given in (device, None):
        model = make_mlp()
        method = L2Regularization(model, device=given)
        assert method.device == torch.device("cpu")
        run_task(method, sgd(model), task_a, 1)
        trained[given] = params_of(model)
    assert_same(trained[device], trained[None])


@pytest.mark.parametrize("cls", ALL)
def test_bad_device_is_rejected(cls):
    with pytest.raises(ValueError, match="device must name a torch device, got 'nonsense'"):
        make(cls, make_mlp(), device="nonsense")
    for bad in (3, 1.5):
        with pytest.raises(TypeError, match=rf"device must be a torch.device, a string or None, got {type(bad).__name__}"):
            make(cls, make_mlp(), device=bad)
    with pytest.raises(ValueError, match=r"device='meta' was given but the model's parameter '0.weight' is on 'cpu'"):
        make(cls, make_mlp(), device="meta")


def test_model_moved_away_from_device_fails_before_any_change(task_a):
    model = make_mlp()
    l2 = L2Regularization(model, device="cpu")
    state = copy.deepcopy(l2.state_dict())
    model.to("meta")
    with pytest.raises(ValueError, match=r"device='cpu' .*'meta'"):
        l2.train_step(sgd(model), F.cross_entropy, *task_a[:8], task_id=1)
    assert_equal_state(l2.state_dict(), state)
    assert l2.active_task is None


# ---------------------------------------------------------------------------- helpers of base
def test_evaluation_mode_restores_each_submodule():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    model[1].eval()
    before = [m.training for m in model.modules()]
    assert before == [True, True, False, True]
    with pytest.raises(RuntimeError, match="boom"), evaluation_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_trainable_parameters_skip_frozen_ones(task_a):
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    params = trainable_parameters(model)
    assert list(params) == ["0.bias", "2.weight", "2.bias"]
    assert params["2.weight"] is model[2].weight
    l2 = L2Regularization(model)
    run_task(l2, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), task_a, 1)
    l2.register_task(1)
    assert list(l2._anchor) == ["0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", ["a model", None, [nn.Linear(2, 2)]])
def test_model_must_be_a_module(cls, bad):
    with pytest.raises(TypeError, match=rf"model must be a torch.nn.Module, got {type(bad).__name__}"):
        cls(bad)


# ---------------------------------------------------------------------------- state
def assert_plain(value) -> None:
    if isinstance(value, dict):
        assert all(isinstance(k, (str, int)) for k in value)
        for v in value.values():
            assert_plain(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or isinstance(value, (torch.Tensor, int, float, str, bool)), type(value)


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trips_through_weights_only_load(cls, task_a, task_b):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    method.register_task(1, loader(task_a))
    if cls is ExperienceReplay:
        method.add_to_memory(*task_a[:20], task_id=1)
    run_task(method, optimizer, task_a, 1)
    method.train_step(optimizer, F.cross_entropy, *task_b[:8], task_id=2)
    state = method.state_dict()
    assert_plain(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_equal_state(loaded, state)
    restored = make(cls, copy.deepcopy(model))
    restored.load_state_dict(loaded)
    assert_equal_state(restored.state_dict(), state)
    if cls is not ExperienceReplay:
        nudge(model), nudge(restored.model)
        x = task_b.tensors[0]
        torch.testing.assert_close(protection(restored, x), protection(method, x))


@pytest.mark.parametrize("cls", ALL)
def test_old_checkpoint_without_newer_keys_loads_and_trains(cls, task_a, task_b):
    model = make_mlp()
    method, optimizer = make(cls, model), sgd(model)
    method.load_state_dict({"active_task": 0})
    assert (method.active_task, method.finished_tasks, method.steps_in_active_task) == (0, [], 0)
    run_task(method, optimizer, task_a, 0)
    end_of_task_0 = params_of(model)
    method.register_task(0, loader(task_a))
    assert (method.active_task, method.finished_tasks) == (None, [0])
    if cls is not ExperienceReplay:
        assert_same(consolidated(method, 0), end_of_task_0)
        nudge(model)
        assert protection(method, task_b.tensors[0]) > 0


def test_task_ids_go_to_models_whose_forward_takes_them():
    from neurenix.continual.base import model_arguments, takes_task_ids

    class MultiHead(torch.nn.Module):
        def forward(self, x, task_ids):
            return x

    class Star(torch.nn.Module):
        def forward(self, *args):
            return args[0]

    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert not takes_task_ids(torch.nn.Linear(3, 3)) and takes_task_ids(MultiHead()) and takes_task_ids(Star())
    assert model_arguments(torch.nn.Linear(3, 3), x, t) == (x,)
    assert model_arguments(MultiHead(), x, t) == (x, t) and model_arguments(MultiHead(), x, None) == (x,)


def test_takes_task_ids_is_asked_again_when_the_forward_changes():
    from neurenix.continual.base import takes_task_ids

    class Net(torch.nn.Module):
        def forward(self, x):
            return x

    class MultiHead(Net):
        def forward(self, x, task_ids):
            return x

    class Unhashable(MultiHead):
        __hash__ = None  # type: ignore[assignment]

    model = Net()
    assert not takes_task_ids(model) and not takes_task_ids(model)  # the second from the cache
    model.forward = lambda x, task_ids: x  # a callable set on the instance
    assert takes_task_ids(model)
    del model.forward
    assert not takes_task_ids(model)
    model.__class__ = MultiHead  # another class's forward
    assert takes_task_ids(model)
    assert takes_task_ids(Unhashable())


def test_device_follows_the_first_parameter_as_model_parameters_orders_them():
    from neurenix.continual import L2Regularization
    from neurenix.continual.base import _first_parameter

    class Own(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 2))
            self.scale = torch.nn.Parameter(torch.ones(1))  # its own parameter comes first

    models = [
        torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 3)), torch.nn.Linear(3, 1)),
        Own(),
        torch.nn.Sequential(torch.nn.ReLU()),
    ]
    for model in models:
        assert _first_parameter(model) is next(model.parameters(), None)
    assert L2Regularization(models[0]).device == torch.device("cpu")


def test_train_step_gives_a_multi_head_model_each_samples_task_id():
    from neurenix.continual import ExperienceReplay

    class MultiHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = torch.nn.Linear(6, 6).double()
            self.seen: list = []

        def forward(self, x, task_ids):
            self.seen.append(task_ids.clone())
            return self.heads(x).view(-1, 2, 3)[torch.arange(x.shape[0]), task_ids]

    model = MultiHead()
    replay = ExperienceReplay(model, memory_size=8, replay_ratio=1.0, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_task(samples=8).tensors
    replay.add_to_memory(x[:4], y[:4], task_id=0)
    replay.train_step(optimizer, torch.nn.functional.cross_entropy, x[4:], y[4:], task_id=1)
    (task_ids,) = model.seen
    assert task_ids.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # the new batch, then the replayed task-0 samples


def test_set_task_data_gives_the_active_task_the_data_its_consolidation_reads(task_a, task_b):
    net = make_mlp()
    ewc = EWC(net, fisher_sample_size=10)
    with pytest.raises(ValueError, match=r"EWC.set_task_data: no task is being trained \(enter_task first\)"):
        ewc.set_task_data(loader(task_a))
    ewc.enter_task(0, data=loader(task_a))
    ewc.set_task_data(loader(task_b))  # replaces task_a
    ewc.finish_task()

    reference = EWC(make_mlp(), fisher_sample_size=10)
    reference.enter_task(0)
    reference.finish_task(loader(task_b))
    for name, fisher in reference._tasks[0]["fisher"].items():
        assert torch.equal(ewc._tasks[0]["fisher"][name], fisher), name


# ---------------------------------------------------------------------------- task ids that do not match
@pytest.mark.parametrize("cls", ALL)
def test_train_step_with_another_id_than_the_untrained_registered_task_is_refused_before_any_change(cls):
    model = make_mlp()
    method = make(cls, model)
    method.register_task(0, loader(make_task()))
    before = params_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_task(seed=2).tensors
    with pytest.raises(ValueError) as raised:
        method.train_step(optimizer, F.cross_entropy, x, y, task_id=1)  # a loop counting from 1
    assert str(raised.value).startswith(
        "train_step got task_id=1 while task 0 is registered and no step has trained it: going on would consolidate "
        "task 0 at parameters that never learned it. Give train_step the id the task was registered with (task_id=0)"
    )
    assert method.active_task == 0 and method.finished_tasks == [] and method.steps_in_active_task == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    method.train_step(optimizer, F.cross_entropy, x, y, task_id=0)  # the registered id trains
    method.train_step(optimizer, F.cross_entropy, x, y, task_id=1)  # and a trained task then ends
    assert method.finished_tasks == [0] and method.active_task == 1


def test_a_pretrained_task_is_ended_explicitly_by_registering_the_next():
    model = make_mlp()
    ewc = make(EWC, model)
    ewc.register_task(0, loader(make_task()))  # the weights already know task 0
    ewc.register_task(1)  # ends it where it stands (the API's own task-boundary example does this)
    x, y = make_task(seed=2).tensors
    ewc.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=1)
    assert ewc.finished_tasks == [0] and ewc.active_task == 1 and ewc._tasks[0]["samples"] == 40


@pytest.mark.parametrize("cls", [EWC, KnowledgeDistillation])
def test_reading_a_task_s_shuffled_loader_leaves_the_global_generator_alone(cls):
    # EWC's Fisher (and distillation's labels, for a task trained out of view) iterate DataLoaders,
    # which draw their seed and order from PyTorch's global generator unless given their own.
    model = make_mlp()
    method = make(cls, model, **({"units": "seen"} if cls is KnowledgeDistillation else {}))
    with torch.no_grad():
        model[0].weight.add_(0.1)  # trained outside: register_task consolidates now, reading the loader
    task_loader = loader(make_task(), shuffle=True)  # no generator of its own
    state = torch.get_rng_state()
    method.register_task(0, task_loader)
    assert method.finished_tasks == [0]
    assert torch.equal(torch.get_rng_state(), state)
