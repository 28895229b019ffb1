"""Task-free training under Lightning's DDP: a TaskBoundaryDetector and EWC on a 2-process Trainer.

    python tests/distributed/boundary_worker.py OUT_DIR

Each rank trains on its share of every global batch of an unshuffled three-task stream (16
samples, 8 per rank: ``StreamSampler``) and writes ``OUT_DIR/rank{r}.pt``: the boundaries it detected, the
signal it saw at every step and EWC's state.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `tests.*`

from neurenix.continual import EWC  # noqa: E402
from neurenix.continual.boundary import TaskBoundaryDetector  # noqa: E402
from neurenix.continual.distributed import rank_and_world_size  # noqa: E402
from neurenix.data.stream import StreamSampler  # noqa: E402
from tests.continual.test_boundary import Classifier, rule_stream  # noqa: E402


class RecordSignal(L.Callback):
    def __init__(self, detector: TaskBoundaryDetector) -> None:
        self.detector, self.signals = detector, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.signals.append(self.detector.last_signal)


def main(out: Path) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dataset = rule_stream(batch=16)[0].dataset
    # Each rank its half of every global batch of 16, in the stream's order: Lightning's own
    # DistributedSampler would shuffle the stream (use_distributed_sampler=False below).
    stream = DataLoader(dataset, batch_size=8, sampler=StreamSampler(len(dataset)))
    model = Classifier(8, 2, lr=1e-2)
    ewc = EWC(model.net, importance=10.0, seed=0)
    detector = TaskBoundaryDetector(window=10, test_window=3)
    record = RecordSignal(detector)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, callbacks=[detector, ewc, record],
        use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, stream)
    rank, _ = rank_and_world_size()
    torch.save(
        {
            "boundaries": detector.boundaries,
            "change_points": detector.change_points,
            "signals": record.signals,
            "finished_tasks": ewc.finished_tasks,
            "fisher": {task: state["fisher"] for task, state in ewc._tasks.items()},
            "samples": {task: state["samples"] for task, state in ewc._tasks.items()},
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        },
        out / f"rank{rank}.pt",
    )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
