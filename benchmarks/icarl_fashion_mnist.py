"""iCaRL on split Fashion-MNIST (class-incremental): its NCM next to its own head, replay and fine-tuning.

Each seed draws the class order of the 5 tasks (2 classes each), the network's initial weights and
the batch order; every method starts from the same weights. The network is the overhead
benchmark's MLP 784-400-400-10, as ``nn.Sequential(backbone, head)``: iCaRL's features are the
backbone's output (400 units after a ReLU). Training goes through each method's plain-PyTorch door
(``train_step``, ``register_task`` at each task's end with the task's data), with Adam and the
command's batch size. After the last task every test sample of the 10 classes is classified among
all 10 (class-incremental), and the table reports the accuracy per seed (mean ± std):

- ``finetune``: cross-entropy, no memory;
- ``replay``: ``ExperienceReplay(memory_size, replay_ratio)``, a reservoir;
- ``icarl head``: iCaRL's network, arg max of its own outputs (its sigmoid head);
- ``icarl ncm``: iCaRL's prediction, the nearest mean of exemplars;
- ``replay ncm`` (diagnostic): NCM over a herded exemplar memory of the *replay* network, chosen
  after training, to tell what the classifier brings from what iCaRL's loss brings.

The docs' table::

    python benchmarks/icarl_fashion_mnist.py --seeds 0 1 2 --epochs 1 --output runs/icarl
    python benchmarks/icarl_fashion_mnist.py --seeds 0 1 2 --epochs 5 --output runs/icarl-5ep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared protocol, run as a script

from exemplar_protocol import Tasks, accuracy, argument_parser, evaluated, run, split_tasks, trained  # noqa: E402

from neurenix.continual import ExperienceReplay  # noqa: E402
from neurenix.continual.exemplars import (  # noqa: E402
    FeatureExtractor,
    NearestMeanClassifier,
    select_exemplars,
)
from neurenix.continual.icarl import ICaRL  # noqa: E402
from neurenix.continual.memory import ExemplarMemory  # noqa: E402


def herded_ncm(model: nn.Sequential, trains: Tasks, memory_size: int, seed: int) -> NearestMeanClassifier:
    """NCM over exemplars herded task by task from a finished network (the replay diagnostic)."""
    memory = ExemplarMemory(memory_size, torch.device("cpu"), seed)
    features = FeatureExtractor(model, model[0])
    for task_id, (x, y) in enumerate(trains):
        select_exemplars(memory, features, (x, y), task_id, "herding")
    classifier = NearestMeanClassifier(model, features, memory)
    classifier.update_means()
    return classifier


def run_seed(seed: int, options: argparse.Namespace) -> dict[str, Any]:
    trains, tests = split_tasks(seed, options.data_root)
    settings = (options.epochs, options.batch_size, options.lr, seed)
    rows: dict[str, list[float]] = {}
    times: dict[str, float] = {}

    model, _, times["finetune"] = trained(lambda model: None, trains, settings)
    rows["finetune"] = accuracy(evaluated(model), tests)

    model, _, times["replay"] = trained(
        lambda model: ExperienceReplay(model, memory_size=options.memory, replay_ratio=options.replay_ratio, seed=seed), trains, settings
    )
    rows["replay"] = accuracy(evaluated(model), tests)
    rows["replay ncm"] = accuracy(evaluated(herded_ncm(model, trains, options.memory, seed), model), tests)

    model, icarl, times["icarl"] = trained(
        lambda model: ICaRL(model, memory_size=options.memory, feature_extractor=model[0], replay_ratio=options.replay_ratio, seed=seed),
        trains,
        settings,
    )
    rows["icarl head"] = accuracy(evaluated(model), tests)
    rows["icarl ncm"] = accuracy(evaluated(icarl.classifier, model), tests)
    return {"accuracy_per_task": rows, "wall_time_s": times}


def main(arguments: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__.split("\n\n")[0], output="runs/icarl")
    return run(parser.parse_args(arguments), run_seed)


if __name__ == "__main__":
    main()
