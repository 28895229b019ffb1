"""BiC on split Fashion-MNIST (class-incremental): its corrected prediction next to replay at equal memory.

Each seed draws the class order of the 5 tasks (2 classes each), the network's initial weights and
the batch order; every method starts from the same weights. The network, the training (each
method's plain-PyTorch door: ``train_step``, ``register_task`` at each task's end with its data;
Adam, batch 128) and the measurement (after the last task, every test sample classified among all
10 classes) are those of ``benchmarks/icarl_fashion_mnist.py`` (``benchmarks/exemplar_protocol.py``). Rows (mean ± std over seeds):

- ``finetune``: cross-entropy, no memory;
- ``replay``: ``ExperienceReplay(memory_size, replay_ratio)``, a reservoir of ``memory_size`` samples;
- ``replay herding``: ``ExperienceReplay(..., selection="herding")``: the same class-balanced,
  herded exemplar memory as BiC's, cross-entropy on new data and exemplars (BiC without its
  distillation or correction);
- ``bic head``: BiC's network, arg max of its own (uncorrected) outputs;
- ``bic``: BiC's prediction, ``bic.classifier`` (the bias-corrected logits).

All memories hold ``memory_size`` samples in all (BiC's includes its held-out part). The docs' table::

    python benchmarks/bic_fashion_mnist.py --seeds 0 1 2 --epochs 1 --output runs/bic
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared protocol, run as a script

from exemplar_protocol import accuracy, argument_parser, evaluated, run, split_tasks, trained  # noqa: E402

from neurenix.continual import ExperienceReplay  # noqa: E402
from neurenix.continual.bic import BiC  # noqa: E402


def run_seed(seed: int, options: argparse.Namespace) -> dict[str, Any]:
    trains, tests = split_tasks(seed, options.data_root)
    settings = (options.epochs, options.batch_size, options.lr, seed)
    rows: dict[str, list[float]] = {}
    times: dict[str, float] = {}
    extra: dict[str, Any] = {}

    if "finetune" in options.methods:
        model, _, times["finetune"] = trained(lambda model: None, trains, settings)
        rows["finetune"] = accuracy(evaluated(model), tests)
    if "replay" in options.methods:
        model, _, times["replay"] = trained(lambda model: ExperienceReplay(model, options.memory, options.replay_ratio, seed=seed), trains, settings)
        rows["replay"] = accuracy(evaluated(model), tests)
    if "replay-herding" in options.methods:
        model, _, times["replay herding"] = trained(
            lambda model: ExperienceReplay(model, options.memory, options.replay_ratio, seed=seed, selection="herding", feature_extractor=model[0]),
            trains,
            settings,
        )
        rows["replay herding"] = accuracy(evaluated(model), tests)
    if "bic" in options.methods:
        model, bic, times["bic"] = trained(
            lambda model: BiC(
                model, options.memory, model[0], options.replay_ratio, seed=seed, held_out=options.held_out, temperature=options.temperature
            ),
            trains,
            settings,
        )
        rows["bic head"] = accuracy(evaluated(model), tests)
        rows["bic"] = accuracy(evaluated(bic.classifier, model), tests)
        extra["bic corrections (task, alpha, beta)"] = bic.corrections
    return {"accuracy_per_task": rows, "wall_time_s": times, **extra}


def main(arguments: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(
        __doc__.split("\n\n")[0],
        output="runs/bic",
        methods=["finetune", "replay", "replay-herding", "bic"],
        method_options=(("held_out", float, 0.1), ("temperature", float, 2.0)),
    )
    return run(parser.parse_args(arguments), run_seed)


if __name__ == "__main__":
    main()
