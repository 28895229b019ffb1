"""GDumb on split Fashion-MNIST, class-incremental, beside the ``neurenix`` command's runs.

The protocol of ``benchmarks/memory_methods.py`` (5 tasks of 2 classes in the order drawn from
the seed, the command's MLP 784-400-400-10, batch 128, Adam 1e-3, ``seed_everything(seed)``),
with GDumb's memory of ``--memory`` samples in all: each task's fit fills the memory from the
task, resets the network to its initial weights and trains it on the memory alone for
``--epochs`` epochs (``fit_sequence``'s ``epochs_per_task``); ``ForgettingCurves`` measures it.
Prints a Markdown table of mean ± standard deviation over the seeds and writes every seed's
numbers to ``OUTPUT/summary.json``. The docs' numbers::

    python benchmarks/gdumb_fashion_mnist.py --data_root /usr/share/datasets/fashion-mnist \\
        --seeds 0 1 2 --memory 2000 --epochs 30 --output runs/gdumb
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from neurenix.cli.runs import MLPClassifier
from neurenix.continual.gdumb import GDumb
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark
from neurenix.metrics import ForgettingCurves


def run(seed: int, data_root: str, memory: int, epochs: int) -> dict[str, float]:
    """One GDumb run of the protocol; its average accuracy and forgetting after the last task."""
    benchmark = split_benchmark("fashion_mnist", num_tasks=5, classes_per_task=2, seed=seed, scenario="class", root=data_root)
    L.seed_everything(seed, verbose=False)
    model = MLPClassifier(784, benchmark.num_classes, hidden=400, lr=1e-3)
    curves = ForgettingCurves()
    trainer = L.Trainer(
        callbacks=[GDumb(model, memory_size=memory, seed=seed), curves], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=128, eval_batch_size=512, seed=seed)
    start = time.perf_counter()
    fit_sequence(trainer, model, datamodule, epochs_per_task=epochs)
    matrix = curves.matrix
    return {
        "average_accuracy": float(matrix.average_accuracy()),
        "forgetting": float(matrix.forgetting()),
        "wall_time_s": time.perf_counter() - start,
        "final_accuracies": matrix.accuracies()[-1].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--memory", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("runs/gdumb"))
    options = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    torch.set_num_threads(1)
    runs = [run(seed, options.data_root, options.memory, options.epochs) for seed in options.seeds]
    rows = {key: [r[key] for r in runs] for key in ("average_accuracy", "forgetting", "wall_time_s")}
    stats = {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for key, v in rows.items()}
    options.output.mkdir(parents=True, exist_ok=True)
    report = {"seeds": options.seeds, "memory": options.memory, "epochs": options.epochs, "runs": runs}
    (options.output / "summary.json").write_text(json.dumps(report, indent=1))
    (acc, acc_sd), (fgt, fgt_sd), (wall, _) = stats["average_accuracy"], stats["forgetting"], stats["wall_time_s"]
    print(f"| method | memory | average accuracy (mean ± std, {len(runs)} seeds) | forgetting | time per run |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| gdumb ({options.epochs} epochs) | {options.memory} | {acc:.3f} ± {acc_sd:.3f} | {fgt:.3f} ± {fgt_sd:.3f} | {wall:.1f} s |")


if __name__ == "__main__":
    main()
