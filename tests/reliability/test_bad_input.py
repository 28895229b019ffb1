"""Every public entry point refuses bad input with the exception and message docs/reliability.md lists.

``ROWS`` is that table: one test per row, and a test that the docs show exactly these rows
(``python -c "from tests.reliability.test_bad_input import markdown_table; print(markdown_table())"``
prints it). A row without an exception is a documented policy (NaN in a training batch is not
scanned for, a plain fit with no batches is Lightning's to skip); its check asserts what the policy
promises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import neurenix as nx
from neurenix.automl import GridSearch
from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    GEM,
    MAS,
    BiC,
    ClassBalancedMemory,
    ContinualLossMixin,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SeenClassMask,
    SynapticIntelligence,
    mark_seen_classes,
)
from neurenix.data import (
    MNIST,
    ConcatTaskDataset,
    Digits,
    IDXFormatError,
    PermutePixels,
    TaskDataset,
    TaskSequenceDataModule,
    fit_sequence,
    permuted_benchmark,
    read_idx,
    split_benchmark,
)
from neurenix.metrics import (
    AccuracyMatrix,
    ForgettingCurves,
    average_accuracy,
    forward_transfer,
)
from tests.helpers import lit_classifier, quiet_trainer

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
#: The rehearsal methods of issue 15: their train_step stores its own batch; they need class labels.
REHEARSAL = (DarkExperienceReplay, ERACE, AGEM, GEM)
#: The importance methods of issue 17.
IMPORTANCE = (MAS, RWalk)
#: The exemplar methods of issue 16.
EXEMPLAR = (ICaRL, BiC, GDumb)
METHODS = (EWC, ExperienceReplay, L2Regularization, SynapticIntelligence, KnowledgeDistillation, *REHEARSAL, *IMPORTANCE, *EXEMPLAR)
ALL_METHODS = ("`EWC`, `ExperienceReplay`, `L2Regularization`, `SynapticIntelligence`, `KnowledgeDistillation`, "
               "`DarkExperienceReplay`, `ERACE`, `AGEM`, `GEM`, `MAS`, `RWalk`, `ICaRL`, `BiC`, `GDumb`")
POLICY = "none (policy)"


# ---------------------------------------------------------------------------- small pieces
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def data(samples: int = 16, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, 4, generator=generator), torch.randint(0, 3, (samples,), generator=generator)
    if nan:
        x[3, 1] = float("nan")
    return x, y


def loader(samples: int = 16, nan: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*data(samples, nan)), batch_size=4)


def step(method: Any, task_id: int, nan: bool = False) -> torch.Tensor:
    """One ``train_step`` of ``task_id`` on the first four samples."""
    x, y = data(nan=nan)
    return method.train_step(torch.optim.SGD(method.model.parameters(), lr=0.1), F.cross_entropy, x[:4], y[:4], task_id)


def trained(cls: type, **options: Any) -> Any:
    method = cls(mlp(), **options)
    step(method, 0)
    return method


def tasks(count: int, samples: int = 16) -> list[TaskDataset]:
    return [TaskDataset(*data(samples), task_id=t) for t in range(count)]


def sequence(count: int = 2) -> TaskSequenceDataModule:
    return TaskSequenceDataModule(tasks(count), tasks(count), batch_size=4)


def fit(callbacks: list, module: L.LightningModule, train: Any, **options: Any) -> L.Trainer:
    trainer = quiet_trainer(callbacks=callbacks, **options)
    trainer.fit(module, train)
    return trainer


def fit_with(cls: type, mixin: bool = True, nan: bool = False, **options: Any) -> Any:
    net = mlp()
    method = cls(net, **options)
    fit([method], lit_classifier(net, mixin=mixin), loader(nan=nan))
    return method


def fit_sequence_with(tmp: Path, method: Optional[Callable[[nn.Module], Any]] = None, datamodule=None, **options: Any):
    net = mlp()
    callbacks = [] if method is None else [method(net)]
    trainer = quiet_trainer(callbacks=callbacks, **options)
    fit_sequence(trainer, lit_classifier(net), datamodule or sequence(), epochs_per_task=1)
    return trainer, callbacks


# ---------------------------------------------------------------------------- composite cases
class _Spawnable(L.LightningModule):
    """At module level: ddp_spawn pickles the module (it is refused before that, with the callbacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def spawned_with(cls: type) -> Callable[[Any], Any]:
    def call(_):
        module = _Spawnable()
        trainer = quiet_trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=[cls(module.net)])
        trainer.fit(module, loader())
    return call


def train_step_with_another_id(_):
    method = EWC(mlp())
    method.register_task(0, loader())
    step(method, 1)


def fit_again(_):
    net = mlp()
    module, trainer = lit_classifier(net), quiet_trainer(callbacks=[EWC(net)])
    trainer.fit(module, loader())
    trainer.fit(module, loader())


def dict_batches_with_ewc(_, cls: type = EWC):
    net = mlp()

    class DictModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    fit([cls(net)], DictModule(), DataLoader(DictBatches(), batch_size=4))


def dict_batches_with(cls: type) -> Callable[[Any], Any]:
    return lambda tmp: dict_batches_with_ewc(tmp, cls)


class _CallsItsNet(ContinualLossMixin, L.LightningModule):
    """``training_step`` calls ``self.net(x)``, not ``self(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def distillation_of_the_lightning_module(_):
    module = _CallsItsNet()
    fit([KnowledgeDistillation(module)], module, loader())


def regression_with_ewc(_):
    method = EWC(nn.Linear(4, 1))
    x, _ = data()
    method.train_step(torch.optim.SGD(method.model.parameters(), lr=0.1), lambda f, t: (f - t).square().mean(), x, x[:, :1], 0)


def reuse_with_register_task(_):
    method = trained(EWC)
    method.register_task(1)
    method.register_task(0)


def reuse_with_train_step(_):
    method = trained(L2Regularization)
    step(method, 1)
    step(method, 0)


def moved_after_construction(_):
    method = EWC(mlp(), device="cpu")
    method.model.to("meta")
    step(method, 0)


def nan_step_returns_nan_loss(_):
    method = EWC(mlp())
    loss = step(method, 0, nan=True)
    return bool(loss.isnan())


def nan_penalty(cls: type) -> Callable[[Any], Any]:
    def call(_):
        method = trained(cls)
        method.register_task(0, loader())  # task 0 consolidated on clean data
        step(method, 1, nan=True)  # the parameters are NaN now
        (method.get_ewc_loss if cls is EWC else method.get_regularization_loss)()  # MAS, RWalk: the same getter

    return call


def si_without_backward(_):
    method = SynapticIntelligence(mlp())
    method.register_task(0)
    method.update_importance(torch.tensor(1.0))


def seen_units_without_labels(_):
    method = KnowledgeDistillation(mlp(), units="seen")
    with torch.no_grad():
        method.model[0].weight.add_(1.0)  # trained outside train_step
    method.register_task(0)


def replay_with(first: torch.Tensor, then: torch.Tensor) -> Callable[[Any], Any]:
    def call(_):
        method = ExperienceReplay(mlp(), memory_size=8)
        y = torch.zeros(first.shape[0], dtype=torch.long)
        method.add_to_memory(first, y, 0)
        method.add_to_memory(then, y, 0)

    return call


class DictBatches(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        x, y = data()
        return {"x": x[index], "y": y[index]}


def step_returning_float(_):
    net = mlp()

    class FloatLoss(type(lit_classifier(net))):  # the mixin wraps this training_step too
        def training_step(self, batch, batch_idx):
            return 0.5

    fit([L2Regularization(net)], FloatLoss(net), loader())


def dict_batches(_):
    net = mlp()
    fit([ExperienceReplay(net)], lit_classifier(net), DataLoader(DictBatches(), batch_size=4))


def nan_parameters_clean_data_of(cls: type) -> Callable[[Any], Any]:
    def call(_):
        method = trained(cls)
        with torch.no_grad():
            method.model[0].weight.fill_(float("nan"))
        method.register_task(0, loader())  # consolidates task 0 at NaN parameters

    return call


nan_parameters_clean_data = nan_parameters_clean_data_of(EWC)


def predicted_fisher_with_mse(_):
    model = nn.Sequential(nn.Linear(4, 3))
    EWC(model, fisher="predicted").train_step(torch.optim.SGD(model.parameters()), F.mse_loss, X, torch.zeros(16, 3), 0)


def fisher_supplied_later(fisher: str) -> Callable[[Any], Any]:
    def call(_):
        method = trained(EWC, fisher=fisher)
        method.register_task(1)  # task 0 consolidated without data (a warning)
        method.update_fisher(0, loader(nan=True))

    return call


def memory_untouched_by_nan(_):
    method = ExperienceReplay(mlp(), memory_size=32)
    with pytest.raises(ValueError):
        method.add_to_memory(*data(nan=True), 0)
    return len(method.memory) == 0 and method.memory.num_seen == 0


def refused_step_changes_nothing(cls: type) -> Callable[[Any], Any]:
    def call(_):
        method = trained(cls)  # one step: the model moved, the memory holds its batch
        optimizer = torch.optim.Adam(method.model.parameters(), lr=0.1)
        x, y = data()
        method.train_step(optimizer, F.cross_entropy, x[4:8], y[4:8], 0)
        before = ([p.detach().clone() for p in method.model.parameters()], len(method.memory), method.memory.num_seen,
                  [s["exp_avg"].clone() for s in optimizer.state.values()])
        with pytest.raises(ValueError, match="needs class labels as targets"):
            method.train_step(optimizer, F.cross_entropy, x[8:12], y[8:12].float(), 0)
        after = ([p.detach() for p in method.model.parameters()], len(method.memory), method.memory.num_seen,
                 [s["exp_avg"] for s in optimizer.state.values()])
        unchanged = all(torch.equal(a, b) for a, b in zip(before[0] + before[3], after[0] + after[3]))
        return unchanged and before[1:3] == after[1:3] == (8, 8) and all(p.grad is None or not p.grad.isnan().any()
                                                                        for p in method.model.parameters())

    return call


def rehearsal_fit_with(cls: type, targets: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], Any]:
    def call(_):
        net = mlp()
        x, y = data()
        fit([cls(net)], lit_classifier(net), DataLoader(TensorDataset(x, targets(y)), batch_size=4))

    return call


def two_rehearsal_methods(_):
    net = mlp()
    fit([ExperienceReplay(net), DarkExperienceReplay(net)], lit_classifier(net), loader())


def er_ace_with_distillation(_):
    net = mlp()
    fit([KnowledgeDistillation(net), ERACE(net)], lit_classifier(net), loader())


def icarl_with_distillation(_):
    net = mlp()
    fit([ICaRL(net), KnowledgeDistillation(net)], lit_classifier(net), loader())


def gdumb_without_a_task_sequence(_):
    net = mlp()
    fit([GDumb(net)], lit_classifier(net), loader())


def gdumb_with_another_method(tmp):
    fit_sequence_with(tmp, lambda net: GDumb(net))  # a task sequence alone is fine
    net = mlp()
    trainer = quiet_trainer(callbacks=[GDumb(net), EWC(net)])
    fit_sequence(trainer, lit_classifier(net), sequence(), epochs_per_task=1)


def task_switch_without_data(cls: type) -> Callable[[Any], Any]:
    def call(_):
        net = mlp()
        method, optimizer = cls(net, memory_size=10), torch.optim.SGD(net.parameters(), lr=0.1)
        method.train_step(optimizer, F.cross_entropy, X, Y, 1)
        state = {name: p.detach().clone() for name, p in net.named_parameters()}
        try:
            method.train_step(optimizer, F.cross_entropy, X, Y, 2)
        finally:  # refused before any change: the parameters are task 1's
            assert all(torch.equal(p, state[name]) for name, p in net.named_parameters()) and method.active_task == 1

    return call


def gdumb_training(**options: Any) -> Callable[[Any], Any]:
    def call(_):
        gdumb = GDumb(mlp(), memory_size=10)
        if options.pop("filled", True):
            gdumb.add_to_memory(X, Y, 0)
        arguments = {"optimizer_factory": lambda p: torch.optim.SGD(p, lr=0.1), "loss_fn": F.cross_entropy,
                     "epochs": 1, "batch_size": 4, **options}
        gdumb.train_on_memory(**arguments)

    return call


def nan_fit_runs_on(cls: type) -> Callable[[Any], Any]:
    def call(_):
        method = fit_with(cls, nan=True)
        return method.finished_tasks == [0] and all(bool(p.isnan().all()) for p in method.model.parameters())

    return call


def empty_fit_is_refused(_):
    net = mlp()
    fit([EWC(net)], lit_classifier(net), DataLoader(TensorDataset(*data(0)), batch_size=4))


class SilentTask(TaskSequenceDataModule):
    """Task 1's training loader yields nothing (a custom loader, a sampler that filters everything)."""

    def train_dataloader(self):
        if self.current_task == 1:
            return DataLoader(TensorDataset(*data(0)), batch_size=4)
        return super().train_dataloader()


def sequence_with_silent_task(tmp):
    fit_sequence_with(tmp, EWC, SilentTask(tasks(3), tasks(3), batch_size=4))


def silent_task_refused_before_its_fit(tmp):
    net = mlp()
    method = EWC(net)
    trainer = quiet_trainer(callbacks=[method])
    datamodule = SilentTask(tasks(3), tasks(3), batch_size=4)
    with pytest.raises(ValueError):
        fit_sequence(trainer, lit_classifier(net), datamodule, epochs_per_task=1)
    return method.finished_tasks == [0] and method.active_task is None and trainer.global_step == 4


def task_reused_in_sequence(tmp):
    net = mlp()
    trainer = quiet_trainer(callbacks=[EWC(net)])
    datamodule = sequence()
    fit_sequence(trainer, lit_classifier(net), datamodule, epochs_per_task=1)
    datamodule.set_task(0)
    fit_sequence(trainer, lit_classifier(net), datamodule, epochs_per_task=1)


def checkpoint_of(tmp: Path, method=None, count: int = 2) -> Path:
    trainer, _ = fit_sequence_with(tmp, method, sequence(count))
    path = tmp / f"sequence{count}.ckpt"
    trainer.save_checkpoint(path)
    return path


def resume_from(path_of: Callable[[Path], Path], method=None, count: int = 2) -> Callable[[Path], Any]:
    def call(tmp):
        net = mlp()
        trainer = quiet_trainer(callbacks=[] if method is None else [method(net)])
        fit_sequence(trainer, lit_classifier(net), sequence(count), epochs_per_task=1, ckpt_path=str(path_of(tmp)))

    return call


def plain_checkpoint(tmp: Path) -> Path:
    trainer = fit([], lit_classifier(mlp()), loader())
    trainer.save_checkpoint(tmp / "plain.ckpt")
    return tmp / "plain.ckpt"


def truncated_idx(tmp: Path) -> Any:
    (tmp / "truncated-idx").write_bytes(b"\x00\x00\x08")
    return read_idx(tmp / "truncated-idx")


def grid_search_fit(X, y, model_fn=None) -> Any:
    def ewc(importance):
        return EWC(nn.Linear(4, 3), importance=importance)

    return GridSearch(model_fn or ewc, {"importance": [1.0, 2.0]}, cv=2, epochs=1).fit(X, y)


def replay_grid_search_on_nan(_) -> Any:
    def replay(memory_size):
        return ExperienceReplay(nn.Linear(4, 3), memory_size=memory_size)

    return GridSearch(replay, {"memory_size": [4, 8]}, cv=2, epochs=1).fit(*data(nan=True))


def accepted(value: Any) -> bool:
    return value is not None


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    entry: str  # the entry point, markdown
    invalid: str  # the invalid input, markdown
    error: Optional[type]  # None: a documented policy, `calls` return True when it holds
    message: str  # a literal part of the message (policy rows: what happens)
    calls: tuple[Callable[[Path], Any], ...]
    known_failure: Optional[str] = None

    @property
    def id(self) -> str:
        def words(text: str, length: int) -> str:
            return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")[:length].strip("-")

        return f"{words(self.entry.replace(ALL_METHODS, 'every method'), 40)}--{words(self.invalid, 70)}"


def row(entry, invalid, error, message, *calls, known_failure=None) -> Row:
    return Row(entry, invalid, error, message, tuple(calls), known_failure)


def each_method(make: Callable[[type], Any]) -> tuple:
    return tuple((lambda _, cls=cls: make(cls)) for cls in METHODS)


def meta_model() -> nn.Module:
    return mlp().to("meta")


E = "`EWC(model, ...)`"
TS = "`train_step(optimizer, loss_fn, inputs, targets, task_id)`"
ER = "`ExperienceReplay.add_to_memory(inputs, targets, task_id)`"
SI = "`SynapticIntelligence.update_importance(loss)`"
FIT = "`Trainer.fit` with a method"
DER = "`DarkExperienceReplay(model, ...)`"
ACE = "`ERACE(model, ...)`"
AG = "`AGEM(model, ...)`"
GE = "`GEM(model, ...)`"
IC = "`ICaRL(model, ...)`"
GD = "`GDumb(model, ...)`"
GDT = "`GDumb.train_on_memory(optimizer_factory, loss_fn, epochs, batch_size)`"
ERX = "`ExperienceReplay(model, ...)` with exemplars"
MASK = "`SeenClassMask(num_classes)`"
MA = "`MAS(model, ...)`"
RW = "`RWalk(model, ...)`"
NEW = "`DarkExperienceReplay`, `ERACE`, `AGEM`, `GEM`"
NEW_ATM = f"`add_to_memory(inputs, targets, task_id)` of {NEW}"
NEW_TS = f"`train_step(optimizer, loss_fn, inputs, targets, task_id)` of {NEW}"
NEW_GRB = f"`get_replay_batch(batch_size)` of {NEW}"
LABELS = "needs class labels as targets (a 1-D integer tensor: its memory terms are cross-entropies), got targets of shape"
FS = "`fit_sequence(trainer, model, datamodule, ...)`"
DM = "`TaskSequenceDataModule(train_tasks, test_tasks, ...)`"
TD = "`TaskDataset(inputs, targets, task_id, ...)`"
GS = "`GridSearch(model_fn, param_space, scoring, cv)`"
GF = "`GridSearch.fit(X, y)`"
X, Y = data()

ROWS: list[Row] = [
    # construction of the methods
    row(ALL_METHODS, "`model` not an `nn.Module`", TypeError, "model must be a torch.nn.Module, got str", *each_method(lambda cls: cls("net"))),
    row(ALL_METHODS, "`device=\"cpu\"`, the model on another device (`meta`)", ValueError,
        "device='cpu' was given but the model's parameter '0.weight' is on 'meta'", *each_method(lambda cls: cls(meta_model(), device="cpu"))),
    row(ALL_METHODS, "`device=\"meta\"` (another device), the model on the CPU", ValueError,
        "device='meta' was given but the model's parameter '0.weight' is on 'cpu'", *each_method(lambda cls: cls(mlp(), device="meta"))),
    row(ALL_METHODS, "`device=\"gpu0\"`", ValueError, "device must name a torch device, got 'gpu0'", *each_method(lambda cls: cls(mlp(), device="gpu0"))),
    row(ALL_METHODS, "`device=0` (an int)", TypeError, "device must be a torch.device, a string or None, got int: 0", *each_method(lambda cls: cls(mlp(), device=0))),
    row(E, "`importance=-1.0`", ValueError, "importance must be >= 0.0, got -1.0", lambda _: EWC(mlp(), importance=-1.0)),
    row(E, "`importance=nan`", ValueError, "importance must be finite, got nan", lambda _: EWC(mlp(), importance=float("nan"))),
    row(E, "`importance=\"high\"`", TypeError, "importance must be a real number, got str: 'high'", lambda _: EWC(mlp(), importance="high")),
    row(E, "`fisher_sample_size=0`", ValueError, "fisher_sample_size must be >= 1, got 0", lambda _: EWC(mlp(), fisher_sample_size=0)),
    row(E, "`fisher_sample_size=2.5`", TypeError, "fisher_sample_size must be an int, got float: 2.5", lambda _: EWC(mlp(), fisher_sample_size=2.5)),
    row(E, "`gamma=1.5`", ValueError, "gamma must be <= 1.0, got 1.5", lambda _: EWC(mlp(), gamma=1.5)),
    row(E, "`fisher=\"fast\"`", ValueError, "fisher must be one of 'empirical', 'true', 'predicted'; got 'fast'", lambda _: EWC(mlp(), fisher="fast")),
    row(E, "`online=\"yes\"`", TypeError, "online must be a bool, got str: 'yes'", lambda _: EWC(mlp(), online="yes")),
    row(E, "`seed=-1`", ValueError, "seed must be >= 0, got -1", lambda _: EWC(mlp(), seed=-1)),
    row(E, "`likelihood=\"mse\"`", ValueError, "likelihood must be one of 'categorical', 'gaussian', 'bernoulli'; got 'mse'",
        lambda _: EWC(mlp(), likelihood="mse")),
    row(ALL_METHODS, "`model` a parameter (`model.weight`)", TypeError,
        "model must be a torch.nn.Module, got a Parameter of shape (5, 4): pass the module that holds it",
        *each_method(lambda cls: cls(mlp()[0].weight))),
    row("`ExperienceReplay(model, ...)`", "`memory_size=-1`", ValueError, "memory_size must be >= 0, got -1", lambda _: ExperienceReplay(mlp(), memory_size=-1)),
    row("`ExperienceReplay(model, ...)`", "`replay_ratio=-0.5`", ValueError, "replay_ratio must be >= 0.0, got -0.5", lambda _: ExperienceReplay(mlp(), replay_ratio=-0.5)),
    row(f"{NEW} `(model, ...)`", "`memory_size=-1`", ValueError, "memory_size must be >= 0, got -1",
        *(lambda _, cls=cls: cls(mlp(), memory_size=-1) for cls in REHEARSAL)),
    row(f"{NEW} `(model, ...)`", "`memory_size=2.5`", TypeError, "memory_size must be an int, got float: 2.5",
        *(lambda _, cls=cls: cls(mlp(), memory_size=2.5) for cls in REHEARSAL)),
    row(f"{NEW} `(model, ...)`", "`seed=-1`", ValueError, "seed must be >= 0, got -1", *(lambda _, cls=cls: cls(mlp(), seed=-1) for cls in REHEARSAL)),
    row(DER, "`alpha=-0.1`", ValueError, "alpha must be >= 0.0, got -0.1", lambda _: DarkExperienceReplay(mlp(), alpha=-0.1)),
    row(DER, "`alpha=nan`", ValueError, "alpha must be finite, got nan", lambda _: DarkExperienceReplay(mlp(), alpha=float("nan"))),
    row(DER, "`alpha=\"high\"`", TypeError, "alpha must be a real number, got str: 'high'", lambda _: DarkExperienceReplay(mlp(), alpha="high")),
    row(DER, "`beta=-1.0`", ValueError, "beta must be >= 0.0, got -1.0", lambda _: DarkExperienceReplay(mlp(), beta=-1.0)),
    row(DER, "`beta=inf`", ValueError, "beta must be finite, got inf", lambda _: DarkExperienceReplay(mlp(), beta=float("inf"))),
    row(DER, "`replay_ratio=-0.5`", ValueError, "replay_ratio must be >= 0.0, got -0.5", lambda _: DarkExperienceReplay(mlp(), replay_ratio=-0.5)),
    row(ACE, "`replay_ratio=nan`", ValueError, "replay_ratio must be finite, got nan", lambda _: ERACE(mlp(), replay_ratio=float("nan"))),
    row(AG, "`reference_size=0`", ValueError, "reference_size must be >= 1, got 0", lambda _: AGEM(mlp(), reference_size=0)),
    row(AG, "`reference_size=2.5`", TypeError, "reference_size must be an int, got float: 2.5", lambda _: AGEM(mlp(), reference_size=2.5)),
    row(GE, "`margin=-0.5`", ValueError, "margin must be >= 0.0, got -0.5", lambda _: GEM(mlp(), margin=-0.5)),
    row(GE, "`margin=nan`", ValueError, "margin must be finite, got nan", lambda _: GEM(mlp(), margin=float("nan"))),
    row(ERX, "`selection=\"mean\"`", ValueError, "selection must be one of 'herding', 'closest', 'random'; got 'mean'",
        lambda _: ExperienceReplay(mlp(), selection="mean")),
    row(ERX, "`selection=\"herding\"` without `feature_extractor`", ValueError,
        "selection='herding' ranks samples by their features: give feature_extractor=", lambda _: ExperienceReplay(mlp(), selection="herding")),
    row(ERX, "`feature_extractor=\"encoder\"` (no such submodule)", ValueError,
        "feature_extractor='encoder' names no submodule of Sequential; its submodules include ['0', '1', '2']",
        lambda _: ExperienceReplay(mlp(), selection="closest", feature_extractor="encoder")),
    row(ERX, "`feature_extractor` without `selection`", ValueError, "feature_extractor is used by exemplar selection only",
        lambda _: ExperienceReplay(mlp(), feature_extractor="0")),
    row(f"{ER} with `selection=`", "any batch", ValueError,
        "ExperienceReplay(selection='random') chooses its exemplars from each task's data at the task's end",
        lambda _: ExperienceReplay(mlp(), selection="random").add_to_memory(X, Y, 0)),
    row(IC, "`memory_size=-1`", ValueError, "memory_size must be >= 0, got -1", lambda _: ICaRL(mlp(), memory_size=-1)),
    row(IC, "`replay_ratio=-1.0`", ValueError, "replay_ratio must be >= 0.0, got -1.0", lambda _: ICaRL(mlp(), replay_ratio=-1.0)),
    row(IC, "`selection=\"greedy\"`", ValueError, "selection must be one of 'herding', 'closest', 'random'; got 'greedy'",
        lambda _: ICaRL(mlp(), selection="greedy")),
    row(IC, "`feature_extractor=\"nowhere\"`", ValueError, "feature_extractor='nowhere' names no submodule of Sequential",
        lambda _: ICaRL(mlp(), feature_extractor="nowhere")),
    row("`ICaRL.train_step(...)`", "a new `task_id` while the task before was given no data", ValueError,
        "ICaRL chooses task 1's exemplars from its data when the task ends, and got none: pass the task's data to register_task(1, dataloader)",
        task_switch_without_data(ICaRL)),
    row("`BiC(model, ...)`", "`memory_size=-1`", ValueError, "memory_size must be >= 0, got -1", lambda _: BiC(mlp(), memory_size=-1)),
    row("`BiC(model, ...)`", "`held_out=0`", ValueError, "held_out must be > 0.0, got 0.0", lambda _: BiC(mlp(), held_out=0.0)),
    row("`BiC(model, ...)`", "`held_out=0.6`", ValueError, "held_out must be <= 0.5, got 0.6", lambda _: BiC(mlp(), held_out=0.6)),
    row("`BiC(model, ...)`", "`temperature=0`", ValueError, "temperature must be > 0.0, got 0.0", lambda _: BiC(mlp(), temperature=0)),
    row("`BiC(model, ...)`", "`feature_extractor=\"nowhere\"`", ValueError, "feature_extractor='nowhere' names no submodule of Sequential",
        lambda _: BiC(mlp(), feature_extractor="nowhere")),
    row("`BiC.train_step(...)`", "a new `task_id` while the task before was given no data", ValueError,
        "BiC chooses task 1's exemplars from its data when the task ends, and got none", task_switch_without_data(BiC)),
    row("`BiC.train_step(...)`", "float targets", ValueError, "BiC needs class labels as targets (a 1-D integer tensor",
        lambda _: BiC(mlp()).train_step(torch.optim.SGD(mlp().parameters(), lr=0.1), F.cross_entropy, X, Y.float(), 0)),
    row("`ICaRL.train_step(...)`", "float targets", ValueError, "ICaRL needs class labels as targets (a 1-D integer tensor",
        lambda _: ICaRL(mlp()).train_step(torch.optim.SGD(mlp().parameters(), lr=0.1), F.cross_entropy, X, Y.float(), 0)),
    row(GD, "`memory_size=0`", ValueError, "memory_size must be >= 1, got 0", lambda _: GDumb(mlp(), memory_size=0)),
    row(GD, "`memory_size=2.5`", TypeError, "memory_size must be an int, got float: 2.5", lambda _: GDumb(mlp(), memory_size=2.5)),
    row("`GDumb.train_step(...)`", "any batch", TypeError, "GDumb does not train on the stream, so it has no train_step",
        lambda _: GDumb(mlp()).train_step(torch.optim.SGD(mlp().parameters(), lr=0.1), F.cross_entropy, X, Y, 0)),
    row(GDT, "an empty memory", ValueError, "train_on_memory: the memory is empty; offer samples with add_to_memory first",
        gdumb_training(filled=False)),
    row(GDT, "`epochs=0`", ValueError, "epochs must be >= 1, got 0", gdumb_training(epochs=0)),
    row(GDT, "`batch_size=0`", ValueError, "batch_size must be >= 1, got 0", gdumb_training(batch_size=0)),
    row(GDT, "`optimizer_factory=\"sgd\"`", TypeError, "optimizer_factory must be a function parameters -> optimizer",
        gdumb_training(optimizer_factory="sgd")),
    row(GDT, "`loss_fn=\"ce\"`", TypeError, "loss_fn must be callable, got str", gdumb_training(loss_fn="ce")),
    row(MA, "`importance=-1.0`", ValueError, "importance must be >= 0.0, got -1.0", lambda _: MAS(mlp(), importance=-1.0)),
    row(MA, "`sample_size=0`", ValueError, "sample_size must be >= 1, got 0", lambda _: MAS(mlp(), sample_size=0)),
    row(MA, "`sample_size=2.5`", TypeError, "sample_size must be an int, got float: 2.5", lambda _: MAS(mlp(), sample_size=2.5)),
    row(MA, "`seed=-1`", ValueError, "seed must be >= 0, got -1", lambda _: MAS(mlp(), seed=-1)),
    row(RW, "`importance=nan`", ValueError, "importance must be finite, got nan", lambda _: RWalk(mlp(), importance=float("nan"))),
    row(RW, "`alpha=1.5`", ValueError, "alpha must be <= 1.0, got 1.5", lambda _: RWalk(mlp(), alpha=1.5)),
    row(RW, "`alpha=-0.1`", ValueError, "alpha must be >= 0.0, got -0.1", lambda _: RWalk(mlp(), alpha=-0.1)),
    row(RW, "`epsilon=0`", ValueError, "epsilon must be > 0.0, got 0.0", lambda _: RWalk(mlp(), epsilon=0)),
    row(RW, "`interval=0`", ValueError, "interval must be >= 1, got 0", lambda _: RWalk(mlp(), interval=0)),
    row(RW, "`interval=2.5`", TypeError, "interval must be an int, got float: 2.5", lambda _: RWalk(mlp(), interval=2.5)),
    row("`L2Regularization(model, ...)`", "`importance=inf`", ValueError, "importance must be finite, got inf", lambda _: L2Regularization(mlp(), importance=float("inf"))),
    row("`SynapticIntelligence(model, ...)`", "`xi=-0.1`", ValueError, "xi must be >= 0.0, got -0.1", lambda _: SynapticIntelligence(mlp(), xi=-0.1)),
    row("`KnowledgeDistillation(model, ...)`", "`temperature=0`", ValueError, "temperature must be > 0.0, got 0.0", lambda _: KnowledgeDistillation(mlp(), temperature=0)),
    row("`KnowledgeDistillation(model, ...)`", "`alpha=1.5`", ValueError, "alpha must be <= 1.0, got 1.5", lambda _: KnowledgeDistillation(mlp(), alpha=1.5)),
    row("`KnowledgeDistillation(model, ...)`", "`units=\"some\"`", ValueError, "units must be one of 'all', 'seen'; got 'some'", lambda _: KnowledgeDistillation(mlp(), units="some")),
    row("`KnowledgeDistillation(model, ...)`", "`alpha=\"sometimes\"`", ValueError,
        "alpha must be a number in [0, 1], one of '1-1/t' or a callable of the task index; got 'sometimes'",
        lambda _: KnowledgeDistillation(mlp(), alpha="sometimes")),
    row("`ExperienceReplay(model, ...)`", "`offer=\"twice\"`", ValueError, "offer must be one of 'every_epoch', 'once'; got 'twice'",
        lambda _: ExperienceReplay(mlp(), offer="twice")),
    row(ERX, "`offer=\"once\"` with `selection=\"random\"`", ValueError,
        "offer='once' says which training batches enter a memory filled from the stream; with selection='random' exemplars are "
        "chosen from each task's data at its end: leave offer at 'every_epoch'",
        lambda _: ExperienceReplay(mlp(), offer="once", selection="random")),
    row(MASK, "`num_classes=0`", ValueError, "num_classes must be >= 1, got 0", lambda _: SeenClassMask(0)),
    row(MASK, "`num_classes=10.0`", TypeError, "num_classes must be an int, got float: 10.0", lambda _: SeenClassMask(10.0)),
    row("`SeenClassMask.mark_seen(classes)`", "a class out of range (10 of 10)", ValueError,
        "mark_seen got class 10, outside [0, 10) for SeenClassMask(10)", lambda _: SeenClassMask(10).mark_seen(10)),
    row("`SeenClassMask.mark_seen(classes)`", "float labels", TypeError,
        "mark_seen needs integer class labels, got a tensor of dtype torch.float32", lambda _: SeenClassMask(10).mark_seen(torch.tensor([1.0]))),
    row("`mark_seen_classes(model, dataset)`", "a dataset without `classes` or `targets`", TypeError,
        "mark_seen_classes reads a dataset's classes from its integer `classes` or its `targets`; TensorDataset has neither: "
        "call mask.mark_seen(classes) on the model's SeenClassMask instead",
        lambda _: mark_seen_classes(nn.Sequential(nn.Linear(4, 3), SeenClassMask(3)), TensorDataset(torch.zeros(2, 4)))),
    # the API document's calls
    row("`register_task(task_id, dataloader)`", "`task_id=\"1\"`", TypeError, "task_id must be an int, got str: '1'", *each_method(lambda cls: cls(mlp()).register_task("1"))),
    row("`register_task(task_id, dataloader)`", "a task id reused out of order (0 after 1)", ValueError,
        "task_id=0 was already trained and consolidated (tasks so far: [0, 1]; task 1 is being trained)", reuse_with_register_task),
    row(TS, "a task id reused out of order (0 after 1)", ValueError, "task_id=0 was already trained and consolidated", reuse_with_train_step),
    row(TS, "`task_id=1` after `register_task(0, ...)`, task 0 not trained", ValueError,
        "train_step got task_id=1 while task 0 is registered and no step has trained it", train_step_with_another_id),
    row("`EWC.train_step(...)`", "floating-point targets, a `loss_fn` of no known likelihood (a lambda)", ValueError,
        "EWC cannot tell the likelihood of floating-point targets (torch.float32, from train_step's targets", regression_with_ewc),
    row(TS, "`inputs` a list", TypeError, "inputs must be a torch.Tensor, got list",
        lambda _: EWC(mlp()).train_step(torch.optim.SGD(mlp().parameters()), F.cross_entropy, [1.0], Y, 0)),
    row(TS, "0-dimensional `inputs`", ValueError, "inputs must have a batch dimension, got a 0-dimensional tensor",
        lambda _: EWC(mlp()).train_step(torch.optim.SGD(mlp().parameters()), F.cross_entropy, torch.tensor(1.0), Y, 0)),
    row(TS, "16 inputs, 5 targets", ValueError, "inputs and targets must hold the same number of samples, got inputs with 16",
        lambda _: EWC(mlp()).train_step(torch.optim.SGD(mlp().parameters()), F.cross_entropy, X, Y[:5], 0)),
    row(TS, "an empty batch", ValueError, "inputs and targets must hold at least one sample, got an empty batch",
        lambda _: EWC(mlp()).train_step(torch.optim.SGD(mlp().parameters()), F.cross_entropy, X[:0], Y[:0], 0)),
    row(TS, "`optimizer=None`", TypeError, "optimizer must be a torch.optim.Optimizer, got NoneType",
        lambda _: EWC(mlp()).train_step(None, F.cross_entropy, X, Y, 0)),
    row(TS, "float64 inputs for a float32 model (PyTorch's message, raised in the model)", RuntimeError, "mat1 and mat2 must have the same dtype",
        lambda _: EWC(mlp()).train_step(torch.optim.SGD(mlp().parameters()), F.cross_entropy, X.double(), Y, 0)),
    row(TS, "built with `device=\"cpu\"`, the model moved since to another device (`meta`)", ValueError,
        "device='cpu' was given but the model's parameter '0.weight' is on 'meta'", moved_after_construction),
    row(TS, "NaN in `inputs`", None, "not scanned: returns the NaN loss, as PyTorch would", nan_step_returns_nan_loss),
    row("`EWC.register_task(task_id, dataloader)`", "a dataloader that yields nothing", ValueError,
        "EWC cannot estimate the Fisher: the task's data yielded no samples", lambda _: trained(EWC).register_task(0, loader(0))),
    row("`EWC.register_task(task_id, dataloader)`", "NaN in the task's inputs", ValueError,
        "dataloader must yield finite inputs, got NaN or infinity in 1 of the 16 samples drawn for task 0's Fisher",
        lambda _: trained(EWC).register_task(0, loader(nan=True))),
    row("`EWC.register_task(task_id, dataloader)`", "NaN parameters (set outside training), clean data", FloatingPointError,
        "EWC's Fisher holds NaN or infinite values for parameters ['0.weight'", nan_parameters_clean_data),
    row("`EWC.update_fisher(task_id, dataloader)`", "`dataloader=None`", ValueError, "update_fisher needs data for task 0, got dataloader=None",
        lambda _: trained(EWC).update_fisher(0, None)),
    row("`EWC.update_fisher(task_id, dataloader)`", "a task never registered", ValueError, "update_fisher: task_id=7 was never registered",
        lambda _: trained(EWC).update_fisher(7, loader())),
    row("`EWC.update_fisher(task_id, dataloader)`", "NaN in the task's inputs (`fisher=\"empirical\"` or `\"true\"`)", ValueError,
        "dataloader must yield finite inputs, got NaN or infinity in 1 of the 16 samples drawn for task 0's Fisher",
        fisher_supplied_later("empirical"), fisher_supplied_later("true")),
    row("`EWC.get_ewc_loss()`", "NaN parameters (a NaN batch trained)", FloatingPointError,
        "EWC penalty is nan: the parameter of '0.weight' holds NaN or infinite values", nan_penalty(EWC)),
    row("`L2Regularization` / `SynapticIntelligence` `.get_regularization_loss()`", "NaN parameters (a NaN batch trained)", FloatingPointError,
        "penalty is nan: the parameter of '0.weight' holds NaN or infinite values", nan_penalty(L2Regularization), nan_penalty(SynapticIntelligence)),
    row("`MAS` / `RWalk` `.get_regularization_loss()`", "NaN parameters (a NaN batch trained)", FloatingPointError,
        "penalty is nan: the parameter of '0.weight' holds NaN or infinite values", nan_penalty(MAS), nan_penalty(RWalk)),
    row(MA, "`register_task(task_id, dataloader)` with a dataloader that yields nothing", ValueError,
        "MAS cannot estimate the importance: the task's data yielded no samples", lambda _: trained(MAS).register_task(0, loader(0))),
    row(MA, "`register_task(task_id, dataloader)` with NaN in the task's inputs", ValueError,
        "dataloader must yield finite inputs, got NaN or infinity in 1 of the 16 samples drawn for task 0's importance",
        lambda _: trained(MAS).register_task(0, loader(nan=True))),
    row(MA, "`register_task(task_id, dataloader)`, NaN parameters (set outside training), clean data", FloatingPointError,
        "MAS's importance holds NaN or infinite values for parameters ['0.weight'", nan_parameters_clean_data_of(MAS)),
    row(E, "`fisher=\"predicted\", likelihood=\"gaussian\"`", ValueError,
        "fisher='predicted' needs a likelihood with a most likely label (categorical or bernoulli), got a gaussian one",
        lambda _: EWC(mlp(), fisher="predicted", likelihood="gaussian")),
    row("`EWC(model, fisher=\"predicted\").train_step(...)`", "a `loss_fn` of a Gaussian likelihood (`mse_loss`)", ValueError,
        "fisher='predicted' needs a likelihood with a most likely label", predicted_fisher_with_mse),
    row(ER, "`inputs` a list", TypeError, "inputs must be a torch.Tensor, got list", lambda _: ExperienceReplay(mlp()).add_to_memory([1.0], Y[:1], 0)),
    row(ER, "float64 samples after float32 ones", ValueError,
        "inputs of shape (16, 4) and dtype torch.float64 do not match the replay memory, which holds samples of shape (4,) and dtype torch.float32",
        replay_with(X, X.double())),
    row(ER, "samples of another shape", ValueError, "inputs of shape (16, 5) and dtype torch.float32 do not match the replay memory",
        replay_with(X, torch.zeros(16, 5))),
    row(ER, "`task_id=1.0`", TypeError, "task_id must be an int, got float: 1.0", lambda _: ExperienceReplay(mlp()).add_to_memory(X, Y, 1.0)),
    row(ER, "NaN in `inputs`", ValueError, "inputs must hold finite values, got NaN or infinity in 1 of 16 samples (the first: sample 3)",
        lambda _: ExperienceReplay(mlp()).add_to_memory(*data(nan=True), 0)),
    row(ER, "infinity in float `targets`", ValueError, "targets must hold finite values, got NaN or infinity in 1 of 16 samples (the first: sample 0)",
        lambda _: ExperienceReplay(mlp()).add_to_memory(X, torch.cat([torch.tensor([float("inf")]), Y[1:].float()]), 0)),
    row(ER, "NaN in `inputs`, the memory afterwards", None, "on the CPU, refused before anything is stored: the memory stays as it was (on an accelerator, raised at the next synchronization: below)", memory_untouched_by_nan),
    row("`ExperienceReplay.get_replay_batch(batch_size)`", "`batch_size=0`", ValueError, "batch_size must be >= 1, got 0",
        lambda _: ExperienceReplay(mlp()).get_replay_batch(0)),
    row("`ExperienceReplay.get_replay_batch(batch_size)`", "an empty memory", ValueError, "cannot draw a replay batch: the replay memory is empty",
        lambda _: ExperienceReplay(mlp()).get_replay_batch(4)),
    row("`ExperienceReplay.announce_classes(classes)`", "`classes=[0, -2]`", ValueError,
        "classes must be class labels (ints >= 0), got [0, -2]",
        lambda _: ExperienceReplay(mlp(), balance="classes").announce_classes([0, -2])),
    row("`ClassBalancedMemory.announce(keys)`", "`keys=[0, 1.0]`", ValueError,
        "announce takes the groups' keys as ints >= 0, got [0, 1.0]",
        lambda _: ClassBalancedMemory(4, torch.device("cpu"), 0).announce([0, 1.0])),
    row(NEW_ATM, "float targets", ValueError, f"{LABELS} (16,) and dtype torch.float32",
        *(lambda _, cls=cls: cls(mlp()).add_to_memory(X, Y.float(), 0) for cls in REHEARSAL)),
    row(NEW_ATM, "one-hot targets (2-D)", ValueError, f"{LABELS} (16, 3) and dtype torch.int64",
        *(lambda _, cls=cls: cls(mlp()).add_to_memory(X, F.one_hot(Y, 3), 0) for cls in REHEARSAL)),
    row(NEW_TS, "float targets", ValueError, f"{LABELS} (16,) and dtype torch.float32",
        *(lambda _, cls=cls: cls(mlp()).train_step(torch.optim.SGD(mlp().parameters()), F.cross_entropy, X, Y.float(), 0)
          for cls in REHEARSAL)),
    row(NEW_TS, "one-hot targets (2-D, float)", ValueError, f"{LABELS} (16, 3) and dtype torch.float32",
        *(lambda _, cls=cls: cls(mlp()).train_step(torch.optim.SGD(mlp().parameters()), F.cross_entropy, X, F.one_hot(Y, 3).float(), 0)
          for cls in REHEARSAL)),
    row(NEW_TS, "float targets, the model, the optimizer and the memory afterwards", None,
        "refused before anything changes: parameters, optimizer state and memory stay as they were",
        *(refused_step_changes_nothing(cls) for cls in REHEARSAL)),
    row(NEW_GRB, "`batch_size=0`", ValueError, "batch_size must be >= 1, got 0", *(lambda _, cls=cls: cls(mlp()).get_replay_batch(0) for cls in REHEARSAL)),
    row(NEW_GRB, "an empty memory", ValueError, "cannot draw a replay batch: the replay memory is empty",
        *(lambda _, cls=cls: cls(mlp()).get_replay_batch(4) for cls in REHEARSAL)),
    row(SI, "`loss=1.0` (a float)", TypeError, "loss must be a torch.Tensor, got float", lambda _: SynapticIntelligence(mlp()).update_importance(1.0)),
    row(SI, "a loss of shape (3,)", ValueError, "loss must be a scalar, got a tensor of shape (3,)", lambda _: SynapticIntelligence(mlp()).update_importance(torch.ones(3))),
    row(SI, "no task registered", ValueError, "update_importance: no task is being trained; call register_task(task_id) first",
        lambda _: SynapticIntelligence(mlp()).update_importance(torch.tensor(1.0))),
    row(SI, "called before `loss.backward()`", ValueError, "update_importance found no gradients: call loss.backward() before it", si_without_backward),
    row("`KnowledgeDistillation.get_distillation_loss(inputs, outputs)`", "`outputs` a list", TypeError, "outputs must be a torch.Tensor, got list",
        lambda _: KnowledgeDistillation(mlp()).get_distillation_loss(X, [0.0])),
    row("`KnowledgeDistillation(units=\"seen\").register_task(task_id)`", "a task trained outside `train_step`, no dataloader", ValueError,
        "KnowledgeDistillation(units='seen') needs task 0's labels", seen_units_without_labels),
    # under a Trainer
    row(FIT, "the method built for a model outside the LightningModule", ValueError,
        "was built for a model that is not part of the LightningModule being fit", lambda _: fit([EWC(mlp())], lit_classifier(mlp()), loader())),
    row(FIT, "`ExperienceReplay`, `KnowledgeDistillation`, `DarkExperienceReplay` or `ERACE`, the module without `ContinualLossMixin`",
        TypeError, "changes the training batch or loss, so the LightningModule must inherit neurenix.continual.ContinualLossMixin",
        *(lambda _, cls=cls: fit_with(cls, mixin=False) for cls in (ExperienceReplay, KnowledgeDistillation, DarkExperienceReplay, ERACE))),
    row(FIT, "two rehearsal methods (`ExperienceReplay` and `DarkExperienceReplay`)", ValueError,
        "ExperienceReplay and DarkExperienceReplay are on one Trainer: each keeps its own memory of the same stream",
        two_rehearsal_methods),
    row(FIT, "`ICaRL` and `KnowledgeDistillation`", ValueError, "ICaRL and KnowledgeDistillation are on one Trainer",
        icarl_with_distillation),
    row(FIT, "`GDumb`, a fit without a `TaskSequenceDataModule`", ValueError,
        "GDumb under a Trainer needs a neurenix.data.TaskSequenceDataModule", gdumb_without_a_task_sequence),
    row(FIT, "`GDumb` and another method (`EWC`)", ValueError, "GDumb and EWC are on one Trainer", gdumb_with_another_method),
    row(FIT, "`ERACE` and `KnowledgeDistillation`", ValueError, "ERACE and KnowledgeDistillation are on one Trainer: ERACE masks the outputs",
        er_ace_with_distillation),
    row(FIT, f"{NEW}, float targets (refused at the first batch)", ValueError, f"{LABELS} (4,) and dtype torch.float32",
        *(rehearsal_fit_with(cls, lambda y: y.float()) for cls in REHEARSAL)),
    row(FIT, "`ExperienceReplay`, batches that are dicts", TypeError,
        "neurenix reads training batches as (inputs, targets) or (inputs, targets, task_ids) tuples or lists of tensors, got dict",
        dict_batches),
    row(FIT, "`training_step` (under `ContinualLossMixin`) returning a float", TypeError,
        "training_step must return a loss tensor, a dict with a 'loss' tensor, or None; got float", step_returning_float),
    row(FIT, "`EWC`, NaN in the task's data", ValueError,
        "dataloader must yield finite inputs, got NaN or infinity in 1 of the 16 samples drawn for task 0's Fisher", lambda _: fit_with(EWC, nan=True)),
    row(FIT, "`L2Regularization`, `SynapticIntelligence`, `KnowledgeDistillation`, `ExperienceReplay`, `DarkExperienceReplay`, "
        "`ERACE`, `AGEM`, `GEM`, `RWalk`, NaN in the task's data", None,
        "not scanned: the loss and then the parameters become NaN (the memories keep the batches they are offered); "
        "the penalty getters raise FloatingPointError when read",
        *(nan_fit_runs_on(cls) for cls in METHODS if cls not in (EWC, MAS, *EXEMPLAR))),
    row(FIT, "`MAS`, NaN in the task's data", ValueError,
        "dataloader must yield finite inputs, got NaN or infinity in 1 of the 16 samples drawn for task 0's importance: "
        "MAS would consolidate a NaN importance", lambda _: fit_with(MAS, nan=True)),
    row(FIT, "`MAS` with dict batches (refused at the first batch)", TypeError,
        "MAS computes task 0's importance from the fit's training batches when the task ends, and cannot read them",
        dict_batches_with(MAS)),
    row(FIT, "`strategy=\"ddp_spawn\"` (refused in the parent, before any process starts)", RuntimeError,
        "does not support strategies that run each fit in new processes (start method 'spawn'", *(spawned_with(cls) for cls in METHODS)),
    row(FIT, "the same `Trainer` fit again (its `max_epochs` already reached)", RuntimeError,
        "EWC: this fit trained no step for task 1 (tasks trained so far: [0]): the Trainer had already reached its limits", fit_again),
    row(FIT, "`EWC` with dict batches (refused at the first batch)", TypeError,
        "EWC computes task 0's Fisher from the fit's training batches when the task ends, and cannot read them", dict_batches_with_ewc),
    row(FIT, "`KnowledgeDistillation(lightning_module)`, `training_step` calling `self.net(x)` (refused at the first step)", RuntimeError,
        "KnowledgeDistillation saw no forward of its model (_CallsItsNet) in training_step", distillation_of_the_lightning_module),
    row(FIT, "a training loader that yields nothing", RuntimeError,
        "EWC: this fit trained no step for task 0 (tasks trained so far: []): the fit's training loader yields no batches",
        empty_fit_is_refused),
    row(FS, "a task id reused out of order (`set_task(0)` after the sequence)", ValueError, "task_id=0 was already trained and consolidated",
        task_reused_in_sequence),
    row(FS, "a task whose training loader yields nothing", ValueError, "task 1's training loader yields no batches (train_dataloader() has length 0)",
        sequence_with_silent_task),
    row(FS, "a task whose training loader yields nothing, the methods afterwards", None,
        "refused before the task's fit: the earlier tasks stay trained and consolidated, nothing else happened",
        silent_task_refused_before_its_fit),
    row(FS, "`Trainer(limit_train_batches=0)`", ValueError,
        "task 0's training loader yields no batches: the Trainer was built with limit_train_batches=0",
        lambda tmp: fit_sequence_with(tmp, EWC, limit_train_batches=0)),
    row(FS, "a `Trainer(strategy=\"ddp_spawn\")`, no callbacks (refused before the first fit)", ValueError,
        "fit_sequence does not support strategies that run each fit in new processes (start method 'spawn'",
        lambda tmp: fit_sequence_with(tmp, accelerator="cpu", devices=2, strategy="ddp_spawn")),
    row(FS, "`trainer` not a `Trainer`", TypeError, "trainer must be a lightning Trainer, got str", lambda _: fit_sequence("t", None, sequence(), epochs_per_task=1)),
    row(FS, "a plain `LightningDataModule`", TypeError, "datamodule must be a TaskSequenceDataModule, got LightningDataModule",
        lambda _: fit_sequence(quiet_trainer(), None, L.LightningDataModule(), epochs_per_task=1)),
    row(FS, "both `epochs_per_task` and `steps_per_task`", ValueError, "give exactly one of epochs_per_task and steps_per_task",
        lambda _: fit_sequence(quiet_trainer(), None, sequence(), epochs_per_task=1, steps_per_task=1)),
    row(FS, "`epochs_per_task=0`", ValueError, "epochs_per_task must be >= 1, got 0", lambda _: fit_sequence(quiet_trainer(), None, sequence(), epochs_per_task=0)),
    row(FS, "`ckpt_path` a file that does not exist", FileNotFoundError, "missing.ckpt' does not exist", resume_from(lambda tmp: tmp / "missing.ckpt")),
    row(FS, "`ckpt_path` a checkpoint not written by `fit_sequence`", ValueError,
        "holds no TaskSequenceDataModule state: it was not written while fitting a TaskSequenceDataModule", resume_from(plain_checkpoint)),
    row(FS, "`ckpt_path` a checkpoint of a longer sequence (task 2 of a 2-task datamodule)", ValueError,
        "sequence3.ckpt' was saved in task 2, but the datamodule has 2 tasks (0..1): the checkpoint was written by a sequence with more tasks",
        resume_from(lambda tmp: checkpoint_of(tmp, count=3))),
    row(FS, "`ckpt_path` saved with `EWC(importance=1000.0)`, resumed with `EWC(importance=5.0)`", ValueError,
        "the checkpoint holds state for EWC{'importance': 1000.0, 'fisher_sample_size': 1000, 'online': False, 'gamma': 1.0, "
        "'fisher': 'empirical'}, not for EWC{'importance': 5.0,", resume_from(lambda tmp: checkpoint_of(tmp, EWC), lambda net: EWC(net, importance=5.0))),
    # data
    row(TD, "an empty task (0 samples)", ValueError, "inputs must hold at least one sample, got shape (0, 4)", lambda _: TaskDataset(X[:0], Y[:0])),
    row(TD, "float targets", TypeError, "targets must hold integer labels, got dtype torch.float32", lambda _: TaskDataset(X, Y.float())),
    row(TD, "16 inputs, 3 targets", ValueError, "targets must be 1-D with one label per input, got targets of shape (3,)", lambda _: TaskDataset(X, Y[:3])),
    row(TD, "`task_id=-1`", ValueError, "task_id must be an int >= 0, got -1", lambda _: TaskDataset(X, Y, -1)),
    row(TD, "`transform=3`", TypeError, "transform must be callable or None, got int: 3", lambda _: TaskDataset(X, Y, transform=3)),
    row(TD, "NaN in `inputs`", None, "not scanned: kept as given", lambda _: accepted(TaskDataset(*data(nan=True)))),
    row("`TaskDataset[index]`", "float indices", IndexError, "a batch index must be a 1-D sequence of ints", lambda _: TaskDataset(X, Y)[[0.5, 1.0]]),
    row(DM, "no tasks", ValueError, "train_tasks must hold at least one task, got []", lambda _: TaskSequenceDataModule([], [])),
    row(DM, "an empty task", ValueError, "train_tasks[1] is empty",
        lambda _: TaskSequenceDataModule([tasks(1)[0], TensorDataset(X[:0], Y[:0])], tasks(2))),
    row(DM, "a string", TypeError, "train_tasks must be a list of datasets, one per task, got str", lambda _: TaskSequenceDataModule("abc", "abc")),
    row(DM, "2 training tasks, 1 test task", ValueError, "test_tasks must hold one dataset per training task (2), got 1",
        lambda _: TaskSequenceDataModule(tasks(2), tasks(1))),
    row(DM, "`batch_size=0`", ValueError, "batch_size must be >= 1, got 0", lambda _: TaskSequenceDataModule(tasks(1), tasks(1), batch_size=0)),
    row(DM, "`batch_size=3.0`", TypeError, "batch_size must be an int, got float: 3.0", lambda _: TaskSequenceDataModule(tasks(1), tasks(1), batch_size=3.0)),
    row(DM, "`training=\"offline\"`", ValueError, "training must be one of 'sequential', 'cumulative', 'joint', got 'offline'",
        lambda _: TaskSequenceDataModule(tasks(1), tasks(1), training="offline")),
    row("`ConcatTaskDataset(tasks)`", "an empty list", ValueError, "tasks must hold at least one TaskDataset, got []", lambda _: ConcatTaskDataset([])),
    row(DM, "`keep_on_device=\"yes\"`", TypeError, "keep_on_device must be a bool, got str: 'yes'",
        lambda _: TaskSequenceDataModule(tasks(1), tasks(1), keep_on_device="yes")),
    row(DM, "`keep_on_device=True` with `num_workers=2`", ValueError,
        "keep_on_device=True builds every batch on the device, in this process, but num_workers=2",
        lambda _: TaskSequenceDataModule(tasks(1), tasks(1), num_workers=2, keep_on_device=True)),
    row(DM, "`keep_on_device=True` with `pin_memory=True`", ValueError,
        "but pin_memory=True pins batches in host memory for a copy to the device: use pin_memory=False with keep_on_device=True",
        lambda _: TaskSequenceDataModule(tasks(1), tasks(1), pin_memory=True, keep_on_device=True)),
    row(DM, "`keep_on_device=True` with a `TensorDataset` task", TypeError,
        "keep_on_device=True needs every task to be a TaskDataset (or ConcatTaskDataset), tensors it can move to the device, got train_tasks[0]: TensorDataset",
        lambda _: TaskSequenceDataModule([TensorDataset(*data())], tasks(1), keep_on_device=True)),
    row("`TaskDataset.to(device)`", "`device=\"gpu0\"`", ValueError, "device must name a device such as 'cpu' or 'cuda:0', got 'gpu0'",
        lambda _: tasks(1)[0].to("gpu0")),
    row("`TaskDataset.to(device)`", "`device=1.5`", TypeError,
        "device must be a torch.device, a device string such as 'cuda:0', or an index, got float: 1.5",
        lambda _: tasks(1)[0].to(1.5)),
    row("`ConcatTaskDataset(tasks)`", "members on two devices", ValueError,
        "the tasks of one batch must be on one device (move them with TaskDataset.to)",
        lambda _: ConcatTaskDataset([tasks(1)[0], tasks(1)[0].to("meta")])),
    row(FS, "`keep_optimizer_state=\"yes\"`", TypeError, "keep_optimizer_state must be a bool, got str: 'yes'",
        lambda _: fit_sequence(quiet_trainer(), lit_classifier(mlp()), sequence(), epochs_per_task=1, keep_optimizer_state="yes")),
    row("`TaskSequenceDataModule.set_task(task)`", "task 5 of 2", ValueError, "task must be in 0..1 (2 tasks), got 5", lambda _: sequence().set_task(5)),
    row("`TaskSequenceDataModule.from_benchmark(benchmark)`", "not a benchmark", TypeError, "benchmark must have .train and .test task lists, got int",
        lambda _: TaskSequenceDataModule.from_benchmark(3)),
    row("`split_benchmark(source, num_tasks, ...)`", "`scenario=\"x\"`", ValueError, "scenario must be one of 'task', 'domain', 'class'; got 'x'",
        lambda _: split_benchmark("digits", 5, scenario="x")),
    row("`split_benchmark(source, num_tasks, ...)`", "`num_tasks=0`", ValueError, "num_tasks must be >= 1, got 0", lambda _: split_benchmark("digits", 0)),
    row("`split_benchmark(source, num_tasks, ...)`", "11 tasks of 10 classes", ValueError, "num_tasks=11 does not divide the 10 classes equally",
        lambda _: split_benchmark("digits", 11)),
    row("`split_benchmark(source, num_tasks, ...)`", "`source=\"cifar\"`", ValueError,
        "source must be one of 'digits', 'mnist', 'fashion_mnist' or a (train, test) pair; got 'cifar'", lambda _: split_benchmark("cifar", 5)),
    row("`permuted_benchmark(source, num_tasks, ...)`", "`num_tasks=0`", ValueError, "num_tasks must be >= 1, got 0", lambda _: permuted_benchmark("digits", 0)),
    row("`PermutePixels(permutation)`", "not a permutation", ValueError, "permutation must be a permutation of 0..n-1", lambda _: PermutePixels(torch.tensor([0, 0, 1]))),
    row("`MNIST(root, download=False)`", "a root that does not exist", FileNotFoundError, "does not exist; pass download=True to download MNIST into it",
        lambda tmp: MNIST(tmp / "missing", download=False)),
    row("`Digits(test_fraction=...)`", "`test_fraction=1.5`", ValueError, "test_fraction must be a number in (0, 1), got 1.5", lambda _: Digits(test_fraction=1.5)),
    row("`read_idx(path)`", "a file of 3 bytes", IDXFormatError, "truncated header: the file holds 3 bytes", truncated_idx),
    # metrics
    row("`AccuracyMatrix(num_tasks)`", "`num_tasks=0`", ValueError, "num_tasks must be >= 1, got 0", lambda _: AccuracyMatrix(0)),
    row("`AccuracyMatrix.update(preds, target, task, after_task)`", "task 5 of 2", ValueError, "task must be an int in [0, 1], got 5",
        lambda _: AccuracyMatrix(2).update(torch.randn(4, 3), Y[:4], task=5, after_task=0)),
    row("`AccuracyMatrix.update(preds, target, task, after_task)`", "4 predictions, 5 targets", ValueError, "preds and target describe different samples",
        lambda _: AccuracyMatrix(2).update(torch.randn(4, 3), Y[:5], task=0, after_task=0)),
    row("`average_accuracy` / `backward_transfer` / `forgetting` `(matrix, after_task)`", "a 2x3 matrix", ValueError,
        "matrix must be a square (tasks x tasks) tensor, got (2, 3)", lambda _: average_accuracy(torch.zeros(2, 3))),
    row("`forward_transfer(matrix, initial, after_task)`", "3 initial accuracies for 2 tasks", ValueError,
        "initial must hold one accuracy per task, shape (2,), got (3,)", lambda _: forward_transfer(torch.zeros(2, 2), torch.zeros(3))),
    row("`ForgettingCurves(every_n_epochs)`", "`every_n_epochs=0`", ValueError, "every_n_epochs must be >= 1, got 0", lambda _: ForgettingCurves(every_n_epochs=0)),
    row("`ForgettingCurves(task_ids)`", "`task_ids=[1, 1]`", ValueError, "task_ids must name each task once (at least one), got [1, 1]",
        lambda _: ForgettingCurves(task_ids=[1, 1])),
    row("`ForgettingCurves` under `Trainer.fit`", "no task-sequence datamodule", ValueError, "ForgettingCurves needs a task-sequence datamodule",
        lambda _: fit([ForgettingCurves()], lit_classifier(mlp()), loader())),
    # search and session
    row(GS, "`model_fn=3`", TypeError, "model_fn must be callable, got int: 3", lambda _: GridSearch(3, {"a": [1]})),
    row(GS, "`n_jobs=0`", ValueError, "n_jobs must be a number of processes >= 1, or -1 for every CPU, got 0",
        lambda _: GridSearch(lambda a: None, {"a": [1]}, n_jobs=0)),
    row(GS, "`param_space={}`", ValueError, "param_space must name at least one hyperparameter, got an empty dict {}", lambda _: GridSearch(lambda a: None, {})),
    row(GS, "`param_space={\"a\": 1}`", TypeError, "param_space['a'] must be a list of values to try, got int: 1", lambda _: GridSearch(lambda a: None, {"a": 1})),
    row(GS, "a name `model_fn` does not take", ValueError, "param_space names ['b'] but model_fn", lambda _: GridSearch(lambda a: None, {"b": [1]})),
    row(GS, "`scoring=\"f1\"`", ValueError, "scoring must be one of 'accuracy', 'neg_log_loss' or a callable", lambda _: GridSearch(lambda a: None, {"a": [1]}, scoring="f1")),
    row(GS, "`cv=1`", ValueError, "cv must be >= 2, got 1", lambda _: GridSearch(lambda a: None, {"a": [1]}, cv=1)),
    row("`GridSearch.best_params()`", "before `fit`", RuntimeError, "GridSearch.best_params() was called before fit(X, y) or fit(tasks=...)",
        lambda _: GridSearch(lambda a: None, {"a": [1]}).best_params()),
    row(GF, "16 inputs, 5 labels", ValueError, "X and y must hold the same number of samples", lambda _: grid_search_fit(X, Y[:5])),
    row(GF, "float labels", TypeError, "y must hold integer class labels, got dtype torch.float32", lambda _: grid_search_fit(X, Y.float())),
    row(GF, "`model_fn` returning a bare network", TypeError, "model_fn must return a neurenix continual method",
        lambda _: grid_search_fit(X, Y, lambda importance: nn.Linear(4, 3))),
    row(GF, "NaN in `X`", None, "not scanned: every combination is scored on what the model outputs", lambda _: accepted(grid_search_fit(*data(nan=True)))),
    row(GF, "NaN in `X`, `model_fn` returning `ExperienceReplay` (its `add_to_memory` scans)", ValueError,
        "inputs must hold finite values, got NaN or infinity in 1 of", replay_grid_search_on_nan),
    row("`nx.init(seed)`", "`seed=-1`", ValueError, "seed must be in [0, 2**64), got -1", lambda _: nx.init(-1)),
    row("`nx.init(seed)`", "`seed=1.0`", TypeError, "seed must be an int or None, got 1.0", lambda _: nx.init(1.0)),
]


def markdown_table() -> str:
    lines = ["| entry point | invalid input | exception | message (a part of it) |", "| --- | --- | --- | --- |"]
    for r in ROWS:
        error = POLICY if r.error is None else f"`{r.error.__name__}`"
        message = r.message if r.error is None else f"`{r.message}`"
        mark = " **(known failure)**" if r.known_failure else ""
        lines.append(f"| {r.entry} | {r.invalid} | {error}{mark} | {message} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the tests
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy-waiting threads on two shared cores run ten times slower
    yield
    torch.set_num_threads(threads)


def _params() -> list:
    marks = lambda r: [pytest.mark.xfail(strict=True, reason=r.known_failure)] if r.known_failure else []  # noqa: E731
    return [pytest.param(r, id=r.id, marks=marks(r)) for r in ROWS]


@pytest.mark.filterwarnings("ignore")  # Lightning's advice and our own warnings are not under test here
@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Row, tmp_path):
    for call in case.calls:
        if case.error is None:
            assert call(tmp_path) is True, case.message
        else:
            with pytest.raises(case.error, match=re.escape(case.message)):
                call(tmp_path)


def test_the_docs_table_lists_every_row():
    text = DOCS.read_text()
    assert markdown_table() in text, "docs/reliability.md's table differs from ROWS: regenerate it with markdown_table()"
    assert len({r.id for r in ROWS}) == len(ROWS)
