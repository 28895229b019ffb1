"""What the two-process DDP workers (CPU, gloo) and their tests share.

The workers run as scripts (``python tests/distributed/<name>_worker.py OUT``), each putting the
repository on ``sys.path`` before it imports this module. Each builds its runs from the pieces
here, and ``main`` writes every rank's results to ``OUT/rank{r}.pt``; a test launches its worker
with ``launch`` and reads those files with ``rank_results``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from neurenix.continual import ContinualLossMixin
from neurenix.continual.distributed import rank_and_world_size
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence

RANKS = (0, 1)
TIMEOUT = 240  # seconds: a DDP job that has not ended by then has hung


def network(seed: int, outputs: int = 3) -> nn.Sequential:
    """The workers' network, 6 inputs to ``outputs``, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, outputs))


class PlainClassifier(L.LightningModule):
    """``network`` trained on cross-entropy, without ContinualLossMixin."""

    def __init__(self, seed: int, *, outputs: int = 3, lr: float = 0.1, optimizer: type = torch.optim.SGD) -> None:
        super().__init__()
        self.net = network(seed, outputs)
        self.lr, self.optimizer = lr, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=self.lr)


class Classifier(ContinualLossMixin, PlainClassifier):
    """``PlainClassifier`` whose loss the methods' penalties and replay terms join."""


def threshold_task(seed: int, samples: int) -> TaskDataset:
    """``samples`` random inputs labelled 0-2 by two thresholds, task id ``seed % 10``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=generator)
    return TaskDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long(), seed % 10)


def ddp_trainer(callbacks: list, checkpoints: Path, resume: str | None, every: int) -> L.Trainer:
    """A quiet two-process Trainer; a fresh run (``resume`` None) checkpoints every ``every`` steps."""
    saving = [] if resume else [ModelCheckpoint(dirpath=checkpoints, filename="{step}", every_n_train_steps=every, save_top_k=-1)]
    return L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", callbacks=[*callbacks, *saving], logger=False,
        enable_checkpointing=not resume, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip


def cloned_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def uninterrupted_and_resumed(run: Callable[[Path, str | None], dict], checkpoints: Path, resume_step: int) -> dict:
    """``run`` fresh (checkpointing into ``checkpoints``), then resumed from its step ``resume_step``."""
    return {
        "uninterrupted": run(checkpoints, None),
        "resumed": run(checkpoints, str(checkpoints / f"step={resume_step}.ckpt")),
    }


def main(doc: str, resume_step: int, results: Callable[[Path, int], dict]) -> None:
    """Parse ``OUT [--resume-step N]``, run ``results(OUT, N)`` on this rank and save it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume-step", type=int, default=resume_step, help="the step whose checkpoint the second run resumes from")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    saved = results(args.out, args.resume_step)
    rank, _ = rank_and_world_size()
    torch.save(saved, args.out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # before exit: gloo's threads torn down at exit can abort


# ---------------------------------------------------------------------------- two tasks of two classes
#: The classes of each task of :func:`two_class_task`.
TWO_CLASS_LABELS = {0: (0, 1), 1: (2, 3)}


def two_class_task(task_id: int, samples: int) -> TaskDataset:
    """Task ``task_id``: random inputs, each labelled with one of the task's two classes at random."""
    generator = torch.Generator().manual_seed(task_id)
    x = torch.randn(samples, 6, generator=generator)
    classes = torch.tensor(TWO_CLASS_LABELS[task_id])
    return TaskDataset(x, classes[torch.randint(0, 2, (samples,), generator=generator)], task_id)


class RecordBatches(L.Callback):
    """This rank's share of every global batch, with its task."""

    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.datamodule.current_task, batch[0].clone(), batch[1].clone()))


# ---------------------------------------------------------------------------- class-incremental jobs
# iCaRL's and BiC's workers run the same job and differ only in the method they build.

#: 32 samples per task, 16 a rank: four batches of 4 per rank, one epoch a task, 8 steps in all.
CLASS_INCREMENTAL_SAMPLES, CLASS_INCREMENTAL_BATCH, CLASS_INCREMENTAL_EVERY = 32, 4, 3
CLASS_INCREMENTAL_LABELS = ((0, 1), (2, 3))


def class_incremental_task(index: int) -> TaskDataset:
    """Task ``index``: random inputs labelled with its two classes by the sign of the first input."""
    generator = torch.Generator().manual_seed(index + 1)
    x = torch.randn(CLASS_INCREMENTAL_SAMPLES, 6, generator=generator)
    labels = torch.tensor(CLASS_INCREMENTAL_LABELS[index])
    return TaskDataset(x, labels[(x[:, 0] > 0).long()], index)


def probe() -> torch.Tensor:
    """Fixed inputs whose scores the class-incremental workers report."""
    return torch.randn(10, 6, generator=torch.Generator().manual_seed(99))


class SeenInputs(L.Callback):
    """The inputs of every training batch this rank trains on (before replay extends it)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].detach().clone())


def class_incremental_run(make_method: Callable[[nn.Module, int], L.Callback], out: Path, resume: str | None) -> dict:
    """Two class-incremental tasks with the method ``make_method(net, seed)`` builds, checkpointed
    every few steps (or resumed from ``resume``); the parameters, the method's ``state_dict``, the
    inputs this rank trained on and its ``classifier``'s scores on ``probe()``."""
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift, outputs=4)
    method, seen = make_method(model.net, shift + 1), SeenInputs()
    trainer = ddp_trainer([method, seen], out, resume, CLASS_INCREMENTAL_EVERY)
    tasks = [class_incremental_task(0), class_incremental_task(1)]
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=CLASS_INCREMENTAL_BATCH, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=1, ckpt_path=resume)
    with torch.no_grad():
        scores = method.classifier(probe())
    return {"params": cloned_params(model), "method": method.state_dict(), "seen": torch.cat(seen.inputs), "scores": scores}


def class_incremental_main(doc: str, make_method: Callable[[nn.Module, int], L.Callback]) -> None:
    """A class-incremental worker's entry: uninterrupted, then resumed from step 6 (task 1, two batches in)."""
    main(doc, 6, lambda out, step: uninterrupted_and_resumed(lambda o, r: class_incremental_run(make_method, o, r), out / "checkpoints", step))


def assert_same_parameters(first: dict, second: dict, **tolerance: float) -> None:
    """Two runs' ``"params"`` agree: exactly, or within ``rtol``/``atol``."""
    for name, value in first["params"].items():
        if tolerance:
            torch.testing.assert_close(second["params"][name], value, msg=name, **tolerance)
        else:
            assert torch.equal(second["params"][name], value), name


def assert_resumed_like_uninterrupted(run: dict) -> None:
    """A class-incremental rank's resumed run ended where its uninterrupted one did: parameters,
    memory, scores on ``probe()``, both tasks finished."""
    uninterrupted, resumed = run["uninterrupted"], run["resumed"]
    assert_same_parameters(uninterrupted, resumed, rtol=0, atol=1e-6)
    ours, theirs = resumed["method"]["memory"], uninterrupted["method"]["memory"]
    for name in ("inputs", "targets", "ranks", "generator"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(resumed["scores"], uninterrupted["scores"], rtol=0, atol=1e-6)
    assert resumed["method"]["finished_tasks"] == [0, 1]


def launch(worker: Path, out: Path) -> None:
    """Run ``worker`` (which starts its two processes itself) into ``out``; fail with its stderr."""
    done = subprocess.run([sys.executable, str(worker), str(out)], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]


def rank_results(out: Path) -> list[dict]:
    """What each rank of a finished job saved, in rank order."""
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in RANKS]
