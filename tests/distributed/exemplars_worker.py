"""ExperienceReplay with herding exemplars over two class-incremental tasks as a two-process DDP
job (CPU, gloo): uninterrupted, checkpointed every few steps, then resumed in the same processes
from a checkpoint in task 1; at the end, a nearest-mean classifier over each rank's memory.

    python tests/distributed/exemplars_worker.py OUT [--resume-step 9]

Each rank writes ``OUT/rank{r}.pt``: for both runs its parameters at each task's end, the replay's
``state_dict`` at the end and the class means. ``tests/distributed/test_ddp_exemplars.py`` runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual import ExperienceReplay  # noqa: E402
from neurenix.continual.exemplars import NearestMeanClassifier  # noqa: E402
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import Classifier, cloned_params, ddp_trainer, main, two_class_task, uninterrupted_and_resumed  # noqa: E402

SAMPLES, BATCH_PER_RANK, EVERY, RESUME_STEP = 32, 4, 3, 9  # 4 steps an epoch, 2 epochs a task: step 9 is in task 1
LR, MEMORY_SIZE, REPLAY_RATIO, SEED = 0.2, 8, 1.0, 4
OUTPUTS = 4
FEATURES = "1"  # the network's hidden layer (its Tanh), of 12 features


class RecordTaskEnds(L.Callback):
    """The parameters at each task's end (the features exemplars were chosen with)."""

    def __init__(self) -> None:
        self.params: list = []

    def on_train_end(self, trainer, pl_module):
        self.params.append(cloned_params(pl_module))


def task(task_id: int) -> TaskDataset:
    return two_class_task(task_id, SAMPLES)


def run(out: Path, resume: str | None) -> dict:
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift, outputs=OUTPUTS, lr=LR)
    replay = ExperienceReplay(
        model.net, MEMORY_SIZE, REPLAY_RATIO, seed=SEED + shift, selection="herding", feature_extractor=FEATURES
    )
    recorder = RecordTaskEnds()
    trainer = ddp_trainer([replay, recorder], out, resume, EVERY)
    datamodule = TaskSequenceDataModule([task(0), task(1)], [task(0), task(1)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=resume)
    classifier = NearestMeanClassifier(model.net, FEATURES, replay.memory)
    classifier.update_means()
    return {
        "task_end_params": recorder.params,
        "params": cloned_params(model),
        "state": replay.state_dict(),
        "means": classifier.means,
        "seen": classifier.seen,
        "global_step": trainer.global_step,
    }


if __name__ == "__main__":
    main(__doc__, RESUME_STEP, lambda out, resume_step: uninterrupted_and_resumed(run, out / "checkpoints", resume_step))
