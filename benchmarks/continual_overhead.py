"""What each continual-learning method costs, as ratios to plain training of the same model on the same batches.

One run measures, on one reference setup (an MLP 784-400-400-10, batch 128, Adam, the 5-task split
Fashion-MNIST benchmark in the class-incremental scenario, a fixed number of CPU threads):

1. **step**: the time of one training step per method, once its first task has ended (penalty,
   replay memory, teacher, DER's and ER-ACE's memory terms, A-GEM's and GEM's reference
   gradients all active), under a Lightning ``Trainer`` against plain Lightning training, and
   through the standalone ``train_step`` against a hand-written PyTorch step;
2. **consolidation**: the time to consolidate a task (EWC's Fisher of ``fisher_sample_size``
   samples, SI's importance, L2's anchor, the distillation teacher) against one training epoch
   over the same samples, and EWC's Fisher against a per-sample reference loop, whose values it
   must equal to float tolerance;
3. **sequence**: the wall time of a whole 5-task ``fit_sequence`` per method;
4. **wrapper**: the standalone ``train_step`` during a method's first task (nothing to protect
   yet, so it is the wrapper itself) against the hand-written step; DER and ER-ACE are
   task-free and rehearse their memory from their second step on, so their rows there are
   their full step (A-GEM and GEM only store the batch: no earlier task to project against);
5. **memory**: the bytes of tensors in each method's ``state_dict()`` after the 5 tasks (and the
   bytes it holds in all, which adds working copies outside the state dict);
6. **compiled** (with ``--compile``): the step of section 1 with the model compiled
   (``torch.compile``, backend ``--compile-backend``, inductor by default), per method in both
   doors: ``train_step`` on ``torch.compile(net)`` against the hand-written step on its own
   compiled model, and ``Trainer.fit(torch.compile(module))`` against plain Lightning fitting a
   compiled module. Compilation happens in task 0's fit or steps and the first timed steps (the
   warm-up dropped), not in the medians. What compiles and what stays eager: docs/compile.md.

Every variant gets a model of the same initial weights and the same batches. Rounds run every
variant once, in turn, in reversed order every other round (A B C, C B A, ...), so that drifts
in the machine's speed hit all alike; many short runs rather than a few long ones spread load
that comes and goes within seconds. Step times are taken per optimizer step (a Lightning
callback from ``on_train_batch_start`` to ``on_train_batch_end``, or around ``train_step``), so
data loading, which all variants share, is left out; a run's step time is the median of its
steps after the first two (the optimizer's state being allocated, caches refilled after the
previous variant), and the tables give the median over the rounds, of the wall clock and of the
process's CPU time, with ratios of the medians. The load average at the start and the end goes
into the report: numbers taken on a busy machine are not comparable with quiet ones.

    python benchmarks/continual_overhead.py [--model mlp|large] [--threads 2] [--repeats N]
        [--accelerator cpu|gpu] [--precision 32-true|bf16-mixed]
        [--steps N] [--sequence-steps N] [--data fashion_mnist|digits] [--root DIR]
        [--compile [--compile-backend inductor|aot_eager|eager] [--compile-only]]
        [--quick] [--json PATH]

``--model large`` runs the same measurements on an MLP 784-2048-2048-2048-10 (21 times the
parameters) to show how the ratios move as the model grows. ``--quick`` is a smoke mode on tiny
sizes (seconds; the timings mean nothing). ``--compile-only`` runs section 6 alone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from neurenix.continual import (
    AGEM,
    BiC,
    ERACE,
    EWC,
    GEM,
    ContinualLossMixin,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    MAS,
    RWalk,
    SynapticIntelligence,
)
from neurenix.continual.base import uncompiled
from neurenix.continual.footprint import held_bytes, state_bytes
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
#: The benchmark of issue 7: five tasks of two classes each.
NUM_TASKS = 5
LEARNING_RATE = 1e-3
#: Each method with its documented defaults (EWC's importance is the continual-learning API's 1000).
EWC_IMPORTANCE, FISHER_SAMPLES = 1000.0, 1000
L2_IMPORTANCE = 1.0
SI_IMPORTANCE, SI_XI = 1.0, 0.1
MEMORY_SIZE, REPLAY_RATIO = 1000, 0.5
TEMPERATURE, ALPHA = 2.0, 0.5
#: The memory-based methods of issue 15 share replay's memory size and ratio. DER's weights are the
#: command's (its authors' for sequential MNIST): der is DER (beta 0), derpp DER++.
DER_ALPHA, DERPP_BETA = 0.2, 1.0
AGEM_REFERENCE_SIZE, GEM_MARGIN = 256, 0.5
#: Issue 17's importance methods at their defaults (MAS samples as many as EWC's Fisher).
MAS_IMPORTANCE, RWALK_IMPORTANCE = 1.0, 1.0

METHODS = ("ewc", "l2", "si", "replay", "distillation", "der", "derpp", "er_ace", "agem", "gem", "mas", "rwalk", "icarl", "bic")
#: Methods measured only as whole sequences: GDumb has no training step of its own (each task's fit
#: trains on its memory from the initial weights: a plain step on memory samples).
SEQUENCE_ONLY = ("gdumb",)
#: Methods that change the batch or the loss: their LightningModule needs ContinualLossMixin.
NEEDS_MIXIN = ("replay", "distillation", "der", "derpp", "er_ace", "icarl", "bic")

#: Targets of issue 7, as the largest (or, for the Fisher's speed-up, smallest) ratio allowed.
#: Issue 15 sets none for its methods (A-GEM's reference gradient is an extra forward and
#: backward each step, by design): they are reported, not judged.
STEP_TARGETS = {
    "ewc": 1.10,
    "l2": 1.10,
    "si": 1.10,
    # "(1 + replay_ratio) times plain, plus 10%": read strictly, 1 + replay_ratio + 0.10.
    "replay": 1.0 + REPLAY_RATIO + 0.10,
    "distillation": 1.5,
}
WRAPPER_TARGET = 1.10
FISHER_VS_EPOCH_TARGET = 1.0
FISHER_SPEEDUP_TARGET = 10.0
#: "The same values": float32 sums of 1000 squares in another order agree to about 1e-6 relative;
#: entries far below a tensor's largest are compared against a floor set by that largest one.
FISHER_RTOL, FISHER_ATOL_SCALE = 1e-4, 1e-6
#: torch.compile backends --compile offers: inductor (what users run), aot_eager (dynamo and
#: AOTAutograd's tracing without code generation: compilation's overhead without its gains),
#: eager (dynamo's tracing alone).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class Setup:
    """Everything one run depends on (it goes into the JSON as is)."""

    model: str
    hidden: tuple[int, ...]
    batch_size: int
    steps: int
    repeats: int
    sequence_steps: Optional[int]  # optimizer steps per task of the sequence; None: one epoch
    fisher_samples: int
    reference_samples: int  # samples the per-sample Fisher loop is timed on (then scaled)
    threads: int
    data: str
    root: Optional[str]
    seed: int = 0
    accelerator: str = "cpu"  # "cpu" or "gpu" (the first CUDA device)
    precision: str = "32-true"  # or "bf16-mixed": Lightning's precision, autocast for the standalone steps
    compile_backend: Optional[str] = None  # torch.compile's backend for section 6; None: not measured

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.accelerator == "gpu" else torch.device("cpu")

    @property
    def sequence_repeats(self) -> int:
        """A whole sequence takes as long as many step runs: a third of the repetitions, at least 3."""
        return max(3, math.ceil(self.repeats / 3))

    @property
    def warmup(self) -> int:
        """Steps dropped at the start of each timed run (Adam allocates its state in the first)."""
        return min(2, self.steps // 2)


PRESETS = {
    # The reference. Many short runs rather than a few long ones: on a machine shared with other
    # processes, load comes and goes within seconds, and fine interleaving spreads it evenly.
    "mlp": Setup("mlp", (400, 400), 128, steps=20, repeats=15, sequence_steps=None, fisher_samples=FISHER_SAMPLES,
                 reference_samples=FISHER_SAMPLES, threads=2, data="fashion_mnist", root=FASHION_MNIST),
    # 10 M parameters: steps take ~30x longer, so fewer of them, and the per-sample Fisher loop is
    # timed on 100 samples and scaled (its cost is linear in the samples).
    "large": Setup("large", (2048, 2048, 2048), 128, steps=6, repeats=6, sequence_steps=6,
                   fisher_samples=FISHER_SAMPLES, reference_samples=100, threads=2, data="fashion_mnist",
                   root=FASHION_MNIST),
}
QUICK = dict(batch_size=32, steps=4, repeats=2, sequence_steps=2, fisher_samples=64, reference_samples=64)
QUICK_WIDTH = 16

TRAINER_OPTIONS = dict(
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


# ---------------------------------------------------------------------------- models
def build_net(setup: Setup, inputs: int, classes: int) -> nn.Sequential:
    """The MLP of the setup, with the same initial weights every call."""
    torch.manual_seed(setup.seed)
    layers: list[nn.Module] = []
    width = inputs
    for hidden in setup.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes)).to(setup.device)


def trainer(setup: Setup, **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator=setup.accelerator, precision=setup.precision, **TRAINER_OPTIONS, **kwargs)


def autocast(setup: Setup) -> contextlib.AbstractContextManager:
    """What a hand-written loop does for ``bf16-mixed``: the forward pass under autocast."""
    if setup.precision == "bf16-mixed":
        return torch.autocast(setup.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Classifier(L.LightningModule):
    """Plain Lightning training of ``net``: cross-entropy, Adam."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)


class ContinualClassifier(ContinualLossMixin, Classifier):
    """The same module with the mixin that replay and distillation need."""


def lightning_module(variant: str, net: nn.Module) -> Classifier:
    return ContinualClassifier(net) if variant in NEEDS_MIXIN else Classifier(net)


def make_method(name: str, net: nn.Module, setup: Setup) -> Any:
    if name == "ewc":
        return EWC(net, importance=EWC_IMPORTANCE, fisher_sample_size=setup.fisher_samples, seed=setup.seed)
    if name == "l2":
        return L2Regularization(net, importance=L2_IMPORTANCE)
    if name == "si":
        return SynapticIntelligence(net, importance=SI_IMPORTANCE, xi=SI_XI)
    if name == "replay":
        return ExperienceReplay(net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=setup.seed)
    if name == "distillation":
        return KnowledgeDistillation(net, temperature=TEMPERATURE, alpha=ALPHA)
    if name in ("der", "derpp"):
        beta = DERPP_BETA if name == "derpp" else 0.0
        return DarkExperienceReplay(net, memory_size=MEMORY_SIZE, alpha=DER_ALPHA, beta=beta, replay_ratio=REPLAY_RATIO, seed=setup.seed)
    if name == "er_ace":
        return ERACE(net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=setup.seed)
    if name == "agem":
        return AGEM(net, memory_size=MEMORY_SIZE, reference_size=AGEM_REFERENCE_SIZE, seed=setup.seed)
    if name == "gem":
        return GEM(net, memory_size=MEMORY_SIZE, margin=GEM_MARGIN, seed=setup.seed)
    if name == "mas":
        return MAS(net, importance=MAS_IMPORTANCE, sample_size=setup.fisher_samples, seed=setup.seed)
    if name == "rwalk":
        return RWalk(net, importance=RWALK_IMPORTANCE)
    # iCaRL's and BiC's features: the last hidden layer's output (the head's input), their default,
    # named as a module so that a compiled net (an OptimizedModule, not a Sequential) gets it too.
    if name == "icarl":
        return ICaRL(net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=setup.seed, feature_extractor=uncompiled(net)[-2])
    if name == "bic":
        return BiC(net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=setup.seed, feature_extractor=uncompiled(net)[-2])
    if name == "gdumb":
        return GDumb(net, memory_size=MEMORY_SIZE, seed=setup.seed)
    raise ValueError(f"unknown method {name!r}")


def parameter_bytes(net: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


# ---------------------------------------------------------------------------- data
@dataclass
class Data:
    benchmark: Any
    inputs: int
    classes: int
    loaders: list  # the training loader of each task, unshuffled: every run sees the same batches
    batches: list[tuple[Tensor, Tensor]]  # the first `steps` batches of task 1
    fisher_batches: list[tuple[Tensor, Tensor]]  # exactly `fisher_samples` samples of task 1


def load_data(setup: Setup) -> Data:
    benchmark = split_benchmark(setup.data, NUM_TASKS, root=setup.root, scenario="class", seed=setup.seed)
    loaders = [_unshuffled_loader(task, setup.batch_size) for task in benchmark.train]
    batches = on_device(itertools.islice(loaders[1], setup.steps), setup)
    if len(batches) < setup.steps:
        raise ValueError(f"--steps {setup.steps} is more than the {len(batches)} batches of a task")
    return Data(benchmark, benchmark.input_shape[0], benchmark.num_classes, loaders, batches,
                on_device(_first_samples(loaders[1], setup.fisher_samples), setup))


def on_device(batches: Any, setup: Setup) -> list[tuple[Tensor, Tensor]]:
    """Batches on the setup's device, as a hand-written loop would move them (outside the timing)."""
    return [(x.to(setup.device), y.to(setup.device)) for x, y in batches]


def _unshuffled_loader(task: Any, batch_size: int) -> Any:
    return TaskSequenceDataModule([task], [task], batch_size=batch_size, shuffle=False).train_dataloader()


def _first_samples(loader: Any, count: int) -> list[tuple[Tensor, Tensor]]:
    batches, taken = [], 0
    for x, y in loader:
        keep = min(count - taken, x.shape[0])
        batches.append((x[:keep], y[:keep]))
        taken += keep
        if taken == count:
            return batches
    raise ValueError(f"a task holds fewer than the {count} samples asked for the Fisher")


# ---------------------------------------------------------------------------- timing
class Timing(NamedTuple):
    """Seconds of one measurement: on the wall clock, and of CPU used by the whole process.

    The wall clock is what a user waits. On a machine shared with other processes, CPU time is
    the steadier of the two (it does not count the time the process waits for a core), so the
    tables give both.
    """

    wall: float
    cpu: float


def clock() -> Timing:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a CUDA step is over when its kernels are, not when Python is
    return Timing(time.perf_counter(), time.process_time())


def since(start: Timing) -> Timing:
    now = clock()
    return Timing(now.wall - start.wall, now.cpu - start.cpu)


def timed(action: Callable[[], Any]) -> Timing:
    start = clock()
    action()
    return since(start)


class StepTimer(Callback):
    """Times each optimizer step of a fit: training_step, backward, every hook, optimizer.step."""

    def __init__(self) -> None:
        self.times: list[Timing] = []
        self._start = Timing(0.0, 0.0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(since(self._start))


def median_after_warmup(times: Sequence[Timing], warmup: int) -> Timing:
    """The typical step of a run: its median, robust to the stalls other processes cause."""
    kept = list(times[warmup:]) or list(times)
    return Timing(statistics.median(t.wall for t in kept), statistics.median(t.cpu for t in kept))


def interleaved(runs: dict[str, Callable[[], Timing]], repeats: int) -> dict[str, list[Timing]]:
    """Each run ``repeats`` times, in turn, the order reversed every other repetition."""
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(runs[name]())
    return times


def median(times: Sequence[Timing]) -> Timing:
    return Timing(statistics.median(t.wall for t in times), statistics.median(t.cpu for t in times))


def summary(times: list[Timing], reference: Optional[list[Timing]] = None) -> dict[str, Any]:
    """The repetitions, their medians, and (with ``reference``) the ratios of the medians."""
    middle = median(times)
    entry: dict[str, Any] = {
        "times_s": [t.wall for t in times],
        "median_s": middle.wall,
        "cpu_times_s": [t.cpu for t in times],
        "cpu_median_s": middle.cpu,
    }
    if reference is not None:
        base = median(reference)
        entry["ratio"], entry["cpu_ratio"] = middle.wall / base.wall, middle.cpu / base.cpu
    return entry


def fit(module: L.LightningModule, callbacks: list[Callback], loader: Any, setup: Setup) -> None:
    trainer(setup, max_steps=setup.steps, callbacks=callbacks).fit(module, train_dataloaders=loader)


# ---------------------------------------------------------------------------- 1 and 4: steps
def lightning_run(module: L.LightningModule, callbacks: list[Callback], loader: Any, setup: Setup) -> Callable[[], Timing]:
    """One fit of ``steps`` steps on task 1's first batches; its median step time."""

    def run() -> Timing:
        timer = StepTimer()
        fit(module, [timer, *callbacks], loader, setup)
        return median_after_warmup(timer.times, setup.warmup)

    return run


def standalone_run(step: Callable[[Tensor, Tensor], Any], batches: list, setup: Setup) -> Callable[[], Timing]:
    def run() -> Timing:
        times = [timed(lambda: step(x, y)) for x, y in batches]
        return median_after_warmup(times, setup.warmup)

    return run


def handwritten_step(net: nn.Module, optimizer: torch.optim.Optimizer, setup: Setup) -> Callable[[Tensor, Tensor], None]:
    """The plain PyTorch step a user would write."""

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        with autocast(setup):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()

    return step


def leaves_memory_to_caller(method: Any) -> bool:
    """ExperienceReplay: its documented loop stores each batch with ``add_to_memory`` after ``train_step``.

    The other rehearsal methods store the batch inside ``train_step`` (and refuse it again).
    """
    return not getattr(method, "remembers_training_batches", True)


def method_step(method: Any, optimizer: torch.optim.Optimizer, task_id: int, setup: Setup) -> Callable[[Tensor, Tensor], None]:
    """``train_step``; replay also stores the batch, as its documented loop does."""
    remember = leaves_memory_to_caller(method) and task_id > 0

    def step(x: Tensor, y: Tensor) -> None:
        with autocast(setup):
            method.train_step(optimizer, F.cross_entropy, x, y, task_id=task_id)
        if remember:
            method.add_to_memory(x, y, task_id)

    return step


def task1_step_runs(
    setup: Setup,
    data: Data,
    prepared: Callable[[nn.Module], nn.Module],
    lightning_run_of: Callable[[L.LightningModule, list[Callback], Any, Setup], Callable[[], Timing]],
) -> tuple[dict[str, Callable[[], Timing]], nn.Module]:
    """The task-1 step runs of every variant in both doors, each trained on task 0 first, and the
    hand-written step's model.

    Lightning variants fit task 0 through ``lightning_run_of`` (which consolidates it) and are
    timed on task 1's batches, one fit per repetition (each fit is a task of its own to the
    methods, consolidated at its end, outside the timed steps). Standalone variants, on the net
    as ``prepared`` (eager or compiled), train task 0 with ``train_step``, enter task 1 with an
    untimed step, and are timed on the same batches.
    """
    runs: dict[str, Callable[[], Timing]] = {}
    task0, task1 = data.loaders[0], data.loaders[1]
    task0_batches = on_device(itertools.islice(task0, setup.steps), setup)
    for variant in ("plain", *METHODS):
        net = build_net(setup, data.inputs, data.classes)
        module = lightning_module(variant, net)
        callbacks = [] if variant == "plain" else [make_method(variant, net, setup)]
        lightning_run_of(module, callbacks, task0, setup)()  # task 0, consolidated at the fit's end
        runs[f"lightning/{variant}"] = lightning_run_of(module, callbacks, task1, setup)

    hand_net = prepared(build_net(setup, data.inputs, data.classes))
    hand_step = handwritten_step(hand_net, _adam(hand_net), setup)
    for x, y in task0_batches:  # trained on task 0 as the methods' nets are: the same weights' regime
        hand_step(x, y)
    runs["standalone/handwritten"] = standalone_run(hand_step, data.batches, setup)
    for name in METHODS:
        net = prepared(build_net(setup, data.inputs, data.classes))
        optimizer, method = _adam(net), make_method(name, net, setup)
        method.register_task(0, task0)  # EWC's Fisher data, as in the continual-learning API's flow
        for x, y in task0_batches:
            method_step(method, optimizer, 0, setup)(x, y)
            if leaves_memory_to_caller(method):
                method.add_to_memory(x, y, 0)
        method_step(method, optimizer, 1, setup)(*data.batches[0])  # consolidates task 0, untimed
        runs[f"standalone/{name}"] = standalone_run(method_step(method, optimizer, 1, setup), data.batches, setup)
    return runs, hand_net


def measure_steps(setup: Setup, data: Data) -> tuple[dict[str, Any], nn.Module]:
    """Per-step times of every variant in both doors, all interleaved in one loop.

    Lightning variants train task 0 in a first fit (which consolidates it) and are then timed
    on task 1's batches, one fit per repetition (each fit is a task of its own to the methods,
    consolidated at its end, outside the timed steps). Standalone variants train task 0 with
    ``train_step``, enter task 1 with an untimed step, and are timed on the same batches; a
    second set stays in its first task to time the wrapper alone. Returns the hand-written
    step's model, trained, for the consolidation measurements.
    """
    runs, hand_net = task1_step_runs(setup, data, lambda net: net, lightning_run)
    for name in METHODS:
        net = build_net(setup, data.inputs, data.classes)
        runs[f"first_task/{name}"] = standalone_run(method_step(make_method(name, net, setup), _adam(net), 0, setup), data.batches, setup)

    times = interleaved(runs, setup.repeats)
    plain, hand = times["lightning/plain"], times["standalone/handwritten"]
    result = {
        "step_lightning": {v: summary(times[f"lightning/{v}"], plain) for v in ("plain", *METHODS)},
        "step_standalone": {
            "handwritten": summary(hand, hand),
            **{m: summary(times[f"standalone/{m}"], hand) for m in METHODS},
        },
        "step_standalone_first_task": {m: summary(times[f"first_task/{m}"], hand) for m in METHODS},
        "lightning_plain_vs_handwritten": {
            "ratio": median(plain).wall / median(hand).wall,
            "cpu_ratio": median(plain).cpu / median(hand).cpu,
        },
    }
    return result, hand_net


def _adam(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)


# ---------------------------------------------------------------------------- 6: compiled steps
def compiled(model: nn.Module, setup: Setup) -> nn.Module:
    assert setup.compile_backend is not None
    return torch.compile(model, backend=setup.compile_backend)


def compiled_lightning_run(
    module: L.LightningModule, callbacks: list[Callback], loader: Any, setup: Setup
) -> Callable[[], Timing]:
    """:func:`lightning_run` of ``Trainer.fit(torch.compile(module))``.

    Lightning compiles the module's ``forward`` and ``training_step`` in place at each fit, over
    what an earlier fit compiled: they are put back after every fit so that each repetition runs
    one compiled layer, from dynamo's cache (the same code, the same guards).
    """
    from lightning.pytorch.utilities.compile import to_uncompiled

    fitted = compiled(module, setup)

    def run() -> Timing:
        timer = StepTimer()
        try:
            fit(fitted, [timer, *callbacks], loader, setup)
        finally:
            to_uncompiled(module)
        return median_after_warmup(timer.times, setup.warmup)

    return run


def measure_compiled_steps(setup: Setup, data: Data) -> dict[str, Any]:
    """Section 1's task-1 steps with the model compiled, every variant interleaved.

    Each variant trains task 0 first (compiling its graphs), as in :func:`measure_steps`; the
    compiled plain step of each door is the reference of that door.
    """
    runs, _ = task1_step_runs(setup, data, lambda net: compiled(net, setup), compiled_lightning_run)
    times = interleaved(runs, setup.repeats)
    plain, hand = times["lightning/plain"], times["standalone/handwritten"]
    return {
        "backend": setup.compile_backend,
        "lightning": {v: summary(times[f"lightning/{v}"], plain) for v in ("plain", *METHODS)},
        "standalone": {"handwritten": summary(hand, hand), **{m: summary(times[f"standalone/{m}"], hand) for m in METHODS}},
    }


# ---------------------------------------------------------------------------- 2: consolidation
def per_sample_fisher(net: nn.Module, batches: list, count: int) -> dict[str, Tensor]:
    """The reference: ``mean_n (∂ log p(y_n|x_n) / ∂θ)²``, one backward per sample."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [p for p in net.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    taken = 0
    with _eval_mode(net):
        for x, y in batches:
            for i in range(x.shape[0]):
                if taken == count:
                    break
                grads = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)
                torch._foreach_addcmul_(sums, grads, grads)
                taken += 1
    return {name: s / taken for name, s in zip(names, sums)}


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def compare_fisher(ours: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, Any]:
    """Whether two Fishers hold the same values, and by how much they differ."""
    equal, max_abs, max_rel = True, 0.0, 0.0
    for name, expected in reference.items():
        got = ours[name]
        scale = float(expected.abs().max())
        difference = float((got - expected).abs().max())
        equal &= bool(torch.allclose(got, expected, rtol=FISHER_RTOL, atol=FISHER_ATOL_SCALE * scale))
        max_abs = max(max_abs, difference)
        max_rel = max(max_rel, difference / scale if scale > 0 else difference)
    return {"equal": equal, "max_abs_diff": max_abs, "max_diff_relative_to_largest": max_rel,
            "rtol": FISHER_RTOL, "atol_relative_to_largest": FISHER_ATOL_SCALE}


def measure_consolidation(setup: Setup, data: Data, trained: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Consolidating a task, each method on a fresh object over the same trained model."""
    net = copy.deepcopy(trained)
    batches = data.fisher_batches

    epoch_net = copy.deepcopy(trained)
    epoch_step = handwritten_step(epoch_net, _adam(epoch_net), setup)
    epoch_step(*batches[0])  # Adam's state, allocated once

    def epoch() -> None:
        for x, y in batches:
            epoch_step(x, y)

    fisher_ewc = make_method("ewc", net, setup)
    fisher_ewc.enter_task(0)
    fisher_ewc.finish_task(batches)

    def consolidate(name: str) -> Callable[[], float]:
        def run() -> Timing:
            method = make_method(name, net, setup)
            method.enter_task(0)
            return timed(lambda: method.finish_task(batches if name in ("ewc", "mas", "icarl", "bic") else None))

        return run

    reference: dict[str, Tensor] = {}

    def per_sample_loop() -> Timing:
        seconds = timed(lambda: reference.update(per_sample_fisher(net, batches, setup.reference_samples)))
        scale = setup.fisher_samples / setup.reference_samples  # the loop's cost is linear in the samples
        return Timing(seconds.wall * scale, seconds.cpu * scale)

    runs = {
        "epoch": lambda: timed(epoch),
        "ewc_fisher": lambda: timed(lambda: fisher_ewc.update_fisher(0, batches)),
        "fisher_per_sample_loop": per_sample_loop,
        **{name: consolidate(name) for name in METHODS},
    }
    times = interleaved(runs, setup.repeats)
    result: dict[str, Any] = {
        "epoch": summary(times["epoch"]),
        "ewc_fisher": summary(times["ewc_fisher"], times["epoch"]),
        **{name: summary(times[name], times["epoch"]) for name in METHODS},
        "fisher_per_sample_loop": {
            **summary(times["fisher_per_sample_loop"], times["epoch"]),
            "measured_samples": setup.reference_samples,
            "speedup_of_ewc_fisher": median(times["fisher_per_sample_loop"]).wall / median(times["ewc_fisher"]).wall,
            "cpu_speedup_of_ewc_fisher": median(times["fisher_per_sample_loop"]).cpu / median(times["ewc_fisher"]).cpu,
        },
        "samples": setup.fisher_samples,
    }
    check_ewc = make_method("ewc", net, replace(setup, fisher_samples=setup.reference_samples))
    check_ewc.enter_task(0)
    check_ewc.finish_task(batches)
    check = compare_fisher(check_ewc.state_dict()["tasks"][0]["fisher"], reference)
    check["samples"] = setup.reference_samples
    return result, check


# ---------------------------------------------------------------------------- 3 and 5: sequences
def measure_sequence(setup: Setup, data: Data) -> tuple[dict[str, Any], dict[str, Any]]:
    """Whole 5-task ``fit_sequence`` runs per variant, then each method's state after them."""
    batches_per_epoch = min(len(loader) for loader in data.loaders)
    steps_per_task = min(setup.sequence_steps or batches_per_epoch, batches_per_epoch)
    finished: dict[str, tuple[Any, nn.Module]] = {}

    def sequence(variant: str) -> Callable[[], float]:
        def run() -> Timing:
            net = build_net(setup, data.inputs, data.classes)
            module = lightning_module(variant, net)
            methods = [] if variant == "plain" else [make_method(variant, net, setup)]
            datamodule = TaskSequenceDataModule.from_benchmark(data.benchmark, batch_size=setup.batch_size, seed=setup.seed)
            start = clock()
            sequence_trainer = trainer(setup, callbacks=methods)
            fit_sequence(sequence_trainer, module, datamodule, steps_per_task=steps_per_task)
            seconds = since(start)
            if sequence_trainer.global_step != NUM_TASKS * steps_per_task:
                raise RuntimeError(f"{variant}: the sequence made {sequence_trainer.global_step} steps")
            if methods:
                if methods[0].finished_tasks != list(range(NUM_TASKS)):
                    raise RuntimeError(f"{variant} finished tasks {methods[0].finished_tasks}")
                finished[variant] = (methods[0], net)
            return seconds

        return run

    times = interleaved({variant: sequence(variant) for variant in ("plain", *METHODS, *SEQUENCE_ONLY)}, setup.sequence_repeats)
    result = {variant: summary(times[variant], times["plain"]) for variant in times}
    result["steps_per_task"] = steps_per_task
    memory = {}
    for name, (method, net) in finished.items():
        state, held, params = state_bytes(method.state_dict()), held_bytes(method), parameter_bytes(net)
        memory[name] = {"state_dict_bytes": state, "state_dict_vs_parameters": state / params,
                        "resident_bytes": held, "resident_vs_parameters": held / params}
    return result, memory


# ---------------------------------------------------------------------------- targets and report
def evaluate_targets(measurements: dict[str, Any], fisher_check: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []

    def add(measure: str, value: Any, bound: Any, met: bool, target: str) -> None:
        targets.append({"measure": measure, "value": value, "target": target, "bound": bound, "met": bool(met)})

    for section, reference in (("step_lightning", "plain Lightning"), ("step_standalone", "hand-written step")):
        for name in (m for m in METHODS if m in STEP_TARGETS):
            ratio = measurements[section][name]["ratio"]
            bound = STEP_TARGETS[name]
            add(f"{section}/{name}", ratio, bound, ratio <= bound, f"<= {bound:.2f}x {reference}")
    for name in (m for m in METHODS if m in STEP_TARGETS):  # DER and ER-ACE rehearse within their first task
        ratio = measurements["step_standalone_first_task"][name]["ratio"]
        add(f"step_standalone_first_task/{name}", ratio, WRAPPER_TARGET, ratio <= WRAPPER_TARGET,
            f"<= {WRAPPER_TARGET:.2f}x hand-written step")
    consolidation = measurements["consolidation"]
    fisher_ratio = consolidation["ewc_fisher"]["ratio"]
    add("consolidation/ewc_fisher", fisher_ratio, FISHER_VS_EPOCH_TARGET, fisher_ratio <= FISHER_VS_EPOCH_TARGET,
        "<= 1 training epoch over the same samples")
    speedup = consolidation["fisher_per_sample_loop"]["speedup_of_ewc_fisher"]
    add("consolidation/fisher_speedup", speedup, FISHER_SPEEDUP_TARGET, speedup >= FISHER_SPEEDUP_TARGET,
        ">= 10x faster than the per-sample loop")
    add("fisher_check/equal", fisher_check["equal"], True, fisher_check["equal"], "same values as the per-sample loop")
    return targets


def print_report(report: dict[str, Any]) -> None:
    m, setup = report["measurements"], report["setup"]
    where = f"{report['machine']['gpu']}, {setup['precision']}" if setup["accelerator"] == "gpu" else f"{setup['threads']} CPU threads"
    print(f"\n{setup['model']} {report['model_parameters']:,} parameters, batch {setup['batch_size']}, "
          f"{where}, torch {report['machine']['torch']}, medians of {setup['repeats']} interleaved rounds "
          f"({setup['steps']} steps per step run; sequences: {report['sequence_repeats']} rounds)")

    def table(title: str, rows: dict[str, Any], unit: str, scale: float, reference: str) -> None:
        print(f"\n{title}")
        print(f"  {'':<24}{'wall ' + unit:>12}{'ratio':>8}{'cpu ' + unit:>12}{'ratio':>8}   (ratios vs {reference})")
        for name, entry in rows.items():
            if isinstance(entry, dict) and "median_s" in entry:
                ratios = [f"{entry[key]:.3f}" if key in entry else "" for key in ("ratio", "cpu_ratio")]
                print(f"  {name:<24}{entry['median_s'] * scale:>12.3f}{ratios[0]:>8}{entry['cpu_median_s'] * scale:>12.3f}{ratios[1]:>8}")

    if "step_lightning" in m:
        print_eager_sections(report, table)
    if "compiled" in m:
        c = m["compiled"]
        table(f"6. step time under Lightning with the module compiled ({c['backend']}), task 1", c["lightning"], "ms/step", 1e3,
              "plain Lightning, compiled")
        table(f"6. step time with the standalone train_step on the compiled model ({c['backend']}), task 1", c["standalone"],
              "ms/step", 1e3, "hand-written step, compiled")
    print(f"\ntargets (wall-clock ratios; load average {report['machine']['load_average_start']} at the start, "
          f"{report['machine']['load_average_end']} at the end)")
    for target in report["targets"]:
        value = target["value"] if isinstance(target["value"], bool) else f"{target['value']:.3f}"
        print(f"  {'met   ' if target['met'] else 'MISSED'} {target['measure']:<40} {value:>7}  {target['target']}")


def print_eager_sections(report: dict[str, Any], table: Callable[..., None]) -> None:
    m, setup = report["measurements"], report["setup"]
    table(f"1. step time under Lightning, task 1 ({setup['steps']} steps per run)", m["step_lightning"], "ms/step", 1e3, "plain Lightning")
    table("1. step time with the standalone train_step, task 1", m["step_standalone"], "ms/step", 1e3, "hand-written step")
    table("4. standalone train_step in the first task (the wrapper alone; DER and ER-ACE rehearse already)", m["step_standalone_first_task"], "ms/step", 1e3, "hand-written step")
    print(f"  (plain Lightning step vs hand-written step: {m['lightning_plain_vs_handwritten']['ratio']:.3f}x)")
    table(f"2. consolidating a task, {m['consolidation']['samples']} samples", m["consolidation"], "ms", 1e3, "one epoch over them")
    c, check = m["consolidation"], report["fisher_check"]
    print(f"  EWC's Fisher is {c['fisher_per_sample_loop']['speedup_of_ewc_fisher']:.1f}x faster than the per-sample loop "
          f"(timed on {c['fisher_per_sample_loop']['measured_samples']} samples, scaled); same values: {check['equal']} "
          f"(largest difference {check['max_diff_relative_to_largest']:.1e} of the largest entry, on {check['samples']} samples)")
    table(f"3. a whole {NUM_TASKS}-task sequence, {m['sequence']['steps_per_task']} steps per task", m["sequence"], "s", 1.0, "plain Lightning")
    print(f"\n5. method state after {NUM_TASKS} tasks (model parameters: {report['model_parameter_bytes'] / 2**20:.2f} MiB)")
    print(f"  {'':<24}{'state_dict MiB':>15}{'x params':>9}{'held MiB':>10}{'x params':>9}")
    for name, entry in m["memory"].items():
        print(f"  {name:<24}{entry['state_dict_bytes'] / 2**20:>15.2f}{entry['state_dict_vs_parameters']:>9.2f}"
              f"{entry['resident_bytes'] / 2**20:>10.2f}{entry['resident_vs_parameters']:>9.2f}")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu}


def git_commit() -> Optional[str]:
    """The repository's commit, where git can tell it (a run belongs to the code it ran)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def reported(name: str, run: Callable[[], Timing], started: float) -> Callable[[], Timing]:
    """``run``, which says on stderr how long it took (a long run shows where it is)."""

    def reported_run() -> Timing:
        seconds = run()
        _progress(f"{name}: {seconds.wall:.2f} s", started)
        return seconds

    return reported_run


def _progress(phase: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s, load {_load_average()}] {phase}", file=sys.stderr, flush=True)


def _load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages: other processes competing for the cores."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:
        return []


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """No Lightning banners or advice about loader workers while timing."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        logger.setLevel(level)


def parse_setup(argv: Optional[Sequence[str]]) -> tuple[Setup, Optional[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(PRESETS), default="mlp", help="mlp: 784-400-400-10 (default); large: 784-2048x3-10")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds of every measurement; sequences get a third as many, at least 3 (default: mlp 15, large 6)")
    parser.add_argument("--steps", type=int, help="steps per timed run, the first 2 dropped (default: mlp 20, large 6)")
    parser.add_argument("--sequence-steps", type=int, help="steps per task of the sequences (default: mlp one epoch, large 6)")
    parser.add_argument("--data", choices=("fashion_mnist", "digits"), help="benchmark source (default fashion_mnist)")
    parser.add_argument("--root", help=f"where Fashion-MNIST is (default {FASHION_MNIST})")
    parser.add_argument("--quick", action="store_true", help="a smoke run on tiny sizes (seconds; timings mean nothing)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="where to train: the CPU (default) or the first CUDA device")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true",
                        help="Lightning's precision; the standalone steps run their forward under the same autocast (default 32-true)")
    parser.add_argument("--compile", action="store_true", help="also measure the steps with the model compiled (section 6)")
    parser.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                        help="torch.compile's backend for --compile (default inductor; aot_eager traces as inductor does without generating code)")
    parser.add_argument("--compile-only", action="store_true", help="with --compile: measure section 6 alone")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.compile_only and not args.compile:
        parser.error("--compile-only needs --compile")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu needs a CUDA device, and torch.cuda.is_available() is False")

    setup = PRESETS[args.model]
    if args.quick:
        setup = replace(setup, hidden=(QUICK_WIDTH,) * len(setup.hidden), **QUICK)
    overrides = {"threads": args.threads, "repeats": args.repeats, "steps": args.steps, "data": args.data, "root": args.root,
                 "accelerator": args.accelerator, "precision": args.precision}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    if args.sequence_steps is not None:
        setup = replace(setup, sequence_steps=args.sequence_steps)
    if args.compile:
        setup = replace(setup, compile_backend=args.compile_backend)
    if setup.data == "digits":
        setup = replace(setup, root=None)
    for name in ("threads", "repeats", "steps"):
        if getattr(setup, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(setup, name)}")
    if setup.sequence_steps is not None and setup.sequence_steps < 1:
        parser.error(f"--sequence-steps must be >= 1, got {setup.sequence_steps}")
    return setup, args.json, args.compile_only


def measure_eager(setup: Setup, data: Data, started: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sections 1 to 5 (the eager model), their targets evaluated; the Fisher check under ``"fisher_check"``."""
    _progress("1, 4. step times", started)
    steps, trained = measure_steps(setup, data)
    _progress("2. consolidation", started)
    consolidation, fisher_check = measure_consolidation(setup, data, trained)
    _progress("3, 5. sequences and state", started)
    sequence, memory = measure_sequence(setup, data)
    measurements = {**steps, "consolidation": consolidation, "sequence": sequence, "memory": memory}
    targets = evaluate_targets(measurements, fisher_check)
    return {**measurements, "fisher_check": fisher_check}, targets


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    setup, json_path, compile_only = parse_setup(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    load_start = _load_average()
    try:
        with quiet_lightning():
            started = time.perf_counter()
            data = load_data(setup)
            measurements, targets = ({}, []) if compile_only else measure_eager(setup, data, started)
            if setup.compile_backend is not None:
                _progress(f"6. compiled steps ({setup.compile_backend})", started)
                measurements["compiled"] = measure_compiled_steps(setup, data)
            elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    host = {**machine(), "load_average_start": load_start, "load_average_end": _load_average()}
    fisher_check = measurements.pop("fisher_check", None)
    net = build_net(setup, data.inputs, data.classes)
    report = {
        "benchmark": "continual_overhead",
        "setup": asdict(setup),
        "sequence_repeats": setup.sequence_repeats,
        "model_parameters": sum(p.numel() for p in net.parameters()),
        "model_parameter_bytes": parameter_bytes(net),
        "machine": host,
        "command": " ".join(["python", "benchmarks/continual_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "wall_time_s": elapsed,
        "measurements": measurements,
        "fisher_check": fisher_check,
        "targets": targets,
    }
    print_report(report)
    print(f"\n(whole run {elapsed:.0f} s)")
    if json_path:
        with open(json_path, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
