"""torch.compile: every method trains a compiled model as it trains the eager one.

Two doors: the Neurenix continual-learning API (``train_step`` on ``torch.compile(model)``) and
Lightning (``fit_sequence(trainer, torch.compile(module), ...)``: Lightning unwraps the compiled
module and compiles its ``forward`` and ``training_step`` in place).

Backend ``aot_eager``: dynamo and AOTAutograd trace the forward and backward as with inductor
(the same graphs, guards, graph breaks and recompilations), then the traced ATen ops run eagerly
instead of generated C++: a compilation takes milliseconds here, inductor's first one ~17 s on
the 2-core CI machine, once per method. Inductor runs in benchmarks/continual_overhead.py
``--compile`` and in tests/gpu/test_compile_cuda.py.

Tolerance: compiled and eager parameters and method state agree to 1e-10 (absolute, float64
models). The traced graph runs the same kernels on the same data; what may differ is the order
of a decomposed reduction (float64 rounding, ~1e-16 relative per operation over a few steps).
Measured: bit-equal for every method.
"""

from __future__ import annotations

import copy
import re
from typing import Callable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurenix.continual import (
    AGEM,
    EWC,
    GEM,
    MAS,
    BiC,
    ContinualLossMixin,
    DarkExperienceReplay,
    ERACE,
    ExperienceReplay,
    GDumb,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)
from neurenix.continual.base import eagerly, trainable_parameters, uncompiled, without_compiled_forwards
from neurenix.continual.callback import fitted_module
from tests.helpers import lit_classifier, loader, make_mlp, make_task, quiet_trainer

TOLERANCE = dict(rtol=0.0, atol=1e-10)
CLASSES = 6

#: name -> build(model, net): the method on ``model`` (compiled or not); ``net`` is the plain network.
METHODS: dict[str, Callable[[nn.Module, nn.Sequential], object]] = {
    "EWC": lambda model, net: EWC(model, importance=10.0, fisher_sample_size=16, seed=0),
    "online EWC": lambda model, net: EWC(model, importance=10.0, fisher_sample_size=16, seed=0, online=True, gamma=0.9),
    "SI": lambda model, net: SynapticIntelligence(model),
    "L2": lambda model, net: L2Regularization(model),
    "MAS": lambda model, net: MAS(model, importance=10.0, sample_size=16, seed=0),
    "RWalk": lambda model, net: RWalk(model),
    "distillation": lambda model, net: KnowledgeDistillation(model),
    "replay": lambda model, net: ExperienceReplay(model, memory_size=16, seed=0),
    "DER": lambda model, net: DarkExperienceReplay(model, memory_size=16, seed=0),
    "DER++": lambda model, net: DarkExperienceReplay(model, memory_size=16, beta=0.5, seed=0),
    "ER-ACE": lambda model, net: ERACE(model, memory_size=16, seed=0),
    "A-GEM": lambda model, net: AGEM(model, memory_size=16, reference_size=8, seed=0),
    "GEM": lambda model, net: GEM(model, memory_size=16, seed=0),
    # The features named by module, as a method given the LightningModule (no Sequential) needs them;
    # the default (a Sequential's second-to-last layer) is tested below.
    "iCaRL": lambda model, net: ICaRL(model, memory_size=16, seed=0, feature_extractor=net[1]),
    "BiC": lambda model, net: BiC(model, memory_size=16, seed=0, feature_extractor=net[1]),
    "GDumb": lambda model, net: GDumb(model, memory_size=16, seed=0),
}
#: Methods that read the task's data at its end when given it (the Fisher, importance, exemplars).
READS_TASK_DATA = {"EWC", "online EWC", "MAS", "iCaRL", "BiC"}


def class_incremental_data(task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """24 samples of classes ``3·task .. 3·task + 2``."""
    x, y = make_task(24, classes=CLASSES, seed=task + 1).tensors
    return x, y % 3 + 3 * task


def aot_eager(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="aot_eager")


def parameters_of(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def assert_close_state(actual, expected, where: str = "state", tolerance: dict = TOLERANCE) -> None:
    """Nested method state equal: the same keys (so each loads into the other), tensors to ``tolerance``."""
    assert type(actual) is type(expected), where
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_close_state(actual[key], expected[key], f"{where}[{key!r}]", tolerance)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_state(a, e, f"{where}[{i}]", tolerance)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, **tolerance, msg=where)
    else:
        assert actual == expected, where


# ---------------------------------------------------------------------------- the continual-learning API
def standalone_run(name: str, compiled: bool, backend: str = "aot_eager", device: str = "cpu"):
    """Two tasks of three steps with ``train_step`` (GDumb: its memory, then train_on_memory)."""
    net = make_mlp(classes=CLASSES).to(device)
    model = torch.compile(net, backend=backend) if compiled else net
    method = METHODS[name](model, net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for task in range(2):
        x, y = class_incremental_data(task)
        for inputs, targets in loader(torch.utils.data.TensorDataset(x, y)):
            if name == "GDumb":
                method.add_to_memory(inputs, targets, task_id=task)
            else:
                method.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=task)
                if name == "replay":
                    method.add_to_memory(inputs, targets, task_id=task)
        if name in READS_TASK_DATA:
            method.register_task(task, loader(torch.utils.data.TensorDataset(x, y)))
        if name == "GDumb":
            method.train_on_memory(torch.optim.SGD, F.cross_entropy, epochs=1, batch_size=8)
    return net, method


@pytest.mark.parametrize("name", list(METHODS))
def test_train_step_on_a_compiled_model_equals_the_eager_one(name):
    eager_net, eager = standalone_run(name, compiled=False)
    compiled_net, compiled = standalone_run(name, compiled=True)
    torch.testing.assert_close(parameters_of(compiled_net), parameters_of(eager_net), **TOLERANCE)
    # Named as the module's own parameters: a state saved with a compiled model loads into an eager one.
    assert_close_state(compiled.state_dict(), eager.state_dict())


@pytest.mark.parametrize("cls", [ICaRL, BiC])
def test_the_default_features_of_a_compiled_sequential_are_its_second_to_last_layer(cls):
    net = make_mlp(classes=CLASSES)
    method = cls(aot_eager(net), memory_size=16, seed=0)
    assert method._extractor.module is net[1] and method._extractor.model is net  # extracted eagerly


def test_trainable_parameters_of_a_compiled_model_are_named_as_the_modules_own():
    net = make_mlp()
    compiled = aot_eager(net)
    assert list(trainable_parameters(compiled)) == list(trainable_parameters(net)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert uncompiled(compiled) is net and uncompiled(net) is net


def test_a_compiled_model_is_asked_about_task_ids_through_the_module_it_wraps():
    from neurenix.continual.base import requires_task_ids, takes_task_ids

    class MultiHead(torch.nn.Module):
        def forward(self, x, task_ids):
            return x

    # torch.compile's wrapper forwards (*args, **kwargs): read as it is, every compiled model would
    # be called with task ids, and a one-input model fails on its first step.
    single, multi = torch.compile(torch.nn.Linear(3, 3)), torch.compile(MultiHead())
    assert not takes_task_ids(single) and not requires_task_ids(single)
    assert takes_task_ids(multi) and requires_task_ids(multi)


#: The graphs the "neurenix_counting" backend was given since the last clear.
GRAPHS: list = []


@torch._dynamo.register_backend(name="neurenix_counting")
def _counting_backend(graph_module: torch.fx.GraphModule, example_inputs):
    """Runs the traced graph eagerly and keeps it (its nodes carry the user's stack). Registered by
    name, it is one backend for every torch.compile call: cached graphs are reused across calls
    as with "aot_eager" or "inductor" (a backend given as a function is new at each call)."""
    GRAPHS.append(graph_module)
    return graph_module.forward


def counted_graphs() -> list:
    """Dynamo's caches emptied and the count restarted (earlier tests compiled the same code)."""
    torch._dynamo.reset()
    GRAPHS.clear()
    return GRAPHS


def test_eagerly_runs_a_compiled_model_or_one_compiled_in_place_without_compiling():
    graphs = counted_graphs()
    net = make_mlp()
    compiled = torch.compile(net, backend="neurenix_counting")
    in_place = make_mlp()
    in_place.forward = compiled.dynamo_ctx(in_place.forward)  # what Lightning does to a LightningModule
    x = torch.randn(3, 6, dtype=torch.float64)
    with eagerly():
        torch.testing.assert_close(compiled(x), net(x), rtol=0, atol=0)
        in_place(x)
    assert graphs == []
    compiled(x)
    assert len(graphs) == 1  # outside, it compiles


# ---------------------------------------------------------------------------- Lightning
def task_sequence():
    from neurenix.data import TaskDataset, TaskSequenceDataModule

    tasks = [TaskDataset(*class_incremental_data(task), task_id=task) for task in range(2)]
    return TaskSequenceDataModule(tasks, tasks, batch_size=8, seed=0)


def lightning_run(name: str, compiled: bool, given: str = "net", backend="aot_eager", callbacks=(), **trainer_options):
    """Two tasks of one epoch (three steps) under fit_sequence; the method on ``module.net``
    (``given="net"``) or on what ``fit_sequence`` is given (``given="module"``)."""
    from neurenix.data import fit_sequence

    net = make_mlp(classes=CLASSES)
    module = lit_classifier(net)
    fitted = torch.compile(module, backend=backend) if compiled else module
    method = METHODS[name](net if given == "net" else fitted, net)
    trainer = quiet_trainer(callbacks=[method, *callbacks], **trainer_options)
    fit_sequence(trainer, fitted, task_sequence(), epochs_per_task=1)
    return net, module, method


@pytest.mark.parametrize("name", list(METHODS))
def test_a_compiled_lightning_module_trains_as_the_eager_one(name):
    eager_net, _, eager = lightning_run(name, compiled=False)
    compiled_net, _, compiled = lightning_run(name, compiled=True)
    torch.testing.assert_close(parameters_of(compiled_net), parameters_of(eager_net), **TOLERANCE)
    assert_close_state(compiled.state_dict(), eager.state_dict())


class ModuleSeen(L.Callback):
    def __init__(self) -> None:
        self.modules: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.modules.append(pl_module)


@pytest.mark.parametrize("name", ["EWC", "MAS", "distillation", "DER++", "GDumb", "iCaRL"])
def test_a_method_given_the_compiled_lightning_module_works_on_the_module_lightning_fits(name):
    # Lightning fits the module torch.compile wrapped (its forward compiled in place): the method
    # takes that module too, so its hooks' pl_module, its model and its captured forwards agree.
    # EWC's Fisher and MAS's importance run through torch.func, eagerly; the teacher is an eager copy.
    seen = ModuleSeen()
    eager_net, _, eager = lightning_run(name, compiled=False, given="module")
    compiled_net, module, compiled = lightning_run(name, compiled=True, given="module", callbacks=[seen])
    assert compiled.model is module and seen.modules == [module, module]
    torch.testing.assert_close(parameters_of(compiled_net), parameters_of(eager_net), **TOLERANCE)
    assert_close_state(compiled.state_dict(), eager.state_dict())


class CompiledInPlace(L.Callback):
    """Records, at each fit's start, whether Lightning compiled the module's forward in place over
    its class's own method (and not over a previous fit's compiled one)."""

    def __init__(self) -> None:
        self.over_the_class_method: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        assert "forward" in pl_module.__dict__  # compiled in place for this fit
        original = pl_module._compiler_ctx["original_forward"]
        self.over_the_class_method.append(getattr(original, "__func__", None) is type(pl_module).forward)


def test_each_fit_of_a_sequence_compiles_the_module_s_own_methods_once_and_leaves_them_as_they_were():
    # Lightning compiles a compiled module's methods in place at every fit, over what the module
    # has then: without fit_sequence undoing it, task t's forward was t nested compiled wrappers.
    from neurenix.data import fit_sequence

    seen, graphs = CompiledInPlace(), counted_graphs()
    module = lit_classifier(make_mlp(classes=CLASSES))
    fit_sequence(quiet_trainer(callbacks=[seen]), torch.compile(module, backend="neurenix_counting"), task_sequence(), epochs_per_task=1)
    assert seen.over_the_class_method == [True, True]
    assert module._compiler_ctx is None and not set(module.__dict__) & {"forward", "training_step", "validation_step"}
    assert len(graphs) == 1  # the training step, compiled in the first task and reused in the second


def test_a_teacher_copied_from_a_module_compiled_in_place_answers_with_its_own_weights():
    # Lightning sets module.forward to a compiled function of the module's bound forward: a plain
    # deep copy would run the student's weights. (Before: distillation off by 5e-4 after two tasks.)
    _, module, kd = lightning_run("distillation", compiled=True, given="module", callbacks=[CompiledInPlace()])
    assert kd.teacher._compiler_ctx is None and "forward" not in kd.teacher.__dict__
    x = torch.randn(4, 6, dtype=torch.float64)
    before = kd.teacher(x)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    torch.testing.assert_close(kd.teacher(x), before, rtol=0, atol=0)
    assert fitted_module(torch.compile(module)) is module and fitted_module(module) is module


def test_without_compiled_forwards_leaves_an_uncompiled_copy_as_it_is():
    net = make_mlp()
    copied = without_compiled_forwards(copy.deepcopy(net))
    assert "forward" not in copied.__dict__ and list(copied.state_dict()) == list(net.state_dict())


def innermost_file(stack_trace: str) -> str:
    """The file of a traced node's innermost frame (where its operation was written)."""
    files = re.findall(r'File "([^"]+)"', stack_trace)
    return files[-1] if files else ""


def test_the_methods_part_of_a_compiled_training_step_runs_eagerly():
    # Replay's draw from memory and insertion, the teacher's forward and the distillation term read
    # and change Python state (memory sizes, generators): traced, they would be guarded on and
    # recompiled as it changes. The graphs hold the user's training_step and nothing of ours.
    from neurenix.data import fit_sequence

    graphs = counted_graphs()
    net = make_mlp(classes=CLASSES)
    fitted = torch.compile(lit_classifier(net), backend="neurenix_counting")
    methods = [ExperienceReplay(net, memory_size=16, seed=0), KnowledgeDistillation(net)]
    fit_sequence(quiet_trainer(callbacks=methods), fitted, task_sequence(), epochs_per_task=2)
    files = {innermost_file(node.meta["stack_trace"]) for graph in graphs for node in graph.graph.nodes if node.meta.get("stack_trace")}
    assert files and all(name.endswith("tests/helpers.py") for name in files), files
    # One graph for the first batch, one once the batch grows with replayed samples (then with
    # dynamic shapes): not one per step, although the memory changes at every step.
    assert len(graphs) == 2
    # Other methods beside the same capture reuse the graphs: the compiled frames hold no method.
    others = [methods[1], EWC(net, fisher_sample_size=8, seed=0), L2Regularization(net)]
    x, y = class_incremental_data(0)
    as_tuples = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, collate_fn=lambda b: tuple(torch.utils.data.default_collate(b))
    )
    quiet_trainer(callbacks=others).fit(fitted, as_tuples)  # task 2 to each
    assert others[0].finished_tasks == [0, 1, 2] and len(graphs) == 2


class SharedClassifier(ContinualLossMixin, L.LightningModule):
    """One class for several modules: their training_step is one compiled code, one cache."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_step_compiled_without_a_capture_is_not_reused_where_a_capture_must_see_the_forward():
    # Dynamo does not guard on module hooks: a training_step traced for replay (no hook) would be
    # reused for distillation's module, whose capture's hook would then never run.
    graphs = counted_graphs()
    first, second = make_mlp(classes=CLASSES), make_mlp(classes=CLASSES)
    data = task_sequence()
    for net, method in ((first, ExperienceReplay(first, memory_size=16, seed=0)), (second, KnowledgeDistillation(second))):
        quiet_trainer(callbacks=[method]).fit(torch.compile(SharedClassifier(net), backend="neurenix_counting"), datamodule=data)
    kd = method
    assert kd.finished_tasks == [0] and kd.teacher is not None
    assert len(graphs) == 3  # replay's two (the batch grows), distillation's own
