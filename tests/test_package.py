"""The names, signatures and examples of the API document (seed/continual-learning-api.txt)."""

from __future__ import annotations

import inspect

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import TensorDataset

import neurenix as nx
from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    GEM,
    MAS,
    BiC,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)

METHODS = [EWC, ExperienceReplay, L2Regularization, KnowledgeDistillation, SynapticIntelligence]
#: Methods beyond the API document, in its shape (positional arguments as the five's, options keyword-only).
BEYOND_API = [DarkExperienceReplay, ERACE, AGEM, GEM, MAS, RWalk, ICaRL, BiC, GDumb]


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: nx.nn.Sequential, torch.nn.Sequential),
        (lambda: nx.nn.Linear, torch.nn.Linear),
        (lambda: nx.nn.ReLU, torch.nn.ReLU),
        (lambda: nx.nn.CrossEntropyLoss, torch.nn.CrossEntropyLoss),
        (lambda: nx.nn.Module, torch.nn.Module),
        (lambda: nx.optim.Adam, torch.optim.Adam),
        (lambda: nx.data.DataLoader, torch.utils.data.DataLoader),
        (lambda: nx.Device, torch.device),
    ],
)
def test_document_names_are_pytorch_classes(ours, theirs):
    assert ours() is theirs


def test_document_imports():
    from neurenix.continual import EWC as ewc  # noqa: F401
    from neurenix.continual import (  # noqa: F401
        ExperienceReplay,
        KnowledgeDistillation,
        L2Regularization,
        SynapticIntelligence,
    )
    from neurenix.data import DataLoader  # noqa: F401
    from neurenix.nn import Linear, ReLU, Sequential  # noqa: F401
    from neurenix.optim import Adam  # noqa: F401

    assert nx.continual.EWC is ewc
    assert nx.Device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------------------- signatures
DOCUMENTED = {
    EWC: [("model", inspect.Parameter.empty), ("importance", 1000.0), ("fisher_sample_size", 1000), ("device", None)],
    ExperienceReplay: [("model", inspect.Parameter.empty), ("memory_size", 1000), ("replay_ratio", 0.5), ("device", None)],
    L2Regularization: [("model", inspect.Parameter.empty), ("importance", 1.0), ("device", None)],
    KnowledgeDistillation: [("model", inspect.Parameter.empty), ("temperature", 2.0), ("alpha", 0.5), ("device", None)],
    SynapticIntelligence: [("model", inspect.Parameter.empty), ("importance", 1.0), ("xi", 0.1), ("device", None)],
}


OURS = {
    DarkExperienceReplay: [("model", inspect.Parameter.empty), ("memory_size", 1000), ("alpha", 0.2), ("beta", 0.0),
                           ("replay_ratio", 1.0), ("device", None)],
    ERACE: [("model", inspect.Parameter.empty), ("memory_size", 1000), ("replay_ratio", 1.0), ("device", None)],
    AGEM: [("model", inspect.Parameter.empty), ("memory_size", 1000), ("reference_size", 256), ("device", None)],
    GEM: [("model", inspect.Parameter.empty), ("memory_size", 1000), ("margin", 0.5), ("device", None)],
    ICaRL: [("model", inspect.Parameter.empty), ("memory_size", 2000), ("feature_extractor", None), ("replay_ratio", 0.5),
            ("device", None)],
    BiC: [("model", inspect.Parameter.empty), ("memory_size", 2000), ("feature_extractor", None), ("replay_ratio", 0.5),
          ("device", None)],
    GDumb: [("model", inspect.Parameter.empty), ("memory_size", 2000), ("device", None)],
    MAS: [("model", inspect.Parameter.empty), ("importance", 1.0), ("sample_size", 1000), ("device", None)],
    RWalk: [("model", inspect.Parameter.empty), ("importance", 1.0), ("alpha", 0.9), ("epsilon", 1e-3), ("device", None)],
}


@pytest.mark.parametrize("cls", METHODS + BEYOND_API)
def test_constructor_signature_is_the_documented_one(cls):
    params = list(inspect.signature(cls).parameters.values())
    documented = DOCUMENTED.get(cls) or OURS[cls]
    head, extra = params[: len(documented)], params[len(documented) :]
    assert [(p.name, p.default) for p in head] == documented
    for p, (_, default) in zip(head, documented):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert type(p.default) is type(default)  # 1000.0 stays a float, 1000 an int
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra), extra
    assert all(p.default is not inspect.Parameter.empty for p in extra), extra


METHOD_PARAMETERS = {
    EWC: {
        "register_task": ["task_id", "dataloader"],
        "update_fisher": ["task_id", "dataloader"],
        "get_ewc_loss": [],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    },
    ExperienceReplay: {
        "add_to_memory": ["inputs", "targets", "task_id"],
        "get_replay_batch": ["batch_size"],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    },
    L2Regularization: {
        "register_task": ["task_id"],
        "get_regularization_loss": [],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    },
    KnowledgeDistillation: {
        "register_task": ["task_id", "dataloader"],
        "get_distillation_loss": ["inputs", "outputs"],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    },
    SynapticIntelligence: {
        "register_task": ["task_id"],
        "update_importance": ["loss"],
        "get_regularization_loss": [],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    },
    MAS: {
        "register_task": ["task_id", "dataloader"],
        "get_regularization_loss": [],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    },
    RWalk: {
        "register_task": ["task_id", "dataloader"],
        "get_regularization_loss": [],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    },
    **{cls: {
        "register_task": ["task_id", "dataloader"],
        "add_to_memory": ["inputs", "targets", "task_id"],
        "get_replay_batch": ["batch_size"],
        "train_step": ["optimizer", "loss_fn", "inputs", "targets", "task_id"],
    } for cls in (DarkExperienceReplay, ERACE, AGEM, GEM, ICaRL, BiC)},
    GDumb: {
        "register_task": ["task_id", "dataloader"],
        "add_to_memory": ["inputs", "targets", "task_id"],
        "train_on_memory": ["optimizer_factory", "loss_fn", "epochs", "batch_size"],
    },
}


@pytest.mark.parametrize(
    ("cls", "method"), [(cls, name) for cls, methods in METHOD_PARAMETERS.items() for name in methods]
)
def test_documented_methods_take_the_documented_parameters(cls, method):
    function = getattr(cls, method)
    assert callable(function)
    params = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
    documented = METHOD_PARAMETERS[cls][method]
    assert [p.name for p in params[: len(documented)]] == documented
    assert all(p.default is not inspect.Parameter.empty for p in params[len(documented) :])


def test_register_task_dataloader_may_be_none():
    # "ewc.register_task(current_task_id, dataloader=None)  # We'll update Fisher later"
    assert inspect.signature(EWC.register_task).parameters["dataloader"].default is None


@pytest.mark.parametrize("cls", METHODS + BEYOND_API)
def test_every_method_is_a_lightning_callback(cls):
    assert issubclass(cls, Callback)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))  # iCaRL's features: the first layer's
    assert isinstance(cls(model), Callback)


# ---------------------------------------------------------------------------- nx.init
def test_init_is_repeatable_and_harmless_twice():
    assert nx.init(seed=3) == 3
    first = torch.rand(4)
    assert nx.init(seed=3) == 3
    torch.testing.assert_close(torch.rand(4), first, rtol=0, atol=0)
    once, twice = nx.init(), nx.init()
    assert isinstance(once, int) and not isinstance(once, bool)
    assert once == twice == 3  # init() keeps the seed a run already has


@pytest.mark.parametrize(
    ("seed", "error", "message"),
    [
        ("3", TypeError, "seed must be an int or None, got '3'"),
        (1.5, TypeError, "seed must be an int or None, got 1.5"),
        (True, TypeError, "seed must be an int or None, got True"),
        (-1, ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
        (2**64, ValueError, "seed must be in .*got 18446744073709551616"),
    ],
)
def test_init_rejects_bad_seeds(seed, error, message):
    with pytest.raises(error, match=message):
        nx.init(seed=seed)


# ---------------------------------------------------------------------------- the document's examples
@pytest.fixture
def datasets():
    torch.manual_seed(0)
    task1 = TensorDataset(torch.randn(64, 784), torch.randint(0, 10, (64,)))
    task2 = TensorDataset(torch.randn(64, 784) + 1.0, torch.randint(0, 10, (64,)))
    return task1, task2


def test_ewc_example(datasets):
    task1_dataset, task2_dataset = datasets
    # ---- the document's code, unchanged ----
    import neurenix as nx
    from neurenix.continual import EWC
    from neurenix.data import DataLoader
    from neurenix.nn import Linear, ReLU, Sequential
    from neurenix.optim import Adam

    model = Sequential(Linear(784, 256), ReLU(), Linear(256, 10))
    ewc = EWC(model, importance=1000.0)
    optimizer = Adam(model.parameters(), lr=0.001)
    loss_fn = nx.nn.CrossEntropyLoss()
    task1_dataloader = DataLoader(task1_dataset, batch_size=32, shuffle=True)
    ewc.register_task(task_id=1, dataloader=task1_dataloader)
    for epoch in range(10):
        for inputs, targets in task1_dataloader:
            ewc.train_step(optimizer, loss_fn, inputs, targets, task_id=1)
    task2_dataloader = DataLoader(task2_dataset, batch_size=32, shuffle=True)
    ewc.register_task(task_id=2, dataloader=task2_dataloader)
    for epoch in range(10):
        for inputs, targets in task2_dataloader:
            ewc.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    # ---- end of the document's code ----
    assert (ewc.active_task, ewc.finished_tasks) == (2, [1])
    assert ewc._tasks[1]["samples"] == 64  # fisher_sample_size=1000 > 64: the whole task
    assert ewc.get_ewc_loss() > 0


def test_experience_replay_example(datasets):
    task1_dataset, task2_dataset = datasets
    import neurenix as nx
    from neurenix.continual import ExperienceReplay
    from neurenix.data import DataLoader
    from neurenix.nn import Linear, ReLU, Sequential
    from neurenix.optim import Adam

    model = Sequential(Linear(784, 256), ReLU(), Linear(256, 10))
    replay = ExperienceReplay(model, memory_size=1000, replay_ratio=0.5)
    optimizer = Adam(model.parameters(), lr=0.001)
    loss_fn = nx.nn.CrossEntropyLoss()
    task1_dataloader = DataLoader(task1_dataset, batch_size=32, shuffle=True)
    for epoch in range(10):
        for inputs, targets in task1_dataloader:
            replay.add_to_memory(inputs, targets, task_id=1)
            replay.train_step(optimizer, loss_fn, inputs, targets, task_id=1)
    task2_dataloader = DataLoader(task2_dataset, batch_size=32, shuffle=True)
    for epoch in range(10):
        for inputs, targets in task2_dataloader:
            replay.add_to_memory(inputs, targets, task_id=2)
            replay.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    # ----
    assert replay.memory.num_seen == 2 * 10 * 64
    assert len(replay.memory) == 1000  # capped at memory_size
    batch = replay.get_replay_batch(32)
    assert batch.inputs.shape == (32, 784) and batch.targets.shape == (32,)
    assert set(replay.memory.state_dict()["task_ids"].tolist()) == {1, 2}


def test_l2_example(datasets):
    task1_dataset, task2_dataset = datasets
    import neurenix as nx
    from neurenix.continual import L2Regularization
    from neurenix.data import DataLoader
    from neurenix.nn import Linear, ReLU, Sequential
    from neurenix.optim import Adam

    model = Sequential(Linear(784, 256), ReLU(), Linear(256, 10))
    l2_reg = L2Regularization(model, importance=1.0)
    optimizer = Adam(model.parameters(), lr=0.001)
    loss_fn = nx.nn.CrossEntropyLoss()
    task1_dataloader = DataLoader(task1_dataset, batch_size=32, shuffle=True)
    for epoch in range(10):
        for inputs, targets in task1_dataloader:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            optimizer.step()
    end_of_task_1 = {n: p.detach().clone() for n, p in model.named_parameters()}  # (test's own line)
    l2_reg.register_task(task_id=1)
    task2_dataloader = DataLoader(task2_dataset, batch_size=32, shuffle=True)
    for epoch in range(10):
        for inputs, targets in task2_dataloader:
            l2_reg.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    # ----
    assert (l2_reg.active_task, l2_reg.finished_tasks) == (2, [1])
    expected = 0.5 * sum(((p - end_of_task_1[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(l2_reg.get_regularization_loss(), expected)
    assert expected > 0


def test_knowledge_distillation_example(datasets):
    task1_dataset, task2_dataset = datasets
    import neurenix as nx
    from neurenix.continual import KnowledgeDistillation
    from neurenix.data import DataLoader
    from neurenix.nn import Linear, ReLU, Sequential
    from neurenix.optim import Adam

    model = Sequential(Linear(784, 256), ReLU(), Linear(256, 10))
    distillation = KnowledgeDistillation(model, temperature=2.0, alpha=0.5)
    optimizer = Adam(model.parameters(), lr=0.001)
    loss_fn = nx.nn.CrossEntropyLoss()
    task1_dataloader = DataLoader(task1_dataset, batch_size=32, shuffle=True)
    for epoch in range(10):
        for inputs, targets in task1_dataloader:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            optimizer.step()
    end_of_task_1 = {n: p.detach().clone() for n, p in model.named_parameters()}  # (test's own line)
    distillation.register_task(task_id=1, dataloader=task1_dataloader)
    task2_dataloader = DataLoader(task2_dataset, batch_size=32, shuffle=True)
    for epoch in range(10):
        for inputs, targets in task2_dataloader:
            distillation.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    # ----
    assert (distillation.active_task, distillation.finished_tasks) == (2, [1])
    teacher = distillation.teacher.state_dict()
    for name, value in end_of_task_1.items():
        torch.testing.assert_close(teacher[name], value, rtol=0, atol=0)
    x = task2_dataset.tensors[0]
    assert distillation.get_distillation_loss(x, model(x)) > 0


def test_synaptic_intelligence_example(datasets):
    task1_dataset, task2_dataset = datasets
    import neurenix as nx
    from neurenix.continual import SynapticIntelligence
    from neurenix.data import DataLoader
    from neurenix.nn import Linear, ReLU, Sequential
    from neurenix.optim import Adam

    model = Sequential(Linear(784, 256), ReLU(), Linear(256, 10))
    si = SynapticIntelligence(model, importance=1.0, xi=0.1)
    optimizer = Adam(model.parameters(), lr=0.001)
    loss_fn = nx.nn.CrossEntropyLoss()
    task1_dataloader = DataLoader(task1_dataset, batch_size=32, shuffle=True)
    si.register_task(task_id=1)
    for epoch in range(10):
        for inputs, targets in task1_dataloader:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            si.update_importance(loss)
            optimizer.step()
    end_of_task_1 = {n: p.detach().clone() for n, p in model.named_parameters()}  # (test's own line)
    task2_dataloader = DataLoader(task2_dataset, batch_size=32, shuffle=True)
    si.register_task(task_id=2)
    for epoch in range(10):
        for inputs, targets in task2_dataloader:
            si.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    # ----
    assert (si.active_task, si.finished_tasks) == (2, [1])
    for name, value in end_of_task_1.items():
        torch.testing.assert_close(si._anchor[name], value, rtol=0, atol=0)
    omega = torch.cat([o.flatten() for o in si.big_omega.values()])
    assert bool((omega >= 0).all()) and bool((omega > 0).any())
    assert si.get_regularization_loss() > 0


def test_submodules_load_on_first_use_and_unknown_names_are_errors():
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import neurenix as nx\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules\n"
        "assert nx.continual.EWC.__name__ == 'EWC' and nx.Device('cpu').type == 'cpu'\n"
        "from neurenix import data\n"
        "assert data is nx.data and set(nx.__all__) <= set(dir(nx))\n"
        "try:\n"
        "    nx.no_such_name\n"
        "except AttributeError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "module 'neurenix' has no attribute 'no_such_name'"
