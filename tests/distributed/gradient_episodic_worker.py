"""A-GEM and GEM on a two-process DDP job (CPU, gloo), run by test_ddp_gradient_episodic.py.

    python tests/distributed/gradient_episodic_worker.py OUT [--resume-step 6]

In one launch (later Trainers join the process group the first one made):

1. A-GEM over three tasks uninterrupted, checkpointed every few steps, then resumed in the same
   processes from the checkpoint at ``--resume-step`` (task 1, two batches in);
2. GEM over the same three tasks;
3. outside Lightning, each method's ``project_gradients`` on memories of *different sizes* per rank
   (rank 0: 3 samples of task 0 and 4 of task 1; rank 1: 9 of task 0 and none of task 1).

Each rank writes ``OUT/rank{r}.pt``: for the Lightning runs, at the first optimizer step of task 2,
the parameters and the final gradient before and after the projection, the rank's memory and the
slots its reference batches were drawn from, and at the end the parameters and method state;
for part 3, its memory and the gradients before and after.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual.distributed import rank_and_world_size  # noqa: E402
from neurenix.continual.gradient_episodic import AGEM, GEM  # noqa: E402
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import PlainClassifier, cloned_params, ddp_trainer, main  # noqa: E402

# 16 samples a rank per task: four batches, one epoch a task, 12 steps in all. The first step of
# task 2 (global step 8) has two finished tasks, 6 samples of each in every rank's memory of 12.
SAMPLES, BATCH_PER_RANK, EVERY, MEMORY, REFERENCE, PROBE_STEP = 32, 4, 3, 12, 5, 8


def task(k: int) -> TaskDataset:
    """The same inputs every task, labels shifted by ``k``: each task's gradients fight the others'."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 6, generator=generator)
    return TaskDataset(x, ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long() + k) % 3, k)


def make_method(name: str, net: nn.Module, seed: int):
    if name == "AGEM":
        return AGEM(net, memory_size=MEMORY, reference_size=REFERENCE, seed=seed)
    return GEM(net, memory_size=MEMORY, margin=0.5, seed=seed)


def flat_grad(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().clone() for p in net.parameters()])


class Probe(L.Callback):
    """At PROBE_STEP, the final gradient: listed before the method, as it comes (all-reduced,
    unprojected); listed after it, projected (with the rank's memory and reference slots)."""

    def __init__(self, method, after: bool, record: dict) -> None:
        self.method, self.after, self.record = method, after, record

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != PROBE_STEP:
            return
        net = self.method.model
        if self.after:
            self.record.update(
                after=flat_grad(net), memory=self.method.memory.state_dict(), groups=self.method.recorded_groups
            )
        else:
            self.record.update(before=flat_grad(net), params=[p.detach().clone() for p in net.parameters()])


def recording_groups(method) -> None:
    """Keep the slots of the last reference groups the method drew (its random draw is per rank)."""
    draw = method._reference_groups

    def drawn():
        groups = draw()
        method.recorded_groups = [slots.clone() for slots in groups]
        return groups

    method._reference_groups = drawn


def run(name: str, out: Path, resume: str | None) -> dict:
    """The sequence, checkpointed every EVERY steps (or resumed from ``resume``); what it ends with."""
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = PlainClassifier(seed=shift, lr=0.2)  # A-GEM and GEM need no ContinualLossMixin
    method, probe = make_method(name, model.net, seed=shift + 1), {}
    recording_groups(method)
    trainer = ddp_trainer([Probe(method, False, probe), method, Probe(method, True, probe)], out, resume, EVERY)
    datamodule = TaskSequenceDataModule([task(0), task(1), task(2)], [task(0), task(1), task(2)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=1, ckpt_path=resume)
    return {
        "params": cloned_params(model.net),
        "method": method.state_dict(),
        "probe": probe,
    }


def unequal_shards(name: str, rank: int) -> dict:
    """``project_gradients`` outside Lightning with memories of different sizes on the two ranks."""
    torch.manual_seed(0)
    net = nn.Linear(6, 3)
    method = AGEM(net, memory_size=20, reference_size=64) if name == "AGEM" else GEM(net, memory_size=20, margin=0.5)
    generator = torch.Generator().manual_seed(10 + rank)
    for task_id, count in enumerate((3, 4) if rank == 0 else (9, 0)):
        if count:
            method.add_to_memory(torch.randn(count, 6, generator=generator), torch.randint(0, 3, (count,), generator=generator), task_id)
    method.register_task(0)
    method.register_task(1)
    method.register_task(2)  # tasks 0 and 1 finished
    gradient = torch.Generator().manual_seed(99)  # the same, all-reduced, training gradient on both ranks
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gradient)
    before = flat_grad(net)
    method.project_gradients()
    return {"memory": method.memory.state_dict(), "before": before, "after": flat_grad(net), "params": cloned_params(net)}


def results(out: Path, resume_step: int) -> dict:
    """Every part of the job (see the module's docstring), as this rank saw it."""
    parts = {
        "AGEM": run("AGEM", out / "checkpoints", None),
        "AGEM_resumed": run("AGEM", out / "checkpoints", str(out / "checkpoints" / f"step={resume_step}.ckpt")),
        "GEM": run("GEM", out / "gem_checkpoints", None),
    }
    rank, _ = rank_and_world_size()
    parts["unequal"] = {name: unequal_shards(name, rank) for name in ("AGEM", "GEM")}
    return parts


if __name__ == "__main__":
    main(__doc__, 6, results)
