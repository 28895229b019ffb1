"""``TaskSequenceDataModule(keep_on_device=True)`` as a two-process DDP job (CPU, gloo), against
the same job with ``keep_on_device=False``, in the sequential and the cumulative regime.

    python tests/distributed/device_data_worker.py OUT

On the CPU the device is the CPU: the unions build their batches as on an accelerator (without
reading their indices on the host, ``_reads_are_free`` patched) in the ``keep_on_device`` runs.
Each rank writes ``OUT/rank{r}.pt``: for each regime and setting its batches (its share of each
global batch, with their task), its parameters, EWC's state, where setup moved the tasks and the
device of its training loader's batches of indices. ``tests/distributed/test_ddp_device_data.py``
runs it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

import lightning as L  # noqa: E402

import neurenix.data.tasks as tasks_module  # noqa: E402
from neurenix.continual import EWC  # noqa: E402
from neurenix.data import TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import Classifier, RecordBatches, cloned_params, main, two_class_task  # noqa: E402

SAMPLES, BATCH_PER_RANK, EPOCHS, OUTPUTS = 24, 4, 2, 4  # 12 samples a rank: 3 steps an epoch
REGIMES = ("sequential", "cumulative")


@contextlib.contextmanager
def batches_built_as_on_an_accelerator(active: bool) -> Iterator[None]:
    saved = tasks_module._reads_are_free
    if active:
        tasks_module._reads_are_free = lambda device: False
    try:
        yield
    finally:
        tasks_module._reads_are_free = saved


def run(out: Path, training: str, keep_on_device: bool) -> dict:
    model = Classifier(seed=0, outputs=OUTPUTS)
    ewc, recorder = EWC(model.net, importance=5.0, fisher_sample_size=8, seed=1), RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", callbacks=[ewc, recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    tasks = [two_class_task(0, SAMPLES), two_class_task(1, SAMPLES)]
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=BATCH_PER_RANK, seed=3, training=training, keep_on_device=keep_on_device)
    with batches_built_as_on_an_accelerator(keep_on_device):
        fit_sequence(trainer, model, datamodule, epochs_per_task=EPOCHS)
    sampler = trainer.train_dataloader.batch_sampler  # the loader Lightning rebuilt with its DistributedSampler
    return {
        "batches": recorder.batches,
        "params": cloned_params(model),
        "ewc": ewc.state_dict(),
        "tasks_device": str(datamodule._tasks_device),
        "sampler": f"{type(sampler).__name__}({type(sampler.sampler).__name__}, device={getattr(sampler, 'device', None)})",
    }


def results(out: Path, _: int) -> dict:
    return {f"{training}-{keep}": run(out, training, keep) for training in REGIMES for keep in (False, True)}


if __name__ == "__main__":
    main(__doc__, 0, results)
