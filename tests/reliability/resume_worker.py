"""A three-task sequence under ``fit_sequence`` that kills itself at a chosen point, then resumes.

    python tests/reliability/resume_worker.py OUT --methods ewc,replay [--every-n-steps N] [--kill POINT]
    python tests/reliability/resume_worker.py OUT --methods ewc,replay --resume [--resume-from FILE]

The first form trains from scratch, checkpointing at every epoch end (``OUT/checkpoints``, with
``last.ckpt``; with ``--every-n-steps N`` every ``N`` optimizer steps instead, wherever in an epoch
the step falls), logging to ``OUT/logs`` (a ``CSVLogger`` that writes every row as it is logged) and
appending to ``OUT/timeline.jsonl`` the sequence position of every epoch start and the tasks each
method has finished at every fit's end. With ``--kill POINT`` it sends itself SIGKILL at that
point (nothing after it runs: no ``finally``, no flush, no exit hook), or SIGTERM; without, it
writes ``OUT/result.pt`` at the end. ``POINT`` is one of

- ``epoch:T:E``: inside task ``T``, after its epoch ``E`` (counted from 0 within the task) has
  ended and been checkpointed, before the next epoch starts;
- ``batch:T:E:B``: inside epoch ``E`` of task ``T``, after its batch ``B`` (the last checkpoint is
  the end of the epoch before);
- ``between:T``: after task ``T`` has ended (its methods consolidated it, ForgettingCurves measured
  it), before task ``T+1`` starts;
- ``sigterm:T:E:B``: SIGTERM after batch ``B`` of epoch ``E`` of task ``T``, the signal a scheduler
  or ``kill`` sends: Lightning ends the fit after that batch, ``OnExceptionCheckpoint`` writes
  ``OUT/checkpoints/on_exception.ckpt`` there, and the process ends with the exception (Lightning's
  ``SIGTERMException``, a ``SystemExit``: status 0, and no ``result.pt``).

The second form builds every object anew, with other seeds and other initial weights (what the
checkpoint holds must win), calls ``fit_sequence(..., ckpt_path=OUT/checkpoints/FILE)`` (``FILE``
is ``last.ckpt`` unless ``--resume-from`` names another) and writes ``OUT/result.pt``: the parameters, every method's ``state_dict``, the ForgettingCurves
matrix, and the curves of every log of ``OUT/logs`` (the killed run's and the resumed run's).

``tests/reliability/test_resume.py`` runs :func:`main` in fresh child processes (and, once, this
file as a script).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

if __name__ == "__main__":  # run as a script: the repository, for `neurenix` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from neurenix.continual import (  # noqa: E402
    AGEM,
    ERACE,
    EWC,
    GEM,
    MAS,
    BiC,
    ContinualLossMixin,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402
from neurenix.metrics import ForgettingCurves  # noqa: E402

NUM_TASKS = 3
EPOCHS_PER_TASK = 2
BATCH_SIZE = 16
TRAIN_SAMPLES = 48  # three batches per epoch
TEST_SAMPLES = 30
FEATURES, CLASSES = 8, 3
#: The methods that run together on one Trainer (the older-checkpoint tests); build_methods also
#: knows the rehearsal methods of issue 15 (der, er_ace, agem, gem), each one rehearsal method
#: per Trainer as replay is, issue 17's mas and rwalk, and issue 16's replay_herding, icarl and gdumb.
METHODS = ("ewc", "replay", "l2", "si", "distillation")
#: A resumed run's objects are built from other seeds: only the checkpoint can make it match.
RESUME_SEED_SHIFT = 1000


class Classifier(ContinualLossMixin, L.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)  # Adam: optimizer state to restore too


def build_methods(names: Sequence[str], net: nn.Module, seed: int) -> dict[str, Any]:
    makers = {
        "ewc": lambda: EWC(net, importance=100.0, fisher_sample_size=20, seed=seed),
        "replay": lambda: ExperienceReplay(net, memory_size=20, replay_ratio=0.5, seed=seed + 1),
        "l2": lambda: L2Regularization(net, importance=1.0),
        "si": lambda: SynapticIntelligence(net, importance=1.0, xi=0.1),
        "distillation": lambda: KnowledgeDistillation(net, temperature=2.0, alpha=0.5),
        # beta > 0: DER++, both memory draws (logits and labels) go through the checkpoint
        "der": lambda: DarkExperienceReplay(net, memory_size=20, alpha=0.2, beta=0.5, replay_ratio=0.5, seed=seed + 1),
        "er_ace": lambda: ERACE(net, memory_size=20, replay_ratio=0.5, seed=seed + 1),
        "agem": lambda: AGEM(net, memory_size=20, reference_size=8, seed=seed + 1),
        "gem": lambda: GEM(net, memory_size=20, margin=0.5, seed=seed + 1),
        # issue 17: MAS's sampling generator, RWalk's online Fisher and its interval in flight
        # (2 steps an interval, three batches an epoch: kills fall inside intervals too)
        "mas": lambda: MAS(net, importance=1.0, sample_size=20, seed=seed + 2),
        "rwalk": lambda: RWalk(net, importance=1.0, interval=2),
        # issue 16: exemplars (with their ranks) chosen at each task's end, iCaRL's teacher and
        # nearest means, GDumb's memory served as the task's training data after its reset
        "replay_herding": lambda: ExperienceReplay(
            net, memory_size=20, replay_ratio=0.5, seed=seed + 1, selection="herding", feature_extractor="1"
        ),
        "icarl": lambda: ICaRL(net, memory_size=20, replay_ratio=0.5, seed=seed + 1),
        "bic": lambda: BiC(net, memory_size=20, replay_ratio=0.5, seed=seed + 1),
        "gdumb": lambda: GDumb(net, memory_size=20, seed=seed + 1),
    }
    unknown = [name for name in names if name not in makers]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {tuple(makers)}")
    return {name: makers[name]() for name in names}


def _task(seed: int, samples: int, task: int) -> TaskDataset:
    """Labels from a random linear teacher per task: learnable, and different across tasks."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(100 + task))
    x = torch.randn(samples, FEATURES, generator=generator)
    return TaskDataset(x, (x @ teacher).argmax(1), task)


def build_datamodule(seed: int) -> TaskSequenceDataModule:
    train = [_task(10 + t, TRAIN_SAMPLES, t) for t in range(NUM_TASKS)]
    test = [_task(20 + t, TEST_SAMPLES, t) for t in range(NUM_TASKS)]
    return TaskSequenceDataModule(train, test, batch_size=BATCH_SIZE, seed=seed)


class KillPoint:
    """Where a run kills itself (see the module docstring)."""

    def __init__(self, text: str) -> None:
        kind, *numbers = text.split(":")
        sizes = {"epoch": 2, "batch": 3, "between": 1, "sigterm": 3}
        if kind not in sizes or len(numbers) != sizes[kind]:
            raise SystemExit(f"--kill: expected epoch:T:E, batch:T:E:B, sigterm:T:E:B or between:T, got {text!r}")
        self.kind, self.numbers = kind, tuple(int(n) for n in numbers)

    def __repr__(self) -> str:
        return ":".join([self.kind, *map(str, self.numbers)])


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Timeline(Callback):
    """Appends the sequence position of every epoch start, and what every method had finished at
    the end of every fit, to a file (flushed each time, so a killed run leaves its part); kills
    the process at the kill point. Listed after the methods: a fit's end is read after theirs."""

    def __init__(self, path: Path, kill: Optional[KillPoint], methods: dict[str, Any]) -> None:
        self.path, self.kill, self.methods = path, kill, methods

    def _write(self, **record: Any) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    @staticmethod
    def _position(trainer: L.Trainer) -> tuple[int, int]:
        datamodule = trainer.datamodule
        return datamodule.current_task, trainer.current_epoch - datamodule.task_start["epoch"]

    def on_fit_start(self, trainer, pl_module):
        kill = self.kill
        if kill is not None and kill.kind == "between" and trainer.datamodule.current_task == kill.numbers[0] + 1:
            die()

    def on_train_epoch_start(self, trainer, pl_module):
        task, epoch = self._position(trainer)
        kill = self.kill
        if kill is not None and kill.kind == "epoch" and (task, epoch) == (kill.numbers[0], kill.numbers[1] + 1):
            die()
        self._write(event="epoch", task=task, epoch=epoch, global_epoch=trainer.current_epoch, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        kill = self.kill
        if kill is not None and kill.kind in ("batch", "sigterm") and (*self._position(trainer), batch_idx) == kill.numbers:
            if kill.kind == "batch":
                die()
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: the fit stops after this batch

    def on_fit_end(self, trainer, pl_module):
        finished = {name: list(method.finished_tasks) for name, method in self.methods.items()}
        self._write(event="fit_end", task=trainer.datamodule.current_task, step=trainer.global_step, finished=finished)


def read_timeline(out: Path) -> list[list[dict[str, Any]]]:
    """The records of ``OUT/timeline.jsonl``, one list per process that wrote them, in order."""
    parts: list[list[dict[str, Any]]] = []
    with open(out / "timeline.jsonl") as file:
        for line in file:
            record = json.loads(line)
            if record["event"] == "process":
                parts.append([])
            else:
                parts[-1].append(record)
    return parts


def logged_curves(log_root: Path) -> dict[str, dict[int, float]]:
    """Every metric's value at every step, over all the runs' CSV logs in the order they ran
    (a step logged again by a resumed run takes the later value, as a plotted curve shows it)."""
    curves: dict[str, dict[int, float]] = {}
    versions = sorted(log_root.glob("run/version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        metrics = version / "metrics.csv"
        if not metrics.exists():
            continue
        with open(metrics, newline="") as file:
            for row in csv.DictReader(file):
                step = int(row.pop("step"))
                for name, value in row.items():
                    if value not in ("", None):
                        curves.setdefault(name, {})[step] = float(value)
    return curves


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def checkpoint_callbacks(directory: Path, every_n_steps: Optional[int], kill: Optional[KillPoint]) -> list[Callback]:
    """Checkpoints at every epoch end, or every ``every_n_steps`` steps; on an exception for SIGTERM kills."""
    if every_n_steps is None:
        when: dict[str, Any] = dict(every_n_epochs=1, save_on_train_epoch_end=True)
    else:
        when = dict(every_n_train_steps=every_n_steps)
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=directory, filename="{epoch}-{step}", save_top_k=-1, save_last=True, **when)
    ]
    if kill is not None and kill.kind == "sigterm":
        callbacks.append(OnExceptionCheckpoint(directory))
    return callbacks


def run(out: Path, names: Sequence[str], kill: Optional[KillPoint] = None, resume: bool = False,
        ckpt_path: Optional[Path] = None, every_n_steps: Optional[int] = None) -> dict[str, Any]:
    """Train (or resume) the sequence; return what ``result.pt`` holds."""
    shift = RESUME_SEED_SHIFT if resume else 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "timeline.jsonl", "a") as file:  # where this process's part of the timeline begins
        file.write(json.dumps({"event": "process", "resume": resume}) + "\n")
    model = Classifier(seed=shift)
    methods = build_methods(names, model.net, seed=7 + shift)
    curves = ForgettingCurves(every_n_epochs=1)
    checkpoints = checkpoint_callbacks(out / "checkpoints", every_n_steps, kill)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[*methods.values(), curves, Timeline(out / "timeline.jsonl", kill, methods), *checkpoints],
        logger=CSVLogger(out / "logs", name="run", flush_logs_every_n_steps=1),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    datamodule = build_datamodule(seed=shift)
    if resume:
        ckpt_path = ckpt_path or out / "checkpoints" / "last.ckpt"
    fit_sequence(trainer, model, datamodule, epochs_per_task=EPOCHS_PER_TASK, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert curves.matrix is not None
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "methods": {name: method.state_dict() for name, method in methods.items()},
        "matrix": {key: value.clone() for key, value in curves.matrix.state_dict().items()},
        "curves": logged_curves(out / "logs"),
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--methods", required=True, help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--every-n-steps", type=int, default=None, help="checkpoint every N steps, not at epoch ends")
    parser.add_argument("--kill", type=KillPoint, default=None, help="epoch:T:E, batch:T:E:B, sigterm:T:E:B or between:T")
    parser.add_argument("--resume", action="store_true", help="resume from OUT/checkpoints/last.ckpt")
    parser.add_argument("--resume-from", default="last.ckpt", help="with --resume: the file in OUT/checkpoints")
    args = parser.parse_args(argv)
    if args.kill is not None and args.resume:
        parser.error("--kill and --resume go to different invocations")
    torch.set_num_threads(1)  # exact repeats, and the machine's cores are shared
    _quiet()
    ckpt_path = args.out / "checkpoints" / args.resume_from if args.resume else None
    result = run(args.out, args.methods.split(","), args.kill, args.resume, ckpt_path, args.every_n_steps)
    torch.save(result, args.out / "result.pt")


def child_main(argv: Sequence[str], log: Path) -> None:
    """:func:`main` with this process's output (and any traceback) sent to ``log``; once it has
    returned, :func:`returned_marker` of ``log`` exists (the process's own word that it ended
    normally, for when the forkserver loses its exit status)."""
    with open(log, "ab", buffering=0) as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
    main(argv)
    returned_marker(log).touch()


def returned_marker(log: Path) -> Path:
    """The file :func:`child_main` writes beside ``log`` when :func:`main` has returned."""
    return Path(f"{log}.returned")


if __name__ == "__main__":
    main()
